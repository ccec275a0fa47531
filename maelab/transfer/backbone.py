"""A ViT encoder as a backbone for dense tasks: spatial feature maps of chosen blocks.

:class:`ViTBackbone` holds the encoder's own modules (timm names: ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.*``; the final ``norm`` is not used, as in the BEiT / MAE segmentation
set-up) and runs them on any input whose sides the patch size divides, resizing the position
embeddings to the input's grid (bicubic, differentiable). Blocks after the last requested one are
dropped, so every parameter gets a gradient (DDP needs that).

Windowed attention (ViTDet): blocks not in ``global_blocks`` attend within non-overlapping windows of
``window_size`` x ``window_size`` patches. LayerNorm and the MLP act per token, so partitioning the
tokens around the whole block is exact; a grid that the window does not divide is padded and the
padded keys are masked out. With windows the cls token is left out everywhere (a window has no
place for it), as in ViTDet.

:class:`MultiLevelNeck` turns the (equal-stride) maps into strides 4 / 8 / 16 / 32: transposed
convolutions up, identity, max-pooling down (BEiT / MAE segmentation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maelab.errors import MaelabError
from maelab.models.checks import pair
from maelab.models.pos_embed import resize_pos_embed
from maelab.models.vit import EncoderWeights, build_vit, grid_of, load_encoder_into
from maelab.train.optim import layer_decay_groups as _timm_layer_decay_groups

STRIDES = (4, 8, 16, 32)  # the feature-pyramid levels of both transfer heads (UPerNet neck, ViTDet pyramid)


def default_out_indices(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced blocks ending with the last: depth 12 -> (2, 5, 8, 11), 24 -> (5, 11, 17, 23);
    an encoder with fewer blocks repeats some (depth 2 -> (0, 0, 1, 1)), so a 4-level neck still fits."""
    step = depth / count
    return tuple(max(int(round(step * (i + 1))) - 1, 0) for i in range(count))


