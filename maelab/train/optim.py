"""Optimizer parameter groups and the learning-rate schedule.

Weight decay is not applied to biases, norms, tokens or position embeddings (timm's grouping plus
the MAE token names). The schedule is per iteration: linear warm-up, then half-cosine to ``min_lr``.
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay

NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "dist_token", "reg_token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_DECAY)


def scaled_lr(base_lr: float, lr: float | None, effective_batch: int) -> float:
    """lr = base_lr x effective batch / 256 (the linear scaling rule), unless given absolutely."""
    return lr if lr is not None else base_lr * effective_batch / 256


def batch_and_lr(batch_size: int, accum_iter: int, world: int, base_lr: float, lr: float | None) -> str:
    """"global batch 512 = 64 per process x 2 accumulation x 4 processes, lr ... = base lr x 512 / 256" for
    a run's first log line: how the effective batch and the learning rate follow the number of processes."""
    g = batch_size * accum_iter * world
    rule = "given by --lr" if lr is not None else f"base lr {base_lr:.3g} x {g} / 256"
    return (f"global batch {g} = {batch_size} per process x {accum_iter} accumulation x {world} process"
            f"{'es' if world > 1 else ''}, lr {scaled_lr(base_lr, lr, g):.3g} ({rule})")


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


def poly_lr(it: float, total: float, warmup: float, lr: float, min_lr: float, power: float = 1.0) -> float:
    """Linear warm-up, then ``(1 - progress) ** power`` decay to ``min_lr`` (mmseg's poly schedule)."""
    if it < warmup:
        return lr * it / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (it - warmup) / (total - warmup))
    return min_lr + (lr - min_lr) * (1.0 - progress) ** power


SCHEDULES = {"cosine": cosine_lr, "poly": poly_lr}  # one per name of maelab.choices.LR_SCHEDULES (--schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- fine-tuning and linear probing ----------------------------------------------------------------
def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                       final_norm_on_top: bool = True) -> list[dict]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning) with timm's ``param_groups_layer_decay``: block
    ``i`` of ``depth`` gets ``lr_scale = layer_decay ** (depth - i)``, the embeddings
    ``layer_decay ** (depth + 1)``, the head and its norm 1. ``set_lr`` applies ``lr_scale``. No weight
    decay on 1-D parameters, tokens and position embeddings. ``final_norm_on_top=False``: timm's own grouping
    (the final norm in the last block's layer), which runs begun before 2026-12-07 were saved with."""
    no_decay = set(NO_DECAY) | set(getattr(model, "no_weight_decay", lambda: ())())
    view = _FinalNormOnTop(model) if final_norm_on_top and hasattr(model, "group_matcher") else model
    return param_groups_layer_decay(view, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


class _FinalNormOnTop:
    """A model's grouping for layer decay with its final ``norm`` beside the head (scale 1), as in BEiT and
    the MAE fine-tuning: timm's ViT ``group_matcher`` puts it in the last block's layer, so with the cls
    token pool (where that norm is a LayerNorm, not an identity) it trained at ``layer_decay`` x the lr."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = dict(self.model.group_matcher(coarse))
        blocks = matcher.get("blocks")
        if isinstance(blocks, (list, tuple)):  # [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]: drop the second
            matcher["blocks"] = [rule for rule in blocks if not (isinstance(rule, tuple) and rule[0] == r"^norm")]
        return matcher


def lars_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """LARS groups as in the MAE / MoCo v3 linear probe: matrices get weight decay and the trust-ratio
    adaptation; 1-D parameters (biases, norms) get neither -- plain SGD with momentum."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": matrices, "weight_decay": weight_decay, "always_adapt": True}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0, "always_adapt": False})
    return groups


def lars(groups: list[dict], lr: float, momentum: float = 0.9, trust_coeff: float = 0.001) -> torch.optim.Optimizer:
    """timm's ``Lars`` (SGD + momentum; update of an adapted parameter scaled by
    ``trust_coeff * |w| / (|g| + wd |w|)``). With zero weight decay, as in the paper's linear probe,
    this equals the official LARS exactly; with decay the denominator is NVIDIA's ``|g| + wd |w|``
    rather than the official ``|g + wd w|``."""
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coeff)
