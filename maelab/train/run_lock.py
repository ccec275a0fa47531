"""One process writes a run folder at a time.

Two processes in one folder (the same command started twice, a Slurm job requeued while the old one still
runs, a chain step left running when its `maelab recipe` parent was killed and the recipe run again)
would both resume from the same checkpoint and then interleave their checkpoints, logs and config: a
run silently made of two. The process that writes the folder (rank 0) holds an exclusive ``flock`` on
``<run>/.maelab.lock`` for its whole life; the kernel drops it when the process ends, however it ends,
so a killed run never leaves a stale lock behind. A file system without locks (some network mounts)
runs unguarded, as before. A forked child (a DataLoader worker) closes its copy of the descriptor: a
worker orphaned by a killed run, which lingers for a few seconds, would otherwise hold the lock for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from maelab.errors import MaelabError
from maelab.io import default_mode

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_NAME = ".maelab.lock"
_HELD: set[int] = set()  # this process's lock descriptors


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The lock of ``run_dir`` for this process (``enabled`` only in the process that writes it)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled and fcntl is not None
        self._fd: int | None = None
        self.deferred = False  # the folder did not exist yet when the run chose to start (or resume)

    def take(self) -> None:
        """Hold the lock if the folder exists (a new folder is locked once it is created, before anything
        is written in it); refuse in one line, naming the holder, if another process holds it."""
        if not self.run_dir.is_dir():
            self.deferred = True
            return
        if not self.enabled or self._fd is not None:
            return
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MaelabError(
                f"{self.run_dir} is in use by another maelab process (pid {holder}): two processes writing one run "
                f"would mix their checkpoints and logs. Wait for it to end, or stop it (on SIGTERM it saves a "
                f"checkpoint: kill {holder}) and run this command again to continue the run") from None
        except OSError:  # no locks on this file system
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def writer_of(run_dir: str | os.PathLike) -> int | None:
    """The pid of another process that holds ``run_dir``'s lock (a run being trained there), read from
    ``/proc/locks`` without touching the lock itself; None when there is none. Best effort, on this host:
    a run trained on another node of a shared file system, or a file system whose ``/proc/locks`` device
    differs from ``stat``'s (btrfs subvolumes), is not seen."""
    path = Path(run_dir) / LOCK_NAME
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147137 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            pid = int(fields[4])
            return pid if pid != os.getpid() else None
    return None
