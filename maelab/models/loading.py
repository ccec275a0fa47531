"""Build a model from anything a user may point at: a run folder, a checkpoint folder, a maelab
safetensors file (self-describing: the constructor arguments are in its header), or an official
MAE ``.pth``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maelab.errors import MaelabError
from maelab.models.mae import MaskedAutoencoder
from maelab.train import checkpoint as ckpt


def model_meta(preset: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a weights file records about its model (JSON in the safetensors header)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return {"arch": "mae", "preset": preset, "kwargs": clean}


def _is_torch_file(path: Path) -> bool:
    """torch.save output (zip or legacy pickle), whatever the file is called."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def save_mae(model: MaskedAutoencoder, path: str | Path, preset: str | None = None) -> Path:
    """A self-describing maelab weights file (safetensors + constructor arguments in the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(path, model.state_dict(), model_meta(preset, model.init_kwargs))
    return path


def load_mae(path: str | Path, device: str | torch.device = "cpu") -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """(model in eval mode, its metadata) from a run folder, checkpoint folder or weights file."""
    p = Path(path).expanduser()
    if p.is_file() and _is_torch_file(p):
        from maelab.interop.official import mae_from_official

        model = mae_from_official(p)
        return model.to(device).eval(), {"arch": "mae", "preset": None, "source": "official"}
    if p.is_dir() and (p / "config.json").is_file():
        from maelab.interop.huggingface import load_hf_pretrained_dir

        model = load_hf_pretrained_dir(p)
        return model.to(device).eval(), {"arch": "mae", "preset": None, "source": "huggingface"}
    weights_path = ckpt.resolve_weights_path(p)
    weights, meta = ckpt.read_weights(weights_path)
    if meta.get("arch") != "mae" or "kwargs" not in meta:
        raise MaelabError(f"{weights_path} is not a maelab MAE checkpoint (no model description in its header); "
                          f"use `maelab convert` for foreign weights")
    kwargs = dict(meta["kwargs"])
    model = MaskedAutoencoder(**kwargs)
    ckpt.check_state_dict(model, weights, str(weights_path))
    model.load_state_dict(weights)
    return model.to(device).eval(), meta
