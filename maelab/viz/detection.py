"""Detections drawn over their images: masks filled half-transparent, boxes, class name and score, one
fixed colour per class; each row shows the prediction beside the ground truth when there is one.
Written to PNG atomically (torchvision's drawing utilities + Pillow)."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import matplotlib
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from maelab.io import atomic_path

PANEL_HEIGHT = 320  # rows are scaled to this height
CAPTION = 18  # pixels of caption above every panel
FONT = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")  # shipped with matplotlib


def class_colour(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class label (golden-ratio hues)."""
    h = (0.61803398875 * int(label)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_instances(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[int], names: Sequence[str],
                   scores: Sequence[float] | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) uint8 picture of ``image`` with its instances; ``labels`` are 1-based (``names[label - 1]``),
    ``masks`` boolean (N, H, W)."""
    out = image.to(torch.uint8).cpu()
    labels = [int(v) for v in labels]
    colours = [class_colour(v) for v in labels]
    if masks is not None and len(labels):
        out = draw_segmentation_masks(out, masks.bool().cpu(), alpha=0.45, colors=colours)
    if len(labels):
        text = [names[v - 1] + (f" {scores[i]:.2f}" if scores is not None else "") for i, v in enumerate(labels)]
        side = max(out.shape[-2:])  # lines and text sized to stay legible once the panel is scaled down
        out = draw_bounding_boxes(out, boxes.float().cpu(), labels=text, colors=colours, width=max(2, side // 250),
                                  font=FONT if Path(FONT).is_file() else None,
                                  font_size=max(10, side // 40) if Path(FONT).is_file() else None)
    return out


def _panel(picture: torch.Tensor, caption: str) -> Image.Image:
    img = Image.fromarray(picture.permute(1, 2, 0).numpy())
    w = max(1, round(img.width * PANEL_HEIGHT / img.height))
    img = img.resize((w, PANEL_HEIGHT), Image.BILINEAR)
    panel = Image.new("RGB", (w, PANEL_HEIGHT + CAPTION), (255, 255, 255))
    panel.paste(img, (0, CAPTION))
    ImageDraw.Draw(panel).text((4, 3), caption, fill=(0, 0, 0))
    return panel


def save_detection_grid(path: str | Path, rows: Sequence[dict], names: Sequence[str], score_threshold: float) -> Path:
    """One row per image: ``{"image": uint8 (3, H, W), "title": str, "pred": torchvision output,
    "gt": target with boxes / labels / masks or None}``; detections below ``score_threshold`` are not drawn."""
    panels: list[list[Image.Image]] = []
    for row in rows:
        pred, image = row["pred"], row["image"]
        keep = pred["scores"] >= score_threshold
        masks = pred["masks"][keep, 0] > 0.5 if "masks" in pred else None
        drawn = draw_instances(image, pred["boxes"][keep], pred["labels"][keep].tolist(), names,
                               pred["scores"][keep].tolist(), masks)
        line = [_panel(drawn, f"{row.get('title', '')} prediction (score >= {score_threshold:g}): {int(keep.sum())}")]
        gt = row.get("gt")
        if gt is not None:
            drawn = draw_instances(image, gt["boxes"], gt["labels"].tolist(), names, None, gt["masks"])
            line.append(_panel(drawn, f"ground truth: {len(gt['labels'])}"))
        panels.append(line)
    width = max(sum(p.width for p in line) for line in panels)
    grid = Image.new("RGB", (width, len(panels) * (PANEL_HEIGHT + CAPTION)), (255, 255, 255))
    for r, line in enumerate(panels):
        x = 0
        for p in line:
            grid.paste(p, (x, r * (PANEL_HEIGHT + CAPTION)))
            x += p.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
