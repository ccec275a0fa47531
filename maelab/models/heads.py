"""Classification heads on top of encoder features.

* Fine-tuning uses timm's own ``VisionTransformer`` head (global average of the patch tokens ->
  ``fc_norm`` -> ``head``, or the cls token -> ``head``): see :mod:`maelab.models.vit`.
* Linear probing (paper, appendix A.2): ``BatchNorm1d`` without affine parameters -- it only
  standardises the frozen features, so a plain linear classifier trains well with LARS -- followed by
  a ``Linear`` layer whose weight starts as trunc_normal(std 0.01), bias 0. BatchNorm without affine
  folds into the Linear layer at inference: the probe stays linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_


class LinearProbeHead(nn.Module):
    """``BatchNorm1d(dim, affine=False, eps=1e-6)`` + ``Linear(dim, num_classes)``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(features))
