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
from maelab.interop.formats import (SAFETENSORS, SIZE_KEY, check_suffix, check_weights_file, load_torch, objective_of, read_record,
                                    size_record)
from maelab.io import atomic_path, read_weights
from maelab.models.checks import pair
from maelab.models.mae import MaskedAutoencoder, as_mae, keeps_rng
from maelab.models.pos_embed import resize_pos_embed, sincos_grid, structure_grid
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


def read_official(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, size record or None) of an official-layout ``.pth`` (``{"model": state_dict}`` or a
    bare state dict) or the same weights as safetensors, read on the CPU, judged by content. A pickle
    that needs code to load (anything ``torch.load(weights_only=True)`` refuses) is refused by name."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MaelabError(f"{path} is a folder; expected a checkpoint file (an official MAE .pth such as "
                          f"mae_pretrain_vit_base.pth, or its safetensors)")
    if not os.path.isfile(path):
        raise MaelabError(f"checkpoint not found: {path}")
    if check_weights_file(path) == SAFETENSORS:  # judged by content: the same weights saved as safetensors
        return unwrap_state_dict(read_weights(path)[0], source=path), read_record(path)
    obj = load_torch(path)
    record = read_record(path, obj)
    trained = objective_of(obj.get("args", {})) if isinstance(obj, Mapping) else {}  # the official script's args
    return unwrap_state_dict(obj, source=path), ({**trained, **(record or {})} if trained else record)


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official MAE checkpoint (see :func:`read_official`)."""
    return read_official(path)[0]


def classify_official(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"full"`` (encoder + decoder), ``"finetuned"`` (encoder + ``head``/``fc_norm``) or ``"encoder"``."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" not in keys or not any(k.startswith("blocks.") for k in keys):
        raise MaelabError(
            f"not an MAE/ViT checkpoint: no patch_embed.proj.weight or blocks.* (keys start: {few(keys)})"
        )
    other = next((k for k in ("dist_token", "reg_token", "head_dist.weight") if k in keys), None)
    if other is not None:  # their position tables hold extra rows: the grid advice that would follow misleads
        raise MaelabError(f"not an MAE/ViT encoder maelab reads: it holds {other} (a ViT with distillation or "
                          f"register tokens, e.g. DeiT or timm's reg_tokens); maelab's encoder has one cls token")
    if "cls_token" not in keys:
        raise MaelabError("not an MAE/ViT encoder maelab reads: it has no cls_token (a ViT without a class "
                          "token, e.g. timm's class_token=False); maelab's encoder has one")
    if any(k.startswith(DECODER_PREFIXES) for k in keys):
        return "full"
    if any(k.startswith(HEAD_PREFIXES) for k in keys):
        return "finetuned"
    return "encoder"


def _depth(keys, prefix: str) -> int:
    """The number of blocks under ``prefix``; a last block with at most half the tensors of the first (a
    stray tensor of one more block, or a block cut off) is named, as it would read as a deeper model."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    parts: dict[int, list[str]] = {}
    for k in keys:
        if m := pat.match(k):
            parts.setdefault(int(m.group(1)), []).append(m.group(2))
    idx = set(parts)
    if idx and idx != set(range(max(idx) + 1)):
        raise MaelabError(f"checkpoint has gaps in {prefix}N: found indices {sorted(idx)}")
    last = max(idx, default=0)
    if last > 0 and 2 * len(parts[last]) <= len(parts[0]):
        raise MaelabError(f"checkpoint's {prefix}{last} holds {len(parts[last])} of the {len(parts[0])} tensors of "
                          f"{prefix}0 ({', '.join(sorted(parts[last])[:4])}): a stray tensor or a block cut off, which "
                          f"would read as a model of depth {last + 1}")
    return len(idx)


def _majority(sizes: dict[str, int], what: str) -> int:
    """The size most tensors agree on; the tensors that disagree are damaged and are named."""
    if not sizes:
        raise MaelabError(f"checkpoint has no tensor that gives the {what}")
    counts: dict[int, int] = {}
    for v in sizes.values():
        counts[v] = counts.get(v, 0) + 1
    value = max(counts, key=lambda v: (counts[v], v))
    odd = sorted(k for k, v in sizes.items() if v != value)
    if odd and counts[value] == 1:
        raise MaelabError(f"checkpoint tensors disagree on the {what}: " + ", ".join(f"{k} says {sizes[k]}" for k in
                                                                                  sorted(sizes)[:4]))
    if odd:
        raise MaelabError(f"checkpoint is damaged: {', '.join(f'{k} {sizes[k]}' for k in odd[:4])} against {value} "
                          f"in the {counts[value]} other tensors giving the {what} (a truncated or edited tensor)")
    return value


