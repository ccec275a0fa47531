"""`python -m maelab <command>`: the `maelab` console script, for environments where it is not on PATH
(and `torchrun -m maelab ...`)."""

from maelab.cli import entry

if __name__ == "__main__":
    entry()
