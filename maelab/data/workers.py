"""DataLoader worker processes: how many, how they behave when the job is signalled, and how they
are stopped when a run ends by an error."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import TYPE_CHECKING, Iterator

from maelab.errors import MaelabError, warn_for_job

if TYPE_CHECKING:  # a type only: the CLI checks --num-workers without loading torch
    from torch.utils.data import DataLoader


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_CAPPED: set[int] = set()


def default_workers(requested: int) -> int:
    """``-1``: one worker per CPU core, at most 8; otherwise the number asked for, up to 4 per core (at
    least 8): 1000 workers on 2 cores took 22 GB and minutes of start-up before the first batch (other
    negative numbers are refused: only -1 means "auto")."""
    if requested < -1:
        raise MaelabError(f"--num-workers must be 0 or more, or -1 for one per CPU core, got {requested}")
    if requested >= 0:
        limit = max(8, 4 * cpu_cores())
        if requested > limit and requested not in _CAPPED:  # said once, though every loader asks
            _CAPPED.add(requested)
            warn_for_job(f"--num-workers {requested} is more than 4 per CPU core ({cpu_cores()} cores): using {limit}")
        return min(requested, limit)
    return max(1, min(8, cpu_cores()))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM/SIGUSR1. Schedulers (Slurm, ``timeout``,
    ``kill -TERM -PGID``) signal the whole process group; a worker dying of it would crash the main
    process before it can save. The main process stops at the next step, saves, and shuts them down."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(loader: DataLoader, iterator: Iterator | None = None) -> None:
    """Shut ``loader``'s worker processes down now (its persistent iterator and ``iterator``).

    Needed because workers ignore SIGTERM: a worker still alive when Python exits makes the
    multiprocessing exit hook (SIGTERM, then join) wait forever. An error's traceback holds a reference
    cycle (torch's re-raise keeps the exception in its frame) that keeps persistent workers alive until
    exit, so the error path must not rely on the iterator being freed. ``_shutdown_workers`` is the
    DataLoader's own clean shutdown (idempotent) and the only way to stop persistent workers."""
    for it in (iterator, getattr(loader, "_iterator", None)):
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    loader._iterator = None


def worker_batches(loader: DataLoader) -> Iterator:
    """``iter(loader)``, stopping its workers (:func:`stop_workers`) when the iteration ends by an
    error in a worker or is abandoned (the consumer closes this generator)."""
    it = iter(loader)
    try:
        yield from it
    except BaseException:
        stop_workers(loader, it)
        raise


def kill_orphaned_workers() -> None:
    """Kill the DataLoader worker processes (daemonic children) an escaping error left alive: they ignore
    SIGTERM (the job's signal is for the main process), so Python's exit, which terminates daemonic children
    with SIGTERM and then joins them, would wait for them forever while the error's frames hold their loader."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    watcher = signal.getsignal(signal.SIGCHLD)  # torch's: it would report the killed workers as a failure
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            child.kill()
            child.join(5)
    finally:
        signal.signal(signal.SIGCHLD, watcher)
