"""The evaluation chain that `maelab ablate` and `maelab recipe` run on a pre-trained encoder: each step
is its own `maelab` process (a crash, a kill or a budget never takes the others with it), logs to one
file, and leaves its result in a file of its own, so a second run skips what is finished and resumes
what is not -- with the same flags only (``steps.json``)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maelab import __version__
from maelab.commands.options.pretrain import PretrainConfig, model_kwargs, validate
from maelab.commands.options.sections import ChainDataConfig, at_least
from maelab.config import load_yaml
from maelab.data.shards import is_shard_source
from maelab.data.splits import LEGACY_VAL_NAMES, check_same_classes, default_val_dir, labelled_split
from maelab.errors import MaelabError, RunInterrupted, SameOnEveryRank, Terminated
from maelab.io import write_json
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import check_mask_type
from maelab.train.precision import native_bf16
from maelab.viz.curves import read_metrics


def check_buildable(cfg: PretrainConfig) -> None:
    """What `maelab pretrain` refuses at its start, checked by a chain before its first step spends a budget:
    :func:`~maelab.commands.options.pretrain.validate`, then its model built on PyTorch's meta device (no
    memory, no time), which refuses a shape that cannot be built (an image size the patch size does not
    divide, a decoder width its heads do not divide)."""
    validate(cfg)
    with torch.device("meta"):
        model = MaskedAutoencoder(**model_kwargs(cfg))
    check_mask_type(cfg.model.mask_type, model.grid, model.mask_ratio)


def check_chain_data(d: ChainDataConfig) -> None:
    """The numbers every step of the chain is passed, checked before the first one runs (a step would
    refuse them only after the steps before it had spent their budgets)."""
    at_least(batch_size=(d.batch_size, 1))
    check_image_counts(limit_images=d.limit_images)


def check_chain_splits(data: str, val: str | Path | None, pretrain_images: int, batch_size: int) -> Path:
    """What the chain's steps read, checked before the first one spends a budget: the evaluations need
    labelled training and validation splits with the same classes (a flat folder, or shards without
    labels, would fail in kNN after the pre-training), and pre-training a whole batch of images. Returns
    the validation split (``val``, or the sibling ``val`` / ``test`` folder of ``--data``)."""
    check_split_paths(data, val)
    val = Path(val).expanduser() if val else default_val_dir(data)
    if val is None:
        raise MaelabError(f"--val-data is required (no sibling val / validation / test folder next to {data})")
    train = labelled_split(data, what="--data")
    check_same_classes(train, labelled_split(str(val), what="--val-data", min_classes=1), "--data", "--val-data")
    n = min(pretrain_images, len(train)) if pretrain_images else len(train)
    if n < batch_size:
        raise MaelabError(f"pre-training takes whole batches of --batch-size {batch_size}, but it would read {n} "
                          f"image(s) of --data: lower --batch-size")
    return val


def check_split_paths(data: str, val: str | Path | None) -> None:
    """``--data`` and ``--val-data`` exist (a folder, or shards)."""
    for flag, path in (("--data", data), ("--val-data", val)):
        if path and not is_shard_source(str(path)) and not Path(path).expanduser().exists():
            raise MaelabError(f"{flag} {path}: no such folder")


def refuse_torchrun(command: str) -> None:
    """A chain runs each step as a child process of one process: under torchrun every process would run
    the whole chain into one folder, and their children would join one process group by accident."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SameOnEveryRank(f"`maelab {command}` runs each of its steps as a process of its own: start it without "
                              f"torchrun (a step under torchrun is a `maelab pretrain` / `finetune` command of its own)")


def check_image_counts(**counts: int | None) -> None:
    """``name=count`` image counts of a chain, where 0 means all images."""
    for name, n in counts.items():
        if n is not None and n < 0:
            raise MaelabError(f"--{name.replace('_', '-')} must be 0 (all images) or a positive count, got {n}")


