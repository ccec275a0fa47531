"""maelab: Masked Autoencoder (MAE) pre-training and evaluation for Vision Transformers.

The model API below is imported on first use (PEP 562), so that `maelab --help` and a mistyped
command answer at once instead of after loading torch and timm (~5 s on a small CPU).
"""

from importlib import import_module

from maelab.errors import MaelabError

__version__ = "0.1.0"
_MODEL_API = {"MaskedAutoencoder": "maelab.models.mae", "patchify": "maelab.models.mae",
              "random_masking": "maelab.models.mae", "unpatchify": "maelab.models.mae",
              "PRESETS": "maelab.models.presets", "create_model": "maelab.models.mae"}
__all__ = ["MaelabError", *_MODEL_API, "__version__"]


def __getattr__(name: str):
    if name not in _MODEL_API:
        raise AttributeError(f"module 'maelab' has no attribute {name!r}")
    value = getattr(import_module(_MODEL_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_API})
