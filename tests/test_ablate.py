"""`maelab ablate` on a tiny subset: one setting, two values, pre-training + kNN + linear probe per value,
a table and a plot; a second run skips what is done; bad sweeps are refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
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
            "--probe-epochs", "2", "--device", "cpu", "--limit-images", "12", "--pretrain-images", "0",
            "--out", str(tmp_path / "sweep")]
    out = ablate(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["value"] for r in summary["rows"]] == ["0.5", "0.75"]
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linprobe_top1"] <= 100 and r["pretrain_s"] > 0
               for r in summary["rows"])
    recorded = (tmp_path / "sweep" / "mask-ratio=0.5" / "pretrain" / "config.yaml").read_text()
    assert "mask_ratio: 0.5" in recorded
    assert "limit_images: 0" in recorded  # --pretrain-images 0: pre-trained on all 32, evaluated on 12
    knn = json.loads((tmp_path / "sweep" / "mask-ratio=0.5" / "knn.json").read_text())
    assert knn["train_images"] == 12 and knn["val_images"] == 12
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| mask-ratio | kNN top-1 | linear probe top-1 | pre-training time | steps |" in table
    assert (tmp_path / "sweep" / "ablation.png").stat().st_size > 1000
    again = ablate(*args, cwd=tmp_path)  # finished values are skipped
    assert again.returncode == 0 and json.loads((tmp_path / "sweep" / "results.json").read_text()) == summary
    page = tmp_path / "page.md"  # the results page shows the sweep, its command, the paper beside it, the plot
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", "--ablation",
                    str(tmp_path / "sweep"), "--quality", str(tmp_path / "none"), "--out", str(page)],
                   check=True, capture_output=True)
    text = page.read_text()
    assert "## Sweep: `mask-ratio`" in text and "Command: `maelab ablate --setting mask-ratio" in text
    assert "Paper: Fig. 5" in text and "Ours: best kNN at **" in text
    assert (tmp_path / "results" / "sweep_mask-ratio.png").is_file() and "(results/sweep_mask-ratio.png)" in text
    for key in ("command", "precision", "seed", "evaluated_images", "pretrain_images"):
        summary.pop(key)  # a summary written before these were recorded: the page reads them from the runs
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(summary))
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", "--ablation",
                    str(tmp_path / "sweep"), "--quality", str(tmp_path / "none"), "--out", str(page)],
                   check=True, capture_output=True)
    text = page.read_text()
    assert "re-created from the recorded settings" in text and "--limit-images 12 --pretrain-images 0" in text
    assert "precision fast), then evaluated on 12 images of each split" in text


@pytest.mark.parametrize("args,message", [
    (["--values", "0.5"], "--setting and --values"),
    (["--setting", "mask-ratio", "--values", "0.5", "0.5"], "repeats"),
    (["--setting", "mask-ratio", "--values", "0.5", "--budget", "soon"], "not a duration"),
    (["--setting", "mask-ratio", "--values", "0.5", "--pretrain-images", "-3"], "--pretrain-images must be"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, args, message):
    out = ablate(*args, "--data", str(tmp_path), "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "sweep").exists()


def write_sweep(folder: Path, setting: str, scores: dict[str, float], minutes: float = 4.0) -> Path:
    rows = [{"value": v, "pretrain_s": minutes * 60, "pretrain_steps": 400, "knn_top1": k} for v, k in scores.items()]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "setting": setting, "budget": "4m", "data": "cifar10/train", "rows": rows, "preset": "pretrain_cifar10_tiny",
        "seed": 0, "precision": "fast", "machine": "test", "evaluated_images": 5000, "pretrain_images": 0,
        "command": f"maelab ablate --setting {setting}"}))
    (folder / "results.md").write_text(f"| {setting} |\n")
    return folder


def test_the_results_page_measures_the_spread_and_calls_a_difference_only_beyond_it(tmp_path):
    sweeps = [write_sweep(tmp_path / "mask", "mask-ratio", {"0.5": 29.0, "0.75": 31.0}),
              write_sweep(tmp_path / "depth", "decoder-depth", {"1": 35.0, "4": 31.5, "8": 30.0}),  # preset: 4
              write_sweep(tmp_path / "norm", "norm-pix-loss", {"true": 31.2, "false": 31.9}, minutes=9.0),
              write_sweep(tmp_path / "seed", "seed", {"1": 30.5})]
    page = tmp_path / "page.md"
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", "--ablation",
                    *map(str, sweeps), "--quality", str(tmp_path / "none"), "--out", str(page)],
                   check=True, capture_output=True)
    text = page.read_text()
    # the preset's own configuration: mask 0.75, depth 4, norm-pix true, seed 1 -> 31.0, 31.5, 31.2, 30.5
    assert "pre-trained 4 times at the 4m budget" in text and "spread 1.00 points" in text
    assert "| `mask-ratio` | 4m | 0.75 | 31.00 | 0.75 | 31.00 | same winner |" in text
    assert "| `decoder-depth` | 4m | 8 | 30.00 | 1 | 35.00 | **differs**: 1 beats 8 by 5.00 (> the 1.00-point spread); the budget bought 400 against 400 steps |" in text
    assert "| `norm-pix-loss` | 4m | true | 31.20 | false | 31.90 | within the 1.00-point spread" in text
    assert "Over the budget: true (9.0 min), false (9.0 min)" in text
    (tmp_path / "depth" / "results.json").write_text((tmp_path / "depth" / "results.json").read_text()
                                                      .replace("35.0", "29.0").replace("30.0", "31.9"))
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_page.py"), "--recipe", "--ablation",
                    *map(str, sweeps), "--quality", str(tmp_path / "none"), "--out", str(page)],
                   check=True, capture_output=True)
    assert "| `decoder-depth` | 4m | 8 | 31.90 | 8 | 31.90 | same winner, but by 0.40: within the 1.00-point spread |" in page.read_text()
