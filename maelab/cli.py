"""`maelab <command>`: build the parser from :mod:`maelab.commands` and dispatch; errors become one line.

The parser needs only the commands' options (:mod:`maelab.commands.options`, no torch), so `maelab --help`,
`maelab <command> --help`, `--version`, a mistyped command or flag answer at once; the command that runs is
imported (with torch and the rest) after the flags are parsed.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

from maelab import __version__
from maelab.commands import COMMANDS, load, options_of
from maelab.config import add_config_args, config_from_args
from maelab.data.workers import kill_orphaned_workers
from maelab.errors import (MaelabError, RunInterrupted, Terminated, is_disk_full, megabytes, rank_zero,
                           said_by_this_rank)

CONFIG_NOTE = " Every flag is a config field; --config loads a YAML preset first (flags override it)."


def _terminate(signum, frame):
    raise Terminated


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command ``argv`` names (of every command when ``argv`` is None):
    the other commands are listed by name and help only, without importing them."""
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="maelab", description="Masked Autoencoder pre-training and evaluation",
                                     epilog="`maelab <command> --help` lists a command's flags, with their defaults.")
    parser.add_argument("--version", action="version", version=f"maelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, help in COMMANDS.items():
        if argv is not None and name != named:
            sub.add_parser(name, help=help)
            continue
        opts = options_of(name)
        p = sub.add_parser(name, help=help, description=opts.DESCRIPTION + (CONFIG_NOTE if opts.Config else ""))
        if opts.Config is not None:
            add_config_args(p, opts.Config)
        else:
            opts.add_arguments(p)
        p.set_defaults(command_options=opts)
    return parser


NEGATIVE = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)  # "-5m", "-1e-3", "-inf": argparse reads them as flags


def negative_values_joined(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -5m`` as ``--budget=-5m``, for every flag of one value: argparse takes a value that starts
    with "-" and is not a plain number for a flag, and says "expected one argument" where the flag's own
    check says what is wrong with the value."""
    single: set[str] = set()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif action.option_strings and action.nargs is None:
                single.update(action.option_strings)
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in single and i + 1 < len(argv) and NEGATIVE.match(argv[i + 1]) and argv[i + 1] not in single:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def dispatch(args: argparse.Namespace) -> int:
    opts, command = args.command_options, load(args.command)
    if opts.Config is None:
        command.run(args)
        return 0
    cfg = config_from_args(opts.Config, args)
    args.out = cfg.run.out  # named by the OSError line in main()
    command.run(cfg)
    return 0


def _one_line(err: BaseException) -> str:
    msg = str(err).strip()
    if msg.startswith("Caught ") and "\n" in msg:  # re-raised from a DataLoader worker
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(err).__name__


def _is_file(p: Path) -> bool:
    """Whether ``p`` exists and is no folder; False where it cannot be looked at (a folder without read
    permission above it: Path.exists raises PermissionError, inside the handler of the error being said)."""
    try:
        return p.exists() and not p.is_dir()
    except OSError:
        return False


def _os_error_line(err: OSError, out: str | None) -> str:
    """One line for a file-system error that escaped a command: the path, what went wrong, and, when the
    path is (inside) the command's output, that it could not be written."""
    reason = err.strerror or _one_line(err)
    if err.filename is None:
        return reason
    path = Path(os.fsdecode(err.filename))
    writing = False
    if out:
        target, where = Path(out).expanduser(), path.absolute()
        writing = where == target.absolute() or target.absolute() in where.parents
        temp_of_target = where.parent == target.absolute().parent and where.name.startswith(f".{target.name}.")
        if where in target.absolute().parents or temp_of_target:  # on the way to --out: name --out itself
            path, writing = target, True
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        blocked = next((p for p in (path, *path.parents) if _is_file(p)), None)
        if blocked is not None:
            reason = f"{blocked} is a file, not a folder"
    return f"cannot {'write' if writing else 'use'} {path}: {reason}"


def _disk_full_line(out: str | None) -> str:
    """A write that found the disk full, from any writer (results, features, converted weights; a
    checkpoint says more itself): where, and how much is free."""
    where = Path(out).expanduser().absolute() if out else Path.cwd()
    disk = next((p for p in (where, *where.parents) if p.is_dir()), Path("/"))
    return (f"no space left on the disk of {out or disk} ({megabytes(shutil.disk_usage(disk).free)} free): free "
            f"some space and run the same command again")


PACKAGE = str(Path(__file__).parent)


def _show_warning(message, category, filename, lineno, file=None, line=None, *, show):
    """maelab's own warnings are messages to the user: one ``maelab: warning:`` line, without the source file
    and line Python adds (other libraries' warnings keep them: they help to report a problem upstream)."""
    if str(filename).startswith(PACKAGE):
        if said_by_this_rank():  # under torchrun, a warning before the group is joined is every process's alike
            print(f"maelab: warning: {_one_line(message)}", file=file or sys.stderr, flush=True)
    else:
        show(message, category, filename, lineno, file, line)


PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted|"
                       r"remote process exited|Socket Timeout", re.IGNORECASE)


