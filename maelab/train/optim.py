"""Optimizer parameter groups and the learning-rate schedule.

Weight decay is not applied to biases, norms, tokens or position embeddings (timm's grouping plus
the MAE token names). The schedule is per iteration: linear warm-up, then half-cosine to ``min_lr``.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay

NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token", "reg_token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_DECAY)


def scaled_lr(base_lr: float, lr: float | None, effective_batch: int) -> float:
    """lr = base_lr x effective batch / 256 (the linear scaling rule), unless given absolutely."""
    return lr if lr is not None else base_lr * effective_batch / 256


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch build has it for the device, else foreach."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type != "cpu" or None)


def cosine_lr(it: float, total: float, warmup: float, lr: float, min_lr: float) -> float:
    """Learning rate at (fractional) iteration ``it`` of ``total``."""
    if it < warmup:
        return lr * it / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (it - warmup) / (total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
