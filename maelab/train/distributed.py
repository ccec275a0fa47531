"""One code path for one process and many: torchrun's environment decides.

``torchrun --nproc_per_node N maelab pretrain ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a
process group (NCCL on CUDA, gloo on CPU) and wrap the model in DistributedDataParallel. Without those
variables everything below is a no-op.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from maelab.errors import MaelabError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MaelabError(f"unknown device {requested!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MaelabError("--device cuda was asked for but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MaelabError("--device mps was asked for but MPS is not available")
    return device


def init_distributed(requested_device: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment, pick the device, join the process group if there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(requested_device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = elastic_attempt_store(info)
        extra = dict(store=store, rank=info.rank, world_size=info.world) if store is not None else {}
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None, **extra)
    return info, device


def elastic_attempt_store(info: DistInfo):
    """The store of this attempt of an elastic torchrun job (``--max-restarts``), or None.

    torchrun's agent keeps one store for the whole job, and the keys the previous attempt's workers
    published stay in it; a restarted group then dials the dead workers' ports (``Gloo connectFullMesh
    failed ... Connection refused``) and the restart fails. Each attempt gets its own key prefix."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world, is_master=False,
                         timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"maelab/attempt_{attempt}", base)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP only)."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (a collective: call at the same point on all)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
