"""One code path for one process and many: torchrun's environment decides.

``torchrun --nproc_per_node N maelab pretrain ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join a
process group (NCCL on CUDA, gloo on CPU) and wrap the model in DistributedDataParallel. Without those
variables everything below is a no-op.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from maelab.errors import MaelabError, joining_job


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

    @classmethod
    def from_env(cls) -> "DistInfo":
        """This process's place in the group as torchrun's environment gives it (one process without)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


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
    joining_job()  # from here on an error may be this process's alone (its device, its part of the data)
    info = DistInfo.from_env()
    device = pick_device(requested_device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = elastic_attempt_store(info)
        extra = dict(store=store, rank=info.rank, world_size=info.world) if store is not None else {}
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None, **extra)
    return info, device


def end_process(code: int) -> NoReturn:
    """End a torchrun worker now that its command is done, without the interpreter's finalisation.

    ``destroy_process_group`` does not stop gloo: after FSDP / DTensor use, torch's own caches (the
    device mesh behind every cached DTensor spec) keep the group object, and with it its worker
    threads, alive until exit. A worker thread that drops the last reference to a tensor while the
    interpreter finalises needs the GIL, is ended by the finalising interpreter, and the process dies
    with ``terminate called without an active exception`` (SIGABRT; torchrun then reports the run as
    failed although every file was written); rare, seen in CI and in repeated 2-process FSDP tests. By
    now every file is closed (the logger, TensorBoard and loaders close themselves); the standard
    streams and ``logging`` are flushed here, then the process exits with ``code``."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be said on it
            pass
    os._exit(code)


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


STOPPED_BY = "maelab/stopped_by"  # the job store's key for the error that stopped one of its processes


def tell_peers(message: str) -> None:
    """Leave the error that stops this process in the job's store, for the processes that will find the
    group broken: they said "another process stopped ... run the same command again to resume", false
    advice for an unreadable image that one process alone decoded. Best effort: a store that cannot be
    reached leaves them the plain peer-lost line."""
    if not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._get_default_store().set(STOPPED_BY, f"{dist.get_rank()}\n{message}")
    except Exception:  # noqa: BLE001 - the store went with a peer: nothing to tell
        pass


def peer_error() -> tuple[str, str] | None:
    """(rank, error) left by :func:`tell_peers` of another process of this group, if any."""
    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        if not store.check([STOPPED_BY]):
            return None
        rank, message = store.get(STOPPED_BY).decode().split("\n", 1)
        return rank, message
    except Exception:  # noqa: BLE001 - no store any more: no word from the peer
        return None


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False,
             activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module the training loop calls: ``model`` itself (one process), DistributedDataParallel, or
    -- ``fsdp`` -- ``model`` sharded in place with ``fully_shard`` (each transformer block its own unit,
    then the root), so every process holds 1/world of the weights, gradients and AdamW state.
    ``activation_checkpointing`` recomputes each block's activations in the backward pass instead of
    keeping them (less memory, about a third more compute); it does not change the parameter names."""
    if activation_checkpointing:
        for block in transformer_blocks(model):
            checkpoint_activations(block)
    if not info.enabled:
        if fsdp:
            warnings.warn("--fsdp shards the model across torchrun's processes; in a single process it is not "
                          "sharded (the same training, without the memory saving)")
        return model
    if fsdp:
        in_parts = getattr(model, "called_in_parts", list)()
        for block in transformer_blocks(model):
            if not any(block is b for b in in_parts):
                fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    # a model with a parameter its forward never uses (the decoder's mask token when the encoder takes the
    # mask tokens) says so: DDP waits for every gradient and failed at the second step otherwise
    unused = bool(getattr(model, "has_unused_parameters", False))
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def share_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's buffers (a BatchNorm's running statistics). DDP does so at each training
    forward, but that forward then moves each process's statistics with its own micro-batch: scored as they
    are, each process's share of a validation split would meet another model than the one rank 0 saves."""
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, Block)]


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def _no_gradient_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on accumulation micro-steps."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if skip and is_sharded(model):
        return _no_gradient_sync(model)
    return nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t``'s whole value (a collective for a sharded DTensor: call on every rank)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of a sharded model in the single-process format -- plain tensors, the
    optimizer's state numbered as ``optimizer.state_dict()`` numbers it -- on rank 0 (empty elsewhere).
    A collective: every rank calls it. So a checkpoint saved under FSDP resumes in one process or
    under DDP, and the reverse (:func:`load_full_state`)."""
    weights = get_model_state_dict(model, options=_FULL)
    named = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not named:
        return weights, {}
    index, groups = {}, []
    for group in named["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return weights, {"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, state: dict) -> None:
    """Load single-process weights and optimizer state into a sharded model (every rank, each keeps its shard)."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    named = {"state": {order[i]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def reduce_values(values: list[float], info: DistInfo, device: torch.device, op=dist.ReduceOp.MAX) -> list[float]:
    """``values`` reduced over every rank with ``op`` (a collective; the values themselves in one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")  # NCCL: GPU
    dist.all_reduce(t, op=op)
    return t.tolist()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def peak_memory(info: DistInfo, device: torch.device) -> list[float]:
    """Each process's peak memory in GiB, in rank order (a collective): allocated CUDA memory on a GPU,
    the peak resident set size (``ru_maxrss``, interpreter and libraries included) on a CPU."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not info.enabled:
        return [mine]
    t = torch.zeros(info.world, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    t[info.rank] = mine
    dist.all_reduce(t)
    return t.tolist()


def plain_copy(model: torch.nn.Module, build, info: DistInfo, device: torch.device) -> torch.nn.Module | None:
    """``model`` for work rank 0 does alone (pictures, the kNN monitor): the model itself, or, when it is
    sharded, a plain copy with the full weights built by ``build()`` on rank 0 (None on the others). A
    collective under FSDP: every rank calls it at the same point."""
    if not is_sharded(model):
        return model
    weights = get_model_state_dict(model, options=_FULL)
    if not info.is_main:
        return None
    copy = build()
    copy.load_state_dict(weights)
    return copy.to(device)
