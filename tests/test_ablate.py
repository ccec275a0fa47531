"""`maelab ablate` on a tiny subset: one setting, two values, pre-training + kNN + linear probe per value,
a table and a plot; a second run skips what is done; bad sweeps are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import maelab_here, maelab_refusal, make_subset, results_page
from maelab.errors import MaelabError

REPO = Path(__file__).resolve().parents[1]


def ablation_page(tmp_path: Path, page: Path, *sweeps: Path) -> None:
    """The results page of these sweeps alone (no recipe, no quality runs), written to ``page``."""
    results_page("--recipe", "--ablation", *map(str, sweeps), "--quality", "--out", str(page),
                 check=True)


def ablate(*args: str, cwd: Path):
    return maelab_here("ablate", *args, cwd=cwd)


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
    assert f"Evaluated on {tmp_path / 'c10' / 'test'} (validation)" in table and "input 32x32 px" in table
    assert summary["img_size"] == [32, 32] and summary["val_data"] == str(tmp_path / "c10" / "test")
    assert (tmp_path / "sweep" / "ablation.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "losses.png").stat().st_size > 1000  # every run's loss curve
    again = ablate(*args, cwd=tmp_path)  # finished values are skipped
    assert again.returncode == 0 and json.loads((tmp_path / "sweep" / "results.json").read_text()) == summary
    longer = [a if a != "1" else "2" for a in args]  # --pretrain-epochs 2: finished values are no answer to it
    changed = ablate(*longer, cwd=tmp_path)
    assert changed.returncode == 2 and "mask-ratio=0.5/pretrain was run with other settings (--epochs 1 -> 2)" \
        in changed.stderr, changed.stderr[-2000:]
    assert json.loads((tmp_path / "sweep" / "results.json").read_text()) == summary
    resized = ablate(*args, "--img-size", "16", cwd=tmp_path)  # every pre-training at another size: a new sweep
    assert resized.returncode == 2 and "--img-size (not given) -> 16" in resized.stderr, resized.stderr[-2000:]
    one = [*args[:2], "--values", "0.5", *args[5:]]  # a second seed for one value: only its runs are new
    first = (tmp_path / "sweep" / "mask-ratio=0.5" / "knn.json").stat().st_mtime_ns
    more = ablate(*one, "--seeds", "0", "1", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "mask-ratio = 0.5, seed 1" in more.stderr
    assert (tmp_path / "sweep" / "mask-ratio=0.5" / "knn.json").stat().st_mtime_ns == first  # seed 0: kept
    seeded = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert seeded["seeds"] == [0, 1] and (tmp_path / "sweep" / "mask-ratio=0.5" / "seed=1" / "knn.json").is_file()
    assert [r["value"] for r in seeded["rows"]] == ["0.5"]
    for row, single in zip(seeded["rows"], summary["rows"]):
        assert row["seeds"] == [0, 1] and row["knn_top1_runs"][0] == single["knn_top1"]
        assert row["knn_top1"] == pytest.approx(sum(row["knn_top1_runs"]) / 2)
    assert "seed: 1" in (tmp_path / "sweep" / "mask-ratio=0.5" / "seed=1" / "pretrain" / "config.yaml").read_text()
    assert "Mean ± standard deviation over 2 seeds" in (tmp_path / "sweep" / "results.md").read_text()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(summary))  # the page below reads the one-seed sweep
    page = tmp_path / "page.md"  # the results page shows the sweep, its command, the paper beside it, the plot
    ablation_page(tmp_path, page, tmp_path / "sweep")
    text = page.read_text()
    assert "## Sweep: `mask-ratio` (`sweep`)" in text and "Command: `maelab ablate --setting mask-ratio" in text
    assert summary["code"].startswith("maelab ") and f"Code: {summary['code']}." in text
    assert "Paper: Fig. 5" in text and "Ours: best kNN at **" in text
    kept = tmp_path / "results" / "runs" / "sweep"  # archived: the page shows the pictures from there
    assert (kept / "ablation.png").is_file() and "(results/runs/sweep/ablation.png)" in text
    assert "(results/runs/sweep/losses.png)" in text
    assert (kept / "mask-ratio=0.5" / "pretrain" / "config.yaml").is_file() and (kept / "mask-ratio=0.5" / "knn.json").is_file()
    assert not list(kept.rglob("*.pth")) and not list(kept.rglob("*.safetensors")) and not list(kept.rglob("*.jsonl"))
    for key in ("command", "precision", "seed", "evaluated_images", "pretrain_images", "code"):
        summary.pop(key)  # a summary written before these were recorded: the page reads them from the runs
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(summary))
    ablation_page(tmp_path, page, tmp_path / "sweep")
    text = page.read_text()
    assert "re-created from the recorded settings" in text and "--limit-images 12 --pretrain-images 0" in text
    assert "precision fast), then evaluated on 12 images of each split" in text
    assert "Code:" not in text  # not recorded then, so not claimed


@pytest.mark.parametrize("args,message", [
    (["--values", "0.5"], "--setting and --values"),
    (["--setting", "mask-ratio", "--values", "0.5", "0.5"], "repeats"),
    (["--setting", "mask-ratio", "--values", "0.5", ".50"], "--values 0.5 and .50 are the same mask-ratio"),
    (["--setting", "mask-ratio", "--values", "0.5", "--budget", "soon"], "not a duration"),
    (["--setting", "mask-ratio", "--values", "0.5", "--pretrain-images", "-3"], "--pretrain-images must be"),
    (["--setting", "mask-ratio", "--values", "0.5", "--probe-base-lr", "-1"], "--probe-base-lr must be positive"),
    (["--setting", "mask-ratio", "--values", "0.5", "--seeds", "1", "1"], "--seeds repeats"),
    (["--setting", "seed", "--values", "1", "2", "--seeds", "0", "1"], "--setting seed already runs one seed"),
    (["--setting", "seed", "--values", "1", "two"], "takes whole numbers as --values, got two"),
    # a value `maelab pretrain` would refuse fails before the values before it spend their budgets
    (["--setting", "mask-rate", "--values", "0.5"], "`maelab pretrain --mask-rate 0.5` would refuse it: unrecognized"),
    (["--setting", "mask-ratio", "--values", "0.5", "1.5"], "--values 1.5: `maelab pretrain --mask-ratio 1.5`"),
    (["--setting", "mask-type", "--values", "random", "hex"], "invalid choice: 'hex'"),
    (["--setting", "decoder-depth", "--values", "2", "two"], "cannot read 'two' as int"),
    (["--setting", "decoder-embed-dim", "--values", "128", "130"], "130 is not divisible by decoder_num_heads=4"),
    (["--setting", "mask-ratio", "--values", "0.5", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--setting", "mask-ratio", "--values", "0.5", "--finetune-budget", "0s"], "--finetune-budget must be longer"),
    # flags that say where and on what a run works: a sweep over them would write outside --out or
    # evaluate on other data than it pre-trained on
    (["--setting", "out", "--values", "a", "b"], "--setting out is not a setting to sweep: every value's run"),
    (["--setting", "data", "--values", "x", "y"], "--setting data is not a setting to sweep: every evaluation"),
    (["--setting", "limit_images", "--values", "5", "6"], "not a setting to sweep: ablate's --pretrain-images"),
    # the budget sets every run's length: the rows were alike and labelled as different lengths
    (["--setting", "epochs", "--values", "1", "2"], "--setting epochs under --budget 5m: the budget sets every run's"),
    (["--setting", "max-steps", "--values", "5", "9", "--budget", "2m"], "every value would train alike"),
    (["--setting", "mask-ratio", "--values", "0.5", "--budget", "none", "--pretrain-epochs", "0"],
     "--pretrain-epochs must be at least 1 (leave it out for the preset's), got 0"),  # 0 ran the preset's 200
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, err = maelab_refusal(capsys, "ablate", *args, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "sweep"))
    assert code == 2 and message in err and not (tmp_path / "sweep").exists(), err


def test_the_results_page_is_rendered_again_from_its_archive_when_the_runs_are_gone(tmp_path):
    sweep = write_sweep(tmp_path / "runs" / "mask", "mask-ratio", {"0.5": 29.0, "0.75": 31.0})
    page = tmp_path / "docs" / "results.md"
    results_page("--recipe", str(tmp_path / "runs" / "recipe_full"), "--ablation", str(sweep),
                 "--quality", "--out", str(page), check=True)
    first = page.read_text()
    assert "| `mask-ratio` | 4m | test | 0.75 | 31.00 |" in first and "## `recipe_full`" in first
    index = json.loads((tmp_path / "docs" / "results" / "runs" / "index.json").read_text())
    assert index["ablation"] == ["mask"] and index["recipe"] == ["recipe_full"]
    import shutil
    shutil.rmtree(tmp_path / "runs")  # the machine that trained them is gone
    page.unlink()
    again = results_page("--out", str(page))
    assert again.returncode == 0, again.stderr
    assert page.read_text() == first  # same page, same command in its header
    (tmp_path / "docs" / "results" / "earlier").mkdir()
    (tmp_path / "docs" / "results" / "earlier" / "old.md").write_text(
        "# Old runs on another machine\n\n## `recipe_full`\n\nNot run yet (needs a GPU).\n\n"
        "## Quality per CPU-minute: maelab against HF ViTMAE + torchvision\n\nCommand: `python benchmarks/...`\n")
    results_page("--out", str(page), check=True)
    text = page.read_text()
    assert "- [Old runs on another machine](results/earlier/old.md)" in text
    quality, full = text.split("## Quality per CPU-minute")[1], text.split("## `recipe_full`")[1].split("##")[0]
    assert "Measured earlier, on another machine: [old](results/earlier/old.md)." in quality  # there, measured
    assert "Measured earlier" not in full  # there too, but never run
    twice = results_page("--recipe", "--ablation", str(tmp_path / "a" / "mask"),
                         str(tmp_path / "b" / "mask"), "--out", str(page))
    assert twice.returncode != 0 and "mask is named twice" in twice.stderr


def test_the_archive_survives_a_damaged_input_and_a_partial_command_says_what_it_drops(tmp_path):
    """A damaged results.json given again used to replace its good archived copy before it was read, and the
    page, its pictures and the index went with it; naming one folder dropped the others without a word."""
    page = tmp_path / "docs" / "results.md"
    a = write_sweep(tmp_path / "runs" / "a", "mask-ratio", {"0.5": 29.0, "0.75": 31.0})
    b = write_sweep(tmp_path / "runs" / "b", "mask-ratio", {"0.5": 30.0, "0.75": 32.0})
    results_page("--recipe", "--ablation", str(a), str(b), "--quality", "--out", str(page), check=True)
    archive = tmp_path / "docs" / "results" / "runs"
    before = {p: p.read_bytes() for p in sorted(archive.rglob("*")) if p.is_file()}
    first = page.read_text()
    (b / "results.json").write_text('{"setting": ')  # cut while it was written
    out = results_page("--recipe", "--ablation", str(a), str(b), "--quality", "--out", str(page))
    assert out.returncode != 0 and f"cannot read {b / 'results.json'}" in out.stderr, out.stderr
    assert {p: p.read_bytes() for p in sorted(archive.rglob("*")) if p.is_file()} == before
    assert page.read_text() == first
    partial = results_page("--recipe", "--ablation", str(a), "--quality", "--out", str(page), check=True)
    assert "the page drops 1 archived folder(s) not named here: b" in partial.stderr
    assert (archive / "b" / "results.json").is_file()  # still there to be named again
    missing = results_page("--recipe", "--ablation", str(tmp_path / "runs" / "typo"), "--out", str(page))
    assert missing.returncode != 0 and "no such run folder" in missing.stderr
    (tmp_path / "runs" / "recipe_x").mkdir()  # a recipe's results given as a sweep: valid JSON, another kind
    (tmp_path / "runs" / "recipe_x" / "results.json").write_text('{"rows": []}')
    wrong = results_page("--recipe", "--ablation", str(a), str(tmp_path / "runs" / "recipe_x"), "--quality",
                         "--out", str(page))
    assert wrong.returncode != 0 and "a results.json lacks 'setting'" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not (archive / "recipe_x").exists()
    (tmp_path / "runs" / "stopped").mkdir()  # a sweep stopped before its results.json
    results_page("--recipe", "--ablation", str(a), str(tmp_path / "runs" / "stopped"), "--quality", "--out",
                 str(page), check=True)
    assert "Not finished:" in page.read_text()


def test_several_seeds_give_a_mean_and_a_spread_per_value():
    from maelab.commands.ablate import combine, table
    runs = [{"value": "0.75", "seed": s, "pretrain_s": 60.0 * (s + 1), "pretrain_steps": 100 + s, "knn_top1": k,
             "linprobe_top1": 20.0} for s, k in ((0, 30.0), (1, 32.0), (2, 34.0))]
    row = combine(runs)
    assert row["seeds"] == [0, 1, 2] and row["knn_top1"] == 32.0 and row["knn_top1_runs"] == [30.0, 32.0, 34.0]
    assert row["knn_top1_std"] == pytest.approx(2.0) and row["linprobe_top1_std"] == 0.0
    assert row["pretrain_s"] == 120.0 and row["pretrain_steps"] == 101
    assert combine(runs[:1]) is runs[0]  # one seed: the run itself
    text = table("mask-ratio", [row])
    assert "over 3 seeds" in text and "| 0.75 | 32.00 ± 2.00 | 20.00 ± 0.00 | 2.0 min | 101 |" in text


def test_a_folder_that_holds_another_seeds_run_is_refused(tmp_path):
    from maelab.commands.ablate import AblateConfig, run_value
    from maelab.errors import MaelabError
    folder = tmp_path / "mask-ratio=0.75"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"value": "0.75", "seed": 3, "pretrain_s": 1.0, "knn_top1": 9.0}))
    cfg = AblateConfig()
    cfg.sweep.evaluate = ["knn"]
    assert run_value(cfg, "0.75", folder, 3)["knn_top1"] == 9.0  # finished: read back, nothing runs
    with pytest.raises(MaelabError, match="holds the run with seed 3, not seed 0"):
        run_value(cfg, "0.75", folder, 0)


def test_a_seed_sweep_runs_and_records_each_value_as_the_seed_of_its_whole_chain(tmp_path, monkeypatch, cifar_tiny):
    from maelab.commands import ablate as module
    calls = []

    def fake_run_value(cfg, value, folder, seed):
        calls.append((value, folder.name, seed))
        (folder / "pretrain").mkdir(parents=True)
        (folder / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 1.0}\n')
        return {"value": value, "seed": seed, "pretrain_s": 60.0, "pretrain_steps": 10, "knn_top1": 30.0 + seed}

    monkeypatch.setattr(module, "run_value", fake_run_value)
    cfg = module.AblateConfig()
    cfg.sweep.setting, cfg.sweep.values, cfg.sweep.evaluate = "seed", ["1", "2"], ["knn"]
    cfg.data.data, cfg.data.val_data, cfg.run.out, cfg.run.seed = str(cifar_tiny), str(cifar_tiny), str(tmp_path / "sweep"), 0
    cfg.data.batch_size = 16
    module.run(cfg)
    assert calls == [("1", "seed=1", 1), ("2", "seed=2", 2)]  # not the sweep's --seed 0, and no seed=S/ nesting
    summary = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert summary["seeds"] == [1, 2] and [r["seed"] for r in summary["rows"]] == [1, 2]
    assert module.setting_flags("mask-ratio", "0.5") == ["--mask-ratio", "0.5"]


def test_an_on_off_setting_takes_1_and_0_and_names_them_true_and_false(cifar_tiny, tmp_path):
    import maelab.commands.ablate as module
    cfg = module.AblateConfig()
    cfg.sweep.setting, cfg.sweep.values = "norm-pix-loss", ["1", "0"]
    cfg.data.data, cfg.data.val_data, cfg.run.out, cfg.data.batch_size = str(cifar_tiny), str(cifar_tiny), str(tmp_path), 16
    module.validate(cfg)
    assert cfg.sweep.values == ["true", "false"]  # one folder and one table row per state, however it was typed
    assert module.setting_flags("norm_pix_loss", "0") == ["--no-norm-pix-loss"]
    assert module.setting_flags("norm-pix-loss", "On") == ["--norm-pix-loss"]
    assert module.setting_flags("decoder-depth", "1") == ["--decoder-depth", "1"]  # a number stays a number
    cfg.sweep.values = ["yes", "1"]
    with pytest.raises(MaelabError, match="repeats a value"):
        module.validate(cfg)
    cfg.sweep.values = ["maybe"]
    with pytest.raises(MaelabError, match="--values maybe"):
        module.validate(cfg)
    (tmp_path / "norm-pix-loss=on").mkdir()  # a sweep run before: its folder keeps its spelling, not run again
    cfg.sweep.values = ["on", "off"]
    module.validate(cfg)
    assert cfg.sweep.values == ["on", "false"]


def write_sweep(folder: Path, setting: str, scores: dict[str, float], minutes: float = 4.0, budget: str = "4m",
                machine: str = "test, 2 threads, native bf16") -> Path:
    rows = [{"value": v, "pretrain_s": minutes * 60, "pretrain_steps": 400, "knn_top1": k} for v, k in scores.items()]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "setting": setting, "budget": budget, "data": "cifar10/train", "rows": rows, "preset": "pretrain_cifar10_tiny",
        "seed": 0, "precision": "fast", "machine": machine, "evaluated_images": 5000, "pretrain_images": 0,
        "command": f"maelab ablate --setting {setting}"}))
    (folder / "results.md").write_text(f"| {setting} |\n")
    return folder


def test_the_results_page_measures_the_spread_and_calls_a_difference_only_beyond_it(tmp_path):
    sweeps = [write_sweep(tmp_path / "mask", "mask-ratio", {"0.5": 29.0, "0.75": 31.0}),
              write_sweep(tmp_path / "depth", "decoder-depth", {"1": 35.0, "4": 31.5, "8": 30.0}),  # preset: 4
              write_sweep(tmp_path / "norm", "norm-pix-loss", {"true": 31.2, "false": 31.9}, minutes=9.0),
              write_sweep(tmp_path / "seed", "seed", {"1": 30.5}),
              write_sweep(tmp_path / "crop", "crop", {"none": 34.0, "random-size": 32.5}, minutes=8.0, budget="8m"),
              # the same budget on another machine buys other step counts: its preset run is no repeat of the others,
              # nor is a run on the same CPU model without native bf16 (fp32) or with a GPU
              write_sweep(tmp_path / "mask_b", "mask-ratio", {"0.5": 20.0, "0.75": 40.0}, machine="Other CPU, 2 threads"),
              write_sweep(tmp_path / "mask_g", "mask-ratio", {"0.5": 20.0, "0.75": 41.0},
                          machine="test, 2 threads, native bf16, NVIDIA H100")]
    page = tmp_path / "page.md"
    ablation_page(tmp_path, page, *sweeps)
    text = page.read_text()
    # at a budget with no repeats of its own, a gap is reported but never called a difference
    assert ("| `crop` | 8m | test | random-size | 32.50 | none | 34.00 | none beats random-size by 1.50, but the "
            "run-to-run spread at this budget on this machine is not measured; at 4m it is 1.00 points |") in text
    assert ("random-size trails none by 1.50 kNN points; the run-to-run spread at this budget on this machine is not "
            "measured; at 4m it is 1.00 points.") in " ".join(text.split())
    assert ("| `mask-ratio` | 4m | Other CPU (no native bf16) | 0.75 | 40.00 | 0.75 | 40.00 | same winner, by 20.00 (the "
            "run-to-run spread at this budget on this machine is not measured; at 4m on test it is 1.00 points) |") in text
    assert "| `mask-ratio` | 4m | test + NVIDIA H100 | 0.75 | 41.00 | 0.75 | 41.00 | same winner, by 21.00 (the" in text
    # the preset's own configuration: mask 0.75, depth 4, norm-pix true, seed 1 -> 31.0, 31.5, 31.2, 30.5
    assert "pre-trained 4 times at the 4m budget in precision fast on test (" in text and "spread 1.00 points" in text
    assert "## Run-to-run spread: 4m on test" in text
    assert "| `mask-ratio` | 4m | test | 0.75 | 31.00 | 0.75 | 31.00 | same winner |" in text
    assert "| `decoder-depth` | 4m | test | 8 | 30.00 | 1 | 35.00 | **differs**: 1 beats 8 by 5.00 (> the 1.00-point spread); the budget bought 400 against 400 steps |" in text
    assert "| `norm-pix-loss` | 4m | test | true | 31.20 | false | 31.90 | within the 1.00-point spread" in text
    assert "Over the budget: true (9.0 min), false (9.0 min)" in text
    # each sweep's own sentence weighs the paper's value against the same spread
    assert "does not win here at this scale: 8 trails 1 by 5.00 kNN points, more than the 1.00-point" in text
    assert ("does not win here at this scale: true trails false by 0.70 kNN points, within the 1.00-point "
            "run-to-run spread: no real difference.") in text
    (tmp_path / "depth" / "results.json").write_text((tmp_path / "depth" / "results.json").read_text()
                                                      .replace("35.0", "29.0").replace("30.0", "31.9"))
    ablation_page(tmp_path, page, *sweeps)
    assert "| `decoder-depth` | 4m | test | 8 | 31.90 | 8 | 31.90 | same winner, but by 0.40: within the 1.00-point spread |" in page.read_text()


def test_the_results_page_pools_every_seed_of_the_presets_value(tmp_path):
    sweep = write_sweep(tmp_path / "mask", "mask-ratio", {"0.5": 29.0, "0.75": 31.0})
    summary = json.loads((sweep / "results.json").read_text())
    summary["seeds"] = [0, 1, 2]
    summary["rows"][1].update(seeds=[0, 1, 2], knn_top1_runs=[30.0, 31.0, 32.0], knn_top1_std=1.0)
    (sweep / "results.json").write_text(json.dumps(summary))
    page = tmp_path / "page.md"
    ablation_page(tmp_path, page, sweep)
    text = page.read_text()
    assert "pre-trained 3 times at the 4m budget" in text and "mask-ratio=0.75 seed 2: 32.00" in text
    assert "spread 2.00 points" in text and "(seeds 0, 1, 2, precision fast)" in text


def test_a_seed_sweep_reports_its_scatter_not_a_best_seed(tmp_path):
    sweep = write_sweep(tmp_path / "seed", "seed", {"1": 30.5, "2": 33.5, "3": 32.0})
    page = tmp_path / "page.md"
    ablation_page(tmp_path, page, sweep)
    text = " ".join(page.read_text().split())
    assert "best kNN at" not in text  # no seed is the "best" one
    assert "Across these 3 seeds (mean ± standard deviation, range): kNN 32.00 ± 1.50 (30.50-33.50)." in text
    assert "pre-trained 3 times at the 4m budget" in text and "spread 3.00 points" in text


def test_a_new_probe_setting_re_runs_only_the_probe_and_keeps_the_pretraining_time(tmp_path, monkeypatch):
    import maelab.commands.ablate as ablate_cmd
    import maelab.commands.steps as steps
    folder = tmp_path / "mask-ratio=0.75"
    folder.mkdir()
    old = {"value": "0.75", "pretrain_s": 900.0, "pretrain_steps": 2000, "knn_top1": 30.0, "linprobe_top1": 20.0}
    (folder / "result.json").write_text(json.dumps(old))  # written by a sweep with the old 20-epoch probe
    (folder / "knn.json").write_text(json.dumps({"knn_top1": 30.0}))
    calls = []

    def fake(args, log):  # a `maelab` process: record it, leave the result file it would leave
        calls.append(args)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"val_top1": 42.0}))
        return 1.0

    monkeypatch.setattr(steps, "maelab", fake)
    cfg = ablate_cmd.AblateConfig()
    cfg.data.data = "images"
    result = ablate_cmd.run_value(cfg, "0.75", folder, 0)
    assert [c[0] for c in calls] == ["linprobe"]  # no pre-training, no kNN: both finished
    assert calls[0][calls[0].index("--epochs") + 1] == "90" and calls[0][calls[0].index("--base-lr") + 1] == "4"
    assert result["linprobe_top1"] == 42.0 and result["pretrain_s"] == 900.0 and result["knn_top1"] == 30.0
    assert result["probe"] == "90 epochs, base lr 4" and (folder / "linprobe_90ep_lr4" / "results.json").is_file()
    assert json.loads((folder / "pretrain.json").read_text()) == {"pretrain_s": 900.0, "pretrain_steps": 2000}
    assert ablate_cmd.run_value(cfg, "0.75", folder, 0) == result and len(calls) == 1  # now finished
    (folder / "result.json").unlink()  # cut after pre-training, before the evaluations were recorded
    ablate_cmd.run_value(cfg, "0.75", folder, 0)
    assert len(calls) == 1  # the pre-training is not run (nor timed) again; kNN and probe are read back


def test_a_damaged_run_record_stops_the_page_with_one_line(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text('{"setting": ')  # cut while it was written
    out = results_page("--recipe", "--ablation", str(tmp_path / "sweep"), "--out", str(tmp_path / "docs" / "results.md"))
    assert out.returncode != 0 and "cannot read" in out.stderr and "results.json" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_subset_seed_scores_runs_of_every_seed_on_the_same_images(tmp_path):
    from maelab.commands.knn import KnnConfig
    from maelab.commands.pretrain import PretrainConfig
    from maelab.config import build_config
    from maelab.data.folders import prepare_images
    from maelab.data.splits import load_splits, subset_seed
    data = make_subset(tmp_path / "c10" / "train", 6, classes=3)
    make_subset(tmp_path / "c10" / "test", 6, classes=3, split="test")

    def drawn(seed: int, fixed: int | None) -> tuple[list[str], list[str]]:
        cfg = build_config(KnnConfig, {"data": str(data), "limit_images": 5, "seed": seed, "subset_seed": fixed})
        return tuple(list(split.paths) for split in load_splits(cfg.data, cfg.run.seed))

    assert drawn(1, None) != drawn(0, None)  # by default each seed draws its own subsets ...
    assert drawn(1, 0) == drawn(0, None) == drawn(0, 0) == drawn(2, 0)  # ... --subset-seed 0 fixes them
    assert len(drawn(1, 0)[0]) == len(drawn(1, 0)[1]) == 5
    pre = build_config(PretrainConfig, {"data": str(data), "limit_images": 5, "seed": 3, "subset_seed": 0})
    assert subset_seed(pre.data, pre.run.seed) == 0  # pre-training's subset follows it too
    assert (prepare_images(str(data), "error", 5, subset_seed(pre.data, pre.run.seed)).paths
            == prepare_images(str(data), "error", 5, 0).paths)


def test_a_sweep_with_a_subset_seed_passes_it_to_every_step_and_refuses_other_subsets(tmp_path, monkeypatch):
    import maelab.commands.ablate as ablate_cmd
    import maelab.commands.steps as steps
    calls = []

    def fake(args, log):  # a `maelab` process: record it, leave the result file it would leave
        calls.append(args)
        out = Path(args[args.index("--out") + 1])
        if args[0] == "pretrain":
            out.mkdir(parents=True)
            (out / "config.yaml").write_text("optim:\n  max_steps: 7\n")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"knn_top1": 30.0} if args[0] == "knn" else {"val_top1": 40.0}
            (out if out.suffix == ".json" else out.mkdir(parents=True) or out / "results.json").write_text(json.dumps(payload))
        return 1.0

    monkeypatch.setattr(steps, "maelab", fake)
    cfg = ablate_cmd.AblateConfig()
    cfg.data.data, cfg.data.subset_seed, cfg.sweep.evaluate = "images", 0, ["knn"]
    result = ablate_cmd.run_value(cfg, "1", tmp_path / "seed=1", 1)
    assert [c[0] for c in calls] == ["pretrain", "knn"]
    assert all(c[c.index("--subset-seed") + 1] == "0" and c[c.index("--seed") + 1] == "1" for c in calls)
    assert result["subset_seed"] == 0 and result["seed"] == 1 and result["knn_top1"] == 30.0
    calls.clear()
    ablate_cmd.run_value(cfg, "0", tmp_path / "seed=0", 0)  # the subsets of its own seed: nothing to pass
    assert calls and all("--subset-seed" not in c for c in calls)
    old = tmp_path / "old"  # a run recorded before --subset-seed: its subsets were drawn with its seed, 1
    old.mkdir()
    (old / "result.json").write_text(json.dumps({"value": "1", "seed": 1, "pretrain_s": 1.0, "knn_top1": 9.0}))
    with pytest.raises(ablate_cmd.MaelabError, match="evaluated on the subsets of seed 1, not 0: use another --out, "
                                                     "or --subset-seed 1"):
        ablate_cmd.run_value(cfg, "1", old, 1)
    cfg.data.subset_seed = None
    assert ablate_cmd.run_value(cfg, "1", old, 1)["knn_top1"] == 9.0  # its own subsets: read back
    # a value timed before steps were read from the log (sized by epochs: no max_steps) gets them on the next run
    timed = tmp_path / "seed=1"
    (timed / "pretrain.json").write_text(json.dumps({"pretrain_s": 1.0, "pretrain_steps": None}))
    (timed / "pretrain" / "config.yaml").write_text("optim:\n  epochs: 1\n")
    (timed / "pretrain" / "metrics.jsonl").write_text('{"step": 6, "epoch": 1, "epoch_loss": 1.0}\n')
    cfg.data.subset_seed = 0
    assert ablate_cmd.run_value(cfg, "1", timed, 1)["pretrain_steps"] == 6


def test_the_results_page_says_which_runs_were_scored_on_other_subsets(tmp_path):
    sweeps = [write_sweep(tmp_path / "mask", "mask-ratio", {"0.5": 29.0, "0.75": 31.0}),
              write_sweep(tmp_path / "norm", "norm-pix-loss", {"true": 31.2, "false": 30.0}),
              write_sweep(tmp_path / "seed", "seed", {"1": 30.5})]
    page = tmp_path / "page.md"

    def render() -> str:
        ablation_page(tmp_path, page, *sweeps)
        return " ".join(page.read_text().split())

    assert "seed=1 was scored on other evaluation subsets than the rest" in render()
    summary = json.loads((sweeps[2] / "results.json").read_text())
    (sweeps[2] / "results.json").write_text(json.dumps({**summary, "subset_seed": 0}))
    text = render()
    assert "All were scored on the same evaluation subsets (drawn with seed 0)" in text
    assert "(subsets drawn with seed 0 for every run)" in text


def test_the_equal_time_lead_names_the_snapshots_it_cannot_compare():
    """A slow machine's first maelab snapshot can come after the alternative's first: that one is left out,
    and the page says so instead of claiming a lead against each snapshot."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("results_page", REPO / "scripts" / "results_page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    ours = [{"minutes": 7.3, "token": 29.0, "avg": 29.0}, {"minutes": 14.5, "token": 34.0, "avg": 33.0}]
    theirs = [{"minutes": m, "token": 25.0, "avg": 24.0} for m in (6.0, 12.0, 18.0)]
    text = page.equal_minutes(ours, theirs, ["maelab", "HF"])
    assert text == ("At equal or less time: against each HF snapshot from 12.0 min on, the latest maelab snapshot "
                    "taken no later leads by at least +4.00 points (cls and mean-pool); maelab has no snapshot as "
                    "early as its 6.0-min one, so that is not compared.\n")
    assert page.equal_minutes([{"minutes": 3.0, "token": 29.0, "avg": 29.0}], theirs, ["maelab", "HF"]) == (
        "At equal or less time: against each HF snapshot, the latest maelab snapshot taken no later leads by at "
        "least +4.00 points (cls and mean-pool).\n")


def test_a_step_recorded_without_its_split_is_held_to_the_folder_it_scored_on(tmp_path):
    """ablate passed --val-data only when given: after a `valid` folder appeared beside `test`, a re-run read
    back the finished values' kNN (scored on test) beside new values scored on valid, in one table."""
    from maelab.commands.steps import changed_flags, with_implied_split

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    recorded = ["knn", "--data", str(tmp_path / "train"), "--out", "{out}/knn.json"]
    on_test = [*recorded[:3], "--val-data", str(tmp_path / "test"), *recorded[3:]]
    assert changed_flags(with_implied_split(recorded, on_test), on_test) == ""  # the same split: read back
    (tmp_path / "valid").mkdir()
    on_valid = [*recorded[:3], "--val-data", str(tmp_path / "valid"), *recorded[3:]]
    assert "--val-data (not given) -> " in changed_flags(with_implied_split(recorded, on_valid), on_valid)
    assert with_implied_split(None, on_valid) is None
