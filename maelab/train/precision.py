"""Which numeric precision a run uses, and the autocast context that applies it."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512 BF16
    or AMX (there bf16 autocast makes MAE steps ~1.8x faster; elsewhere it is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a CUDA GPU with native bf16 (the fast path there, and no loss scaling
    needed), fp32 on CPUs and MPS so results there stay comparable across machines. ``fast``: bf16 wherever
    the hardware has it (:func:`native_bf16`, CPUs included), fp32 elsewhere -- what time-budgeted runs
    (the quick recipe, ablations) use, since a budget buys ~1.8x the steps on such a CPU."""
    if requested == "fast":
        return "bf16" if native_bf16(device) else "fp32"
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
