"""Which numeric precision a run uses, and the autocast context that applies it."""

from __future__ import annotations

import torch


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a CUDA GPU with native bf16 (the fast path there, and no loss scaling
    needed), fp32 on CPUs and MPS so results there stay comparable across machines (pass
    ``--precision bf16`` on a CPU with AVX-512 BF16 / AMX: ~1.8x faster steps, docs/benchmarks.md)."""
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision name (``auto`` is resolved for ``device``)."""
    precision = resolve_precision(precision, device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
