"""One exception type for every user-facing error.

The CLI prints ``MaelabError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class MaelabError(Exception):
    """A problem with the user's input (paths, flags, checkpoints, data), explained in one line."""