def window_partition(tokens: torch.Tensor, grid: tuple[int, int], ws: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, h*w, D) row-major tokens -> (B * windows, ws*ws, D), and the key mask (True = real token,
    shape (B * windows, 1, 1, ws*ws)) when the grid had to be padded, else None."""
    b, _, d = tokens.shape
    h, w = grid
    ph, pw = (-h) % ws, (-w) % ws
    x = F.pad(tokens.view(b, h, w, d), (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, d)
    if not (ph or pw):
        return x, None
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=tokens.device)
    valid[:h, :w] = True
    valid = valid.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    return x, valid.repeat(b, 1)[:, None, None, :]


def window_unpartition(windows: torch.Tensor, grid: tuple[int, int], ws: int, batch: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: back to (B, h*w, D), padding removed."""
    h, w = grid
    hp, wp = h + (-h) % ws, w + (-w) % ws
    d = windows.shape[-1]
    x = windows.view(batch, hp // ws, wp // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, d)
    return x[:, :h, :w].reshape(batch, h * w, d)


class ViTBackbone(nn.Module):
    """Any encoder maelab can load (``enc`` from :func:`maelab.interop.encoders.resolve_encoder`, or None
    for a random init of ``arch``), giving one (B, embed_dim, H/p, W/p) map per ``out_indices`` block."""

    def __init__(self, enc: EncoderWeights | None, arch: dict[str, Any], img_size: tuple[int, int] | int,
                 out_indices: Sequence[int] | None = None, drop_path_rate: float = 0.0,
                 window_size: int | None = None, global_blocks: Sequence[int] = ()):
        super().__init__()
        size = pair(img_size)
        depth = int(arch["depth"])
        indices = tuple(default_out_indices(depth) if out_indices is None else out_indices)
        if not indices or list(indices) != sorted(indices):
            raise MaelabError(f"out indices must be block numbers in increasing order, got {list(indices)}")
        if indices[0] < 0 or indices[-1] >= depth:
            raise MaelabError(f"out indices {list(indices)} must lie in 0..{depth - 1} (the encoder has {depth} blocks)")
        if window_size is not None and window_size < 1:
            raise MaelabError(f"window size must be at least 1 patch, got {window_size}")
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise MaelabError(f"global blocks {bad} are not in 0..{depth - 1}")
        vit = build_vit(arch, num_classes=0, global_pool="token", drop_path_rate=drop_path_rate, img_size=size)
        self.notes = load_encoder_into(vit, enc) if enc is not None else []
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.blocks = nn.ModuleList(list(vit.blocks)[: indices[-1] + 1])
        self.embed_dim, self.patch_size = int(arch["embed_dim"]), int(arch["patch_size"])
        self.img_size, self.grid = size, grid_of(arch, size)
        self.out_indices = indices
        self.window_size = window_size
        self.global_blocks = tuple(sorted(set(global_blocks)))
        self.use_cls = window_size is None
        if not self.use_cls:
            self.cls_token.requires_grad_(False)  # unused with windows; frozen so DDP sees no unused parameter
        if depth > len(self.blocks):
            self.notes.append(f"blocks {len(self.blocks)}..{depth - 1} dropped (after the last out index)")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping (for layer-wise lr decay): embeddings, then one layer per block."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise MaelabError(f"the backbone takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise MaelabError(f"input {h}x{w} is not divisible by the patch size {p}; pad or resize it")
        return h // p, w // p

    def windowed(self, index: int) -> bool:
        return self.window_size is not None and index not in self.global_blocks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = self.check_input(x)
        b = x.shape[0]
        tokens = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
        pos = self.pos_embed_for(grid)
        tokens = tokens + pos[:, 1:]
        if self.use_cls:
            tokens = torch.cat([(self.cls_token + pos[:, :1]).expand(b, -1, -1), tokens], dim=1)
        prefix = 1 if self.use_cls else 0
        outs = []
        for i, blk in enumerate(self.blocks):
            if self.windowed(i):
                windows, mask = window_partition(tokens, grid, self.window_size)
                windows = blk(windows, attn_mask=mask) if mask is not None else blk(windows)
                tokens = window_unpartition(windows, grid, self.window_size, b)
            else:
                tokens = blk(tokens)
            for _ in range(self.out_indices.count(i)):  # an index given twice (shallow encoders) gives two maps
                outs.append(tokens[:, prefix:].transpose(1, 2).reshape(b, self.embed_dim, *grid))
        return outs


def _rescale(channels: int, factor: float) -> nn.Module:
    """Change the resolution by ``factor`` (a power of two): transposed convs up (BN + GELU between
    them, as BEiT), identity, or max-pooling down."""
    if factor == 1:
        return nn.Identity()
    steps = round(math.log2(factor))
    if 2.0 ** steps != factor:
        raise MaelabError(f"patch size / stride ratio {factor:g} is not a power of two")
    if steps < 0:
        k = 2 ** (-steps)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    layers: list[nn.Module] = []
    for s in range(steps):
        if s:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class MultiLevelNeck(nn.Module):
    """Four equal-stride maps (stride = patch size) -> strides 4 / 8 / 16 / 32 (patch 16: 4x deconv,
    2x deconv, identity, 2x max-pool). ``out_channels`` stays the embedding width."""

    def __init__(self, embed_dim: int, patch_size: int, strides: Sequence[int] = STRIDES):
        super().__init__()
        self.strides = tuple(strides)
        self.out_channels = [embed_dim] * len(self.strides)
        try:
            self.ops = nn.ModuleList(_rescale(embed_dim, patch_size / s) for s in self.strides)
        except MaelabError as e:
            raise MaelabError(f"patch size {patch_size} cannot be resampled to strides {list(self.strides)}: {e}") from None

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.ops):
            raise MaelabError(f"the neck takes {len(self.ops)} feature maps, got {len(maps)}")
        return [op(m) for op, m in zip(self.ops, maps)]


def layer_decay_groups(backbone_or_model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       prefix: str = "backbone.") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (timm's ``param_groups_layer_decay``, via
    :func:`maelab.train.optim.layer_decay_groups`): the embeddings get ``layer_decay ** (depth + 1)``,
    block ``i`` ``layer_decay ** (depth - i)``, everything outside the backbone (neck, head) 1. Works on
    a :class:`ViTBackbone` or a model holding one under ``prefix``. Each group carries ``lr_scale``
    (what ``set_lr`` applies) and its starting ``lr``. No decay on 1-D parameters, tokens, position
    embeddings."""
    model = backbone_or_model
    if not isinstance(model, ViTBackbone):
        inner = getattr(model, prefix.rstrip("."), None)
        if not isinstance(inner, ViTBackbone):
            raise MaelabError(f"layer decay needs a ViTBackbone or a model with one at .{prefix.rstrip('.')}")
        model = _Prefixed(backbone_or_model, prefix)
    groups = _timm_layer_decay_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


class _Prefixed(nn.Module):
    """A view of a model whose backbone sits under ``prefix``: the backbone's grouping with the prefix."""

    def __init__(self, model: nn.Module, prefix: str):
        super().__init__()
        self.inner, self.prefix = model, prefix

    def named_parameters(self, *args, **kwargs):  # the inner model's names, unprefixed by "inner."
        return self.inner.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        p = self.prefix.replace(".", r"\.")
        return {"stem": rf"^{p}cls_token|^{p}pos_embed|^{p}patch_embed", "blocks": rf"^{p}blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return {self.prefix + n for n in ("cls_token", "pos_embed")}
