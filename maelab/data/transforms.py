"""Augmentation as in the paper: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip +
ImageNet normalisation (and, for its ablation, fixed-size or no crop and colour jitter). Crop boxes are drawn from an explicit ``torch.Generator`` -- vectorised for a
whole batch -- so every augmentation is a pure function of (seed, epoch, step) and a resumed or
multi-process run sees exactly the same pixels as an uninterrupted single-process one.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from timm.data import create_transform
from torchvision.transforms import InterpolationMode

from maelab.choices import CROPS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_range(crop: str, min_scale: float, height: int, width: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(area scale range, aspect-ratio range) of :func:`sample_crop_boxes` for a crop mode:
    ``random-size`` is RandomResizedCrop (area in [min_scale, 1], aspect 3/4-4/3); ``fixed-size`` keeps the
    area at the random-size crop's mean ((min_scale + 1) / 2) and the image's aspect, at a random
    position; ``none`` is the whole image."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    aspect = (width / height, width / height)
    if crop == "none":
        return (1.0, 1.0), aspect
    if crop == "fixed-size":
        mean = (min_scale + 1.0) / 2.0
        return (mean, mean), aspect
    return (min_scale, 1.0), RATIO


def jitter_factors(n: int, strength: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """(n, 3) brightness / contrast / saturation factors uniform in [1 - s, 1 + s] (None when s = 0)."""
    if strength <= 0:
        return None
    return 1.0 + strength * (2.0 * torch.rand(n, 3, generator=generator, dtype=torch.float64) - 1.0)


def jitter_colors(x: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    """Colour jitter of (N, 3, H, W) images in [0, 1]: brightness, then contrast (around the mean grey),
    then saturation (around each pixel's grey), as torchvision's ColorJitter without hue, per sample."""
    if factors is None:
        return x
    f = factors.to(x.device, x.dtype)[:, :, None, None, None]
    grey = lambda t: (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])  # noqa: E731
    x = (x * f[:, 0]).clamp(0, 1)
    mean = grey(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
    g = grey(x)
    return ((x - g) * f[:, 2] + g).clamp(0, 1)


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


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] -> ImageNet-normalised model input."""
    mean, std = _stats(x)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) -> pixels in [0, 1] (clamped), for pictures."""
    mean, std = _stats(x)
    return (x * std + mean).clamp(0.0, 1.0)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> ImageNet-normalised float model input."""
    return normalize(x.float().div_(255.0))


class PretrainTransform:
    """Per-sample pre-training augmentation for the DataLoader path (PIL image -> normalised tensor): the
    same crop, flip and colour jitter rules as the in-memory batch path."""

    def __init__(self, size: tuple[int, int], min_scale: float = 0.2, hflip: bool = True, crop: str = "random-size",
                 color_jitter: float = 0.0):
        self.size, self.min_scale, self.hflip = tuple(size), min_scale, hflip
        self.crop, self.color_jitter = crop, color_jitter

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        scale, ratio = crop_range(self.crop, self.min_scale, img.height, img.width)
        top, left, h, w = sample_crop_boxes(1, img.height, img.width, scale, ratio, generator=generator)[0].tolist()
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        factors = jitter_factors(1, self.color_jitter, generator)
        img = TF.resized_crop(img, top, left, h, w, list(self.size), InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and flip:
            img = TF.horizontal_flip(img)
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        return normalize(jitter_colors(x.unsqueeze(0), factors))[0]


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


class SeededTransform:
    """Runs a transform that draws from the global RNGs (torch, ``random``, NumPy -- as timm's and
    torchvision's do) under a seed taken from the per-sample ``generator``, then restores the caller's
    RNG states. The result is a pure function of (image, seed), in any worker and after a resume."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"SeededTransform({self.transform!r})"


def finetune_transform(size: tuple[int, int], min_scale: float = 0.08, hflip: bool = True,
                       auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25) -> SeededTransform:
    """The official fine-tuning augmentation through timm's ``create_transform``: RandomResizedCrop
    (bicubic, scale ``(min_scale, 1)``) + flip + RandAugment + normalisation + random erasing (pixel
    mode). ``auto_augment=None`` turns RandAugment off (timm then adds no colour jitter either)."""
    t = create_transform(input_size=tuple(size), is_training=True, scale=(min_scale, 1.0),
                         hflip=0.5 if hflip else 0.0, color_jitter=None, auto_augment=auto_augment,
                         interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in getattr(t, "transforms", []):  # this transform's RandAugment ops only, nothing global
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return SeededTransform(t)


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also for 0 bits: RandAugment's ``PosterizeIncreasing`` reaches 0 bits at
    high magnitudes, which Pillow >= 12 refuses; older Pillow returned a black image, as here."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, int(bits_to_keep))
