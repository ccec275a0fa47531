"""Box and mask AP with pycocotools' COCOeval, against the original category ids.

Detections (boxes in pixels of the original image, contiguous labels, scores, per-instance mask
probabilities) become COCO result entries (``bbox`` as x, y, w, h; ``segmentation`` as RLE of the
mask thresholded at 0.5; labels mapped back to category ids). With no detection at all every AP is 0
(COCOeval cannot load an empty result list; no detection recalls nothing).
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maelab.data.coco import usable_segmentation

AP_KEYS = ("AP", "AP50", "AP75")  # COCOeval.stats[0:3]


def coco_results(image_id: int, output: dict[str, torch.Tensor], cat_id: Callable[[int], int],
                 mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result entries of one image's detections (torchvision's output dict, on any device)."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = output.get("masks")
    rles = []
    if masks is not None and len(labels):
        binary = (masks.detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for r in rles:
            r["counts"] = r["counts"].decode("ascii")  # JSON-friendly, as COCO files store it
    out = []
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
        x1, y1, x2, y2 = box
        entry = {"image_id": int(image_id), "category_id": int(cat_id(label)), "score": float(score),
                 "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if rles:
            entry["segmentation"] = rles[i]
        out.append(entry)
    return out


def ground_truth(dataset: dict[str, Any], image_ids: list[int] | None = None) -> COCO:
    """A pycocotools ``COCO`` index over the annotation JSON (restricted to ``image_ids``), built quietly.
    Annotations without an ``area`` get their box area (COCOeval's area ranges need one). Every annotation
    gets its own id here (1, 2, ...): COCOeval takes id 0 for "unmatched" and merges annotations that share
    an id, so a file numbered from 0, or with repeated or missing ids, would score a perfect detector low.

    The ground truth is the file as training reads it (:func:`~maelab.data.coco.load_coco`): ids written
    as strings (``"7"``) are numbers here too, or every detection, made with the number, would miss them
    (AP 0 without a word); an annotation without a usable segmentation is scored against its box as mask,
    as it is trained (pycocotools failed on it at the end of the first epoch)."""
    d = copy.copy(dataset)
    keep = set(image_ids) if image_ids is not None else None
    d["images"] = [{**im, "id": int(im["id"])} for im in dataset["images"] if keep is None or int(im["id"]) in keep]
    d["categories"] = [{**c, "id": int(c["id"])} for c in dataset["categories"]]
    anns = []
    for i, a in enumerate(dataset["annotations"]):
        if keep is not None and int(a["image_id"]) not in keep:
            continue
        bbox = [float(v) for v in a["bbox"]]
        a = {**a, "id": i + 1, "image_id": int(a["image_id"]), "category_id": int(a["category_id"]), "bbox": bbox,
             "iscrowd": int(a.get("iscrowd") or 0), "segmentation": scored_segmentation(a, bbox)}
        a["area"] = float(a["area"]) if a.get("area") is not None else bbox[2] * bbox[3]
        anns.append(a)
    d["annotations"] = anns
    gt = COCO()
    gt.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def scored_segmentation(ann: dict[str, Any], bbox: list[float]) -> Any:
    """An annotation's segmentation as pycocotools can score it: its polygons of at least 3 points, its
    RLE, or (none usable, as training decides) the box as a polygon."""
    seg = usable_segmentation(ann.get("segmentation"))
    if isinstance(seg, list):
        return [[float(v) for v in p] for p in seg]
    if seg is not None:
        return seg
    x, y, w, h = bbox
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def coco_ap(gt: COCO, results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox", "segm"),
            image_ids: list[int] | None = None) -> dict[str, float]:
    """``box_AP``, ``box_AP50``, ``box_AP75`` (and ``mask_*`` for ``segm``) in percent, over ``image_ids``
    (default: every image of ``gt``). Categories without ground truth in these images are left out of
    the mean, as COCOeval does."""
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(image_ids)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        prefix = "box" if iou_type == "bbox" else "mask"
        if iou_type == "segm":  # without the box, loadRes takes the area from the mask (as detectron2 does)
            usable = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            usable = list(results)
        if not usable:
            metrics.update({f"{prefix}_{k}": 0.0 for k in AP_KEYS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(usable))
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for k, v in zip(AP_KEYS, ev.stats[:3]):
            metrics[f"{prefix}_{k}"] = 100.0 * max(float(v), 0.0)  # -1: no ground truth at all
    return metrics
