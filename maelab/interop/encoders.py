"""Encoder weights from anything a user may point at, for every downstream command.

:func:`read_encoder` accepts a maelab run / checkpoint folder / ``.safetensors`` (pre-training or
fine-tuning), an official MAE ``.pth``, a timm checkpoint, or a Hugging Face ViTMAE folder, and returns
:class:`~maelab.models.vit.EncoderWeights`: the weights under timm names plus the architecture they
need. :func:`resolve_encoder` adds what the commands share: ``--init none`` (a random encoder, the
baseline), ``--model`` checked against the checkpoint, ``--img-size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from maelab.errors import MaelabError, SameOnEveryRank
from maelab.interop.formats import TORCH, check_weights_file, maelab_file, read_record
from maelab.interop.huggingface import load_hf_pretrained_dir
from maelab.interop.mae_weights import check_num_heads, load_mae, probed_encoder
from maelab.models.mae import keeps_rng
from maelab.interop.official import classify_official, infer_mae_architecture, read_official
from maelab.io import read_weights
from maelab.models.checks import pair
from maelab.models.presets import PRESETS, preset_kwargs
from maelab.models.state_dicts import DECODER_PREFIXES, ENCODER_PREFIXES
from maelab.models.vit import EncoderWeights, describe, pooled_norm, vit_arch, vit_meta
from maelab.train.checkpoint import resolve_weights_path

DROPPED_NOTE = "ignored"  # the note that names what reading an encoder left out of a file


def _from_mae_model(model: nn.Module, source: str, path: str, preset: str | None) -> EncoderWeights:
    sd = {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}
    arch = dict(img_size=tuple(model.img_size), patch_size=int(model.patch_size), in_chans=int(model.in_chans),
                embed_dim=int(model.embed_dim), depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads),
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim, norm_eps=float(model.norm_eps))
    return EncoderWeights(sd, arch, source, path, preset)


def _from_vit_state_dict(sd: dict[str, torch.Tensor], source: str, path: str,
                         arch: dict[str, Any] | None = None, num_heads: int | None = None,
                         record: dict[str, Any] | None = None, img_size: tuple[int, int] | None = None) -> EncoderWeights:
    """A timm / official state dict (encoder, full MAE or classifier) -> encoder weights."""
    notes = []
    dropped = sorted(k for k in sd if k.startswith(DECODER_PREFIXES) or k.startswith("head."))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    if dropped:
        notes.append(f"{DROPPED_NOTE} {len(dropped)} decoder/head tensor(s)")
    if pooled_norm(sd):  # timm's / the official classifier's global-pool layout: fc_norm after pooling
        notes.append("global-pool layout: fc_norm normalises the pooled features (as its classifier did)")
    if arch is None:
        kwargs = infer_mae_architecture(sd, img_size=img_size, num_heads=num_heads, record=record, notes=notes)
        arch = vit_arch(kwargs)
        if num_heads is None and "num_heads" not in (record or {}):
            notes.append(f"{arch['num_heads']} attention heads assumed (not stored in the file; set --num-heads)")
    extra = sorted(k for k in sd if not k.startswith(ENCODER_PREFIXES) and not k.startswith("fc_norm."))
    if extra:
        shown = ", ".join(extra[:3]) + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
        raise MaelabError(f"{path} has weights that are not part of a ViT encoder: {shown}")
    return EncoderWeights(sd, arch, source, path, None, notes)


@keeps_rng
def read_encoder(path: str | Path, num_heads: int | None = None,
                 img_size: tuple[int, int] | None = None) -> EncoderWeights:
    """Encoder weights from a maelab run / checkpoint folder / ``.safetensors`` (pre-training or
    fine-tuning), an official MAE ``.pth``, a timm checkpoint (``.safetensors`` / ``.pth`` / ``.bin``),
    or a Hugging Face ViTMAE folder (``config.json`` + weights).

    Official and timm files do not record the number of attention heads: ``num_heads`` gives it, else
    the paper's table decides (width 192: 3, 384: 6, 768: 12, 1024 / 1280: 16; otherwise 64-dim heads).
    Self-describing sources must agree with ``num_heads`` when it is given. Official and timm files
    written elsewhere do not record their image size either: ``img_size`` (``--img-size``) is taken as
    theirs when its patch grid has exactly the position table's rows, else the table must show its grid
    (:func:`~maelab.interop.official.patch_grid`)."""
    check_num_heads(num_heads)
    enc = _read_encoder(Path(path).expanduser(), num_heads, img_size)
    if num_heads is not None and int(enc.arch["num_heads"]) != int(num_heads):
        raise MaelabError(f"{enc.path} records {enc.arch['num_heads']} attention heads; --num-heads {num_heads} "
                          f"contradicts it")
    if enc.arch["embed_dim"] % enc.arch["num_heads"]:
        raise MaelabError(f"width {enc.arch['embed_dim']} is not divisible by {enc.arch['num_heads']} heads")
    return enc


def _read_encoder(p: Path, num_heads: int | None, img_size: tuple[int, int] | None) -> EncoderWeights:
    if not p.exists():
        raise MaelabError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        return _from_mae_model(load_hf_pretrained_dir(p), "huggingface", str(p), None)
    if p.is_file() and check_weights_file(p) == TORCH:  # by content, whatever the file is called
        sd, record = read_official(p)
        classify_official(sd)
        return _from_vit_state_dict(sd, "official", str(p), num_heads=num_heads, record=record, img_size=img_size)
    weights_path = resolve_weights_path(p)
    weights, meta = read_weights(weights_path)
    arch_name = meta.get("arch")
    if arch_name == "mae":
        model, meta = load_mae(weights_path)
        return _from_mae_model(model, "maelab", str(weights_path), meta.get("preset"))
    if arch_name == "vit":
        return _from_vit_state_dict(weights, "maelab-finetune", str(weights_path), vit_arch(meta["vit"]))
    if arch_name == "linprobe":
        raise MaelabError(f"{weights_path} is a linear-probe head; point at the encoder it probed "
                          f"({probed_encoder(meta)})")
    if arch_name is not None:
        raise MaelabError(f"{weights_path} holds a {arch_name!r} model, not a ViT encoder")
    return _from_vit_state_dict(weights, "timm", str(weights_path), num_heads=num_heads,
                                record=read_record(weights_path), img_size=img_size)


def read_classifier(path: str | Path, num_heads: int | None = None,
                    img_size: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state dict, maelab ``vit`` metadata) when ``path`` holds a ViT classifier -- a maelab fine-tune, or an
    official / timm fine-tuned checkpoint (``head.*``; ``fc_norm`` without ``norm`` for the global-pool
    recipe) -- else None. The metadata is what a maelab fine-tune records, so the classifier can be
    written as one, or as timm weights. ``img_size``: the size of a file that records none and whose
    position table does not show its grid."""
    p = Path(path).expanduser()
    found = maelab_file(p) if not (p.is_file() and check_weights_file(p) == TORCH) else None
    if found is not None:
        header = found[1]
        if header.get("arch") == "vit":
            return read_weights(found[0])
        if header:  # a maelab MAE / linear probe: not a classifier of this kind
            return None
        sd, record = read_weights(found[0])[0], read_record(found[0])
    elif p.is_file():
        sd, record = read_official(p)
    else:
        return None
    if "head.weight" not in sd or any(k.startswith(DECODER_PREFIXES) for k in sd):
        return None
    enc = _from_vit_state_dict(sd, "official", str(p), num_heads=num_heads, record=record, img_size=img_size)
    notes = [n for n in enc.notes if not n.startswith(DROPPED_NOTE)]  # the classifier keeps its head
    meta = vit_meta(enc.arch, tuple(enc.arch["img_size"]), num_classes=int(sd["head.weight"].shape[0]),
                    global_pool="avg" if pooled_norm(sd) else "token", init=str(p), notes=notes)
    return sd, meta


