"""The engine: a real short pre-training learns; interrupted, crashed, killed and multi-process runs
end with exactly the weights of one uninterrupted single-process run; bad numerics stop cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from maelab.commands.pretrain import PretrainConfig
from maelab.config import build_config
from maelab.errors import MaelabError
from maelab.commands.pretrain import run as run_pretrain
from maelab.io import read_weights
from maelab.train import checkpoint as ckpt
from maelab.train.loop import NonFiniteLoss, RunInterrupted
from maelab.train.tasks import PretrainTask

SMALL = dict(model="mae_vit_tiny_patch4", decoder_depth=1, epochs=2, warmup_epochs=1, base_lr=1.5e-3,
             vis_every=0, log_every=1, device="cpu", num_workers=0, seed=3)


def cfg_for(data, out, **kw) -> PretrainConfig:
    return build_config(PretrainConfig, {**SMALL, "data": str(data), "out": str(out), "batch_size": 16, **kw})


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return read_weights(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS)[0]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def reference_run(cifar_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_pretrain(cfg_for(cifar_tiny, out))
    return out


def test_short_cifar_pretraining_lowers_the_loss(cifar_small, tmp_path):
    cfg = cfg_for(cifar_small, tmp_path, batch_size=32, epochs=4, log_every=3, vis_every=2)
    result = run_pretrain(cfg)
    epochs = [h for h in result.history if "epoch_loss" in h]
    assert len(epochs) == 4
    assert epochs[-1]["epoch_loss"] < 0.85 * epochs[0]["epoch_loss"], epochs
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "reconstruction.png",
                 "reconstructions/epoch_0002.png", "reconstructions/epoch_0004.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "img_per_s", "grad_norm"} <= set(lines[0])


@pytest.fixture(scope="module")
def reference_stream(cifar_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_stream")
    run_pretrain(cfg_for(cifar_tiny, out, in_memory="no"))
    return out


def test_streamed_data_path_resumes_exactly_too(cifar_tiny, tmp_path, monkeypatch, reference_stream):
    original = PretrainTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return original(self, runner, batch)

    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(RunInterrupted):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, in_memory="no"))
    monkeypatch.setattr(PretrainTask, "forward", original)
    run_pretrain(cfg_for(cifar_tiny, tmp_path, in_memory="no"))
    assert_same_weights(final_weights(tmp_path), final_weights(reference_stream))


def test_resume_after_a_signal_reproduces_the_uninterrupted_weights(cifar_tiny, tmp_path, monkeypatch, reference_run):
    original = PretrainTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # like a scheduler pre-empting the job
        return original(self, runner, batch)

    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(RunInterrupted, match="epoch 2 step 2") as stopped:
        run_pretrain(cfg_for(cifar_tiny, tmp_path))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.setattr(PretrainTask, "forward", original)
    assert ckpt.latest_checkpoint(tmp_path).name.startswith("step_")
    run_pretrain(cfg_for(cifar_tiny, tmp_path))  # same command again: resumes mid-epoch
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))
    # the resumed epoch's mean loss covers the steps before the interruption too
    meta = [json.loads((d / "checkpoints" / "epoch_0002" / ckpt.META).read_text()) for d in (tmp_path, reference_run)]
    assert meta[0]["epoch_loss"] == pytest.approx(meta[1]["epoch_loss"], rel=1e-6)


def test_resume_after_a_crash_restarts_from_the_last_checkpoint_exactly(cifar_tiny, tmp_path, monkeypatch, reference_run):
    original = PretrainTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 2:
            raise RuntimeError("simulated crash")
        return original(self, runner, batch)

    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path))
    monkeypatch.setattr(PretrainTask, "forward", original)
    assert ckpt.latest_checkpoint(tmp_path).name == "epoch_0001"
    run_pretrain(cfg_for(cifar_tiny, tmp_path))
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))
    # the steps logged after the checkpoint by the crashed run are dropped, not logged twice
    steps = [[json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path, reference_run)]
    assert steps[0] == steps[1]


def test_timed_checkpoints_leave_the_run_unchanged_and_a_crash_loses_only_the_steps_since_one(
        cifar_tiny, tmp_path, monkeypatch, reference_run):
    original, kept = PretrainTask.forward, []

    def forward(self, runner, batch):
        kept.append(sorted(d.name for d in ckpt.list_checkpoints(tmp_path)))
        if batch.epoch == 1 and batch.step == 3:
            raise RuntimeError("simulated crash")  # like kill -9: no handler gets to save
        return original(self, runner, batch)

    monkeypatch.setattr(PretrainTask, "forward", forward)
    every_step = 1e-9  # minutes: a timed checkpoint after every step
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, save_every_minutes=every_step))
    # each timed checkpoint replaced the previous one; the epoch's own checkpoint stays
    assert kept[-1] == ["epoch_0001", "step_00000007"] and kept[-2] == ["epoch_0001", "step_00000006"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000007"
    monkeypatch.setattr(PretrainTask, "forward", original)
    run_pretrain(cfg_for(cifar_tiny, tmp_path, save_every_minutes=every_step))
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == ["epoch_0002"]  # the timed ones are gone
    meta = [json.loads((d / "checkpoints" / "epoch_0002" / ckpt.META).read_text()) for d in (tmp_path, reference_run)]
    assert meta[0]["epoch_loss"] == pytest.approx(meta[1]["epoch_loss"], rel=1e-6)


def test_gradient_accumulation_matches_one_big_batch(cifar_tiny, tmp_path, reference_run):
    run_pretrain(cfg_for(cifar_tiny, tmp_path, batch_size=8, accum_iter=2))
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run), atol=3e-5)


def _cli(*args, threads: int | None = None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([*args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _flags(data, out, batch):
    flags = []
    for k, v in {**SMALL, "data": str(data), "out": str(out), "batch_size": batch}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(cifar_tiny, tmp_path, reference_run):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29517"]
    # timed checkpoints at every log step: the processes agree on when to save, and saving changes nothing
    proc = _cli(*torchrun, "-m", "maelab.cli", "pretrain", *_flags(cifar_tiny, tmp_path, 8),
                "--save-every-minutes", "1e-9", threads=1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    # same global batch (2 x 8 = 16), same data, same masks: same weights up to all-reduce rounding
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run), atol=3e-5)
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == ["epoch_0002"]  # the timed ones are gone


def test_two_processes_train_the_symmetric_variant_whose_decoder_mask_token_is_unused(cifar_tiny, tmp_path):
    """With --encoder-mask-tokens the decoder's mask token gets no gradient; DDP waited for it and stopped at
    the second step ("Expected to have finished reduction in the prior iteration")."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29563"]
    proc = _cli(*torchrun, "-m", "maelab.cli", "pretrain", *_flags(cifar_tiny, tmp_path, 8), "--encoder-mask-tokens",
                "--limit-images", "32", threads=1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "encoder_mask_token" in final_weights(tmp_path)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(cifar_tiny, tmp_path, reference_run):
    flags = _flags(cifar_tiny, tmp_path, 16)
    proc = _cli(sys.executable, "-m", "maelab.cli", "pretrain", *flags)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "checkpoints" / "epoch_0001").is_dir():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler, no chance to save: only the atomic files survive
    proc.communicate()
    # same thread count as the in-process reference, so float reductions run in the same order
    proc = _cli(sys.executable, "-m", "maelab.cli", "pretrain", *flags)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cifar_tiny, tmp_path, monkeypatch):
    original = PretrainTask.forward

    def forward(self, runner, batch):
        loss, extra = original(self, runner, batch)
        if batch.epoch == 1 and batch.step == 1:
            loss = loss * float("nan")
        return loss, extra

    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 6 \(epoch 2\).*epoch_0001"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path))
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "epoch_0001"
    weights, _ = read_weights(good / ckpt.WEIGHTS)
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(cifar_tiny, tmp_path, precision):
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path, precision=precision, epochs=1))
    assert result.epochs_done == 1
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


