"""The one door for weights from elsewhere: every file is recognised by content here, and read or
written here.

* :mod:`~maelab.interop.formats` -- what a file is (PyTorch pickle, safetensors, or something else);
* :mod:`~maelab.interop.mae_weights` -- an MAE from any source (:func:`load_mae`), maelab's own file;
* :mod:`~maelab.interop.encoders` -- encoder weights from any source for downstream commands;
* :mod:`~maelab.interop.official` -- the official MAE ``.pth`` release (same names as maelab);
* :mod:`~maelab.interop.timm_export` -- encoder (or a fine-tuned classifier) -> timm ``VisionTransformer``
  (export only: timm files have no decoder);
* :mod:`~maelab.interop.huggingface` -- ``transformers`` ViTMAE, 4.x and 5.x names (``transformers`` is
  imported only when a function needs it).
"""

from maelab.interop.encoders import read_encoder, resolve_encoder
from maelab.interop.formats import weights_format
from maelab.interop.huggingface import (
    detect_hf_naming,
    hf_config_from_mae,
    hf_model_from_mae,
    hf_to_mae_state_dict,
    load_hf_pretrained_dir,
    mae_kwargs_from_hf_config,
    mae_to_hf_state_dict,
    save_hf_pretrained,
)
from maelab.interop.mae_weights import load_mae, require_decoder, save_mae
from maelab.interop.official import (
    classify_official,
    export_official,
    infer_mae_architecture,
    load_into_mae,
    load_official_state_dict,
    mae_from_official,
)
from maelab.interop.timm_export import (
    create_timm_encoder,
    save_timm_checkpoint,
    save_timm_classifier,
    timm_kwargs,
    to_timm_state_dict,
)

__all__ = [
    "classify_official",
    "create_timm_encoder",
    "detect_hf_naming",
    "export_official",
    "hf_config_from_mae",
    "hf_model_from_mae",
    "hf_to_mae_state_dict",
    "infer_mae_architecture",
    "load_hf_pretrained_dir",
    "load_into_mae",
    "load_mae",
    "load_official_state_dict",
    "mae_from_official",
    "mae_kwargs_from_hf_config",
    "mae_to_hf_state_dict",
    "read_encoder",
    "require_decoder",
    "resolve_encoder",
    "save_mae",
    "save_hf_pretrained",
    "save_timm_checkpoint",
    "save_timm_classifier",
    "timm_kwargs",
    "to_timm_state_dict",
    "weights_format",
]
