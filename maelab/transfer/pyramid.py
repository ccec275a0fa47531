"""ViTDet's simple feature pyramid (Li et al. 2022, Fig. 2c): from the LAST block's map alone
(stride = patch size p) to strides 4 / 8 / 16 / 32 with transposed convolutions up and max-pooling
down, each level then a 1x1 and a 3x3 convolution with LayerNorm to ``out_channels``, plus a 'pool'
level (stride 64, max-pool of the last) for the RPN, as in detectron2 and torchvision's FPN.

The output is the ``OrderedDict`` torchvision's detectors expect (keys '0', '1', '2', '3', 'pool'),
and the module declares ``out_channels``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from maelab.errors import MaelabError
from maelab.transfer.backbone import STRIDES, ViTBackbone


def _resample(dim: int, factor: float) -> tuple[nn.Module, int]:
    """(module, channels out) changing the resolution by ``factor``, a power of two: ViTDet's
    deconvolutions (halving the width each time, LayerNorm + GELU between them), identity, or max-pool."""
    steps = round(math.log2(factor))
    if 2.0 ** steps != factor:
        raise MaelabError(f"patch size / stride ratio {factor:g} is not a power of two")
    if steps <= 0:
        return (nn.Identity() if steps == 0 else nn.MaxPool2d(2 ** -steps, 2 ** -steps)), dim
    layers: list[nn.Module] = []
    for s in range(steps):
        if s:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
    return nn.Sequential(*layers), dim


class SimpleFeaturePyramid(nn.Module):
    """A :class:`ViTBackbone` (its last out index is the map used) -> {'0': stride 4, ..., '3': stride 32,
    'pool': stride 64}, each ``out_channels`` wide."""

    def __init__(self, vit: ViTBackbone, out_channels: int = 256, strides: Sequence[int] = STRIDES):
        super().__init__()
        if out_channels < 1:
            raise MaelabError(f"--out-channels must be at least 1, got {out_channels}")
        self.vit, self.out_channels, self.strides = vit, out_channels, tuple(strides)
        stages = []
        for stride in self.strides:
            try:
                resample, dim = _resample(vit.embed_dim, vit.patch_size / stride)
            except MaelabError as e:
                raise MaelabError(f"patch size {vit.patch_size} cannot give pyramid strides {list(self.strides)}: "
                                  f"{e}") from None
            if dim < 1:
                raise MaelabError(f"width {vit.embed_dim} is too narrow to halve down to stride {stride}")
            stages.append(nn.Sequential(
                resample,
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_channels)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        last = self.vit(x)[-1]
        out = OrderedDict((str(i), stage(last)) for i, stage in enumerate(self.stages))
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out
