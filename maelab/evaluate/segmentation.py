"""Semantic-segmentation metrics from one confusion matrix (mmseg's definitions).

``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p``; ignored pixels are left out.
Per class: IoU = TP / (TP + FP + FN), accuracy = TP / (TP + FN). mIoU and mAcc average over the
classes that occur in the ground truth or the predictions (a class with an empty union has no IoU
and is left out of the mean, as mmseg's ``nanmean``); aAcc is all correct pixels / all counted pixels.
Under torchrun every process counts its own images and the matrices are summed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) int64 counts of (target, prediction) pairs over the pixels whose target is not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"targets must lie in 0..{num_classes - 1} or be {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def reduce_confusion(conf: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of every process's matrix (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        comm = conf.to(device if device.type == "cuda" else torch.device("cpu"))
        dist.all_reduce(comm)
        return comm.to(conf.device)
    return conf


def segmentation_metrics(conf: torch.Tensor, classes: list[str] | tuple[str, ...] | None = None,
                         prefix: str = "val") -> dict:
    """``{prefix}_mIoU``, ``_mAcc``, ``_aAcc`` (percent) and ``{prefix}_per_class``: {class: {iou, acc}}
    (None where undefined)."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    total = float(conf.sum())
    names = list(classes) if classes is not None else [str(i) for i in range(conf.shape[0])]

    def mean(v: torch.Tensor) -> float | None:
        ok = ~torch.isnan(v)
        return 100.0 * float(v[ok].mean()) if ok.any() else None

    def pct(v: float) -> float | None:
        return None if math.isnan(v) else round(100.0 * v, 4)

    return {f"{prefix}_mIoU": mean(iou), f"{prefix}_mAcc": mean(acc),
            f"{prefix}_aAcc": 100.0 * float(tp.sum()) / total if total else None,
            f"{prefix}_per_class": {n: {"iou": pct(float(i)), "acc": pct(float(a))}
                                    for n, i, a in zip(names, iou, acc)}}
