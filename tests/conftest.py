"""Shared fixtures: small real CIFAR-10 subsets (symlinked, never copied) and tiny models."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("MAELAB_CIFAR10", REPO.parent / "shared" / "datasets" / "cifar10"))

TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def make_subset(dest: Path, per_class: int, classes: int = 10, split: str = "train") -> Path:
    """An ImageFolder of ``per_class`` CIFAR-10 images per class (symlinks); synthetic if CIFAR is absent."""
    src = CIFAR / split
    if src.is_dir():
        for cls in sorted(os.listdir(src))[:classes]:
            (dest / cls).mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(src / cls))[:per_class]:
                (dest / cls / name).symlink_to(src / cls / name)
    else:
        rng = np.random.default_rng(0)
        for c in range(classes):
            (dest / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                arr[..., c % 3] = 40 + 20 * c
                Image.fromarray(arr).save(dest / f"class{c}" / f"{i:04d}.png")
    return dest


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """300 training images, 30 per class."""
    return make_subset(tmp_path_factory.mktemp("cifar_small"), 30)


@pytest.fixture(scope="session")
def cifar_tiny(tmp_path_factory) -> Path:
    """64 images from 4 classes."""
    return make_subset(tmp_path_factory.mktemp("cifar_tiny"), 16, classes=4)


def in_process(call, shown: list[str]) -> subprocess.CompletedProcess:
    """``call()`` run as if it were its own process: its exit status (a ``SystemExit`` mapped as the
    interpreter maps it: none 0, a number itself, a message printed to stderr and 1), stdout and stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = call() or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1 if e.code else 0
            if isinstance(e.code, str):
                print(e.code, file=err)
    return subprocess.CompletedProcess(shown, code, out.getvalue(), err.getvalue())


def maelab_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`maelab ARGS` run in this process from ``cwd``, as the console script would run it, with ``sys.argv``
    its command line. For `recipe` and `ablate`, whose steps are child processes anyway: their own start-up
    in a second interpreter cost ~5 s a call."""
    from maelab.cli import main

    here, argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["maelab", *args]  # what the console script sees: the command line the runs record
    try:
        return in_process(lambda: main(list(args)), ["maelab", *args])
    finally:
        os.chdir(here)
        sys.argv = argv


def maelab_refusal(capsys, *args: str) -> tuple[int, str]:
    """`maelab ARGS` run in this process: (exit code, stderr). For checks that refuse before anything
    runs -- the same `main` the console script calls, without a second interpreter's start-up."""
    from maelab.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def results_page(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python scripts/results_page.py ARGS` run in this process, from a fresh copy of the script's module:
    the page tests render it many times, and each second interpreter spent ~5 s importing torch and timm."""
    spec = importlib.util.spec_from_file_location("results_page", REPO / "scripts" / "results_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    done = in_process(lambda: module.main(list(args)), ["results_page.py", *args])
    if check:
        done.check_returncode()
    return done


SAVING_CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
(out / "ready").write_text("")
for _ in range(600):  # 30 s at most: a parent that never passes the stop on fails its test, not hangs it
    if stop:
        break
    time.sleep(0.05)
time.sleep(1.0)  # a training step finishing, then its checkpoint being written
(out / "saved").write_text("")
sys.exit(143)
"""


def saving_child(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of a stand-in for a `maelab` training run: it writes ``folder/ready``, waits for
    SIGTERM or SIGINT (30 s at most), takes 1 s to "save", writes ``folder/saved`` and exits 143."""
    return [sys.executable, "-c", SAVING_CHILD, str(folder)], dict(os.environ)


def ctrl_c_when_ready(folder: Path):
    """Send this process SIGINT (a Ctrl-C) once ``folder/ready`` exists, from a thread; returns the SIGINT
    handler to restore. Python's own handler is installed first: where this process was started with SIGINT
    ignored (a background job of a non-interactive shell, as CI may be), the Ctrl-C would never arrive."""
    import signal
    import threading

    def ctrl_c():
        while not (folder / "ready").exists():
            threading.Event().wait(0.05)
        threading.Event().wait(0.2)  # the waiting side is in its wait by now
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c, daemon=True).start()
    return before


def record_plans(monkeypatch, steps: int = 2) -> list[tuple[float, float]]:
    """Make every ``--budget`` plan ``steps`` steps in one epoch, with no re-planning; returns the list that
    collects each plan's (per-epoch, final) seconds outside the steps, as the command measured them."""
    from maelab.commands import session
    from maelab.train.budget import BudgetPlan

    planned: list[tuple[float, float]] = []

    def plan(budget_s, spent_s, step_s, steps_per_epoch, warmup_epochs, per_epoch_s=0.0, final_s=0.0):
        planned.append((per_epoch_s, final_s))
        return BudgetPlan(steps, 1, 0.0, step_s, 1.0)

    monkeypatch.setattr(session, "plan_steps", plan)
    monkeypatch.setattr(session, "Deadline", lambda *a, **k: None)
    return planned


def count_calls(monkeypatch, module, name: str, size=len) -> list:
    """Wrap ``module.name`` so that each call's ``size(second argument)`` is recorded in the returned list."""
    original, seen = getattr(module, name), []

    def counting(first, items, *args, **kw):
        seen.append(size(items))
        return original(first, items, *args, **kw)

    monkeypatch.setattr(module, name, counting)
    return seen
