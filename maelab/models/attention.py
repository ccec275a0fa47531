"""Which attention kernel timm's blocks use: one policy for training, evaluation and pictures.

``F.scaled_dot_product_attention`` everywhere, except under bf16 autocast on a CPU, where timm's
explicit ``softmax(q k^T) v`` path is 2-6x faster than PyTorch's fused CPU kernel (measured in
benchmarks/bench_step.py). Same maths either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def fused_attention_wanted(device_type: str, bf16: bool) -> bool:
    return not (device_type == "cpu" and bf16)


def set_attention_kernel(model: nn.Module, fused: bool) -> str:
    """Switch every timm ``Attention`` in ``model``; returns ``"sdpa"`` or ``"math"``."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return "sdpa" if fused else "math"


def attention_for_autocast(model: nn.Module, device: torch.device) -> str:
    """The kernel for the autocast state in force now (called at the start of a forward)."""
    bf16 = (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return set_attention_kernel(model, fused_attention_wanted(device.type, bf16))
