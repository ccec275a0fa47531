"""`maelab ablate` on a tiny subset: one setting, two values, pre-training + kNN + linear probe per value,
a table and a plot; a second run skips what is done; bad sweeps are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import maelab_process, make_subset

REPO = Path(__file__).resolve().parents[1]


def ablate(*args: str, cwd: Path):
    return maelab_process("ablate", *args, cwd=cwd)


def test_a_mask_ratio_sweep_writes_a_table_and_a_plot(tmp_path):
    data = make_subset(tmp_path / "c10" / "train", 8, classes=4)
    make_subset(tmp_path / "c10" / "test", 4, classes=4, split="test")
    args = ["--setting", "mask-ratio", "--values", "0.5", "0.75", "--evaluate", "knn", "linprobe",
            "--data", str(data), "--batch-size", "8", "--budget", "none", "--pretrain-epochs", "1",
            "--probe-epochs", "2", "--device", "cpu", "--out", str(tmp_path / "sweep")]
    out = ablate(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["value"] for r in summary["rows"]] == ["0.5", "0.75"]
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linprobe_top1"] <= 100 and r["pretrain_s"] > 0
               for r in summary["rows"])
    recorded = (tmp_path / "sweep" / "mask-ratio=0.5" / "pretrain" / "config.yaml").read_text()
    assert "mask_ratio: 0.5" in recorded
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| mask-ratio | kNN top-1 | linear probe top-1 | pre-training time |" in table
    assert (tmp_path / "sweep" / "ablation.png").stat().st_size > 1000
    again = ablate(*args, cwd=tmp_path)  # finished values are skipped
    assert again.returncode == 0 and json.loads((tmp_path / "sweep" / "results.json").read_text()) == summary


@pytest.mark.parametrize("args,message", [
    (["--values", "0.5"], "--setting and --values"),
    (["--setting", "mask-ratio", "--values", "0.5", "0.5"], "repeats"),
    (["--setting", "mask-ratio", "--values", "0.5", "--budget", "soon"], "not a duration"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, args, message):
    out = ablate(*args, "--data", str(tmp_path), "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "sweep").exists()