def test_incomplete_checkpoint_folders_are_never_taken(tmp_path, reference_run):
    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    half = tmp_path / "checkpoints" / "epoch_0009"
    half.mkdir()
    (half / ckpt.WEIGHTS).write_bytes(b"partial")  # no meta.json: a save that was cut short
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("epoch_0009\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "epoch_0002"


def test_checkpoint_holds_safetensors_weights_and_a_weights_only_state(reference_run):
    folder = ckpt.latest_checkpoint(reference_run)
    state = torch.load(folder / ckpt.STATE, weights_only=True)
    assert {"optimizer", "scaler", "epoch", "step", "global_step", "rng"} <= set(state)
    weights, meta = read_weights(folder / ckpt.WEIGHTS)
    assert meta["arch"] == "mae" and meta["kwargs"]["decoder_depth"] == 1
    assert "decoder_pred.weight" in weights


def test_keeps_the_latest_and_the_last_k_periodic_checkpoints(cifar_tiny, tmp_path):
    run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=5, save_every=2, keep=2, log_every=4))
    names = sorted(d.name for d in ckpt.list_checkpoints(tmp_path))
    assert names == ["epoch_0004", "epoch_0005"]  # periodic: 2, 4 and the final 5; keep the last 2


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_are_kept():
    from maelab.train.precision import autocast, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        autocast(cpu, "fp8")


