"""Official MAE ``.pth`` checkpoints (facebookresearch/mae layout) <-> maelab.

maelab already uses the official parameter names, so this module is about *recognising* a checkpoint
(encoder-only ``mae_pretrain_*``, full ``*_full`` / ``mae_visualize_*`` with the decoder, fine-tuned
``mae_finetuned_*`` with ``fc_norm.*`` / ``head.*``), inferring the architecture it was saved from, and
loading it strictly with one-line errors that name the offending keys. Files are always read with
``weights_only=True``: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from maelab.errors import MaelabError
from maelab.interop.formats import SAFETENSORS, check_weights_file
from maelab.io import read_weights
from maelab.models.mae import MaskedAutoencoder
from maelab.models.state_dicts import DECODER_PREFIXES, ENCODER_PREFIXES, HEAD_PREFIXES, few, state_dict_mismatch

# Heads per encoder width in the paper's model table (ViT-Ti/S/B/L/H). Widths outside the table
# fall back to 64-dim heads; the decoder to 32-dim heads (the reference decoder: 512 wide, 16 heads).
_ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS = {512: 16, 128: 4}

_MAX_NAMED = 4


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``{"model": sd}`` / ``{"state_dict": sd}`` / a bare state dict -> the state dict. A common
    ``module.`` prefix (DistributedDataParallel) is stripped."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("model", "state_dict"):
            if key in obj and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise MaelabError(f"{source} holds no state dict (expected {{'model': state_dict}} or a bare state dict)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official MAE ``.pth`` (``{"model": state_dict}`` or a bare state dict) on the CPU. The format
    is judged by content: a safetensors file is read as one, anything else is a one-line error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaelabError(f"checkpoint not found: {path}")
    if check_weights_file(path) == SAFETENSORS:  # judged by content: the same weights saved as safetensors
        return unwrap_state_dict(read_weights(path)[0], source=path)
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick its reader by the name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaelabError(f"cannot read {path} as a weights-only PyTorch checkpoint: {msg}") from None
    return unwrap_state_dict(obj, source=path)


def classify_official(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"full"`` (encoder + decoder), ``"finetuned"`` (encoder + ``head``/``fc_norm``) or ``"encoder"``."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" not in keys or not any(k.startswith("blocks.") for k in keys):
        raise MaelabError(
            f"not an MAE/ViT checkpoint: no patch_embed.proj.weight or blocks.* (keys start: {few(keys)})"
        )
    if any(k.startswith(DECODER_PREFIXES) for k in keys):
        return "full"
    if any(k.startswith(HEAD_PREFIXES) for k in keys):
        return "finetuned"
    return "encoder"


def _depth(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise MaelabError(f"checkpoint has gaps in {prefix}N: found indices {sorted(idx)}")
    return len(idx)


def infer_mae_architecture(
    state_dict: Mapping[str, torch.Tensor],
    img_size: int | tuple[int, int] | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> dict[str, Any]:
    """Constructor kwargs for :class:`~maelab.models.mae.MaskedAutoencoder` that fit ``state_dict``.

    Widths, depths, patch size, channels and the MLP ratio are read from shapes; the image size from
    the ``pos_embed`` grid (square grids only unless ``img_size`` is given). Head counts are not stored
    in a checkpoint: they come from the paper's table (or 64-dim heads; decoder 32-dim) unless given.
    Decoder kwargs are returned only when the checkpoint has a decoder.
    """
    sd = state_dict
    classify_official(sd)
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise MaelabError(f"patch_embed.proj.weight must be (D, C, p, p), got {tuple(w.shape)}")
    embed_dim, in_chans, patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = _depth(sd, "blocks.")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise MaelabError("checkpoint has no blocks.0.mlp.fc1.weight")
    kwargs: dict[str, Any] = dict(
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or _ENCODER_HEADS.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=fc1.shape[0] / embed_dim,
    )
    if img_size is None:
        if "pos_embed" not in sd:
            raise MaelabError("checkpoint has no pos_embed; pass img_size")
        length = int(sd["pos_embed"].shape[1]) - 1
        side = int(round(length**0.5))
        if side * side != length:
            raise MaelabError(f"pos_embed has {length} patches, not a square grid; pass img_size=(height, width)")
        img_size = side * patch_size
    kwargs["img_size"] = img_size
    if "decoder_embed.weight" in sd:
        dec_dim = int(sd["decoder_embed.weight"].shape[0])
        kwargs.update(
            decoder_embed_dim=dec_dim,
            decoder_depth=_depth(sd, "decoder_blocks."),
            decoder_num_heads=decoder_num_heads or _DECODER_HEADS.get(dec_dim, max(1, dec_dim // 32)),
        )
        pred = sd.get("decoder_pred.weight")
        if pred is not None and pred.shape[0] != patch_size**2 * in_chans:
            raise MaelabError(
                f"decoder_pred predicts {pred.shape[0]} values per patch, expected {patch_size**2 * in_chans}"
                f" for patch {patch_size} and {in_chans} channels"
            )
        dfc1 = sd.get("decoder_blocks.0.mlp.fc1.weight")
        if dfc1 is not None and dfc1.shape[0] / dec_dim != kwargs["mlp_ratio"]:
            raise MaelabError(
                f"encoder MLP ratio {kwargs['mlp_ratio']} differs from decoder MLP ratio "
                f"{dfc1.shape[0] / dec_dim}; maelab uses one ratio for both"
            )
    return kwargs


def _check_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    problem = state_dict_mismatch(dict(expected), dict(given), named=_MAX_NAMED)
    if problem:
        raise MaelabError(f"{what} does not fit the model: {problem}")


def load_into_mae(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict_encoder_only: bool = True,
) -> dict[str, Any]:
    """Load an official-layout state dict into a :class:`MaskedAutoencoder`, strictly.

    * ``full`` checkpoints must match every key and shape of the model.
    * ``encoder`` checkpoints load into the encoder only (decoder untouched). With
      ``strict_encoder_only=True`` (default) they must supply exactly the encoder keys; with ``False``
      missing encoder keys are allowed (e.g. a global-pool fine-tune without ``norm.*``) and listed in
      the result, but unexpected keys and shape mismatches are still errors.
    * ``finetuned`` checkpoints are treated as encoder checkpoints after dropping ``head.*`` and
      ``fc_norm.*`` (reported as ``ignored``).

    Returns ``{"kind", "missing", "ignored"}``. Raises :class:`MaelabError` naming the first few
    missing / unexpected keys and shape mismatches.
    """
    kind = classify_official(state_dict)
    model_sd = model.state_dict()
    sd = dict(state_dict)
    ignored: list[str] = []
    if kind == "full":
        _check_keys(model_sd, sd, "full MAE checkpoint")
        model.load_state_dict(sd, strict=True)
        return {"kind": kind, "missing": [], "ignored": []}
    if kind == "finetuned":
        ignored = sorted(k for k in sd if k.startswith(HEAD_PREFIXES))
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
    encoder_sd = {k: v for k, v in model_sd.items() if k.startswith(ENCODER_PREFIXES)}
    missing: list[str] = []
    if strict_encoder_only:
        _check_keys(encoder_sd, sd, f"{kind} checkpoint")
    else:
        missing = sorted(set(encoder_sd) - set(sd))
        _check_keys({k: v for k, v in encoder_sd.items() if k in sd}, sd, f"{kind} checkpoint")
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:  # cannot happen after the check; keep the guarantee explicit
        raise MaelabError(f"unexpected keys: {few(result.unexpected_keys)}")
    return {"kind": kind, "missing": missing, "ignored": ignored}


def mae_from_official(path: str | os.PathLike, **overrides: Any) -> torch.nn.Module:
    """Build a :class:`MaskedAutoencoder` shaped like the checkpoint at ``path`` and load it.

    ``overrides`` go to the constructor (e.g. ``num_heads=``, ``norm_pix_loss=True``, decoder sizes for
    encoder-only checkpoints, whose decoder keeps its fresh initialisation)."""
    sd = load_official_state_dict(path)
    kwargs = infer_mae_architecture(
        sd,
        img_size=overrides.pop("img_size", None),
        num_heads=overrides.get("num_heads"),
        decoder_num_heads=overrides.get("decoder_num_heads"),
    )
    kwargs.update(overrides)
    model = MaskedAutoencoder(**kwargs)
    load_into_mae(model, sd)
    return model


def export_official(model: torch.nn.Module, path: str | os.PathLike, include_decoder: bool = True) -> str:
    """Write ``{"model": state_dict}`` in the official layout (encoder only when ``include_decoder`` is
    False, like ``mae_pretrain_*.pth``). Returns the path."""
    sd = model.state_dict()
    if not include_decoder:
        sd = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    torch.save({"model": sd}, path)
    return path
