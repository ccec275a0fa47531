"""Failure modes that must end in one readable line and a clean exit, never a hang or a traceback,
and leave the run folder as it was (docs/reliability.md)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import re
import shutil
import time
import warnings
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


def _disk_full_errors():
    from safetensors import SafetensorError
    return {
        "oserror": ("save_weights", OSError(errno.ENOSPC, "No space left on device")),
        "safetensors": ("save_weights", SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")),
        "torch.save": ("torch_save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                  "64 vs 0")),
    }


@pytest.mark.parametrize("kind", ["oserror", "safetensors", "torch.save"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(capsys, monkeypatch, tmp_path, kind):
    from maelab.cli import main
    from maelab.train import checkpoint as ckpt

    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    flags = ["pretrain", "--data", str(data), "--out", str(out), *FAST, "--epochs", "2", "--num-workers", "0"]
    writer, error = _disk_full_errors()[kind]
    calls = {"n": 0}
    real = ckpt.save_weights if writer == "save_weights" else ckpt.torch.save

    def full_on_second_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1 saved, epoch 2 hits the full disk
            raise error
        return real(*a, **k)

    if writer == "save_weights":
        monkeypatch.setattr(ckpt, "save_weights", full_on_second_save)
    else:
        monkeypatch.setattr(ckpt.torch, "save", full_on_second_save)
    assert main(flags) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("maelab")][-1]
    assert "Traceback" not in err and str(out / "checkpoints") in line and "needs about" in line, err
    assert ckpt.latest_checkpoint(out).name == "epoch_0001"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    if kind != "oserror":
        return  # resuming after it is the same for every writer; checked once
    monkeypatch.undo()
    assert main(flags) == 0
    assert ckpt.latest_checkpoint(out).name == "epoch_0002"


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt"])
def test_a_damaged_checkpoint_names_the_one_to_continue_from_and_that_resumes(capsys, tmp_path, damaged):
    """A save never leaves a damaged file, but a half-copied run folder can: the error must say which of
    the run's other checkpoints to continue from, and continuing from it must work."""
    from maelab.cli import main
    from maelab.train import checkpoint as ckpt

    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    flags = ["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0", "--save-every", "1"]
    assert main([*flags, "--epochs", "2"]) == 0
    newest = out / "checkpoints" / "epoch_0002"
    (newest / damaged).write_bytes((newest / damaged).read_bytes()[:100])
    capsys.readouterr()
    assert main([*flags, "--epochs", "3"]) == 2
    line = _error_line(capsys)
    assert str(newest / damaged) in line, line
    assert f"other checkpoints (epoch_0001): continue from the newest of them with --resume " \
           f"{out / 'checkpoints' / 'epoch_0001'}" in line, line
    assert main([*flags, "--epochs", "3", "--resume", str(out / "checkpoints" / "epoch_0001")]) == 0
    assert "continuing at epoch 2" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(out).name == "epoch_0003"
    assert main([*flags, "--epochs", "3"]) == 0  # the damaged folder was replaced by the re-run's epoch 2
    assert ckpt.read_checkpoint(newest)[1]["epoch"] == 2


