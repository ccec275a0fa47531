"""Which patches to mask, as noise for :func:`maelab.models.mae.random_masking` (which keeps the patches
with the lowest noise): the paper's uniform random sampling and the two alternatives of its Fig. 6.

* ``random``: uniform noise -- every patch equally likely, no replacement (the paper's choice).
* ``block``: BEiT-style block-wise masking -- random rectangles (aspect 0.3-3.3, at least 4 patches, fewer
  only for the last few) are masked until exactly enough patches are covered: a rectangle that would
  cover more than are left is drawn again (BEiT's rule), so blocks are solid, never holed to fit the count.
* ``grid``: a regular lattice is kept: one patch of every k x k (ratio 1 - 1/k^2: 0.75, 8/9, 0.9375),
  at a random offset. Other ratios have no lattice and are refused (:func:`check_mask_type`); on a grid k
  does not divide, the lattice's size depends on its offset and random patches make up the exact count
  (said as a warning).

Every strategy masks exactly ``L - int(L * (1 - r))`` patches per sample (``random_masking`` draws the
same count), and is a pure function of the generator, so masks are reproducible from the seed.
"""

from __future__ import annotations

import math

import torch

from maelab.choices import MASK_TYPES
import warnings

from maelab.errors import MaelabError, SameOnEveryRank
from maelab.models.checks import num_visible

GRID_RATIOS = "0.75, 0.8888888888888888, 0.9375"  # 1 - 1/k^2 for k = 2, 3, 4 (8/9 in full: 0.889 keeps too few)


def nearest_step(mask_ratio: float) -> int:
    """The lattice step whose 1 - 1/k^2 is nearest ``mask_ratio`` (at least 1)."""
    return max(1, round(1 / math.sqrt(max(1e-6, 1 - mask_ratio))))


def grid_step(mask_ratio: float) -> int | None:
    """k when ``mask_ratio`` is 1 - 1/k^2 (k >= 2; to 1 %, so 0.889 is 8/9), else None."""
    if not 0 <= mask_ratio < 1:
        return None
    k = nearest_step(mask_ratio)
    return k if k >= 2 and abs(k * k * (1 - mask_ratio) - 1) < 0.01 else None


def legacy_grid_run(kind: str, mask_ratio: float, recorded: dict) -> bool:
    """Whether a run to resume began with grid masking at a ratio without a lattice (before such ratios
    were refused): it continues with the masks it began with, said as a warning, rather than being lost."""
    if kind != "grid" or grid_step(mask_ratio) is not None:
        return False
    if recorded.get("mask_type") != "grid" or recorded.get("mask_ratio") != mask_ratio:
        return False
    warnings.warn(f"this run began with --mask-type grid at --mask-ratio {mask_ratio:g}, before grid masking took "
                  f"lattice ratios only ({GRID_RATIOS}); it resumes with the masks it began with (at ratios under "
                  f"0.56 those are random masks), so its results are not a grid run's", stacklevel=2)
    return True


def check_mask_type(kind: str, grid: tuple[int, int], mask_ratio: float) -> None:
    """Grid masking needs a lattice ratio: at 0.5 the step rounded to 1 and the "grid" was random masking,
    and other ratios mixed a lattice with random patches, without a word. A grid the step does not divide
    is allowed, with a warning (its lattice is uneven)."""
    if kind != "grid":
        return
    k = grid_step(mask_ratio)
    if k is None:
        raise SameOnEveryRank(f"--mask-type grid keeps one patch of every k x k, so its ratios are 1 - 1/k^2 "
                              f"({GRID_RATIOS}, ...); --mask-ratio {mask_ratio:g} has no such lattice: use --mask-type "
                              f"random or block")
    rows, cols = grid
    length, lattice, kept = rows * cols, (rows // k) * (cols // k), num_visible(rows * cols, mask_ratio)
    if not (rows % k or cols % k) and kept != lattice:
        raise SameOnEveryRank(f"--mask-type grid at --mask-ratio {mask_ratio:g} keeps int({length} x (1 - {mask_ratio:g})) "
                              f"= {kept} patches, but the {k}x{k} lattice of the {rows}x{cols} "
                              f"grid has {lattice}: give --mask-ratio {1 - 1 / k**2!r}")
    if rows % k or cols % k:
        warnings.warn(f"--mask-type grid at --mask-ratio {mask_ratio:g} keeps one patch of every {k}x{k}, but the "
                      f"{rows}x{cols} patch grid is not a multiple of {k}: the lattice kept depends on its offset, and "
                      f"random patches make up the exact count", stacklevel=2)


def mask_noise(kind: str, n: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator,
               device: torch.device | str = "cpu", legacy_grid: bool = False) -> torch.Tensor:
    """(n, rows * cols) noise whose highest values are the patches to mask. ``legacy_grid``: the grid rule
    of before lattice ratios were required (step ``round(1 / sqrt(1 - r))``), for a run that began with it."""
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
        step = nearest_step(mask_ratio) if legacy_grid else grid_step(mask_ratio)
        if step is None:
            raise MaelabError(f"grid masking needs a ratio 1 - 1/k^2 ({GRID_RATIOS}), got {mask_ratio:g}")
        offsets = torch.randint(0, step, (n, 2, 1, 1), generator=generator, device=gen_device)
        r = torch.arange(rows, device=gen_device)[None, :, None]
        c = torch.arange(cols, device=gen_device)[None, None, :]
        preferred = ~(((r - offsets[:, 0]) % step == 0) & ((c - offsets[:, 1]) % step == 0))
    return (preferred.reshape(n, length).float() + tiebreak).to(device)


def _cover_with_blocks(n: int, rows: int, cols: int, target: int, generator: torch.Generator,
                       min_area: int = 4) -> torch.Tensor:
    """(n, rows, cols) bool: random rectangles marked in every sample until exactly ``target`` patches
    are. All samples draw a rectangle per round (a round is a few tensor ops, not a Python loop over
    the batch, so masking stays a negligible part of a training step); a rectangle that would mark more
    new patches than a sample has left is dropped for that round (BEiT's rule: it used to be kept, and the
    surplus unmasked again at random, leaving holes inside the blocks), and the last few patches may come
    as rectangles smaller than ``min_area``; a sample that is covered keeps its mask."""
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
        smallest = left.clamp(min=1, max=min_area).float()
        area = smallest + u[0] * (left.clamp(max=0.4 * rows * cols) - smallest).clamp(min=0)
        aspect = torch.exp(lo + u[1] * (hi - lo))
        h = torch.sqrt(area * aspect).round().clamp(1, rows)
        w = torch.sqrt(area / aspect).round().clamp(1, cols)
        top = (u[2] * (rows - h + 1)).floor()[:, None, None]
        lft = (u[3] * (cols - w + 1)).floor()[:, None, None]
        rect = (r >= top) & (r < top + h[:, None, None]) & (c >= lft) & (c < lft + w[:, None, None])
        fits = (rect & ~mask).sum((1, 2)) <= left  # never past the count: no surplus to unmask at random
        mask |= rect & (short & fits)[:, None, None]
    mask[mask.sum((1, 2)) < target] = True  # never reached in practice; random_masking still picks
    return mask
