"""The fast path for datasets that fit in RAM: decode every image once into one uint8 tensor, then
augment whole batches with one vectorised resampling (affine grid + bicubic ``grid_sample``).

On a 2-core machine per-sample PIL work starves a 32-px model; here the per-step cost is one
batched op, and it runs on the training device.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maelab.data.folders import open_rgb
from maelab.data.transforms import crop_range, jitter_colors, jitter_factors, normalize, sample_crop_boxes
from maelab.data.workers import ignore_stop_signals
from maelab.errors import MaelabError


class _DecodeDataset(Dataset):
    def __init__(self, paths: list[str], size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(uint8 image, readable, has the target size); rows that are not both are zeros."""
        blank = torch.zeros(3, *self.size, dtype=torch.uint8)
        try:
            img = open_rgb(self.paths[i])
        except MaelabError:
            return blank, False, True
        if (img.height, img.width) != self.size:
            return blank, True, False
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), True, True


def decode_all(
    paths: list[str], size: tuple[int, int], num_workers: int = 0, progress: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """(N, 3, H, W) uint8 tensor of every image and the indices of the files that could not be read
    (their rows are zeros).

    Every image must already have ``size``: resizing here would ignore the aspect ratio, and the
    streamed path's views (random crops of the whole image, or resize + centre crop) cannot be taken
    from a fixed-size copy, so other sizes are an error rather than a silent distortion."""
    size = tuple(size)
    loader = DataLoader(_DecodeDataset(paths, size), batch_size=512, num_workers=num_workers, shuffle=False,
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator())  # its seed draw must not move the global RNG
    out = torch.empty(len(paths), 3, *size, dtype=torch.uint8)
    bad: list[int] = []
    other: list[int] = []
    start = 0
    it = loader
    if progress:
        it = tqdm(loader, desc="decoding images into RAM", unit="batch", leave=False, disable=None)
    for images, ok, fits in it:
        out[start : start + len(images)] = images
        bad.extend(start + int(i) for i in torch.nonzero(~ok).flatten())
        other.extend(start + int(i) for i in torch.nonzero(~fits).flatten())
        start += len(images)
    if other:
        width, height = open_rgb(paths[other[0]]).size  # as decoded: after its EXIF orientation
        example = f"{paths[other[0]]} is {height}x{width}"
        raise MaelabError(
            f"decoding into RAM (--in-memory yes) needs every image at the input size {size[0]}x{size[1]} "
            f"(height x width), but {len(other)} of {len(paths)} are not ({example}); use --in-memory auto "
            f"or no, which resize and crop them as the streamed path does")
    return out, bad


def fits_in_memory(num_images: int, size: tuple[int, int], fraction: float = 0.25) -> bool:
    """Whether the uint8 tensor would take less than ``fraction`` of physical RAM."""
    need = num_images * 3 * size[0] * size[1]
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return need < fraction * total


def crop_flip_resize(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resize bicubically to ``out_size``; uint8 in,
    float in [0, 1] out. One ``grid_sample`` for the whole batch."""
    n, _, height, width = images.shape
    x = images.float().div_(255.0)
    boxes = boxes.to(x.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    # Affine map from output coordinates in [-1, 1] to input coordinates (align_corners=False).
    sx, sy = w / width, h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sign = 1.0 - 2.0 * flips.to(x.device, torch.float32)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta, [n, 3, *out_size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def augment_batch(
    images: torch.Tensor,
    out_size: tuple[int, int],
    generator: torch.Generator,
    min_scale: float = 0.2,
    hflip: bool = True,
    global_n: int | None = None,
    offset: int = 0,
    crop: str = "random-size",
    color_jitter: float = 0.0,
) -> torch.Tensor:
    """RandomResizedCrop (or another ``crop`` mode) + flip (+ colour jitter) + normalisation for a batch
    of uint8 images.

    The random parameters are drawn for the whole global batch (``global_n`` images) and rows
    ``offset : offset + len(images)`` are applied here, so each process of a distributed run (and
    each accumulation micro-step) augments its share exactly as one big single-process batch would."""
    n, _, height, width = images.shape
    total = global_n or n
    boxes = sample_crop_boxes(total, height, width, *crop_range(crop, min_scale, height, width), generator=generator)
    flips = torch.rand(total, generator=generator) < 0.5
    factors = jitter_factors(total, color_jitter, generator)  # drawn last: without jitter the stream is unchanged
    if not hflip:
        flips.zero_()
    rows = slice(offset, offset + n)
    out = crop_flip_resize(images, boxes[rows], flips[rows], out_size)
    return normalize(jitter_colors(out, None if factors is None else factors[rows]))
