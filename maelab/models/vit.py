"""The encoder for downstream tasks: a timm ``VisionTransformer`` with the MAE encoder's weights.

The MAE encoder already uses timm's parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.*``, ``norm``), so downstream models are plain timm ViTs:

* ``global_pool="avg"`` (the fine-tuning recipe): mean of the patch tokens -> ``fc_norm`` -> ``head``.
  timm then makes ``norm`` an Identity; as in the official recipe the encoder's final ``norm`` is not
  loaded and ``fc_norm`` starts fresh (LayerNorm 1/0).
* ``global_pool="token"``: the cls token after the final ``norm`` -> ``head``.

:class:`EncoderWeights` is what :mod:`maelab.interop.encoders` reads from any source;
:func:`load_encoder_into` puts it into a model, resizing the position embeddings when the downstream
input size differs (bicubic, as the official ``interpolate_pos_embed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from maelab.choices import POOLS
from maelab.errors import MaelabError
from maelab.models.checks import check_dims, check_image_size, pair
from maelab.models.pos_embed import resize_pos_embed, sincos_2d
from maelab.models.state_dicts import state_dict_mismatch

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def check_pool(global_pool: str) -> None:
    if global_pool not in POOLS:
        raise MaelabError(f"global pool must be one of {', '.join(POOLS)}, got {global_pool!r}")


def encode(model: nn.Module, images: torch.Tensor, global_pool: str = "token") -> torch.Tensor:
    """(N, D) features of any model whose ``forward_features`` gives (N, 1 + L, D) tokens: the cls token
    (``token``) or the mean of the patch tokens (``avg``). Never masks. A global-pool ViT (timm's
    ``fc_norm`` layout, e.g. an official fine-tuned classifier: no final ``norm``) normalises after
    pooling, as its classifier does: its pre-logits are ``fc_norm(mean(patch tokens))``."""
    check_pool(global_pool)
    tokens = model.forward_features(images)
    pooled = tokens[:, 0] if global_pool == "token" else tokens[:, 1:].mean(dim=1)
    fc_norm = getattr(model, "fc_norm", None)
    return pooled if fc_norm is None else fc_norm(pooled)


def pooled_norm(sd: dict[str, torch.Tensor]) -> bool:
    """Whether encoder weights are in the global-pool layout: ``fc_norm`` after pooling, no ``norm``."""
    return "fc_norm.weight" in sd and "norm.weight" not in sd


def vit_arch(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The encoder part of MAE constructor kwargs (a preset or a checkpoint's header)."""
    arch = {k: kwargs[k] for k in ARCH_KEYS if k in kwargs}
    arch.setdefault("in_chans", 3)
    arch.setdefault("mlp_ratio", 4.0)
    arch["norm_eps"] = float(kwargs.get("norm_eps", 1e-6))  # LayerNorm eps: 1e-6 unless the source says otherwise
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise MaelabError(f"model description lacks {', '.join(missing)}")
    arch["img_size"] = pair(arch["img_size"])
    return arch


def describe(arch: dict[str, Any]) -> str:
    h, w = arch["img_size"]
    eps = float(arch.get("norm_eps", 1e-6))
    return (f"ViT width {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, "
            f"patch {arch['patch_size']}, {h}x{w} px" + (f", LayerNorm eps {eps:g}" if eps != 1e-6 else ""))


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
    check_pool(global_pool)
    if not 0.0 <= drop_path_rate < 1.0:
        raise MaelabError(f"drop path rate (--drop-path) must be in [0, 1), got {drop_path_rate}")
    check_dims(arch["embed_dim"], arch["num_heads"])
    if arch["depth"] < 1 or arch["patch_size"] < 1:
        raise MaelabError(f"a ViT needs depth >= 1 and patch_size >= 1, got depth={arch['depth']}, "
                          f"patch_size={arch['patch_size']}")
    size = pair(img_size) if img_size is not None else tuple(arch["img_size"])
    grid = check_image_size(size, arch["patch_size"])
    model = VisionTransformer(
        img_size=size, patch_size=arch["patch_size"], in_chans=arch["in_chans"], embed_dim=arch["embed_dim"],
        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=float(arch.get("norm_eps", 1e-6))), num_classes=num_classes, global_pool=global_pool,
        drop_path_rate=drop_path_rate,
    )
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(arch["embed_dim"], grid).unsqueeze(0))
    return model


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
    elif pooled_norm(sd):  # a global-pool classifier into a cls-token ViT: its only final norm serves
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
        notes.append("the checkpoint's fc_norm (global-pool layout) used as the final norm of the cls-token ViT")
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


def features_model(enc: EncoderWeights | None, arch: dict[str, Any], img_size: tuple[int, int] | None = None,
                   notes: list[str] | None = None) -> VisionTransformer:
    """A frozen, eval-mode encoder (no head) for features, in the layout of its weights: cls-token
    (final ``norm``) for pre-trained encoders, global-pool (``fc_norm`` after pooling) for global-pool
    classifiers, so that :func:`encode` gives their own pre-logits. What loading did (a position-table
    resize, a layout) is appended to ``notes`` for the log."""
    layout = "avg" if enc is not None and pooled_norm(enc.state_dict) else "token"
    vit = build_vit(arch, num_classes=0, global_pool=layout, img_size=img_size)
    if enc is not None:
        loaded = load_encoder_into(vit, enc)
        if notes is not None:
            notes.extend(loaded)
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit.eval()


def vit_meta(arch: dict[str, Any], img_size: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """What a fine-tuned weights file records (JSON in the safetensors header)."""
    a = dict(arch, img_size=list(img_size))
    return {"arch": "vit", "vit": a, **extra}
