"""One exception type for every user-facing error.

The CLI prints ``MaelabError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class MaelabError(Exception):
    """A problem with the user's input (paths, flags, checkpoints, data), explained in one line."""


class SameOnEveryRank(MaelabError):
    """An error every process of a torchrun job raises alike, as it depends only on the settings, the
    data and the number of processes: only rank 0 prints it, so the job says it once."""
