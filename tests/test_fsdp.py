"""FSDP on CPU with 2 gloo processes: the same loss and weights as one process with the same global
batch (within float tolerance), and checkpoints that move both ways between FSDP and one process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maelab.io import read_weights
from maelab.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "mae_vit_tiny_patch4", "--decoder-depth", "2", "--epochs", "2", "--warmup-epochs", "0",
         "--num-workers", "0", "--log-every", "1", "--vis-every", "0", "--device", "cpu", "--seed", "5",
         "--save-every", "1"]
TOL = 1e-4  # gradients are reduce-scattered in another order; AdamW then amplifies the rounding a little


def launched(nproc: int, *program: str) -> subprocess.CompletedProcess:
    """``program`` (interpreter arguments) run by torchrun in ``nproc`` processes, or by the plain
    interpreter for one; output captured."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *program], env=env, capture_output=True, text=True, timeout=600)


def maelab(data: Path, out: Path, nproc: int, *extra: str) -> str:
    done = launched(nproc, "-m", "maelab.cli", "pretrain", "--data", str(data), *FLAGS,
                    "--batch-size", str(16 // nproc), "--out", str(out), *extra)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_weights(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)[0]


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def epoch_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"epoch \d+/\d+  loss ([0-9.]+)", log)]


@pytest.fixture(scope="module")
def one_process(cifar_tiny, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("one_process")
    return out, maelab(cifar_tiny, out, 1)


@pytest.fixture(scope="module")
def fsdp_run(cifar_tiny, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, maelab(cifar_tiny, out, 2, "--fsdp")


def test_two_fsdp_processes_match_one_process_with_the_same_global_batch(fsdp_run, one_process):
    (run, log), (reference, ref_log) = fsdp_run, one_process
    assert "FSDP" in log and re.search(r"peak memory per process during the training steps \(max RSS\): [0-9.]+, [0-9.]+ GiB", log), log[-3000:]
    assert worst(weights(run), weights(reference)) <= TOL
    assert epoch_losses(log) == pytest.approx(epoch_losses(ref_log), rel=1e-5)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process(cifar_tiny, tmp_path, fsdp_run, one_process):
    shutil.copytree(fsdp_run[0], tmp_path / "single")
    maelab(cifar_tiny, tmp_path / "single", 1, "--resume", str(tmp_path / "single" / "checkpoints" / "epoch_0001"))
    assert worst(weights(tmp_path / "single"), weights(one_process[0])) <= TOL


def test_a_single_process_checkpoint_resumes_under_fsdp_with_activation_checkpointing(cifar_tiny, tmp_path,
                                                                                       one_process):
    reference, _ = one_process
    run = tmp_path / "resumed"
    shutil.copytree(reference, run)
    log = maelab(cifar_tiny, run, 2, "--fsdp", "--activation-checkpointing",
                 "--resume", str(run / "checkpoints" / "epoch_0001"))
    assert "continuing at epoch 2" in log and "activation checkpointing" in log, log[-3000:]
    assert worst(weights(run), weights(reference)) <= TOL


ENTRY = """import atexit, sys
atexit.register(print, "interpreter finalised", flush=True)
from maelab.cli import entry
entry()
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_torchrun_worker_ends_without_the_interpreters_finalisation(cifar_tiny, tmp_path, nproc):
    """After FSDP, torch's DTensor caches keep the gloo group and its threads alive past
    destroy_process_group; finalising the interpreter with them running can abort the process
    (``terminate called without an active exception``, rarely). A torchrun worker
    therefore ends with os._exit once its output is flushed; a single process exits normally."""
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    done = launched(nproc, str(script), "pretrain", "--data", str(cifar_tiny), "--model", "mae_vit_tiny_patch4",
                    "--decoder-depth", "1", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
                    "--device", "cpu", "--batch-size", "8", "--out", str(tmp_path / "run"),
                    *(["--fsdp"] if nproc > 1 else []))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "reconstructions: " in done.stdout, log[-3000:]  # rank 0's last line was flushed before the exit
    assert log.count("interpreter finalised") == (0 if nproc > 1 else 1), log[-3000:]


def test_fsdp_in_a_single_process_says_it_does_not_shard():
    from maelab.models.mae import MaskedAutoencoder
    from maelab.train.distributed import DistInfo, wrap_ddp

    from conftest import TINY_MAE

    model = MaskedAutoencoder(**TINY_MAE)
    with pytest.warns(UserWarning, match="in a single process it is not sharded"):
        assert wrap_ddp(model, DistInfo(), torch.device("cpu"), fsdp=True) is model
