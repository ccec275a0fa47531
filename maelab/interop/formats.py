"""What a weights file is, judged by its first bytes and never by its name.

Every reader of foreign or maelab weights asks here first, so a text file, a picture or a truncated
download named ``model.pth`` gets one line saying what it is instead of a pickle traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from maelab.errors import MaelabError
from maelab.io import SAFETENSORS, TORCH, read_header, read_metadata, weights_format  # noqa: F401 - re-exported
from maelab.train.checkpoint import resolve_weights_path

SIZE_KEY = "maelab_size"  # where official / timm files written by maelab record what their format cannot say
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def check_suffix(path: str | os.PathLike, writes: str) -> None:
    """Refuse to write one format under the other's suffix (``writes``: "safetensors" or "official", a
    torch.save pickle): timm, torch.load and safetensors users pick the reader by the suffix, so safetensors
    bytes named ``.pth`` failed in their tools, far from here."""
    suffix = Path(path).suffix.lower()
    if writes == "safetensors" and suffix in TORCH_SUFFIXES:
        raise MaelabError(f"{path}: this writes safetensors, which torch.load and timm do not read under {suffix}; "
                          f"name it {Path(path).stem}.safetensors")
    if writes == "official" and suffix == ".safetensors":
        raise MaelabError(f"{path}: the official layout is a torch.save checkpoint, not safetensors; name it "
                          f"{Path(path).stem}.pth")


def check_weights_file(path: str | Path) -> str:
    """``"torch"`` or ``"safetensors"`` (see :func:`weights_format`); any other file is a one-line error."""
    fmt = weights_format(path)
    if fmt not in (TORCH, SAFETENSORS):
        raise MaelabError(f"cannot read weights {path}: it is {fmt}, not a PyTorch (.pth / .pt / .bin) or "
                          f"safetensors checkpoint")
    return fmt


def maelab_file(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(weights file, its maelab header) when ``path`` is a maelab run / checkpoint folder or a
    safetensors file; None for an official / timm ``.pth`` or a Hugging Face folder."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return None
    if p.is_file() and check_weights_file(p) != SAFETENSORS:
        return None
    weights_path = resolve_weights_path(p)
    return weights_path, read_header(weights_path)


def size_record(img_size: tuple[int, int] | list[int], patch_size: int, norm_eps: float = 1e-6,
                objective: Mapping[str, Any] | None = None, heads: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an official / timm weights file cannot say by its shapes alone: the image size (so the
    patch grid is never guessed from a count), the patch size, the LayerNorm eps and the attention head
    counts (``heads``: ``num_heads``, ``decoder_num_heads``; a round trip would otherwise take the paper's
    table, silently another model where it was trained with others); for an MAE also its objective
    (``norm_pix_loss``, ``mask_ratio``), so a round trip keeps the loss it trains with."""
    h, w = (int(s) for s in img_size)
    record = {"img_size": [h, w], "patch_size": int(patch_size), "norm_eps": float(norm_eps)}
    return {**record, **heads_of(heads or {}), **objective_of(objective or {})}


def heads_of(settings: Mapping[str, Any]) -> dict[str, int]:
    """``num_heads`` / ``decoder_num_heads`` of a record or of model constructor arguments (whole numbers >= 1)."""
    return {k: int(v) for k in ("num_heads", "decoder_num_heads")
            if isinstance(v := settings.get(k), int) and not isinstance(v, bool) and v >= 1}


def objective_of(settings: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """``norm_pix_loss`` / ``mask_ratio`` from a record, or from the ``args`` the official training script
    saves in its checkpoints (an argparse.Namespace); values of another kind are ignored."""
    settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    if not isinstance(settings, Mapping):
        return {}
    found: dict[str, Any] = {}
    if isinstance(settings.get("norm_pix_loss"), bool):
        found["norm_pix_loss"] = settings["norm_pix_loss"]
    ratio = settings.get("mask_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1:
        found["mask_ratio"] = float(ratio)
    return found


def record_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The record as safetensors header metadata (strings only)."""
    return {SIZE_KEY: json.dumps(record)}


def read_record(path: str | Path, obj: Any = None) -> dict[str, Any] | None:
    """The size record of a weights file: the ``maelab_size`` entry of a ``torch.save`` dict (``obj``, already
    loaded) or of a safetensors header; None for files written elsewhere (they cannot say)."""
    if obj is not None:
        raw = obj.get(SIZE_KEY) if isinstance(obj, Mapping) else None
    else:
        raw = read_metadata(path).get(SIZE_KEY)
        try:
            raw = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            raise MaelabError(f"cannot read weights {path}: its {SIZE_KEY} entry is not valid JSON") from None
    if raw is None:
        return None
    try:
        h, w = (int(s) for s in raw["img_size"])
        return size_record((h, w), int(raw["patch_size"]), float(raw.get("norm_eps", 1e-6)), raw, raw)
    except (KeyError, TypeError, ValueError):
        raise MaelabError(f"cannot read weights {path}: its {SIZE_KEY} entry {raw!r} is not "
                          f"{{img_size: [h, w], patch_size: p}}") from None


_BLOCKED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
# What training scripts put beside the weights and is safe to rebuild: the official main_pretrain.py saves
# its argparse.Namespace as "args".
_SAFE_GLOBALS = [argparse.Namespace]


def load_torch(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with maelab's own one-line errors: a pickle that needs
    code to load is refused naming the global it needs (maelab never runs code from a checkpoint), and
    torch's warnings are not printed before it."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_GLOBALS):
            warnings.simplefilter("ignore")  # a file object: torch.load would otherwise pick its reader by the name
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        text = str(exc).strip()
        blocked = _BLOCKED.search(text)
        if blocked:
            raise MaelabError(f"refusing {path}: it is a pickle that needs {blocked.group(1)} to load, and maelab never "
                              f"runs code from a checkpoint; re-save only its tensors (a state dict, or "
                              f"{{'model': state_dict}}) with torch.save or safetensors") from None
        msg = text.splitlines()[0] if text else type(exc).__name__
        raise MaelabError(f"cannot read {path} as a weights-only PyTorch checkpoint: {msg}") from None
