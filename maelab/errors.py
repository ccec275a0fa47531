"""One exception type for every user-facing error.

The CLI prints ``MaelabError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

import signal


class MaelabError(Exception):
    """A problem with the user's input (paths, flags, checkpoints, data), explained in one line."""


class SameOnEveryRank(MaelabError):
    """An error every process of a torchrun job raises alike, as it depends only on the settings, the
    data and the number of processes: only rank 0 prints it, so the job says it once."""


class RunInterrupted(MaelabError):
    """The run was stopped by a signal after saving a resumable checkpoint; ``exit_code`` is the
    shell convention for that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