def test_a_second_process_in_a_running_runs_folder_is_refused_and_a_killed_holder_leaves_no_lock(capsys,
                                                                                                tmp_path):
    """The same command started twice (or a recipe step orphaned by a killed parent, then run again) would
    resume from one checkpoint twice and interleave two runs' checkpoints and logs."""
    import signal

    from maelab.cli import main

    data, out = png_folder(tmp_path / "data", 20), tmp_path / "run"
    flags = ["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0"]
    assert main(flags) == 0
    assert (out / ".maelab.lock").is_file()  # released at the end of the run: the next command may run
    log = tmp_path / "holder.log"
    with open(log, "w") as sink:
        holder = subprocess.Popen([sys.executable, "-m", "maelab.cli", *flags, "--epochs", "400"], stdout=sink,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                 "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while "resumed from" not in log.read_text() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert holder.poll() is None, log.read_text()
        capsys.readouterr()
        assert main([*flags, "--epochs", "400"]) == 2
        line = _error_line(capsys)
        assert f"{out} is in use by another maelab process (pid {holder.pid})" in line, line
        assert f"kill {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock
        holder.wait()
    assert main(flags) == 0, capsys.readouterr().err


def test_a_run_that_another_process_made_and_finished_during_this_ones_start_is_not_overwritten(capsys, tmp_path,
                                                                                                  monkeypatch):
    """The same command started twice into a new --out: the second chose "new run" before the first made the
    folder, the first finished (releasing the lock) while the second was still starting, and the second then
    trained from scratch over the finished run, with whatever settings it had."""
    from maelab.cli import main
    from maelab.train.loop import Trainer

    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    flags = ["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0"]
    original, raced = Trainer.open_run, []

    def open_run(self, config, resume, lock=None):
        if not raced:  # the other process runs to its end just before this one writes the folder
            raced.append(True)
            monkeypatch.setattr(Trainer, "open_run", original)
            assert main([*flags, "--mask-ratio", "0.5"]) == 0
        return original(self, config, resume, lock)

    monkeypatch.setattr(Trainer, "open_run", open_run)
    capsys.readouterr()
    assert main(flags) == 2
    line = _error_line(capsys)
    assert f"{out} was started by another maelab process while this one was starting" in line, line
    assert "mask_ratio: 0.5" in (out / "config.yaml").read_text()  # the finished run is kept as it was
    assert main(flags) == 2 and "--mask-ratio 0.75 (the run has 0.5)" in _error_line(capsys)  # and guarded as usual


def test_a_run_folder_inside_the_data_it_reads_is_refused(capsys, tmp_path):
    """`--out data/train/run` was taken: the resumed run then read its own pictures as 3 more training images
    (and knn later found a class `run`)."""
    from maelab.cli import main

    data = png_folder(tmp_path / "data", 8)
    for out in (data / "run", data):
        assert main(["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0"]) == 2
        assert f"--out {out} is inside {data}, which this run reads" in _error_line(capsys)
    assert not (data / "run").exists()
    assert main(["ablate", "--setting", "mask-ratio", "--values", "0.5", "--data", str(data), "--out",
                 str(data / "sweep")]) == 2
    assert "is inside" in _error_line(capsys)
    for split in ("train/a", "train/b", "valid/a", "valid/b"):  # the validation folder found beside --data too
        png_folder(tmp_path / "export" / split, 4)
    out = tmp_path / "export" / "valid" / "run"
    assert main(["finetune", "--init", "none", "--model", "mae_vit_tiny_patch4", "--data", str(tmp_path / "export" / "train"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--num-workers", "0"]) == 2
    assert f"--out {out} is inside {tmp_path / 'export' / 'valid'}" in _error_line(capsys)


def _linger(ready) -> None:
    ready.set()
    time.sleep(30)


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path):
    """A DataLoader worker is forked while its run holds the lock; when the run is killed, the orphaned worker
    lingers for seconds and, holding a copy of the lock's descriptor, refused the rerun in its dead parent's name."""
    import multiprocessing as mp

    from maelab.train.run_lock import RunLock

    tmp_path.joinpath("run").mkdir()
    lock = RunLock(tmp_path / "run")
    lock.take()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_linger, args=(ready,))
    child.start()
    try:
        assert ready.wait(30)  # the child runs (its fork hooks have run)
        lock.release()  # as the kernel does for a killed holder
        again = RunLock(tmp_path / "run")
        again.take()  # the lingering child does not hold it
        again.release()
    finally:
        child.kill()
        child.join()


def test_temp_checkpoints_a_killed_run_left_are_removed_and_live_ones_kept(capsys, monkeypatch, tmp_path):
    from maelab.cli import main
    from maelab.train import checkpoint as ckpt

    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    root = out / "checkpoints"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [root / f".epoch_0001.{dead.pid}.k2j4x_9a", root / ".epoch_0001.x8dk3l2q",  # (old naming)
                 root / f".latest.{dead.pid}.abcdefgh.tmp"]
        kept = root / f".epoch_0002.{live.pid}.q1w2e3r4"
        for p in [*stale[:2], kept]:
            (p / "model.safetensors").parent.mkdir(parents=True)
            (p / "model.safetensors").write_bytes(b"partial")
        stale[2].write_text("epoch_")
        seen = []
        real = ckpt.save_weights
        monkeypatch.setattr(ckpt, "save_weights", lambda path, *a, **k: seen.append(Path(path)) or real(path, *a, **k))
        assert main(["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0"]) == 0
        assert not any(p.exists() for p in stale) and kept.is_dir()
        assert "removed 3 temp file(s)" in capsys.readouterr().err
        assert f".epoch_0001.{os.getpid()}." in seen[0].parent.name  # the writer names itself
        assert ckpt.latest_checkpoint(out).name == "epoch_0001"
    finally:
        live.kill()
        live.wait()


def test_an_out_folder_holding_someone_elses_config_is_refused_and_left_as_it_was(capsys, tmp_path):
    """A folder with the user's own config.yaml / metrics.jsonl (or another command's run stopped before its
    first checkpoint) was taken over: both files rewritten, hidden files in checkpoints/ deleted."""
    from maelab.cli import main

    data, out = tmp_path / "data", tmp_path / "project"
    png_folder(data / "a", 4), png_folder(data / "b", 4)
    (out / "checkpoints").mkdir(parents=True)
    files = {out / "config.yaml": "project: my-paper\nlr: 0.1\n", out / "metrics.jsonl": '{"step": 5, "acc": 0.9}\n',
             out / "checkpoints" / ".gitkeep": ""}
    for path, text in files.items():
        path.write_text(text)
    args = ["pretrain", "--data", str(data), *FAST, "--num-workers", "0"]
    assert main([*args, "--out", str(out)]) == 2
    assert f"--out {out} holds a config.yaml that this command did not write" in _error_line(capsys)
    assert all(path.read_text() == text for path, text in files.items())
    (out / "config.yaml").write_text("optim:\n  epochs: 1\n")  # a preset of the user's, in sections: refused too
    assert main([*args, "--out", str(out)]) == 2
    assert "this command did not write" in _error_line(capsys) and (out / "metrics.jsonl").read_text() == \
        files[out / "metrics.jsonl"]
    # a pre-training stopped before its first checkpoint: a probe into its folder is refused, a pre-training
    # (the same command run again) starts it over, keeping the user's hidden file in checkpoints/
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # it said "cannot write ...: File exists"
    assert main([*args, "--out", str(tmp_path / "dangling")]) == 2
    assert f"is a link to {tmp_path / 'gone'}, which does not exist" in _error_line(capsys)
    killed = tmp_path / "killed"
    assert main([*args, "--out", str(killed)]) == 0
    shutil.copy(ckpt_latest(killed) / "model.safetensors", tmp_path / "mae.safetensors")
    shutil.rmtree(killed / "checkpoints")
    (killed / "checkpoints").mkdir()
    for name in (".gitkeep", ".notes.2024.txt", ".backup.20240101"):  # the user's, not maelab temps
        (killed / "checkpoints" / name).write_text("")
    assert main(["linprobe", "--init", str(tmp_path / "mae.safetensors"), "--data", str(data), "--val-data", str(data),
                 "--num-workers", "0", "--batch-size", "4", "--out", str(killed)]) == 2
    assert "holds a config.yaml that this command did not write" in _error_line(capsys)
    assert main([*args, "--out", str(killed)]) == 0
    assert ckpt_latest(killed).name == "epoch_0001"
    assert all((killed / "checkpoints" / n).exists() for n in (".gitkeep", ".notes.2024.txt", ".backup.20240101"))


def test_reading_a_run_that_another_process_is_training_is_warned_about(tmp_path):
    """`convert runs/live ...` six times during its training gave six different files without a word."""
    from maelab.train.checkpoint import resolve_weights_path
    from maelab.train.run_lock import LOCK_NAME, RunLock

    run = tmp_path / "live"
    (run / "checkpoints" / "epoch_0003").mkdir(parents=True)
    for name in ("model.safetensors", "meta.json", "state.pt"):
        (run / "checkpoints" / "epoch_0003" / name).write_text("{}")
    (run / "checkpoints" / "latest").write_text("epoch_0003")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no one trains it: no warning
        assert resolve_weights_path(run).parent.name == "epoch_0003"
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(run / LOCK_NAME)!r}, "
                               f"os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.warns(UserWarning, match=rf"live is being trained by process {holder.pid}: reading its newest "
                                             rf"checkpoint, epoch_0003, which that run will replace"):
            resolve_weights_path(run)
    finally:
        holder.kill()
        holder.wait()
    own = RunLock(run)  # this process's own run: no warning
    own.take()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            resolve_weights_path(run)
    finally:
        own.release()


