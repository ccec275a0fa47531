"""Several nodes, simulated on one machine: two torchrun launchers meeting at a c10d rendezvous train
like one process with the same global batch; the Slurm template checkpoints on the time-limit signal,
requeues the job, and the requeued job resumes to exactly the uninterrupted weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maelab.io import read_weights
from maelab.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "mae_vit_tiny_patch4", "--decoder-depth", "1", "--epochs", "2", "--warmup-epochs", "0",
         "--num-workers", "0", "--log-every", "1", "--vis-every", "0", "--device", "cpu", "--seed", "5"]


def env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pretrain(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(list(args), env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_weights(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)[0]


def epoch_losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_loss"] for r in rows if "epoch_loss" in r]


@pytest.fixture(scope="module")
def reference(cifar_tiny, tmp_path_factory) -> Path:
    """One process, global batch 16."""
    out = tmp_path_factory.mktemp("one_process")
    p = pretrain(sys.executable, "-m", "maelab.cli", "pretrain", "--data", str(cifar_tiny), *FLAGS,
                 "--batch-size", "16", "--out", str(out))
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    return out


def test_two_launchers_at_a_c10d_rendezvous_match_one_process(cifar_tiny, tmp_path, reference):
    port, out = free_port(), tmp_path / "two_nodes"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "maelab-test",
                "-m", "maelab.cli", "pretrain", "--data", str(cifar_tiny), *FLAGS, "--batch-size", "8", "--out", str(out)]
    nodes = [pretrain(*launcher) for _ in range(2)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(x[-3000:] for x in logs)
    assert any("global batch 16 = 8 per process x 1 accumulation x 2 processes" in x for x in logs), logs[0][-2000:]
    a, b = weights(out), weights(reference)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 3e-5  # all-reduce sums in another order
    assert epoch_losses(out) == pytest.approx(epoch_losses(reference), rel=1e-5)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()), default=0)


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[Path, Path]:
    """``srun`` runs its command here, ``scontrol`` records what it is asked (and names this host)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = show ] && echo localhost\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, log


def test_slurm_template_checkpoints_requeues_and_the_requeued_job_resumes_exactly(cifar_tiny, tmp_path, fake_slurm,
                                                                                  reference):
    bin_dir, scontrol_log = fake_slurm
    out = tmp_path / "slurm_run"
    job_env = env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
                  SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
                  TORCHRUN=f"{sys.executable} -m torch.distributed.run", OUT=str(out))
    job = ["bash", str(REPO / "scripts" / "slurm" / "pretrain.sbatch"), "--data", str(cifar_tiny), *FLAGS,
           "--batch-size", "16"]
    first = pretrain(*job, env=job_env)
    deadline, signalled = time.time() + 300, False
    while time.time() < deadline and first.poll() is None:
        if (out / "checkpoints" / "epoch_0001").is_dir() and logged_steps(out) >= 5:  # 4 steps per epoch
            first.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
            signalled = True
            break
        time.sleep(0.02)
    log, _ = first.communicate(timeout=300)
    assert signalled, "the run ended before it could be signalled mid-epoch 2\n" + log[-3000:]
    assert "requeue 4242" in scontrol_log.read_text(), log[-3000:]
    assert ckpt.latest_checkpoint(out).name.startswith("step_"), log[-3000:]

    requeued = pretrain(*job, env={**job_env, "SLURM_RESTART_COUNT": "1"})
    log, _ = requeued.communicate(timeout=600)
    assert requeued.returncode == 0, log[-3000:]
    assert "resumed from" in log and "continuing at epoch 2" in log, log[-3000:]
    a, b = weights(out), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    own_out = subprocess.run([*job, "--out", str(tmp_path / "elsewhere")], env=job_env, capture_output=True, text=True)
    assert own_out.returncode == 2 and "give the run folder as OUT=..., not --out" in own_out.stderr
    assert not (tmp_path / "elsewhere").exists()
