"""The benchmark scripts' model builders and bookkeeping keep working as the code changes (the benchmarks
themselves are not run by CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_asymmetry import BASELINE, build_models, loss_fn  # noqa: E402
from conftest import ctrl_c_when_ready, results_page, saving_child  # noqa: E402


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
    (out / "maelab" / "config.yaml").write_text("optim:\n  max_steps: 42\n")  # written last, as the planner does
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
    assert res["maelab_steps"] == 42  # what maelab's planner settled on, kept beside the alternative's


def test_quality_per_minute_stops_its_maelab_run_when_it_is_stopped(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM of the benchmark while its maelab arm trains: the run is asked to stop and saves
    before the benchmark exits, instead of training on, orphaned, until its budget ends."""
    import argparse
    import signal

    from benchmarks import quality_per_minute as qpm

    monkeypatch.setattr(qpm, "child_command", lambda args: saving_child(tmp_path))
    args = argparse.Namespace(rescore=False, snapshot_minutes=1.0, budget="30m", points=5, data="d", batch_size=8,
                              seed=0)
    before = ctrl_c_when_ready(tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            qpm.run_maelab(args, tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "saved").is_file()  # it saved before the benchmark went on to exit


def test_quality_per_minute_keeps_maelabs_timed_checkpoints_and_compares_at_equal_or_less_time(tmp_path):
    """A timed checkpoint is removed by the run's next save: the hard link keeps it, with its time. Each of
    the alternative's snapshots is compared with maelab's latest snapshot taken no later."""
    import json
    import os

    from benchmarks import quality_per_minute as qpm
    from maelab.train import checkpoint as ckpt

    run, snaps = tmp_path / "maelab", tmp_path / "snaps"
    folder = run / "checkpoints" / "step_00000120"
    folder.mkdir(parents=True)
    for name in (ckpt.WEIGHTS, ckpt.STATE):
        (folder / name).write_bytes(b"w")
    (folder / ckpt.META).write_text(json.dumps({"global_step": 120}))
    os.utime(folder / ckpt.WEIGHTS, (1000.0, 1000.0))
    qpm.harvest(run, snaps)
    qpm.harvest(run, snaps)  # already kept: left as it is
    ckpt.prune(run, set())  # the run's next save removes it
    assert not folder.exists() and (snaps / "step_00000120" / ckpt.WEIGHTS).read_bytes() == b"w"
    assert (snaps / "step_00000120" / ckpt.WEIGHTS).stat().st_mtime == 1000.0
    assert sorted(p.name for p in snaps.iterdir()) == ["step_00000120"]  # no half-linked folder left

    times, paths = [2.9, 6.0, 7.3, 9.1, 12.2], [Path(f"s{i}") for i in range(5)]
    picked = qpm.no_later_than(times, paths, [2.0, 6.1, 9.1, 12.0])
    assert [t for t, _ in picked] == [6.0, 9.1, 12.2]  # none is as early as 2.0; the last always


def test_quality_per_minute_rescore_of_a_run_without_its_records_stops_with_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    from benchmarks import quality_per_minute as qpm

    monkeypatch.setattr(sys, "argv", ["quality_per_minute.py", "--data", "d", "--val-data", "v", "--out",
                                      str(tmp_path / "q"), "--rescore"])
    with pytest.raises(SystemExit, match="maelab_started.json, .*snapshots.json not found"):
        qpm.main()


def write_quality(folder: Path, cpu: str, ours: float, theirs: float, steps: dict | None = None) -> Path:
    """A quality_per_minute output as the benchmark writes it: one snapshot per arm (``steps``: the step
    records a run since they were kept has)."""
    import json

    folder.mkdir(parents=True)
    point = lambda minutes, score: {"minutes": minutes, "token": score, "avg": score}  # noqa: E731
    (folder / "results.json").write_text(json.dumps({
        "budget": "30m", "machine": f"CPU: {cpu} (2 logical cores, avx2; torch uses 2 threads); torch 2", "load": "load 1",
        "command": f"python benchmarks/quality_per_minute.py --out runs/{folder.name}", "eval_images": 5000, "seed": 0,
        "curves": {"maelab": [point(28.0, ours)], "HF ViTMAE + torchvision": [point(30.0, theirs)]}, **(steps or {})}))
    (folder / "results.md").write_text("| arm | minutes |\n")
    return folder


def test_the_results_page_shows_each_machines_quality_run_and_renders_again_from_its_archive(tmp_path):
    """Runs from two machines each get a section named by the CPU, with their own verdict; the archive's
    index keeps both, and an index written before it held one name still renders."""
    import json

    page = tmp_path / "docs" / "r.md"
    steps = {"maelab_steps": 2137, "hf_schedule": {"planned_steps": 883, "steps_done": 917}}
    runs = [write_quality(tmp_path / "runs" / "q_intel", "Intel Xeon", 38.0, 26.0, steps),
            write_quality(tmp_path / "runs" / "q_epyc", "AMD EPYC", 30.0, 27.0)]
    results_page("--recipe", "--quality", *map(str, runs), "--out", str(page), check=True)
    text = page.read_text()
    intel, epyc = text.split("### Intel Xeon (`q_intel`)")[1], text.split("### AMD EPYC (`q_epyc`)")[1]
    assert "+12.00 / +12.00 points. Target (at least +4): **met**" in intel.split("###")[0]
    assert "+3.00 / +3.00 points. Target (at least +4): **not met**" in epyc
    assert ("Pre-training steps in the budget: maelab 2137 (the count its budget planner settled on); HF ViTMAE + "
            "torchvision 917 (planned 883 from its first 12 steps' time).") in intel.split("###")[0]
    assert "Pre-training steps" not in epyc  # a run from before the counts were recorded: nothing made up
    index = tmp_path / "docs" / "results" / "runs" / "index.json"
    assert json.loads(index.read_text())["quality"] == ["q_intel", "q_epyc"]
    again = results_page("--out", str(page))
    assert again.returncode == 0, again.stderr
    assert page.read_text() == text
    old = json.loads(index.read_text()) | {"quality": "q_epyc"}
    index.write_text(json.dumps(old))
    results_page("--out", str(page), check=True)
    single = page.read_text()
    assert "###" not in single and "**not met**" in single and "`python benchmarks/quality_per_minute.py --out runs/q_epyc`" in single


def test_masking_benchmark_times_every_strategy_against_a_step():
    import subprocess
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_masking.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--no-write", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for kind in ("random", "block", "grid"):
        assert f"| mask noise: {kind} |" in out.stdout
    assert "| training step (fwd + bwd + AdamW) |" in out.stdout
