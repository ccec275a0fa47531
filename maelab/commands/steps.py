"""The evaluation chain that `maelab ablate` and `maelab recipe` run on a pre-trained encoder: each step
is its own `maelab` process (a crash, a kill or a budget never takes the others with it), logs to one
file, and leaves its result in a file of its own, so a second run skips what is finished and resumes
what is not."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maelab.config import option
from maelab.errors import MaelabError
from maelab.train.precision import native_bf16


@dataclass
class ChainDataConfig:
    """The data section of a chain of commands (``ablate``, ``recipe``)."""

    data: str = option("", "training images: an ImageFolder tree (labels for kNN / probe / fine-tune)")
    val_data: str = option("", "labelled validation images (default: a sibling val / test folder)")
    limit_images: int = option(0, "a fixed seeded subset of N images of each split for the evaluations (0 = all)")
    batch_size: int = option(256, "images per process per step, for pre-training and evaluation")


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


def no_budget(budget: str | None) -> bool:
    return not budget or budget.lower() == "none"


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds this `maelab` package


def child_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of a `maelab` child process that runs this very code. Plain ``python -m``
    puts the working directory first on the path, so a `maelab/` folder where the user stands (another
    checkout, an older copy) would run instead of the code that launched it: ``-P`` stops that, and
    PYTHONPATH names this package's root, installed or not."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-P", "-m", "maelab.cli", *args], {**os.environ, "PYTHONPATH": path}


def maelab(args: list[str], log: Path) -> float:
    """Run one `maelab` command as its own process (output appended to ``log``); seconds it took."""
    t0 = time.perf_counter()
    argv, env = child_command(args)
    with open(log, "a") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise MaelabError(f"`maelab {args[0]}` failed (exit {code}); its output is in {log}")
    return time.perf_counter() - t0


@dataclass
class Chain:
    """The flags every step shares (device, precision, seed, data, batch) and the evaluation split."""

    folder: Path
    common: list[str]
    split: list[str]
    log: Path = field(init=False)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "log.txt"

    def knn(self, init: str, name: str, extra: list[str] = ()) -> dict[str, Any]:
        out = self.folder / f"{name}.json"
        if not out.is_file():
            maelab(["knn", "--init", init, *self.common, *self.split, *extra, "--out", str(out)], self.log)
        return json.loads(out.read_text())

    def trained(self, command: str, preset: str, init: str, name: str, extra: list[str]) -> dict[str, Any]:
        """A linprobe / finetune run in ``name``/ (resumed if it was cut short); its results.json."""
        out = self.folder / name
        if not (out / "results.json").is_file():
            maelab([command, "--config", preset, "--init", init, *self.common, *self.split, *extra,
                    "--out", str(out)], self.log)
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


def length_flags(budget: str | None, epochs: int | None) -> list[str]:
    """``--budget B``, or with no budget (``none``) ``--epochs N`` (nothing: the preset's epochs)."""
    if not no_budget(budget):
        return ["--budget", budget]
    return ["--epochs", str(epochs)] if epochs else []
