"""DataLoader worker processes: how many, and how they behave when the job is signalled."""

from __future__ import annotations

import os
import signal


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(requested: int) -> int:
    """``-1``: one worker per CPU core, at most 8; otherwise the number asked for."""
    if requested >= 0:
        return requested
    return max(1, min(8, cpu_cores()))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM. Schedulers (Slurm, ``timeout``,
    ``kill -TERM -PGID``) signal the whole process group; a worker dying of it would crash the main
    process before it can save. The main process stops at the next step, saves, and shuts them down."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