def machine() -> str:
    """The CPU model, threads and GPU a chain ran on, for its results page."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bf16 = ", native bf16" if native_bf16(torch.device("cpu")) else ""
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{bf16}{gpu}"


def code_version() -> str:
    """The maelab that ran: its version and, run from a git checkout, its commit ("+ local changes" when the
    package's tracked files differ from it), so a results page can tell runs of different code apart."""
    text = f"maelab {__version__}"

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != PACKAGE_ROOT.resolve():
        return text  # not a checkout, or an installed copy inside one (a .venv): not that checkout's code
    commit = git("rev-parse", "--short", "HEAD")
    if commit:
        text += f", commit {commit}" + (" + local changes" if git("status", "--porcelain", "--untracked-files=no",
                                                                     "--", "maelab") else "")
    return text


# a chain's records: file -> what it records, for the error when it cannot be read
STEPS = ("steps.json", "how each step ran: delete it to accept the finished steps as they are")
CODES = ("code.json", "the code each step ran: delete it to record it from now on")
SPENT = ("unfinished.json", "the seconds spent in attempts of a step that did not finish: delete it to count "
         "only the attempt that finishes")


def chains_code(folders: dict[str, Path]) -> str:
    """Which code ran the steps of the chains in ``folders`` (label -> a :class:`Chain`'s folder; steps are
    named ``label/step``), as one line: the version when all steps ran one, else each version followed by
    the steps that ran it. Steps started before versions were recorded are named as such; with nothing
    recorded at all, the code running now."""
    steps: dict[str, list[str]] = {}
    unrecorded = []
    for label, folder in folders.items():
        codes = read_record(folder, CODES)
        for name in read_record(folder, STEPS):
            where = f"{label}/{name}" if label else name
            for version in codes.get(name, []):
                steps.setdefault(version, []).append(where)
            if name not in codes:
                unrecorded.append(where)
    if not steps:
        return code_version()
    if len(steps) == 1 and not unrecorded:
        return next(iter(steps))
    parts = [f"{version} ({named(names)})" for version, names in steps.items()]
    if unrecorded:
        parts.append(f"not recorded ({named(unrecorded)})")
    return "; ".join(parts)


def named(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def read_record(folder: Path, record: tuple[str, str]) -> dict[str, Any]:
    """A chain's JSON ``record`` (:data:`STEPS`, :data:`CODES`) in ``folder``; {} when there is none yet."""
    path, what = folder / record[0], record[1]
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise MaelabError(f"{path} is unreadable ({e}); it records {what}") from e


def invoked(command: str) -> str | None:
    """The ``maelab <command> ...`` line that started this process, for its results page to quote
    (None when the command was called in-process, where argv is someone else's)."""
    return " ".join(["maelab", command, *sys.argv[2:]]) if sys.argv[1:2] == [command] else None


def no_budget(budget: str | None) -> bool:
    return not budget or budget.lower() == "none"


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds this `maelab` package


CHAIN_STEP = "MAELAB_CHAIN_STEP"  # set for the steps of `recipe` / `ablate`, whose flags are not the user's


def child_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of a `maelab` child process that runs this very code. Plain ``python -m``
    puts the working directory first on the path, so a `maelab/` folder where the user stands (another
    checkout, an older copy) would run instead of the code that launched it: ``-P`` stops that, and
    PYTHONPATH names this package's root, installed or not."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-P", "-m", "maelab.cli", *args], {**os.environ, "PYTHONPATH": path, CHAIN_STEP: "1"}


def run_child(args: list[str], log: Path) -> int:
    """Run `maelab ARGS` as a child process (output appended to ``log``); its exit status.

    A Ctrl-C or SIGTERM that stops this process first waits for the child to stop: ``subprocess.run``
    would give it a quarter of a second and then kill it, and a training step would lose everything
    since its last checkpoint. The child is sent SIGTERM (a terminal's Ctrl-C has reached it already,
    and a second SIGINT would abort it), so it saves at its next step boundary and running the same
    command again resumes it. A second Ctrl-C stops the wait."""
    argv, env = child_command(args)
    with open(log, "a") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except BaseException as stopped:
            stop_child(proc)
            if isinstance(stopped, (KeyboardInterrupt, Terminated)):
                raise RunInterrupted(f"interrupted during `maelab {args[0]}` (the end of {log} says where it "
                                     "stopped); run the same command again to resume",
                                     signal.SIGTERM if isinstance(stopped, Terminated) else signal.SIGINT) from None
            raise


def stop_child(proc: subprocess.Popen) -> None:
    """Ask a `maelab` child that is still running to stop (SIGTERM: it saves at its next step boundary)
    and wait until it has."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def maelab(args: list[str], log: Path) -> float:
    """Run one `maelab` command as its own process (output appended to ``log``); seconds it took. A step
    that fails says why in the error itself: its last ``maelab: error:`` line, when it wrote one."""
    t0, start = time.perf_counter(), log.stat().st_size if log.is_file() else 0
    code = run_child(args, log)
    if code != 0:
        why = last_error(log, start)
        raise MaelabError(f"`maelab {args[0]}` failed (exit {code})" + (f": {why}" if why else "")
                          + f"; its output is in {log}")
    return time.perf_counter() - t0


def last_error(log: Path, start: int) -> str:
    """The last ``maelab: error:`` line a step wrote to ``log`` past byte ``start`` (empty if none)."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.split("maelab: error:", 1)[1].strip() for line in text.splitlines() if "maelab: error:" in line]
    return lines[-1] if lines else ""


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag value...`` pairs of a command line (the command itself under ``""``); ``--device`` left out:
    where a step ran does not change what it computes."""
    flags: dict[str, list[str]] = {"": []}
    key = ""
    for token in args:
        if token.startswith("--"):
            key = token
            flags[key] = []
        else:
            flags[key].append(token)
    flags.pop("--device", None)
    return {k: " ".join(v) for k, v in flags.items()}


def changed_flags(old: list[str], new: list[str]) -> str:
    """What differs between two command lines, e.g. ``--base-lr 0.1 -> 4``; empty when nothing does."""
    a, b = flag_values(old), flag_values(new)
    return ", ".join(f"{k or 'command'} {a.get(k, '(not given)') or '(set)'} -> {b.get(k, '(not given)') or '(set)'}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def with_implied_split(recorded: list[str] | None, now: list[str]) -> list[str] | None:
    """A step recorded without ``--val-data`` (ablate passed it only when given) scored on the folder the
    rule of then found beside ``--data``: that folder, written out, so the same split compares equal and
    another one (a `valid` added since) is refused."""
    if recorded is None or "--val-data" in recorded or "--val-data" not in now or "--data" not in recorded:
        return recorded
    implied = default_val_dir(recorded[recorded.index("--data") + 1], LEGACY_VAL_NAMES)
    given = now[now.index("--val-data") + 1]
    if implied is None or implied.resolve() != Path(given).expanduser().resolve():
        return recorded
    return [*recorded, "--val-data", given]


@dataclass
class Chain:
    """The flags every step shares (device, precision, seed, data, batch) and the evaluation split.

    Every step's command line is kept in ``steps.json``: a step finished (or cut short) with other flags
    is refused, not read back, so changing a setting and running again in the same folder can never
    report the old setting's result as the new one's. A step that failed before it wrote its ``--out``
    left nothing to protect: its record is dropped, so the corrected command runs.

    ``code.json`` keeps the code version each step started with (:func:`code_version`), every attempt
    that ran other code than the one before it: a chain that ran for hours while the checkout moved on
    says which steps ran which code, not only the code present at its end.

    A step's time is the sum of its attempts: an attempt cut short (Ctrl-C, SIGTERM, a failure) keeps its
    seconds in ``unfinished.json`` until the attempt that finishes the step adds them to its own, so a
    pre-training interrupted twice is not reported at the length of its last third. Only an attempt whose
    chain was killed outright (SIGKILL, power loss) goes uncounted: nothing was left to write it down."""

    folder: Path
    common: list[str]
    split: list[str]
    log: Path = field(init=False)
    record: dict[str, list[str]] = field(init=False)
    codes: dict[str, list[str]] = field(init=False)
    ran: set[str] = field(init=False, default_factory=set)  # the steps this process ran (not found done)
    spent: dict[str, float] = field(init=False)  # seconds of attempts cut short, per step not yet finished
    carried: dict[str, float] = field(init=False, default_factory=dict)  # those seconds, of the steps finished now

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "log.txt"
        self.record, self.codes = read_record(self.folder, STEPS), read_record(self.folder, CODES)
        self.spent = read_record(self.folder, SPENT)

    def portable(self, token: str) -> str:
        """A path inside the chain's folder as ``{out}/...``; any other token as it is (``--out r1`` must not
        turn ``pretrain_cifar10_tiny`` into ``pretrain_cifa{out}0_tiny``)."""
        root = str(self.folder)
        if token == root or token.startswith(root.rstrip(os.sep) + os.sep):
            return "{out}" + token[len(root):]
        return token

    def note_code(self, name: str) -> None:
        """Record the code ``name`` runs with now (once per change: a step resumed by the same code adds
        nothing)."""
        now, seen = code_version(), self.codes.setdefault(name, [])
        if seen[-1:] != [now]:
            seen.append(now)
            write_json(self.folder / CODES[0], self.codes)

    def code(self) -> str:
        """Which code ran this chain's steps, for its results: one version, or each version with its steps."""
        return chains_code({"": self.folder})

    def run(self, name: str, args: list[str], done: bool) -> float | None:
        """Run step ``name`` (``maelab ARGS``) unless it is ``done``; seconds it took, earlier attempts that
        were cut short included (None: not run).
        Recorded before it starts, so a step cut short resumes only with the same flags."""
        here = [self.portable(token) for token in args]  # a moved --out folder still matches
        recorded = with_implied_split(self.record.get(name), here)
        if recorded is not None and (diff := changed_flags(recorded, here)):
            raise MaelabError(f"{self.folder / name} was run with other settings ({diff}): use another --out, "
                              f"or delete that step's output and its entry in {self.folder / 'steps.json'} to run it again")
        if done:
            return None
        if recorded is None and self.spent.pop(name, None) is not None:  # its record deleted to run it anew
            write_json(self.folder / SPENT[0], self.spent)
        self.record[name] = here
        write_json(self.folder / STEPS[0], self.record)
        self.note_code(name)
        t0 = time.perf_counter()
        try:
            seconds = maelab(args, self.log)
        except MaelabError:
            out = Path(args[args.index("--out") + 1]) if "--out" in args else None
            if recorded is None and out is not None and not out.exists():  # refused before it wrote anything:
                del self.record[name]  # nothing to protect, so the corrected command may run here
                write_json(self.folder / STEPS[0], self.record)
                self.codes.pop(name, None)
                write_json(self.folder / CODES[0], self.codes)
            else:
                self.spend(name, time.perf_counter() - t0)
            raise
        except BaseException:  # interrupted: the child saved at a step boundary, and its time counts
            self.spend(name, time.perf_counter() - t0)
            raise
        self.ran.add(name)
        self.carried[name] = self.spent.pop(name, 0.0)
        if self.carried[name]:
            write_json(self.folder / SPENT[0], self.spent)
        return seconds + self.carried[name]

    def spend(self, name: str, seconds: float) -> None:
        """Keep the seconds of an attempt at ``name`` that did not finish it."""
        self.spent[name] = round(self.spent.get(name, 0.0) + seconds, 3)
        write_json(self.folder / SPENT[0], self.spent)

    def knn(self, init: str, name: str, extra: list[str] = ()) -> dict[str, Any]:
        out = self.folder / f"{name}.json"
        self.run(name, ["knn", "--init", init, *self.common, *self.split, *extra, "--out", str(out)], out.is_file())
        return json.loads(out.read_text())

    def trained(self, command: str, preset: str, init: str, name: str, extra: list[str]) -> dict[str, Any]:
        """A linprobe / finetune run in ``name``/ (resumed if it was cut short); its results.json."""
        out = self.folder / name
        self.run(name, [command, "--config", preset, "--init", init, *self.common, *self.split, *extra,
                        "--out", str(out)], (out / "results.json").is_file())
        return json.loads((out / "results.json").read_text())

    def linprobe(self, init: str, epochs: int, name: str = "linprobe", preset: str = "linprobe_cifar_tiny",
                 base_lr: float | None = None):
        """``base_lr``: the probe's LARS base lr (None: the preset's)."""
        lr = ["--base-lr", f"{base_lr:g}"] if base_lr is not None else []
        return self.trained("linprobe", preset, init, name, ["--no-augment", "--epochs", str(epochs),
                                                             "--warmup-epochs", str(max(1, epochs // 10)), *lr])

    def finetune(self, init: str, length: list[str], name: str = "finetune", preset: str = "finetune_cifar_tiny",
                 extra: list[str] = ()):
        """``length``: the run's flags for how long (:func:`length_flags`)."""
        return self.trained("finetune", preset, init, name, [*length, *extra])


def recorded_optim(run: Path) -> dict[str, Any]:
    """The optimiser section a finished run recorded in its config.yaml (epochs, base_lr, the max_steps a
    budget planned): what ran, not what was asked."""
    return load_yaml(run / "config.yaml").get("optim") or {}


def steps_taken(run: Path) -> int | None:
    """The optimiser steps a finished run took: the ``max_steps`` its budget planned, or, for a run sized by
    epochs (``--budget none``), the last step its ``metrics.jsonl`` logged (the steps column was empty)."""
    planned = recorded_optim(run).get("max_steps")
    if planned:
        return int(planned)
    try:
        records = read_metrics(run / "metrics.jsonl")  # a line cut by a crash is skipped, the others count
    except MaelabError:
        return None
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)


def length_flags(budget: str | None, epochs: int | None) -> list[str]:
    """``--budget B``, or with no budget (``none``) ``--epochs N`` (nothing: the preset's epochs)."""
    if not no_budget(budget):
        return ["--budget", budget]
    return ["--epochs", str(epochs)] if epochs else []
