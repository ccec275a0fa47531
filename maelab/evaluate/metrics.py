"""Top-k accuracy, and a classifier's top-1 / top-5 on a validation split (summed over processes)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from maelab.train.precision import autocast


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                 voted: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Number of rows whose target is among the ``k`` highest scores, per ``k`` (capped by the number
    of classes, so top-5 of a 3-class problem is top-3; reports leave top-k out when ``k`` >= the number
    of classes, see :func:`top5_percent`). ``voted``: (rows, classes) True where a kNN neighbour voted for
    the class; a class with no vote is no guess: with fewer voted classes than ``k`` (k = 1, or a class the
    bank lacks) the zero-vote ties used to fill the top-k in topk's order and count as hits."""
    num_classes = scores.shape[1]
    if voted is not None:  # a voted class ranks above every class without a vote, even at a vote of 0.0
        scores = scores.masked_fill(~voted, float("-inf"))
    top = scores.topk(min(max(ks), num_classes), dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    if voted is not None:
        hit &= voted.gather(1, top)
    return {k: hit[:, : min(k, num_classes)].any(dim=1).sum() for k in ks}


@torch.no_grad()
def evaluate_classifier(forward: Callable[[torch.Tensor], torch.Tensor],
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                        precision: str = "fp32", prefix: str = "val") -> dict[str, float]:
    """``{prefix}_top1``, ``{prefix}_top5`` (percent) and ``{prefix}_loss`` (cross-entropy) of
    ``forward`` over ``batches`` of (inputs, labels). Under torchrun each process passes its own shard
    and the counts are summed, so every image counts exactly once. ``{prefix}_top5`` is None when there
    are 5 classes or fewer (every label is then among the top 5: the number says nothing)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, n
    num_classes = 0
    for x, y in batches:
        y = y.to(device)
        with autocast(device, precision):
            logits = forward(x.to(device))
        logits = logits.float()
        num_classes = logits.shape[1]
        correct = topk_correct(logits, y, (1, 5))
        sums += torch.stack([correct[1].double(), correct[5].double(),
                             F.cross_entropy(logits, y, reduction="sum").double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    top1, top5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {f"{prefix}_top1": 100.0 * top1 / n, f"{prefix}_top5": top5_percent(top5, n, num_classes),
            f"{prefix}_loss": loss / n}


def top5_percent(correct: float, n: float, num_classes: int) -> float | None:
    """Top-5 accuracy in percent, or None when it is meaningless (5 classes or fewer: always 100)."""
    return 100.0 * correct / n if num_classes > 5 else None