def ckpt_latest(run):
    from maelab.train.checkpoint import latest_checkpoint
    return latest_checkpoint(run)


KILLED_WRITER = """
import os, signal, sys, torch
from safetensors.torch import save_file
from maelab.io import atomic_path
with atomic_path(sys.argv[1], scratch_folder=True) as tmp:
    save_file({"w": torch.zeros(10)}, tmp)
    # what safetensors keeps beside its target while it writes (its own unnamed temp file)
    open(os.path.join(os.path.dirname(tmp), ".tmpab12cd"), "wb").write(b"half of a big model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_weights_a_killed_writer_left_are_removed_by_the_next_write_and_nothing_else(tmp_path):
    import torch
    from maelab.io import read_weights, save_weights

    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.safetensors.") and (left[0] / ".tmpab12cd").exists()
    live = subprocess.Popen(["sleep", "60"])
    try:
        users = [tmp_path / ".out.safetensors.bak", tmp_path / f".out.safetensors.{live.pid}.q1w2e3r4.d",
                 tmp_path / ".other.safetensors.99999999.q1w2e3r4.d"]  # another file's: not this write's to remove
        for p in users:
            p.mkdir()
        save_weights(out, {"w": torch.ones(3)})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in users)])
        assert read_weights(out)[0]["w"].sum() == 3
    finally:
        live.kill()
        live.wait()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("maelab: error: ")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("flags,message", [
    (["--keep", "-1"], "--keep must be 0 (keep all) or more, got -1"),
    (["--num-workers", "-5"], "--num-workers must be 0 or more, or -1 for one per CPU core, got -5"),
    (["--save-every-minutes", "-1"], "--save-every-minutes must be 0 (epoch ends only) or a positive number"),
    (["--save-every-minutes", "nan"], "--save-every-minutes must be a number, got nan"),  # every float alike
])
def test_negative_keep_and_worker_counts_are_refused_before_anything_is_written(capsys, tmp_path, flags, message):
    from maelab.cli import main

    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *FAST, *flags]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()
    assert main(["knn", "--init", "none", "--data", str(data), "--num-workers", "-5"]) == 2
    assert "--num-workers must be 0 or more" in _error_line(capsys)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    import torch

    from conftest import TINY_MAE
    from maelab.interop.mae_weights import save_mae
    from maelab.models.mae import MaskedAutoencoder

    torch.manual_seed(0)
    return save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path_factory.mktemp("mae") / "mae.safetensors")


def test_visualize_refuses_an_output_that_is_not_a_png(capsys, tmp_path, mae_file):
    from maelab.cli import main

    image = png_folder(tmp_path / "data", 1) / "000.png"
    for name in ["recon.txt", "recon"]:
        out = tmp_path / name
        assert main(["visualize", "--checkpoint", str(mae_file), "--images", str(image), "--out", str(out)]) == 2
        assert "visualize writes a PNG; name the file recon.png" in _error_line(capsys)
        assert not out.exists()


@pytest.mark.parametrize("to", ["maelab", "official", "timm"])
def test_convert_to_an_existing_folder_for_a_file_format_is_refused(capsys, tmp_path, mae_file, to):
    from maelab.cli import main

    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["convert", str(mae_file), str(folder), "--to", to]) == 2
    assert f"{folder} is a folder, and --to {to} writes one file" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"] and not any(folder.iterdir())


def test_convert_refuses_to_overwrite_its_source(capsys, tmp_path, mae_file):
    from maelab.cli import main

    source = tmp_path / "mae.safetensors"
    source.write_bytes(mae_file.read_bytes())
    assert main(["convert", str(source), str(source), "--to", "maelab"]) == 2
    assert f"the output {source} is the source: converting would overwrite" in _error_line(capsys)
    assert source.read_bytes() == mae_file.read_bytes()
    hf = tmp_path / "hf"
    assert main(["convert", str(source), str(hf), "--to", "hf"]) == 0
    weights = next(hf.glob("*.safetensors"))
    before = weights.read_bytes()
    assert main(["convert", str(hf), str(weights), "--to", "timm"]) == 2
    assert f"is a file inside the source folder {hf}" in _error_line(capsys)
    assert main(["convert", str(hf), str(hf), "--to", "hf"]) == 2
    assert "is the source" in _error_line(capsys)
    assert weights.read_bytes() == before
    assert main(["convert", str(hf), str(hf / "encoder.safetensors"), "--to", "timm"]) == 0  # a new file is fine
    run = tmp_path / "run"  # a folder of other things (a maelab run): HF files beside them change its --init
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    assert main(["convert", str(source), str(run), "--to", "hf"]) == 2
    assert "holds other files (checkpoints, config.yaml) and is not a Hugging Face ViTMAE folder" in _error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    assert main(["convert", str(source), str(hf), "--to", "hf"]) == 0  # an HF folder is written again
    app = tmp_path / "app"  # another program's config.json is not a Hugging Face ViTMAE's
    app.mkdir()
    (app / "config.json").write_text('{"model_type": "bert"}')
    assert main(["convert", str(source), str(app), "--to", "hf"]) == 2
    assert "holds other files (config.json) and is not a Hugging Face ViTMAE folder" in _error_line(capsys)
    assert (app / "config.json").read_text() == '{"model_type": "bert"}'
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / ".keep").write_text("")  # hidden files only: an empty folder for this purpose
    assert main(["convert", str(source), str(kept), "--to", "hf"]) == 0


def test_an_empty_yaml_section_is_accepted_and_a_non_mapping_section_explained(tmp_path):
    from maelab.commands.pretrain import PretrainConfig
    from maelab.config import build_config
    from maelab.errors import MaelabError

    empty = tmp_path / "empty.yaml"
    empty.write_text("optim:\nrun:\n  seed: 5\n")
    cfg = build_config(PretrainConfig, yaml_path=str(empty))
    assert cfg.run.seed == 5 and cfg.optim.epochs == PretrainConfig().optim.epochs
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: 5\n")
    with pytest.raises(MaelabError, match="config section 'optim' in .* must hold `field: value` lines, got 5"):
        build_config(PretrainConfig, yaml_path=str(bad))


def _text_files(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:03d}.jpg").write_text("not an image")
    return folder


def test_a_few_unreadable_files_are_named_instead_of_the_batch_size(capsys, tmp_path):
    from maelab.cli import main

    data, out = _text_files(tmp_path / "data", 3), tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *FAST, "--batch-size", "16",
                 "--num-workers", "0"]) == 2
    line = _error_line(capsys)
    assert "3 of the 3 images cannot be read, e.g. cannot read image" in line and "batch" not in line
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_run_whose_images_are_all_unreadable_writes_nothing(capsys, tmp_path, workers):
    from maelab.cli import main

    data, out = _text_files(tmp_path / "data", 20), tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", workers]) == 2
    assert "cannot read image" in _error_line(capsys)
    assert not out.exists()


def test_sigterm_before_the_training_loop_is_a_clean_one_line_stop(tmp_path):
    data, out = png_folder(tmp_path / "data", 8), tmp_path / "run"
    argv = ["pretrain", "--data", str(data), "--out", str(out), *FAST, "--num-workers", "0"]
    script = ("import os, signal, sys\n"
              "import maelab.commands.pretrain as p\n"
              "scan = p.prepare_images\n"
              "def signalled(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler stops the job while it reads the data\n"
              "    return scan(*a, **k)\n"
              "p.prepare_images = signalled\n"
              "from maelab.cli import main\n"
              f"sys.exit(main({argv!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "maelab: stopped by SIGTERM outside the training loop; checkpoints already written are kept"]
    assert not out.exists()


def test_more_processes_than_images_is_refused_once_by_rank_0(tmp_path):
    data, out = png_folder(tmp_path / "data", 1), tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29541"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, "-m", "maelab.cli", "pretrain", "--data", str(data), "--out", str(out), *FAST,
                           "--batch-size", "1", "--num-workers", "0"], env=env, capture_output=True, text=True,
                          timeout=180)
    text = done.stdout + done.stderr
    lines = [x for x in text.splitlines() if x.startswith("maelab: error: ")]
    assert lines == ["maelab: error: 2 processes but only 1 image(s): every process needs at least one image per "
                     "step; run at most 1 process(es) (torchrun --nproc_per_node)"], text
    assert "exitcode  : 2" in text and done.returncode != 0  # the launcher's own report of the failure remains
    assert not out.exists()


def test_an_unreadable_image_met_by_one_process_is_named_by_the_other_too(tmp_path):
    """Under torchrun, the process that did not decode the bad image found the group broken and said
    "another process of this job stopped ... run the same command again to resume": false advice, the same
    command meets the same image. It now says which process stopped it, and why."""
    import io

    data, out = png_folder(tmp_path / "data", 15), tmp_path / "run"
    noise = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(noise, "JPEG", quality=95)
    (data / "007.jpg").write_bytes(noise.getvalue()[: len(noise.getvalue()) // 3])  # a sound header, data cut
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29547"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, "-m", "maelab.cli", "pretrain", "--data", str(data), "--out", str(out), *FAST,
                           "--batch-size", "2", "--num-workers", "0", "--in-memory", "no", "--img-size", "32"],
                          env=env, capture_output=True, text=True, timeout=180)
    text = done.stdout + done.stderr
    lines = sorted(x for x in text.splitlines() if x.startswith("maelab: error: "))
    assert len(lines) == 2 and lines[0].startswith(f"maelab: error: cannot read image {data / '007.jpg'}"), text
    why = lines[0][len("maelab: error: "):]
    assert re.fullmatch(rf"maelab: error: process [01]: stopped with process [01], which met an error: {re.escape(why)}",
                        lines[1]), text
    assert "run the same command again to resume" not in text and done.returncode != 0