def _peer_lost(err: BaseException) -> str | None:
    """In a job of several processes, a collective that failed because another process died (a SIGKILL, an
    out-of-memory kill, a lost node) -- a 30-line traceback from gloo or NCCL that reads like a bug of this
    process -- as one line that says what happened and what comes next."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(err, RuntimeError):
        return None
    text = str(err)
    found = PEER_GONE.search(text)
    if found is None:
        return None
    rank = os.environ.get("RANK", "?")
    return (f"process {rank}: another process of this job stopped ({found.group(0)} in a collective); under "
            f"`torchrun --max-restarts N` the group restarts and resumes from the last checkpoint, otherwise run "
            f"the same command again to resume")


TRAINING = {"pretrain", "finetune", "linprobe", "recipe", "ablate"}  # and `segment train`, `detect train`


def _stopped_where(args: argparse.Namespace) -> str:
    """What a SIGTERM outside a training loop leaves: a training command keeps its checkpoints; the others
    (features, knn, convert, ...) write each output whole or not at all. They were told of "checkpoints"."""
    action = getattr(args, "action", None) or getattr(args, "segment_command", None)
    if args.command in TRAINING or action == "train":
        return "outside the training loop; checkpoints already written are kept"
    return (f"before `maelab {args.command}` finished; every file it writes appears whole or not at all, so "
            f"running it again makes what is missing")


def _output_closed() -> int:
    """Point stdout and stderr at /dev/null (Python's own advice: the flush at exit would fail again); the
    status a shell gives SIGPIPE. Returning lets the error's frames go, and with them the loaders whose
    worker processes they held."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(null, stream.fileno())
        except (OSError, ValueError):  # not a real file (captured output)
            pass
    os.close(null)
    return 128 + signal.SIGPIPE


def innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)command ``args`` were parsed for, e.g. `segment eval`'s."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[chosen]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(negative_values_joined(parser, argv))
    if unknown:  # said with the usage of the command that was given (argparse: the top level's, no flags)
        innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, show=shown)
    try:
        return dispatch(args)
    except BrokenPipeError:  # the reader of the output went away (`maelab ... | head`): stop quietly, as shell tools do
        return _output_closed()
    except Terminated:
        if rank_zero():
            print(f"maelab: stopped by SIGTERM {_stopped_where(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except RunInterrupted as e:
        if rank_zero():  # under torchrun, rank 0 speaks for the run
            print(f"maelab: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except MaelabError as e:
        if said_by_this_rank(e):
            print(f"maelab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        out = getattr(args, "out", None)
        if is_disk_full(e):  # whichever writer hit it: an OSError, safetensors' or torch.save's own error
            print(f"maelab: error: {_disk_full_line(out)}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # a path the system refused (exists as a file, no such folder, permission)
            print(f"maelab: error: {_os_error_line(e, out)}", file=sys.stderr)
            return 2
        lost = _peer_lost(e)
        if lost:
            print(f"maelab: error: {lost}", file=sys.stderr)
            return 1
        kill_orphaned_workers()
        raise  # a bug: its traceback
    except KeyboardInterrupt:
        print("maelab: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``maelab`` console script and ``python -m maelab.cli``: :func:`main`'s status becomes the
    process's. A torchrun worker of a group of several ends through :func:`end_process`, which skips the
    interpreter's finalisation (see there why)."""
    code = main()
    if code == 0:  # the work is done and written: a SIGTERM while the interpreter winds down (a second or two)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # made a finished run exit 143, read as killed
    if "maelab.train.distributed" in sys.modules:  # loaded by every command that can run under torchrun
        from maelab.train.distributed import DistInfo, end_process

        if DistInfo.from_env().enabled:
            end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
