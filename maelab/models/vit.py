"""The encoder for downstream tasks: a timm ``VisionTransformer`` with the MAE encoder's weights.

The MAE encoder already uses timm's parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.*``, ``norm``), so downstream models are plain timm ViTs:

* ``global_pool="avg"`` (the fine-tuning recipe): mean of the patch tokens -> ``fc_norm`` -> ``head``.
  timm then makes ``norm`` an Identity; as in the official recipe the encoder's final ``norm`` is not
  loaded and ``fc_norm`` starts fresh (LayerNorm 1/0).
* ``global_pool="token"``: the cls token after the final ``norm`` -> ``head``.

:func:`read_encoder` accepts anything a user may point at -- a maelab run / checkpoint folder /
``.safetensors``, an official MAE ``.pth``, a timm checkpoint, a Hugging Face ViTMAE folder, or a
maelab fine-tune run -- and returns encoder weights plus the architecture they need. Foreign formats go
through :mod:`maelab.interop`. :func:`load_encoder_into` resizes the position embeddings when the
downstream input size differs (bicubic, as the official ``interpolate_pos_embed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from maelab.errors import MaelabError
from maelab.models.pos_embed import resize_pos_embed, sincos_2d
from maelab.train.checkpoint import state_dict_mismatch

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
POOLS = ("token", "avg")


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise MaelabError(f"image size must be one number or (height, width), got {size}")
    return size


def vit_arch(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of MAE constructor kwargs (a preset or a checkpoint's header)."""
    arch = {k: kwargs[k] for k in ARCH_KEYS if k in kwargs}
    arch.setdefault("in_chans", 3)
    arch.setdefault("mlp_ratio", 4.0)
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise MaelabError(f"model description lacks {', '.join(missing)}")
    arch["img_size"] = _pair(arch["img_size"])
    return arch


def describe(arch: dict[str, Any]) -> str:
    h, w = arch["img_size"]
    return (f"ViT width {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, "
            f"patch {arch['patch_size']}, {h}x{w} px")


def grid_of(arch: dict[str, Any], img_size: tuple[int, int] | None = None) -> tuple[int, int]:
    h, w = img_size or arch["img_size"]
    p = arch["patch_size"]
    if h % p or w % p:
        raise MaelabError(f"image size {h}x{w} is not divisible by the patch size {p}")
    return h // p, w // p


def build_vit(
    arch: dict[str, Any],
    num_classes: int = 0,
    global_pool: str = "avg",
    drop_path_rate: float = 0.0,
    img_size: tuple[int, int] | list[int] | int | None = None,
) -> VisionTransformer:
    """A timm ViT with the encoder's architecture, randomly initialised (timm's ViT init) except the
    position embedding, which starts as the paper's 2-D sin-cos table (it stays learnable, as in the
    official fine-tuning code). ``num_classes=0`` gives no head (features)."""
    if global_pool not in POOLS:
        raise MaelabError(f"global pool must be one of {', '.join(POOLS)}, got {global_pool!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise MaelabError(f"drop path rate must be in [0, 1), got {drop_path_rate}")
    from maelab.models.mae import check_dims

    check_dims(arch["embed_dim"], arch["num_heads"])
    if arch["depth"] < 1 or arch["patch_size"] < 1:
        raise MaelabError(f"a ViT needs depth >= 1 and patch_size >= 1, got depth={arch['depth']}, "
                          f"patch_size={arch['patch_size']}")
    size = _pair(img_size) if img_size is not None else tuple(arch["img_size"])
    if min(size) < arch["patch_size"]:
        raise MaelabError(f"image size {size[0]}x{size[1]} must be at least the patch size {arch['patch_size']}")
    grid = grid_of(arch, size)
    model = VisionTransformer(
        img_size=size, patch_size=arch["patch_size"], in_chans=arch["in_chans"], embed_dim=arch["embed_dim"],
        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes, global_pool=global_pool,
        drop_path_rate=drop_path_rate,
    )
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(arch["embed_dim"], grid).unsqueeze(0))
    return model


# --- reading encoder weights from any source -----------------------------------------------------
@dataclass
class EncoderWeights:
    """Encoder weights under timm names (``norm.*`` included; ``fc_norm.*`` only when the source was a
    global-pool fine-tune), the architecture they fit, and where they came from."""

    state_dict: dict[str, torch.Tensor]
    arch: dict[str, Any]
    source: str  # maelab | official | timm | huggingface | maelab-finetune
    path: str
    preset: str | None = None
    notes: list[str] = field(default_factory=list)


