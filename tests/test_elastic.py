"""An elastic torchrun job (``--max-restarts``) survives a worker killed mid-epoch: the restarted group
forms (each attempt has its own store prefix), resumes from the last checkpoint and ends with exactly
the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maelab.io import read_weights
from maelab.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def launch(data: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "2",
           "-m", "maelab.cli", "pretrain", "--data", str(data), "--model", "mae_vit_tiny_patch4", "--decoder-depth", "1",
           "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "0", "--num-workers", "0", "--log-every", "1",
           "--vis-every", "0", "--device", "cpu", "--seed", "5", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_pid(rank: int, out: Path) -> int | None:
    """The pid of the worker with ``RANK=rank`` training into ``out``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"maelab.cli" in cmdline and str(out).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the worker")
def test_a_worker_killed_mid_epoch_restarts_and_ends_with_the_uninterrupted_weights(cifar_tiny, tmp_path):
    reference = launch(cifar_tiny, tmp_path / "reference")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    run = tmp_path / "elastic"
    proc = launch(cifar_tiny, run)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        if (run / "checkpoints" / "epoch_0001").is_dir() and logged_steps(run) >= 5:  # 4 steps per epoch
            pid = rank_pid(1, run)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before rank 1 could be killed mid-epoch 2\n" + out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert "connectFullMesh" not in out and "resumed from" in out, out[-3000:]
    a = read_weights(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)[0]
    b = read_weights(ckpt.latest_checkpoint(tmp_path / "reference") / ckpt.WEIGHTS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
