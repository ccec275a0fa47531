"""Seeds derived from integers, so every random choice is a pure function of (seed, epoch, step, ...):
a resumed run, or one split over more processes, draws exactly what an uninterrupted one draws."""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so (seed, epoch, step) streams never collide."""
    h = 0
    for k in keys:
        h = (h ^ (int(k) + _MIX + (h << 6) + (h >> 2))) & ((1 << 64) - 1)
        h = (h * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def make_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*keys))
    return g


def clone_generator(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c