def check_arch(enc: EncoderWeights, preset: str | None) -> None:
    """When the user names a preset next to a checkpoint, the two must describe the same encoder."""
    if not preset:
        return
    want = vit_arch(preset_kwargs(preset))
    if not same_encoder(want, enc.arch):
        fits = [name for name in PRESETS if same_encoder(vit_arch(preset_kwargs(name)), enc.arch)]
        raise MaelabError(f"checkpoint {enc.path} holds a {describe(enc.arch)}; --model {preset} is a "
                          f"{describe(want)} (leave --model out to use the checkpoint's"
                          + (f"; over a --config preset's model, --model {fits[0]} fits it" if fits else "") + ")")


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("patch_size", "embed_dim", "depth", "num_heads", "in_chans")
    return all(int(a[k]) == int(b[k]) for k in keys) and float(a["mlp_ratio"]) == float(b["mlp_ratio"])


def encoder_for(init: str, preset: str | None, num_heads: int | None = None,
                what: str = "--init", img_size: tuple[int, int] | None = None) -> EncoderWeights | None:
    """``none`` -> None (random init: needs a preset); otherwise the checkpoint, checked against
    ``preset`` when one is given."""
    if not init:
        raise MaelabError(f"{what} is required: a checkpoint (maelab run, official .pth, timm, Hugging Face "
                          f"folder) or `none` for a randomly initialised encoder")
    if init.lower() == "none":
        if not preset:
            raise SameOnEveryRank(f"{what} none needs --model (a preset, see `maelab models`)")
        return None
    enc = read_encoder(init, num_heads, img_size)
    check_arch(enc, preset)
    return enc


def arch_for(enc: EncoderWeights | None, preset: str | None, num_heads: int | None = None) -> dict[str, Any]:
    """The checkpoint's architecture, or the preset's for a random init (``num_heads`` overrides it)."""
    if enc is not None:
        return dict(enc.arch)
    check_num_heads(num_heads)
    arch = vit_arch(preset_kwargs(preset))
    if num_heads:
        if arch["embed_dim"] % num_heads:
            raise MaelabError(f"width {arch['embed_dim']} is not divisible by --num-heads {num_heads}")
        arch["num_heads"] = num_heads
    return arch


def img_size_arg(img_size: list[int] | None) -> tuple[int, int] | None:
    """``--img-size``: one number (square) or two (height width), or None for the checkpoint's."""
    if not img_size:
        return None
    if len(img_size) not in (1, 2) or min(img_size) < 1:
        raise MaelabError(f"--img-size takes one side or height and width, positive, got "
                          f"{' '.join(map(str, img_size))}")
    return pair(img_size)


def resolve_encoder(model_cfg) -> tuple[EncoderWeights | None, dict[str, Any], tuple[int, int]]:
    """(encoder weights or None, architecture, input size) for an ``EncoderConfig`` (``init``,
    ``model``, ``num_heads``, ``img_size``): what every downstream command starts from."""
    size = img_size_arg(model_cfg.img_size)
    enc = encoder_for(model_cfg.init, model_cfg.model, model_cfg.num_heads, img_size=size)
    arch = arch_for(enc, model_cfg.model, model_cfg.num_heads)
    if int(arch.get("in_chans", 3)) != 3:
        raise MaelabError(f"the encoder of {model_cfg.init} takes {arch['in_chans']}-channel images; maelab reads every "
                          f"image as 3-channel RGB (the pre-training, evaluation and transfer commands alike)")
    return enc, arch, size or tuple(arch["img_size"])
