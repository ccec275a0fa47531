"""Fixed 2-D sin-cos position embeddings, numerically identical to the official MAE release.

Channel layout (kept on purpose, official weights depend on it): the first half of the channels
encodes the **column** index of a patch, the second half its **row** index; each half is
``[sin(pos * w), cos(pos * w)]`` with ``w_i = 1 / 10000^(i / (D/4))``. Works for any (rows, cols) grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding ``[sin(p*w), cos(p*w)]``, computed in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(1 + rows*cols, dim) float32 table for a row-major patch grid; the cls slot is all zeros."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = grid
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, col_idx), sincos_1d(dim // 2, row_idx)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Bicubically resize the grid part of a (1, prefix + L, D) table; prefix (cls) slots are kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def sincos_grid(table: torch.Tensor) -> tuple[int, int] | str | None:
    """The (rows, cols) grid of a (L, D) patch table that *is* a 2-D sin-cos table (MAE's fixed one):
    each row's column and row halves are matched to 1-D sin-cos positions. None when it is not one;
    a string saying what is wrong when it is one but cut short or out of order (a damaged file)."""
    length, dim = table.shape
    if dim % 4 or length < 1 or table.is_meta:
        return None
    half = dim // 2
    ref = sincos_1d(half, torch.arange(length)).to(torch.float64)
    idx = []
    for part in (table[:, :half], table[:, half:]):  # columns, then rows (the official channel order)
        dist = torch.cdist(part.to(torch.float64), ref)
        best = dist.argmin(dim=1)
        if (part.to(torch.float64) - ref[best]).abs().max().item() > 1e-2:
            return None
        idx.append(best)
    col, row = idx
    cols = int(col.max()) + 1
    order = torch.arange(length)
    if length % cols == 0 and torch.equal(col, order % cols) and torch.equal(row, order // cols):
        return length // cols, cols
    return (f"it is the sin-cos table of a {int(row.max()) + 1}x{cols} grid, but its {length} rows are not that "
            f"grid in order (cut short or shuffled)")


def structure_grid(table: torch.Tensor) -> tuple[int, int] | None:
    """The (rows, cols) factorisation of a learned (L, D) patch table under which neighbours along both
    axes are most alike (learned tables are smooth in 2-D; a wrong factorisation breaks one axis).
    None when no factorisation stands out (e.g. an untrained random table)."""
    length = table.shape[0]
    if table.is_meta:
        return None
    centred = table.to(torch.float64) - table.to(torch.float64).mean(dim=0, keepdim=True)
    unit = F.normalize(centred, dim=-1)
    scores = {}
    for rows in range(2, length // 2 + 1):
        if length % rows:
            continue
        g = unit.reshape(rows, length // rows, -1)
        across = (g[:, 1:] * g[:, :-1]).sum(-1).mean().item()
        down = (g[1:] * g[:-1]).sum(-1).mean().item()
        scores[(rows, length // rows)] = min(across, down)
    if not scores:
        return None
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    best, score = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else -1.0
    return best if score > 0.3 and score - runner_up > 0.05 else None
