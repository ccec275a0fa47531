"""Segmentation pictures: per image, the photo, the predicted mask over it and the ground truth over it,
with one fixed colour per class and a legend of the classes that appear."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from maelab.data.segmentation import IGNORE
from maelab.errors import MaelabError
from maelab.viz.curves import save_figure_atomic

CAMVID_COLOURS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))  # SegNet's colours


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: CamVid's for 11 classes, otherwise the PASCAL VOC bit pattern (from colour
    1, so no class is black). The same class always gets the same colour."""
    if num_classes == len(CAMVID_COLOURS):
        return np.array(CAMVID_COLOURS, dtype=np.uint8)
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, r, g, b = k + 1, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out[k] = (r, g, b)
    return out


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image with the class colours blended in; ignored pixels stay as they are."""
    if image.shape[:2] != mask.shape:
        raise MaelabError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    out = image.astype(np.float32).copy()
    keep = mask != IGNORE
    out[keep] = (1 - alpha) * out[keep] + alpha * colours[mask[keep]].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def segmentation_figure(images: Sequence[np.ndarray], preds: Sequence[np.ndarray], targets: Sequence[np.ndarray | None],
                        classes: Sequence[str], titles: Sequence[str] | None = None) -> Figure:
    """One row per image: image | prediction over it | ground truth over it (blank without one)."""
    if not images:
        raise MaelabError("no images to draw")
    colours = palette(len(classes))
    rows = len(images)
    h, w = images[0].shape[:2]
    fig = Figure(figsize=(3 * 3.2 * w / max(h, w) + 2.4, rows * 3.2 * h / max(h, w) + 0.6))
    present: set[int] = set()
    for r, (img, pred, target) in enumerate(zip(images, preds, targets)):
        present |= set(np.unique(pred).tolist())
        if target is not None:
            present |= set(np.unique(target).tolist())
        panels = [(img, "image"), (overlay(img, pred, colours), "prediction"),
                  (overlay(img, target, colours) if target is not None else None, "ground truth")]
        for c, (picture, label) in enumerate(panels):
            ax = fig.add_subplot(rows, 3, r * 3 + c + 1)
            ax.set_axis_off()
            if picture is not None:
                ax.imshow(picture)
            title = label if c or not titles else f"{titles[r]}"
            ax.set_title(title, fontsize=8)
    present.discard(IGNORE)
    handles = [Patch(color=colours[k] / 255.0, label=classes[k]) for k in sorted(present) if k < len(classes)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.86, top=0.95, bottom=0.02, wspace=0.03, hspace=0.15)
    return fig


def save_segmentation_figure(path: str | os.PathLike, images, preds, targets, classes, titles=None) -> Path:
    """Draw :func:`segmentation_figure` and write it as a PNG (atomically)."""
    return save_figure_atomic(segmentation_figure(images, preds, targets, classes, titles), path, dpi=110)