def _from_mae_model(model: nn.Module, source: str, path: str, preset: str | None) -> EncoderWeights:
    sd = {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}
    arch = dict(img_size=tuple(model.img_size), patch_size=int(model.patch_size), in_chans=int(model.in_chans),
                embed_dim=int(model.embed_dim), depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads),
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim)
    return EncoderWeights(sd, arch, source, path, preset)


def _from_vit_state_dict(sd: dict[str, torch.Tensor], source: str, path: str,
                         arch: dict[str, Any] | None = None, num_heads: int | None = None) -> EncoderWeights:
    """A timm / official state dict (encoder, full MAE or classifier) -> encoder weights."""
    from maelab.interop.official import DECODER_PREFIXES, infer_mae_architecture

    notes = []
    dropped = sorted(k for k in sd if k.startswith(DECODER_PREFIXES) or k.startswith("head."))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    if dropped:
        notes.append(f"ignored {len(dropped)} decoder/head tensor(s)")
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        # timm's global-pool layout: the only final LayerNorm is fc_norm; for token features it is the norm.
        sd.update({"norm.weight": sd["fc_norm.weight"], "norm.bias": sd["fc_norm.bias"]})
        notes.append("fc_norm used as the final norm")
    if arch is None:
        kwargs = infer_mae_architecture({k: v for k, v in sd.items() if not k.startswith("fc_norm.")},
                                        num_heads=num_heads)
        arch = vit_arch(kwargs)
        if num_heads is None:
            notes.append(f"{arch['num_heads']} attention heads assumed (not stored in the file; set --num-heads)")
    extra = sorted(k for k in sd if not k.startswith(ENCODER_PREFIXES) and not k.startswith("fc_norm."))
    if extra:
        shown = ", ".join(extra[:3]) + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")
        raise MaelabError(f"{path} has weights that are not part of a ViT encoder: {shown}")
    return EncoderWeights(sd, arch, source, path, None, notes)


def read_encoder(path: str | Path, num_heads: int | None = None) -> EncoderWeights:
    """Encoder weights from a maelab run / checkpoint folder / ``.safetensors`` (pre-training or
    fine-tuning), an official MAE ``.pth``, a timm checkpoint (``.safetensors`` / ``.pth`` / ``.bin``),
    or a Hugging Face ViTMAE folder (``config.json`` + weights).

    Official and timm files do not record the number of attention heads: ``num_heads`` gives it, else
    the paper's table decides (width 192: 3, 384: 6, 768: 12, 1024 / 1280: 16; otherwise 64-dim heads).
    Self-describing sources must agree with ``num_heads`` when it is given."""
    _check_num_heads(num_heads)
    enc = _read_encoder(Path(path).expanduser(), num_heads)
    if num_heads is not None and int(enc.arch["num_heads"]) != int(num_heads):
        raise MaelabError(f"{enc.path} records {enc.arch['num_heads']} attention heads; --num-heads {num_heads} "
                          f"contradicts it")
    if enc.arch["embed_dim"] % enc.arch["num_heads"]:
        raise MaelabError(f"width {enc.arch['embed_dim']} is not divisible by {enc.arch['num_heads']} heads")
    return enc


def _check_num_heads(num_heads: int | None) -> None:
    if num_heads is not None and num_heads < 1:
        raise MaelabError(f"--num-heads must be at least 1, got {num_heads}")


def _read_encoder(p: Path, num_heads: int | None) -> EncoderWeights:
    from maelab.train import checkpoint as ckpt

    if not p.exists():
        raise MaelabError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        from maelab.interop.huggingface import load_hf_pretrained_dir

        return _from_mae_model(load_hf_pretrained_dir(p), "huggingface", str(p), None)
    from maelab.models.loading import TORCH, check_weights_file

    if p.is_file() and check_weights_file(p) == TORCH:  # by content, whatever the file is called
        from maelab.interop.official import classify_official, load_official_state_dict

        sd = load_official_state_dict(p)
        kind = classify_official(sd)
        return _from_vit_state_dict(sd, "official" if kind in ("full", "encoder", "finetuned") else "timm", str(p),
                                    num_heads=num_heads)
    weights_path = ckpt.resolve_weights_path(p)
    weights, meta = ckpt.read_weights(weights_path)
    arch_name = meta.get("arch")
    if arch_name == "mae":
        from maelab.models.loading import load_mae

        model, meta = load_mae(weights_path)
        return _from_mae_model(model, "maelab", str(weights_path), meta.get("preset"))
    if arch_name == "vit":
        return _from_vit_state_dict(weights, "maelab-finetune", str(weights_path), vit_arch(meta["vit"]))
    if arch_name == "linprobe":
        raise MaelabError(f"{weights_path} is a linear-probe head; point at the encoder it probed "
                          f"({meta.get('init', 'see its config.yaml')})")
    if arch_name is not None:
        raise MaelabError(f"{weights_path} holds a {arch_name!r} model, not a ViT encoder")
    return _from_vit_state_dict(weights, "timm", str(weights_path), num_heads=num_heads)