def _widths(sd: Mapping[str, torch.Tensor], prefix: str, anchors: dict[str, int]) -> tuple[int, int]:
    """(width, MLP hidden size) of the blocks under ``prefix``, from every tensor that holds them."""
    width = {k: int(sd[k].shape[dim]) for k, dim in anchors.items() if k in sd and sd[k].ndim > dim}
    hidden = {}
    pat = re.compile(re.escape(prefix) + r"\d+\.(norm1|norm2|attn\.proj|mlp\.fc2)\.(weight|bias)$")
    for k, v in sd.items():
        if pat.match(k) and v.ndim >= 1:
            width[k] = int(v.shape[0])
        m = re.match(re.escape(prefix) + r"\d+\.mlp\.(fc1\.weight|fc1\.bias|fc2\.weight)$", k)
        if m and v.ndim >= 1:
            hidden[k] = int(v.shape[1] if m.group(1) == "fc2.weight" and v.ndim == 2 else v.shape[0])
    return _majority(width, "width"), _majority(hidden, "MLP hidden size")


def patch_grid(sd: Mapping[str, torch.Tensor], patch_size: int, img_size: int | tuple[int, int] | None = None,
               record: dict[str, Any] | None = None, notes: list[str] | None = None) -> tuple[int, int]:
    """The image size (height, width) the checkpoint's ``pos_embed`` was made for, never guessed from a count:
    the size recorded in the file (maelab writes it into official and timm exports); else ``img_size`` when
    its patch grid has exactly the table's rows; else the grid the table itself proves (the fixed sin-cos
    table of an MAE, or the 2-D structure of a learned one). Anything else is a one-line error."""
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[1] < 2:
        raise MaelabError("checkpoint has no usable pos_embed (1, 1 + patches, width)")
    rows = int(pos.shape[1]) - 1
    if record is not None and "img_size" in record:
        h, w = record["img_size"]
        if record["patch_size"] != patch_size or h % patch_size or w % patch_size:
            raise MaelabError(f"the file records patch {record['patch_size']} and {h}x{w} px, but its patch embedding "
                              f"has patch {patch_size}: the file is damaged")
        if (h // patch_size) * (w // patch_size) != rows:
            raise MaelabError(f"pos_embed has {rows} patch rows, but the file records a {h}x{w} model "
                              f"({(h // patch_size) * (w // patch_size)} patches of {patch_size} px): the tensor is "
                              f"truncated or the file damaged")
        return h, w
    if img_size is not None:
        h, w = pair(img_size)
        if h % patch_size == 0 and w % patch_size == 0 and (h // patch_size) * (w // patch_size) == rows:
            return h, w
    table = pos[0, 1:].detach()
    found = sincos_grid(table)
    how = "the file's sin-cos position table"
    if isinstance(found, str):
        raise MaelabError(f"pos_embed is damaged: {found}")
    if found is None:
        found, how = structure_grid(table), "the 2-D structure of the file's learned position table"
    if found is None:
        given = "" if img_size is None else (f"; --img-size {pair(img_size)[0]} {pair(img_size)[1]} gives "
                                              f"{(pair(img_size)[0] // patch_size) * (pair(img_size)[1] // patch_size)}")
        raise MaelabError(f"the file does not record its image size, and its pos_embed ({rows} patches of "
                          f"{patch_size} px) does not show its grid{given}: pass --img-size HEIGHT WIDTH whose "
                          f"patch grid has {rows} patches")
    if notes is not None:
        notes.append(f"patch grid {found[0]}x{found[1]} read from {how} (the file does not record its size)")
    return found[0] * patch_size, found[1] * patch_size


def infer_mae_architecture(
    state_dict: Mapping[str, torch.Tensor],
    img_size: int | tuple[int, int] | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    record: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Constructor kwargs for :class:`~maelab.models.mae.MaskedAutoencoder` that fit ``state_dict``.

    Widths, depths, patch size, channels and the MLP ratio are read from shapes, each from every tensor
    that holds it (one damaged tensor is named, not blamed on the others); the image size by
    :func:`patch_grid` (``record``: the file's own size record; ``img_size``: a size to try). Head counts
    are not in the shapes: given, else the record's (files maelab wrote), else the paper's table (or
    64-dim heads; decoder 32-dim). Decoder kwargs are returned only when the checkpoint has a decoder.
    """
    sd = state_dict
    recorded = record or {}
    for name, given in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads)):
        if given is not None and recorded.get(name) not in (None, given):
            raise MaelabError(f"this file records {recorded[name]} {'decoder ' if 'decoder' in name else ''}attention "
                              f"heads (its {name}), not {given}: leave the head count out")
    num_heads = num_heads or recorded.get("num_heads")
    decoder_num_heads = decoder_num_heads or recorded.get("decoder_num_heads")
    classify_official(sd)
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise MaelabError(f"patch_embed.proj.weight must be (D, C, p, p), got {tuple(w.shape)}")
    in_chans, patch_size = int(w.shape[1]), int(w.shape[2])
    depth = _depth(sd, "blocks.")
    if "blocks.0.mlp.fc1.weight" not in sd:
        raise MaelabError("checkpoint has no blocks.0.mlp.fc1.weight")
    embed_dim, hidden = _widths(sd, "blocks.", {"patch_embed.proj.weight": 0, "cls_token": 2, "pos_embed": 2,
                                                "norm.weight": 0, "fc_norm.weight": 0})
    kwargs: dict[str, Any] = dict(
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or _ENCODER_HEADS.get(embed_dim, max(1, embed_dim // 64)),
        mlp_ratio=hidden / embed_dim,
    )
    kwargs["img_size"] = patch_grid(sd, patch_size, img_size, record, notes)
    if record is not None and record.get("norm_eps", 1e-6) != 1e-6:
        kwargs["norm_eps"] = record["norm_eps"]
    kwargs.update(objective_of(record or {}))
    if "decoder_embed.weight" in sd:
        if not any(k.startswith("decoder_blocks.") for k in sd):
            raise MaelabError("checkpoint has decoder_embed.weight but no decoder_blocks: a decoder cut off, or a stray "
                              "tensor in an encoder checkpoint (remove it to load the encoder alone)")
        dec_dim, dec_hidden = _widths(sd, "decoder_blocks.", {"decoder_embed.weight": 0, "mask_token": 2,
                                                              "decoder_pos_embed": 2, "decoder_norm.weight": 0})
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
        if dec_hidden / dec_dim != kwargs["mlp_ratio"]:
            raise MaelabError(
                f"encoder MLP ratio {kwargs['mlp_ratio']} differs from decoder MLP ratio "
                f"{dec_hidden / dec_dim}; maelab uses one ratio for both"
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


@keeps_rng
def resize_mae(model: MaskedAutoencoder, img_size: int | tuple[int, int]) -> MaskedAutoencoder:
    """The same MAE for another input size (e.g. reconstructions at 384 from a 224 checkpoint): every weight
    is kept; the position tables become the new grid's sin-cos tables when they are the fixed sin-cos
    tables of the old grid (exact, as the model would have been built at that size), else they are
    resized bicubically."""
    size = pair(img_size)
    if tuple(size) == tuple(model.img_size):
        return model
    resized = MaskedAutoencoder(**dict(model.init_kwargs, img_size=list(size)))
    sd, own = model.state_dict(), resized.state_dict()
    for table in ("pos_embed", "decoder_pos_embed"):
        fixed = sincos_grid(sd[table][0, 1:].detach().cpu()) == tuple(model.grid)
        sd[table] = own[table] if fixed else resize_pos_embed(sd[table], model.grid, resized.grid)
    resized.load_state_dict(sd)
    return resized.to(next(model.parameters()).device).train(model.training)


@keeps_rng
def mae_from_official(path: str | os.PathLike, **overrides: Any) -> torch.nn.Module:
    """Build a :class:`MaskedAutoencoder` shaped like the checkpoint at ``path`` and load it.

    ``overrides`` go to the constructor (e.g. ``num_heads=``, ``norm_pix_loss=True``, decoder sizes for
    encoder-only checkpoints, whose decoder keeps its fresh initialisation). ``img_size`` other than the
    checkpoint's gives the resized model (:func:`resize_mae`)."""
    sd, record = read_official(path)
    img_size = overrides.pop("img_size", None)
    kwargs = infer_mae_architecture(sd, img_size=img_size, num_heads=overrides.get("num_heads"),
                                    decoder_num_heads=overrides.get("decoder_num_heads"), record=record)
    kwargs.update(overrides)
    model = MaskedAutoencoder(**kwargs)
    load_into_mae(model, sd)
    return model if img_size is None else resize_mae(model, img_size)


def export_official(model: torch.nn.Module, path: str | os.PathLike, include_decoder: bool = True) -> str:
    """Write ``{"model": state_dict}`` in the official layout (encoder only when ``include_decoder`` is
    False, like ``mae_pretrain_*.pth``), plus a ``maelab_size`` entry (image size, patch size, LayerNorm
    eps, head counts, and the objective: ``norm_pix_loss``, ``mask_ratio``) that the official code ignores and
    maelab reads back. Written atomically. Returns the path."""
    model = as_mae(model, "export_official")
    sd = model.state_dict()
    if not include_decoder:
        sd = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    heads = {k: v for k, v in model.init_kwargs.items()
             if k == "num_heads" or (include_decoder and k == "decoder_num_heads")}
    record = size_record(model.img_size, model.patch_size, getattr(model, "norm_eps", 1e-6),
                         {"norm_pix_loss": model.norm_pix_loss, "mask_ratio": model.mask_ratio}, heads)
    return save_official(sd, path, record)


def save_official(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                  record: dict[str, Any] | None) -> str:
    """``torch.save({"model": state_dict, "maelab_size": record})`` atomically (never a half-written file)."""
    check_suffix(path, "official")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj: dict[str, Any] = {"model": dict(state_dict)}
    if record is not None:
        obj[SIZE_KEY] = record
    with atomic_path(path, scratch_folder=True) as tmp:
        torch.save(obj, tmp)
    return path