@pytest.mark.parametrize("native", [True, False])
def test_fast_precision_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, native):
    """``fast`` (the quick recipe's and the ablations' default) never picks emulated bf16 on a CPU."""
    from maelab.train.precision import native_bf16, resolve_precision

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is native
    assert resolve_precision("fast", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", cpu) == "fp32"


def test_resume_may_split_the_same_global_batch_differently(cifar_tiny, tmp_path, reference_run):
    """1 process x 8 x accumulation 2, resumed as 1 process x 16 (what 2 processes x 8 -> 1 x 16 also is):
    the same images, masks and crops at every step, the weights within float tolerance of the reference."""
    run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=1, batch_size=8, accum_iter=2))
    with pytest.raises(MaelabError, match="global batch of 16, this run has 8"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, batch_size=8))  # a different global batch: refused
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path))
    assert result.epochs_done == 2
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run), atol=3e-5)


def test_resume_with_or_without_the_default_img_size_is_the_same_run(cifar_tiny, tmp_path):
    run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=1, img_size=[32]))
    assert "- 32\n  - 32" in (tmp_path / "config.yaml").read_text()  # the resolved size is recorded
    assert run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=2)).epochs_done == 2  # no --img-size: the same 32
    assert run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=2, img_size=[32, 32])).epochs_done == 2
    with pytest.raises(MaelabError, match="--img-size"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=3, img_size=[64]))


def test_resume_refuses_changed_settings_and_keeps_the_recorded_config(cifar_tiny, tmp_path):
    run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=1))
    recorded = (tmp_path / "config.yaml").read_text()
    assert str(Path(cifar_tiny).resolve()) in recorded  # absolute data path: same meaning from any folder
    with pytest.raises(MaelabError, match=r"changed settings: --base-lr 0\.01 \(the run has 0\.0015\)"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=2, base_lr=1e-2))
    with pytest.raises(MaelabError, match="--mask-ratio"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=2, mask_ratio=0.5))
    assert (tmp_path / "config.yaml").read_text() == recorded
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=2))  # more epochs: allowed
    assert result.epochs_done == 2 and "epochs: 2" in (tmp_path / "config.yaml").read_text()


def test_a_run_folder_of_another_command_is_refused(tmp_path):
    from maelab.commands.finetune import FinetuneConfig
    from maelab.config import to_dict
    from maelab.train.run_config import check_resume, recorded

    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(recorded(to_dict(build_config(PretrainConfig)))))
    with pytest.raises(MaelabError, match=r"holds a run of another command \(its config.yaml has settings this "
                                          r"command does not: data.color_jitter, .*or a --resume of this command's"):
        check_resume(saved, to_dict(build_config(FinetuneConfig)))
    assert check_resume(saved, to_dict(build_config(PretrainConfig, {"epochs": 9}))) == ["optim.epochs: 10 -> 9"]


def test_run_files_get_the_usual_permissions(cifar_tiny, tmp_path):
    old = os.umask(0o022)
    try:
        run_pretrain(cfg_for(cifar_tiny, tmp_path, epochs=1))
    finally:
        os.umask(old)
    folder = ckpt.latest_checkpoint(tmp_path)
    assert folder.stat().st_mode & 0o777 == 0o755
    for f in [tmp_path / "config.yaml", folder / ckpt.WEIGHTS, folder / ckpt.STATE, folder / ckpt.META]:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_an_out_path_that_is_a_file_is_refused_before_anything_runs(cifar_tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MaelabError, match="not a folder"):
        run_pretrain(cfg_for(cifar_tiny, tmp_path / "afile"))


def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(cifar_small, tmp_path):
    """Slurm / `timeout` signal every process of the job: the DataLoader workers must not die of it
    before the main process has saved."""
    flags = _flags(cifar_small, tmp_path, 16) + ["--num-workers", "2", "--in-memory", "no", "--epochs", "3"]
    proc = _cli(sys.executable, "-m", "maelab.cli", "pretrain", *flags, threads=1, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3/" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    text = "".join(seen) + out
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and ckpt.latest_checkpoint(tmp_path) is not None, text