def check_arch(enc: EncoderWeights, preset: str | None) -> None:
    """When the user names a preset next to a checkpoint, the two must describe the same encoder."""
    if not preset:
        return
    from maelab.models.presets import preset_kwargs

    want = vit_arch(preset_kwargs(preset))
    keys = ("patch_size", "embed_dim", "depth", "num_heads", "in_chans")
    if any(int(want[k]) != int(enc.arch[k]) for k in keys) or float(want["mlp_ratio"]) != float(enc.arch["mlp_ratio"]):
        raise MaelabError(f"checkpoint {enc.path} holds a {describe(enc.arch)}; --model {preset} is a "
                          f"{describe(want)} (leave --model out to use the checkpoint's)")


def load_encoder_into(model: VisionTransformer, enc: EncoderWeights) -> list[str]:
    """Load ``enc`` into a :func:`build_vit` model; resize ``pos_embed`` if the grid differs. Returns
    notes for the log. Only ``head.*`` (and ``fc_norm.*`` for a fresh global-pool head) stay new."""
    notes = list(enc.notes)
    sd = dict(enc.state_dict)
    if "pos_embed" not in sd:
        raise MaelabError(f"{enc.path} has no pos_embed")
    old_grid = grid_of(enc.arch)
    new_grid = tuple(model.patch_embed.grid_size)
    if int(sd["pos_embed"].shape[1]) != 1 + old_grid[0] * old_grid[1]:
        raise MaelabError(f"{enc.path}: pos_embed has {sd['pos_embed'].shape[1]} slots, expected "
                          f"{1 + old_grid[0] * old_grid[1]} for a {old_grid[0]}x{old_grid[1]} grid")
    if old_grid != new_grid:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old_grid, new_grid)
        notes.append(f"pos_embed resized {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} (bicubic)")
    if isinstance(model.norm, nn.Identity):  # global average pooling: norm lives after pooling (fc_norm)
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
        notes.append("fc_norm loaded from the checkpoint" if "fc_norm.weight" in sd else
                     "encoder norm dropped, fresh fc_norm after pooling (official recipe)")
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}
    problem = state_dict_mismatch(model.state_dict(), sd, optional=("head.", "fc_norm."))
    if problem:
        raise MaelabError(f"{enc.path} does not fit this ViT ({problem})")
    model.load_state_dict(sd, strict=False)
    return notes


def init_head(model: VisionTransformer, std: float) -> None:
    """Head weights ~ trunc_normal(std), bias 0 (official: 2e-5 for fine-tuning, 0.01 for probing)."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=std)
        nn.init.zeros_(model.head.bias)


def encoder_for(init: str, preset: str | None, num_heads: int | None = None,
                what: str = "--init") -> EncoderWeights | None:
    """``none`` -> None (random init: needs a preset); otherwise the checkpoint, checked against
    ``preset`` when one is given."""
    if not init:
        raise MaelabError(f"{what} is required: a checkpoint (maelab run, official .pth, timm, Hugging Face "
                          f"folder) or `none` for a randomly initialised encoder")
    if init.lower() == "none":
        if not preset:
            raise MaelabError(f"{what} none needs --model (a preset, see `maelab models`)")
        return None
    enc = read_encoder(init, num_heads)
    check_arch(enc, preset)
    return enc


def arch_for(enc: EncoderWeights | None, preset: str | None, num_heads: int | None = None) -> dict[str, Any]:
    """The checkpoint's architecture, or the preset's for a random init (``num_heads`` overrides it)."""
    if enc is not None:
        return dict(enc.arch)
    from maelab.models.presets import preset_kwargs

    _check_num_heads(num_heads)
    arch = vit_arch(preset_kwargs(preset))
    if num_heads:
        if arch["embed_dim"] % num_heads:
            raise MaelabError(f"width {arch['embed_dim']} is not divisible by --num-heads {num_heads}")
        arch["num_heads"] = num_heads
    return arch


def features_model(enc: EncoderWeights | None, arch: dict[str, Any],
                   img_size: tuple[int, int] | None = None) -> VisionTransformer:
    """A frozen, eval-mode encoder (no head, cls-token layout so ``norm`` is loaded) for features."""
    vit = build_vit(arch, num_classes=0, global_pool="token", img_size=img_size)
    if enc is not None:
        load_encoder_into(vit, enc)
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit.eval()


def vit_meta(arch: dict[str, Any], img_size: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """What a fine-tuned weights file records (JSON in the safetensors header)."""
    a = dict(arch, img_size=list(img_size))
    return {"arch": "vit", "vit": a, **extra}
