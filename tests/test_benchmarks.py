"""The benchmark scripts' model builders and bookkeeping keep working as the code changes (the benchmarks
themselves are not run by CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_asymmetry import BASELINE, build_models, loss_fn  # noqa: E402


def test_asymmetry_variants_share_the_encoder_and_train():
    models = build_models("mae_vit_tiny_patch4", with_sym1=True)
    assert models["MAE, 1-block decoder"].blocks is models["MAE, 8-block decoder"].blocks
    imgs = torch.randn(2, 3, 32, 32)
    for name, model in models.items():
        loss = loss_fn(model)(imgs)
        loss.backward()
        assert torch.isfinite(loss), name
    # the baseline's encoder sees every token, so its mask token gets a gradient
    assert models[BASELINE].enc_mask_token.grad is not None


def test_quality_per_minute_times_maelab_from_its_launch_and_rescores_without_training(tmp_path, monkeypatch):
    """The maelab arm's minutes count from the recorded launch (not config.yaml's time: the budget planner
    rewrites that file at the end, which once gave negative minutes); --rescore trains nothing."""
    import json
    import os

    from benchmarks import quality_per_minute as qpm

    out = tmp_path / "q"
    started = 1_000_000.0
    (out / "knn").mkdir(parents=True)
    (out / "maelab_started.json").write_text(json.dumps({"unix_time": started}))
    for epoch, minute in ((1, 3.0), (2, 9.5)):
        ckpt = out / "maelab" / "checkpoints" / f"epoch_{epoch:04d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"")
        os.utime(ckpt / "model.safetensors", (started + minute * 60, started + minute * 60))
    (out / "maelab" / "config.yaml").write_text("")  # written last, as the planner does
    (out / "hf").mkdir()
    (out / "hf" / "snapshots.json").write_text(json.dumps({"minutes": [5.0, 10.0], "folders": ["snapshot_01", "snapshot_02"],
                                                          "schedule": {"planned_steps": 10, "steps_done": 10}}))
    scores = {"checkpoints_epoch_0001": 30.0, "checkpoints_epoch_0002": 35.0, "hf_snapshot_01": 20.0, "hf_snapshot_02": 21.0}
    for name, score in scores.items():
        for pool in qpm.POOLS:
            (out / "knn" / f"{name}_{pool}.json").write_text(json.dumps({"knn_top1": score}))
    monkeypatch.setattr(qpm, "maelab_cli", lambda *a: (_ for _ in ()).throw(AssertionError("nothing may run")))
    monkeypatch.setattr(sys, "argv", ["quality_per_minute.py", "--data", "d", "--val-data", "v", "--out", str(out),
                                      "--points", "2", "--rescore"])
    qpm.main()
    res = json.loads((out / "results.json").read_text())
    assert [p["minutes"] for p in res["curves"]["maelab"]] == [3.0, 9.5]
    assert [p["token"] for p in res["curves"]["HF ViTMAE + torchvision"]] == [20.0, 21.0]
    assert res["hf_schedule"] == {"planned_steps": 10, "steps_done": 10} and (out / "curve.png").is_file()


def test_quality_per_minute_rescore_of_a_run_without_its_records_stops_with_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    from benchmarks import quality_per_minute as qpm

    monkeypatch.setattr(sys, "argv", ["quality_per_minute.py", "--data", "d", "--val-data", "v", "--out",
                                      str(tmp_path / "q"), "--rescore"])
    with pytest.raises(SystemExit, match="maelab_started.json, .*snapshots.json not found"):
        qpm.main()


def test_masking_benchmark_times_every_strategy_against_a_step():
    import subprocess
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_masking.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--no-write", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for kind in ("random", "block", "grid"):
        assert f"| mask noise: {kind} |" in out.stdout
    assert "| training step (fwd + bwd + AdamW) |" in out.stdout
