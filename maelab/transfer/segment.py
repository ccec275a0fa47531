"""UPerNet semantic segmentation on a ViT backbone (the BEiT / MAE ADE20K set-up), its training task,
and inference (whole image or sliding window) with the metrics of :mod:`maelab.evaluate.segmentation`.

The head is segmentation_models_pytorch's ``UPerNetDecoder`` (pyramid pooling on the stride-32 map +
FPN fusion of strides 4-32, LayerNorm on each input map, BatchNorm + ReLU convolutions), fed by the
:class:`~maelab.transfer.backbone.MultiLevelNeck`; a 1x1 classifier after dropout gives the logits at
stride 4, upsampled bilinearly to the input. An auxiliary FCN head on the stride-16 map (loss weight
0.4, as mmseg) helps early training; it is used only in the training loss.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

from maelab.choices import SEGMENT_MODES
from maelab.data.loader import Batch
from maelab.data.segmentation import IGNORE, SegList, eval_image, load_pair
from maelab.errors import MaelabError
from maelab.evaluate.segmentation import confusion_matrix, reduce_confusion, segmentation_metrics
from maelab.train.precision import autocast
from maelab.train.tasks import ClassifyTask
from maelab.transfer.backbone import STRIDES, MultiLevelNeck, ViTBackbone


class UPerNetSegmenter(nn.Module):
    """backbone -> neck (strides 4/8/16/32) -> UPerNet -> per-pixel logits at the input size."""

    def __init__(self, backbone: ViTBackbone, num_classes: int, channels: int = 512, aux_weight: float = 0.4,
                 dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise MaelabError(f"segmentation needs at least 2 classes, got {num_classes}")
        if channels < 1:
            raise MaelabError(f"decoder channels must be positive, got {channels}")
        self.num_classes, self.aux_weight = num_classes, aux_weight
        self.backbone = backbone
        self.neck = MultiLevelNeck(backbone.embed_dim, backbone.patch_size)
        # smp's decoder skips its first two inputs (strides 1 and 2 of a CNN encoder); ours start at 4
        self.decoder = UPerNetDecoder([0, 0, *self.neck.out_channels], encoder_depth=5, decoder_channels=channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, kernel_size=1))
        self.aux = None
        if aux_weight > 0:
            mid = max(channels // 2, 1)
            self.aux = nn.Sequential(nn.Conv2d(backbone.embed_dim, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                                     nn.ReLU(inplace=True), nn.Dropout2d(dropout), nn.Conv2d(mid, num_classes, 1))

    def forward(self, x: torch.Tensor, aux: bool = False):
        """Logits (B, K, H, W); with ``aux=True`` also the auxiliary head's (or None without one)."""
        feats = self.neck(self.backbone(x))
        logits = self.classifier(self.decoder([None, None, *feats]))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not aux:
            return logits
        if self.aux is None:
            return logits, None
        return logits, F.interpolate(self.aux(feats[2]), size=x.shape[-2:], mode="bilinear", align_corners=False)


def pixel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the pixels that are not ignored (0 for a batch without any)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


class SegmentTask(ClassifyTask):
    """The training loop's task: ``batch.labels`` holds the (B, H, W) target masks; the loss is
    :func:`pixel_loss` plus the auxiliary head's, weighted. ``evaluate()`` runs after every epoch."""

    def forward(self, runner: nn.Module, batch: Batch):
        logits, aux = runner(batch.images, aux=True)
        loss = pixel_loss(logits, batch.labels)
        if aux is not None:
            loss = loss + self.model.aux_weight * pixel_loss(aux, batch.labels)
        return loss, {}


def _pad_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, mode: str = "whole", crop: tuple[int, int] | None = None,
                   stride: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, K, h, w) logits of normalised images ``x`` (B, 3, h, w) of any size.

    ``whole``: the image at once, padded on the right / bottom to a multiple of the patch size, and to at
    least the pyramid's coarsest stride (a thinner strip has no pixel at that level).
    ``slide``: ``crop``-sized windows every ``stride`` pixels (the last one flush with the border, as
    mmseg), each padded to the crop, logits averaged where windows overlap."""
    if mode not in SEGMENT_MODES:
        raise MaelabError(f"inference mode must be one of {', '.join(SEGMENT_MODES)}, got {mode!r}")
    p = model.backbone.patch_size
    h, w = x.shape[-2:]
    if mode == "whole":
        least = max(STRIDES)  # then whole patches: the pad is a multiple of the patch size whatever it is
        return model(_pad_to(x, tuple(math.ceil(max(n, least) / p) * p for n in (h, w))))[..., :h, :w]
    if crop is None or stride is None:
        raise MaelabError("sliding-window inference needs a crop size and a stride")
    (ch, cw), (sh, sw) = crop, stride
    if ch % p or cw % p:
        raise MaelabError(f"crop {ch}x{cw} is not divisible by the patch size {p}")
    if sh < 1 or sw < 1:
        raise MaelabError(f"the sliding-window stride must be positive, got {sh}x{sw}")
    rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
    out = count = None
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            part = model(_pad_to(x[..., y1:y2, x1:x2], (ch, cw)))[..., : y2 - y1, : x2 - x1].float()
            if out is None:
                out = part.new_zeros(x.shape[0], part.shape[1], h, w)
                count = part.new_zeros(1, 1, h, w)
            out[..., y1:y2, x1:x2] += part
            count[..., y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict_mask(model: nn.Module, x: torch.Tensor, out_size: tuple[int, int], mode: str = "whole",
                 crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, H, W) class indices at ``out_size`` (the label's size): logits upsampled bilinearly, argmax."""
    logits = predict_logits(model, x, mode, crop, stride).float()
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)


def _shard(n: int, rank: int, world: int) -> Iterable[int]:
    return range(rank, n, world)


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, items: SegList, device: torch.device, precision: str = "fp32",
                       mode: str = "whole", base_size: int | None = None, crop: tuple[int, int] | None = None,
                       stride: tuple[int, int] | None = None, rank: int = 0, world: int = 1,
                       prefix: str = "val") -> dict[str, Any]:
    """mIoU / mAcc / aAcc / per-class IoU of ``model`` on ``items``: each process predicts every
    ``world``-th image (one at a time: sizes may differ), the confusion matrices are summed. Predictions
    are compared with the labels at their original size."""
    was_training = model.training
    model.eval()
    k = items.spec.num_classes
    conf = torch.zeros(k, k, dtype=torch.long, device=device)
    try:
        for i in _shard(len(items), rank, world):
            img, target = load_pair(items, i)
            x, size = eval_image(img, base_size)
            with autocast(device, precision):
                pred = predict_mask(model, x.to(device), size, mode, crop, stride)
            conf += confusion_matrix(pred[0], target.to(device), k, IGNORE)
    finally:
        model.train(was_training)
    conf = reduce_confusion(conf, device)
    out = segmentation_metrics(conf.cpu(), items.spec.classes, prefix)
    out[f"{prefix}_images"] = len(items)
    return out
