"""maelab: Masked Autoencoder (MAE) pre-training and evaluation for Vision Transformers."""

from maelab.errors import MaelabError
from maelab.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from maelab.models.presets import PRESETS, create_model

__version__ = "0.1.0"
__all__ = [
    "MaelabError",
    "MaskedAutoencoder",
    "PRESETS",
    "create_model",
    "patchify",
    "random_masking",
    "unpatchify",
    "__version__",
]
