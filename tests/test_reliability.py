"""Failure modes that must end in one readable line and a clean exit, never a hang or a traceback,
and leave the run folder as it was (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "mae_vit_tiny_patch4", "--decoder-depth", "1", "--epochs", "1", "--batch-size", "4",
        "--vis-every", "0", "--device", "cpu"]


def png_folder(folder: Path, n: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def maelab_cli(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "maelab.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_an_unreadable_image_with_loader_workers_exits_with_the_message(tmp_path):
    """The worker's error used to leave its persistent workers alive (the traceback's reference cycle
    kept the iterator), and they ignore the SIGTERM the exit hook sends them: the process never ended."""
    data = png_folder(tmp_path / "data")
    (data / "bad.jpg").write_text("not an image")
    done = maelab_cli("pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *FAST,
                      "--num-workers", "2", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "maelab: error: cannot read image" in done.stderr and "bad.jpg" in done.stderr
    assert "Traceback" not in done.stderr
