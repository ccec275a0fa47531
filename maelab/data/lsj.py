"""Large-scale jitter (LSJ, Ghiasi et al. 2021; the ViTDet recipe): horizontal flip, resize by a random
factor of the target size (0.1-2.0), then a random crop / pad to a fixed square. Image, masks and
boxes go through the same geometry; the boxes are then recomputed from the cropped masks (ViTDet's
``recompute_boxes``), so a box is always the tight box of its mask and lies inside the image, and an
instance cropped away entirely is dropped. Every draw comes from an explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maelab.data.transforms import IMAGENET_MEAN
from maelab.errors import MaelabError

PAD_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # the mean colour: 0 after normalisation


def check_scale_range(scale_range: tuple[float, float]) -> None:
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise MaelabError(f"--scale-range must be two numbers 0 < min <= max, got {list(scale_range)}")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy boxes in pixel-edge coordinates (a one-pixel mask at x has x1 = x, x2 = x + 1)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    rows, cols = masks.bool().any(dim=2), masks.bool().any(dim=1)
    h, w = masks.shape[1:]
    ys, xs = torch.arange(h), torch.arange(w)
    big = max(h, w) + 1
    y1 = torch.where(rows, ys, big).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x1 = torch.where(cols, xs, big).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def large_scale_jitter(image: torch.Tensor, target: dict[str, torch.Tensor], size: int,
                       scale_range: tuple[float, float], hflip: bool, generator: torch.Generator
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(3, size, size) uint8 image and its target (``boxes``, ``labels``, ``masks``) from a (3, H, W)
    uint8 image and its target at the image's size."""
    _, h, w = image.shape
    masks, labels = target["masks"], target["labels"]
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if hflip and u[0] < 0.5:
        image, masks = image.flip(-1), masks.flip(-1)
    scale = (scale_range[0] + (scale_range[1] - scale_range[0]) * u[1]) * min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=True)[0].round_().clamp_(0, 255).to(torch.uint8)
    top, left = (min(int(r * (max(n - size, 0) + 1)), max(n - size, 0)) for r, n in ((u[2], nh), (u[3], nw)))
    ch, cw = min(size, nh - top), min(size, nw - left)
    out = torch.tensor(PAD_PIXEL, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    out[:, :ch, :cw] = resized[:, top:top + ch, left:left + cw]
    out_masks = torch.zeros((masks.shape[0], size, size), dtype=torch.uint8)
    if masks.shape[0]:
        # crop in the source grid first: nearest resampling of only the rows / columns that survive
        ys = ((torch.arange(top, top + ch) + 0.5) / (nh / h)).floor().long().clamp_(0, h - 1)
        xs = ((torch.arange(left, left + cw) + 0.5) / (nw / w)).floor().long().clamp_(0, w - 1)
        out_masks[:, :ch, :cw] = masks[:, ys][:, :, xs]
    keep = out_masks.flatten(1).bool().any(dim=1)
    out_masks = out_masks[keep]
    return out, {"boxes": masks_to_boxes(out_masks), "labels": labels[keep], "masks": out_masks}
