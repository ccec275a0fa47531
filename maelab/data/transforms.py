"""Augmentation as in the paper: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip +
ImageNet normalisation. Crop boxes are drawn from an explicit ``torch.Generator`` -- vectorised for a
whole batch -- so every augmentation is a pure function of (seed, epoch, step) and a resumed or
multi-process run sees exactly the same pixels as an uninterrupted single-process one.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """(n, 4) integer boxes (top, left, h, w): torchvision's RandomResizedCrop rule, batched.

    Up to ``attempts`` candidates per sample; the first that fits wins; otherwise a centre crop
    clamped to the aspect-ratio range (the same fallback as torchvision)."""
    area = height * width
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1)
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    top = torch.floor(u[rows, first, 2] * (height - h + 1))
    left = torch.floor(u[rows, first, 3] * (width - w + 1))
    # fallback for samples with no fitting candidate: centre crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    none = ~ok.any(dim=1)
    h = torch.where(none, torch.full_like(h, fh), h)
    w = torch.where(none, torch.full_like(w, fw), w)
    top = torch.where(none, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(none, torch.full_like(left, (width - fw) // 2), left)
    return torch.stack([top, left, h, w], dim=1).long()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean


class PretrainTransform:
    """Per-sample pre-training augmentation for the DataLoader path (PIL image -> normalised tensor)."""

    def __init__(self, size: tuple[int, int], min_scale: float = 0.2, hflip: bool = True):
        self.size, self.scale, self.hflip = tuple(size), (min_scale, 1.0), hflip

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = sample_crop_boxes(1, img.height, img.width, self.scale, generator=generator)[0].tolist()
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        img = TF.resized_crop(img, top, left, h, w, list(self.size), InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and flip:
            img = TF.horizontal_flip(img)
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        return normalize(x.unsqueeze(0))[0]


class EvalTransform:
    """Resize the shorter side (by ``crop_pct``) and centre-crop to ``size``; for evaluation/features."""

    def __init__(self, size: tuple[int, int], crop_pct: float = 1.0):
        self.size = tuple(size)
        self.resize = [int(round(s / crop_pct)) for s in self.size]

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if (img.height, img.width) != self.size:
            scale = max(self.resize[0] / img.height, self.resize[1] / img.width)
            new = (max(self.size[0], round(img.height * scale)), max(self.size[1], round(img.width * scale)))
            img = TF.resize(img, list(new), InterpolationMode.BICUBIC, antialias=True)
            img = TF.center_crop(img, list(self.size))
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        return normalize(x.unsqueeze(0))[0]
