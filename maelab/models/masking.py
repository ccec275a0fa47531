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

from maelab.choices import MASK_TYPES
from maelab.errors import MaelabError
from maelab.models.checks import num_visible


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
    if kind == "block":
        preferred = _cover_with_blocks(n, rows, cols, to_mask, generator)
    else:
        step = max(1, round(1 / math.sqrt(max(1e-6, 1 - mask_ratio))))
        offsets = torch.randint(0, step, (n, 2, 1, 1), generator=generator, device=gen_device)
        r = torch.arange(rows, device=gen_device)[None, :, None]
        c = torch.arange(cols, device=gen_device)[None, None, :]
        preferred = ~(((r - offsets[:, 0]) % step == 0) & ((c - offsets[:, 1]) % step == 0))
    return (preferred.reshape(n, length).float() + tiebreak).to(device)


def _cover_with_blocks(n: int, rows: int, cols: int, target: int, generator: torch.Generator,
                       min_area: int = 4) -> torch.Tensor:
    """(n, rows, cols) bool: random rectangles marked in every sample until at least ``target`` patches
    are. All samples draw a rectangle per round (a round is a few tensor ops, not a Python loop over
    the batch, so masking stays a negligible part of a training step); a sample that is covered keeps
    its mask."""
    g, dev = generator, generator.device
    mask = torch.zeros(n, rows, cols, dtype=torch.bool, device=dev)
    r = torch.arange(rows, device=dev)[None, :, None]
    c = torch.arange(cols, device=dev)[None, None, :]
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for _ in range(100 * rows * cols):  # each round marks at least one new patch in most samples
        left = target - mask.sum((1, 2))
        short = left > 0
        if not bool(short.any()):
            return mask
        u = torch.rand(4, n, generator=g, device=dev)
        area = min_area + u[0] * (left.clamp(max=0.4 * rows * cols) - min_area).clamp(min=0)
        aspect = torch.exp(lo + u[1] * (hi - lo))
        h = torch.sqrt(area * aspect).round().clamp(1, rows)
        w = torch.sqrt(area / aspect).round().clamp(1, cols)
        top = (u[2] * (rows - h + 1)).floor()[:, None, None]
        lft = (u[3] * (cols - w + 1)).floor()[:, None, None]
        rect = (r >= top) & (r < top + h[:, None, None]) & (c >= lft) & (c < lft + w[:, None, None])
        mask |= rect & short[:, None, None]
    mask[mask.sum((1, 2)) < target] = True  # never reached in practice; random_masking still picks
    return mask
