"""Mask R-CNN (torchvision) on a ViT through ViTDet's simple feature pyramid, trained in the one loop.

:func:`build_detector` puts a :class:`~maelab.transfer.pyramid.SimpleFeaturePyramid` over a
:class:`~maelab.transfer.backbone.ViTBackbone` into torchvision's ``MaskRCNN`` with ViTDet's heads: a
two-conv RPN head, a 4-conv + 1-fc box head and a 4-conv mask head, the convolutions with LayerNorm.
Anchors (one size per level, aspect ratios 0.5 / 1 / 2) and the RoI poolers ('0'-'3') match the
pyramid. Images enter as pixels in [0, 1]; the detector's own transform normalises them (ImageNet mean
/ std), resizes the longer side to ``img_size`` (training crops already have it) and pads to a
multiple of 32, and maps detections back to each image's own size.

:class:`DetectTask` is what differs in :class:`~maelab.train.loop.Trainer`: the sum of Mask R-CNN's
five losses, layer-wise lr decay groups, box / mask AP after an epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from maelab.choices import DETECTOR_HEADS
from maelab.data.coco import CocoData, read_image
from maelab.data.loader import Batch
from maelab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from maelab.data.workers import ignore_stop_signals, stop_workers, worker_batches
from maelab.errors import MaelabError
from maelab.io import read_weights
from maelab.evaluate.detection import coco_ap, coco_results, ground_truth
from maelab.models.state_dicts import check_state_dict
from maelab.models.vit import EncoderWeights
from maelab.train.checkpoint import resolve_weights_path
from maelab.train.distributed import DistInfo
from maelab.train.optim import param_groups
from maelab.train.precision import autocast
from maelab.train.tasks import SupervisedTask
from maelab.transfer.backbone import ViTBackbone, layer_decay_groups
from maelab.transfer.pyramid import SimpleFeaturePyramid

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def detector_spec(arch: dict[str, Any], img_size: int, categories: list[dict[str, Any]], window_size: int | None,
                  global_blocks: list[int], out_channels: int, anchor_sizes: list[int],
                  heads: dict[str, int] | None = None) -> dict[str, Any]:
    """Everything :func:`build_detector` needs, as JSON: what a checkpoint records (``meta``) so that
    ``eval`` and ``predict`` rebuild the same model. ``heads`` overrides :data:`DETECTOR_HEADS` (small heads for
    CPU-scale runs and tests)."""
    sizes = dict(DETECTOR_HEADS, **(heads or {}))
    bad = {k: v for k, v in sizes.items() if int(v) < 1}
    if bad:
        raise MaelabError(f"head sizes must be positive, got {bad}")
    return {"arch": "maskrcnn_vitdet", "vit": dict(arch, img_size=[img_size, img_size]), "img_size": img_size,
            "categories": categories, "window_size": window_size, "global_blocks": list(global_blocks),
            "out_channels": out_channels, "anchor_sizes": list(anchor_sizes), "heads": sizes}


def check_spec(spec: dict[str, Any], where: str) -> None:
    if spec.get("arch") != "maskrcnn_vitdet":
        raise MaelabError(f"{where} holds no maelab detector (its weights describe {spec.get('arch', 'nothing')!r}); "
                          f"give a run of `maelab detect train`")


def build_detector(spec: dict[str, Any], enc: EncoderWeights | None = None, drop_path: float = 0.0) -> MaskRCNN:
    """Mask R-CNN over the simple feature pyramid of a ViT (``enc``'s weights, or random for None)."""
    anchor_sizes = tuple(int(s) for s in spec["anchor_sizes"])
    if len(anchor_sizes) != 5 or min(anchor_sizes) < 1:
        raise MaelabError(f"--anchor-sizes takes five positive sizes (strides 4, 8, 16, 32, 64), got "
                          f"{list(anchor_sizes)}")
    size = int(spec["img_size"])
    vit_arch = dict(spec["vit"])
    backbone = ViTBackbone(enc, vit_arch, size, out_indices=(int(vit_arch["depth"]) - 1,), drop_path_rate=drop_path,
                           window_size=spec["window_size"], global_blocks=spec["global_blocks"])
    pyramid = SimpleFeaturePyramid(backbone, spec["out_channels"])
    c, h = pyramid.out_channels, dict(DETECTOR_HEADS, **spec.get("heads", {}))
    proposals = int(h["proposals"])
    anchors = AnchorGenerator(sizes=tuple((s,) for s in anchor_sizes), aspect_ratios=(ASPECT_RATIOS,) * 5)
    model = MaskRCNN(
        pyramid, min_size=size, max_size=size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, len(ASPECT_RATIOS), conv_depth=2),
        rpn_pre_nms_top_n_train=proposals, rpn_post_nms_top_n_train=proposals,
        rpn_pre_nms_top_n_test=max(proposals // 2, 1), rpn_post_nms_top_n_test=max(proposals // 2, 1),
        box_batch_size_per_image=int(h["roi_batch"]),
        box_head=FastRCNNConvFCHead((c, 7, 7), [h["head_width"]] * 4, [h["fc_width"]], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(h["fc_width"], len(spec["categories"]) + 1),
        mask_head=MaskRCNNHeads(c, [h["head_width"]] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(h["head_width"], h["head_width"], len(spec["categories"]) + 1))
    model.notes = backbone.notes
    return model


def detector_groups(model: MaskRCNN, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay over the ViT (the pyramid at scale 1), plain AdamW groups for the heads; no
    weight decay on 1-D parameters, tokens, position embeddings."""
    groups = layer_decay_groups(model.backbone, lr, weight_decay, layer_decay, prefix="vit.")
    inside = {id(p) for p in model.backbone.parameters()}
    heads = nn.ParameterList([p for p in model.parameters() if id(p) not in inside])
    return groups + [dict(g, lr=lr, lr_scale=1.0) for g in param_groups(heads, weight_decay)]


class _Images(Dataset):
    def __init__(self, data: CocoData, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = self.data.images[self.indices[i]]
        return read_image(image), image.id


def _as_lists(samples):
    return tuple(map(list, zip(*samples)))


def image_batches(data: CocoData, indices: list[int], batch_size: int, num_workers: int) -> Iterator:
    """(list of uint8 (3, H, W) images at their own sizes, their ids), in ``indices`` order."""
    loader = DataLoader(_Images(data, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_lists, worker_init_fn=ignore_stop_signals)
    try:
        yield from worker_batches(loader)
    finally:
        stop_workers(loader)


@torch.no_grad()
def detect(model: MaskRCNN, images: list[torch.Tensor], device: torch.device, precision: str) -> list[dict]:
    """torchvision's detections (boxes in each image's pixels, labels, scores, mask probabilities) of
    uint8 images, in eval mode."""
    model.eval()
    with autocast(device, precision):
        outputs = model([thick_enough(im.to(device).float().div_(255.0), model.transform.max_size) for im in images])
    outputs = [{k: v.float() if v.is_floating_point() else v for k, v in out.items()} for out in outputs]
    for im, out in zip(images, outputs):  # back to the image itself where thick_enough padded it
        h, w = im.shape[-2:]
        out["boxes"][:, 0::2] = out["boxes"][:, 0::2].clamp(max=w)
        out["boxes"][:, 1::2] = out["boxes"][:, 1::2].clamp(max=h)
        if "masks" in out:
            out["masks"] = out["masks"][..., :h, :w]
    return outputs


def thick_enough(image: torch.Tensor, max_size: int) -> torch.Tensor:
    """``image`` (3, H, W), padded with zeros at the bottom / right so that torchvision's resize (the long
    side to at most ``max_size``) leaves its short side at least one pixel: a 1 x 500 strip at a 32-px
    detector was resized to 0 x 32 and failed inside torchvision."""
    h, w = image.shape[-2:]
    least = math.ceil(max(h, w) / max_size) + 1  # + 1: the resize floors a scaled size that may be 0.999...
    if min(h, w) >= least:
        return image
    return F.pad(image, (0, max(least - w, 0), 0, max(least - h, 0)))


def evaluate_detector(model: MaskRCNN, data: CocoData, device: torch.device, precision: str, info: DistInfo,
                      batch_size: int = 1, num_workers: int = 0) -> dict[str, float]:
    """Box and mask AP (COCOeval, percent) of ``model`` on every image of ``data``; each process detects
    its share, rank 0 scores all, every process returns the same numbers."""
    mine = list(range(info.rank, len(data), info.world))
    results: list[dict] = []
    for images, ids in image_batches(data, mine, batch_size, num_workers):
        for image_id, out in zip(ids, detect(model, images, device, precision)):
            results += coco_results(image_id, out, data.cat_id)
    if info.enabled:
        parts: list[Any] = [None] * info.world
        dist.all_gather_object(parts, results)
        results = [r for part in parts for r in part]
    ids = [im.id for im in data.images]
    metrics = [coco_ap(ground_truth(data.dataset, ids), results, image_ids=ids) if info.is_main else None]
    if info.enabled:
        dist.broadcast_object_list(metrics, src=0)
    return dict(metrics[0], detections=float(len(results)))


class DetectTask(SupervisedTask):
    """Mask R-CNN's objective (RPN objectness + box regression, RoI classification + box regression,
    mask BCE, summed as torchvision and detectron2 do) on a batch's images and targets; box / mask AP
    from ``evaluate(epoch, last)``."""

    def forward(self, runner: nn.Module, batch: Batch):
        losses = runner(list(batch.images), batch.targets)
        return sum(losses.values()), losses


def load_detector(path: str | Path) -> tuple[MaskRCNN, dict[str, Any], Path]:
    """(detector in eval mode, its spec, the weights file) from a `maelab detect train` run folder,
    checkpoint folder or weights file."""
    weights_path = resolve_weights_path(path)
    state_dict, spec = read_weights(weights_path)
    check_spec(spec, str(weights_path))
    model = build_detector(spec)
    check_state_dict(model, state_dict, f"checkpoint {weights_path}")
    model.load_state_dict(state_dict)
    return model.eval(), spec, weights_path
