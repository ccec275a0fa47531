"""One exception type for every user-facing error.

The CLI prints ``MaelabError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

import errno
import os
import signal
import warnings
from contextlib import contextmanager


class MaelabError(Exception):
    """A problem with the user's input (paths, flags, checkpoints, data), explained in one line."""


class SameOnEveryRank(MaelabError):
    """An error every process of a torchrun job raises alike, as it depends only on the settings, the
    data and the number of processes: only rank 0 prints it, so the job says it once."""


class _Job:
    """Whether this process has begun to join its torchrun job's group. Before that a command has only read
    its settings and the files of its node, so an error then is the same on every process of a node."""

    joining = False


def joining_job() -> None:
    _Job.joining = True


def rank_zero() -> bool:
    """Whether this is the first process of a torchrun job (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def same_on_every_rank():
    """Errors raised inside become :class:`SameOnEveryRank`: for reading what every process reads alike
    (a dataset's files), so a torchrun job says a bad file once, not once per process."""
    try:
        yield
    except SameOnEveryRank:
        raise
    except MaelabError as e:
        raise SameOnEveryRank(str(e)) from None


def said_by_this_rank(error: Exception | None = None) -> bool:
    """Whether this process says ``error`` (None: a warning): every process its own, except what every
    process meets alike: a :class:`SameOnEveryRank` error, said by rank 0 alone; and anything before the
    group is joined, which depends on the settings and on what the node holds (a --config file, its CPU
    count), said by each node's first process (rank 0 alone would hide a file missing on another node)."""
    if isinstance(error, SameOnEveryRank):
        return rank_zero()
    return _Job.joining or os.environ.get("LOCAL_RANK", "0") == "0"


def warn_for_job(message: str, stacklevel: int = 2) -> None:
    """A warning that every process of a torchrun job would give alike (it depends only on the settings and
    the data): given by rank 0 alone, so the job says it once."""
    if rank_zero():
        warnings.warn(message, stacklevel=stacklevel + 1)


class RunInterrupted(MaelabError):
    """The run was stopped by a signal after saving a resumable checkpoint; ``exit_code`` is the
    shell convention for that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves and stops itself): stop as Ctrl-C does, with one
    line and status 143, instead of dying silently with -15. A BaseException, so that no ``except
    Exception`` (or the bad-file policy's ``except MaelabError``) swallows it."""


# how a full disk surfaces: OSError, safetensors' "(os error 28)", torch.save's "unexpected pos"
DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "unexpected pos")


def is_disk_full(err: BaseException) -> bool:
    """Whether a write failed for lack of space (or quota), whichever writer reported it (an OSError, a
    safetensors ``SafetensorError``, torch.save's RuntimeError). Torch-free, for the CLI."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    writer = isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"
    return writer and any(s in str(err) for s in DISK_FULL)


def megabytes(n: float) -> str:
    """Bytes as the disk-full messages give them."""
    return f"{n / 2**20:.1f} MB"
