"""Which patches to mask, as noise for :func:`maelab.models.mae.random_masking` (which keeps the patches
with the lowest noise): the paper's uniform random sampling and the two alternatives of its Fig. 6.

* ``random``: uniform noise -- every patch equally likely, no replacement (the paper's choice).
* ``block``: BEiT-style block-wise masking -- random rectangles (aspect 0.3-3.3, at least 4 patches)
  are masked until enough patches are covered; patches outside them are kept first.
* ``grid``: a regular lattice (one of every 2 x 2 at ratio 0.75, at a random offset) is kept.

Every strategy masks exactly ``L - int(L * (1 - r))`` patches per sample (``random_masking`` draws the
same count), and is a pure function of the generator, so masks are reproducible from the seed.
"""

from __future__ import annotations

import math

import torch

from maelab.errors import MaelabError
from maelab.models.checks import num_visible

MASK_TYPES = ("random", "block", "grid")


def mask_noise(kind: str, n: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, rows * cols) noise whose highest values are the patches to mask."""
    if kind not in MASK_TYPES:
        raise MaelabError(f"mask type must be one of {', '.join(MASK_TYPES)}, got {kind!r}")
    rows, cols = grid
    length = rows * cols
    if kind == "random":
        return torch.rand(n, length, generator=generator, device=device)
    gen_device = generator.device
    tiebreak = torch.rand(n, length, generator=generator, device=gen_device)
    to_mask = length - num_visible(length, mask_ratio)
    preferred = torch.zeros(n, rows, cols, device=gen_device)  # 1 = mask this patch first
    if kind == "block":
        for i in range(n):
            _cover_with_blocks(preferred[i], to_mask, generator)
    else:
        step = max(1, round(1 / math.sqrt(max(1e-6, 1 - mask_ratio))))
        offsets = torch.randint(0, step, (n, 2), generator=generator, device=gen_device)
        r = torch.arange(rows, device=gen_device)
        c = torch.arange(cols, device=gen_device)
        for i in range(n):
            keep = ((r[:, None] - offsets[i, 0]) % step == 0) & ((c[None, :] - offsets[i, 1]) % step == 0)
            preferred[i] = (~keep).float()
    return (preferred.reshape(n, length) + tiebreak).to(device)


def _cover_with_blocks(mask: torch.Tensor, target: int, generator: torch.Generator, min_area: int = 4) -> None:
    """Mark random rectangles in ``mask`` (rows, cols) until at least ``target`` patches are marked."""
    rows, cols = mask.shape
    g = generator
    for _ in range(100 * rows * cols):  # each try marks at least one new patch once most are covered
        covered = int(mask.sum())
        if covered >= target:
            return
        left = target - covered
        area = min_area + float(torch.rand(1, generator=g, device=g.device)) * max(0.0, min(left, 0.4 * rows * cols) - min_area)
        log_aspect = math.log(0.3) + float(torch.rand(1, generator=g, device=g.device)) * (math.log(1 / 0.3) - math.log(0.3))
        h = max(1, min(rows, round(math.sqrt(area * math.exp(log_aspect)))))
        w = max(1, min(cols, round(math.sqrt(area / math.exp(log_aspect)))))
        top = int(torch.randint(0, rows - h + 1, (1,), generator=g, device=g.device))
        lft = int(torch.randint(0, cols - w + 1, (1,), generator=g, device=g.device))
        mask[top : top + h, lft : lft + w] = 1.0
    mask.fill_(1.0)  # never reached in practice; masking everything still lets random_masking pick
