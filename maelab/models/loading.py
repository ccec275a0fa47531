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


def model_meta(preset: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a weights file records about its model (JSON in the safetensors header)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return {"arch": "mae", "preset": preset, "kwargs": clean}


def load_mae(path: str | Path, device: str | torch.device = "cpu") -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """(model in eval mode, its metadata) from a run folder, checkpoint folder or weights file."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin"):
        from maelab.interop.official import load_official_mae

        model = load_official_mae(p)
        return model.to(device).eval(), {"arch": "mae", "preset": None, "source": "official"}
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
