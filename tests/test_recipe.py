"""`maelab recipe` on a tiny subset: the whole chain (pre-train -> kNN vs random -> probe -> fine-tune vs
scratch -> pictures, curves), a table with both signals, a second run that skips what is done, and bad
recipes refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ctrl_c_when_ready, maelab_here, maelab_refusal, make_subset, results_page, saving_child

REPO = Path(__file__).resolve().parents[1]


def recipe(*args: str, cwd: Path):
    return maelab_here("recipe", *args, cwd=cwd)


def test_the_quick_chain_on_a_tiny_subset(tmp_path):
    data = make_subset(tmp_path / "c10" / "train", 8, classes=4)
    make_subset(tmp_path / "c10" / "test", 4, classes=4, split="test")
    args = ["--config", "recipe_quick", "--data", str(data), "--batch-size", "8", "--limit-images", "0", "--img-size", "16",
            "--pretrain-budget", "none", "--pretrain-epochs", "1", "--finetune-budget", "none",
            "--finetune-epochs", "1", "--probe-epochs", "2", "--device", "cpu", "--out", str(tmp_path / "r")]
    out = recipe(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    for key in ("knn_mae_top1", "knn_random_top1", "linprobe_top1", "finetune_mae_top1", "finetune_scratch_top1"):
        assert 0 <= res[key] <= 100, key
    assert set(res["signals"]) == {"knn_mae_beats_random", "finetune_mae_beats_scratch"}
    assert set(res["minutes"]) == {"pretrain", "knn_mae", "knn_random", "linprobe", "finetune_mae", "finetune_scratch"}
    scratch = (tmp_path / "r" / "finetune_scratch" / "config.yaml").read_text()
    assert "init: none" in scratch and "mae_vit_tiny_patch4" in scratch
    assert (tmp_path / "r" / "reconstruction.png").stat().st_size > 1000
    assert set(res["curves"]) == {"pretrain", "linprobe", "finetune_mae", "finetune_scratch"}
    table = (tmp_path / "r" / "results.md").read_text()
    assert "| fine-tune from scratch (same budget) |" in table and "MAE kNN beats random init:" in table
    again = recipe(*args, cwd=tmp_path)  # everything finished: nothing runs again
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["minutes"] == res["minutes"]
    assert "pre-training" in again.stderr
    assert res["probe"] == {"epochs": 2, "base_lr": 4.0} and res["evaluated_images"] == {"train": 32, "val": 16}
    # 1 epoch of 32 images at batch 8, read from the logs (no budget planned them)
    assert res["pretrain_steps"] == 4 and res["finetune_steps"] == {"mae": 4, "scratch": 4}
    assert res["command"] == "maelab recipe " + " ".join(args)  # quoted by the results page
    assert res["code"].startswith("maelab ")  # + the commit when it runs from a checkout
    changed = recipe(*args, "--probe-base-lr", "2", cwd=tmp_path)  # another probe in the same folder: refused
    assert changed.returncode == 2 and "linprobe was run with other settings (--base-lr 4 -> 2)" in changed.stderr
    page = tmp_path / "results.md"  # the results page is generated from these outputs, never typed
    results_page("--recipe", str(tmp_path / "r"), str(tmp_path / "recipe_full"), "--out", str(page), check=True)
    text = page.read_text()
    assert f"| fine-tune from scratch (same budget) | {res['finetune_scratch_top1']:.2f} |" in text
    assert "## `recipe_full`" in text and "Not run yet" in text
    assert f"Command: `maelab recipe --config recipe_quick --data {data} --batch-size 8 " in text
    assert ("What ran: 4 pre-training steps; fine-tune 4 steps from the MAE encoder, 4 from scratch; evaluations on 32 "
            "train / 16 validation images; linear probe 2 epochs at LARS base lr 4.0") in text
    assert f"Code: {res['code']}." in text
    assert "![reconstructions](results/runs/r/reconstruction.png)" in text  # archived next to the page, shown from a clone
    kept = tmp_path / "results" / "runs" / "r"
    assert (kept / "reconstruction.png").read_bytes() == (tmp_path / "r" / "reconstruction.png").read_bytes()
    assert "results/runs/r/curves/pretrain.png" in text and (kept / "curves" / "pretrain.png").is_file()
    assert f"]({tmp_path}" not in text  # pictures linked relative to the page


def test_the_table_and_the_page_say_how_many_steps_the_budgets_bought(tmp_path):
    """On a slow machine a 5-minute fine-tune is a handful of steps, and its MAE-vs-scratch verdict is noise:
    the step counts, read back from the runs' configs, stand beside the verdict."""
    from maelab.commands.recipe import table
    res = {"recipe": "runs/slow", "data": "c10/train", "val_data": "c10/test", "seed": 0, "machine": "CPU, 2 threads",
           "precision": "fast", "budgets": {"pretrain": "15m", "finetune": "5m"}, "knn_mae_top1": 32.8,
           "knn_random_top1": 29.33, "linprobe_top1": 42.17, "finetune_mae_top1": 15.84, "finetune_scratch_top1": 17.11,
           "minutes": {"pretrain": 14.2, "finetune_mae": 4.6, "finetune_scratch": 4.5}, "pretrain_steps": 367,
           "finetune_steps": {"mae": 5, "scratch": 6}, "probe": {"epochs": 90, "base_lr": 4.0},
           "evaluated_images": {"train": 10000, "val": 10000}, "command": "maelab recipe --out runs/slow",
           "signals": {"knn_mae_beats_random": True, "finetune_mae_beats_scratch": False}}
    text = table(res)
    assert "MAE fine-tune beats from scratch: NO." in text
    assert "Steps the budgets bought: pre-training 367; fine-tune 5 from the MAE encoder, 6 from scratch." in text
    assert "Steps the budgets bought" not in table(res | {"pretrain_steps": None, "finetune_steps": {}})  # epochs
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(res))
    page = tmp_path / "page.md"
    results_page("--recipe", str(folder), "--quality", "--out", str(page), check=True)
    assert ("What ran: 367 pre-training steps; fine-tune 5 steps from the MAE encoder, 6 from scratch; evaluations "
            "on 10000 train / 10000 validation images") in page.read_text()


def recipe_result(folder: Path, seed: int, knn: float, ft: float, **changes) -> Path:
    """A finished recipe folder (results.json only) with kNN / fine-tune scores against fixed baselines."""
    res = {"recipe": f"runs/{folder.name}", "data": "c10/train", "val_data": "c10/test", "seed": seed,
           "machine": "CPU, 2 threads", "precision": "fast", "budgets": {"pretrain": "15m", "finetune": "5m"},
           "knn_mae_top1": knn, "knn_random_top1": 29.0, "linprobe_top1": 43.0, "finetune_mae_top1": ft,
           "finetune_scratch_top1": 19.0, "minutes": {"pretrain": 14.2}, "pretrain_steps": 400 + seed,
           "command": f"maelab recipe --config recipe_quick --seed {seed} --out runs/{folder.name}",
           "signals": {"knn_mae_beats_random": knn > 29.0, "finetune_mae_beats_scratch": ft > 19.0}, **changes}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def test_repeated_recipe_runs_get_their_mean_spread_and_how_often_each_signal_held(tmp_path):
    """One run cannot say whether its signal is robust: runs of one configuration (other seeds) are summed up
    as mean ± standard deviation with the count of runs each signal held in; the page says it again when
    re-rendered from its archive, and runs from other machines or budgets are refused as repeats."""
    runs = [recipe_result(tmp_path / f"s{seed}", seed, knn, ft)
            for seed, knn, ft in ((0, 34.0, 25.0), (1, 33.0, 18.0), (2, 35.0, 23.0))]
    page = tmp_path / "page.md"
    results_page("--recipe", *map(str, runs), "--recipe-repeats", *map(str, runs), "--quality", "--out", str(page),
                 check=True)
    text = page.read_text()
    assert "## Repeats of `recipe_quick`: CPU" in text
    assert "| `s1` | 1 | 401 | 33.00 | 29.00 | 43.00 | 18.00 | 19.00 |" in text
    assert "| mean ± sd | | 401 | 34.00 ± 1.00 | 29.00 ± 0.00 | 43.00 ± 0.00 | 22.00 ± 3.61 | 19.00 ± 0.00 |" in text
    assert ("MAE kNN beats random init in **3 of 3** runs (lead 5.00 ± 1.00 points, smallest +4.00); MAE fine-tune "
            "beats from scratch at equal fine-tune time in **2 of 3** runs (lead 3.00 ± 3.61 points, smallest "
            "-1.00).") in text
    results_page("--out", str(page), check=True)  # from the archive alone
    assert page.read_text() == text
    other = recipe_result(tmp_path / "other", 3, 34.0, 25.0, machine="GPU box")
    done = results_page("--recipe", str(runs[0]), str(other), "--recipe-repeats", str(runs[0]), str(other),
                        "--quality", "--out", str(page))
    assert done.returncode != 0 and "other has machine 'GPU box'" in done.stderr


def test_the_code_version_names_the_commit_of_a_checkout_and_only_of_its_own(tmp_path, monkeypatch):
    from maelab import __version__
    from maelab.commands import steps

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path / "repo"), *args],
                       check=True, capture_output=True)

    package = tmp_path / "repo" / "maelab"
    package.mkdir(parents=True)
    (package / "core.py").write_text("x = 1\n")
    monkeypatch.setattr(steps, "PACKAGE_ROOT", tmp_path / "repo")
    assert steps.code_version() == f"maelab {__version__}"  # not a checkout
    git("init", "-q")
    git("add", "maelab")
    git("commit", "-qm", "first")
    sha = subprocess.run(["git", "-C", str(tmp_path / "repo"), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert steps.code_version() == f"maelab {__version__}, commit {sha}"
    (package / "scratch.py").write_text("")  # an untracked file changes none of the committed code
    assert steps.code_version() == f"maelab {__version__}, commit {sha}"
    (package / "core.py").write_text("x = 2\n")
    assert steps.code_version() == f"maelab {__version__}, commit {sha} + local changes"
    inside = tmp_path / "repo" / ".venv" / "site-packages"  # an installed copy inside some checkout
    inside.mkdir(parents=True)
    monkeypatch.setattr(steps, "PACKAGE_ROOT", inside)
    assert steps.code_version() == f"maelab {__version__}"


def test_a_chain_records_the_code_each_step_started_with(tmp_path, monkeypatch):
    """A chain runs for hours while its checkout may move on: its results name the code of each step,
    not only the code present at the end (a resumed step that ran two versions names both)."""
    from maelab.commands import steps
    from maelab.errors import MaelabError
    version = ["maelab 1, commit aaa"]
    monkeypatch.setattr(steps, "code_version", lambda: version[0])
    cut = []

    def fake_maelab(args, log):
        out = Path(args[args.index("--out") + 1])
        if args[0] == "finetune":
            out.mkdir(parents=True, exist_ok=True)
            if not cut:  # the first attempt is killed after it wrote its folder
                cut.append(1)
                raise MaelabError("`maelab finetune` failed (exit 1)")
            (out / "results.json").write_text(json.dumps({"val_top1": 40.0}))
        else:
            out.write_text(json.dumps({"knn_top1": 30.0}))
        return 1.0

    monkeypatch.setattr(steps, "maelab", fake_maelab)
    chain = steps.Chain(tmp_path / "c", ["--seed", "0"], [])
    assert chain.code() == "maelab 1, commit aaa"  # nothing ran yet: the code running now
    chain.knn("pre", "knn_a")
    with pytest.raises(MaelabError):
        chain.finetune("pre", ["--epochs", "2"], "ft")
    assert chain.code() == "maelab 1, commit aaa"
    version[0] = "maelab 1, commit bbb + local changes"
    chain = steps.Chain(tmp_path / "c", ["--seed", "0"], [])  # the same command again, on newer code
    chain.knn("pre", "knn_a")  # finished: read back, no new record
    chain.finetune("pre", ["--epochs", "2"], "ft")
    chain.knn("pre", "knn_b")
    assert chain.code() == "maelab 1, commit aaa (knn_a, ft); maelab 1, commit bbb + local changes (ft, knn_b)"
    assert json.loads((tmp_path / "c" / "code.json").read_text())["ft"] == ["maelab 1, commit aaa",
                                                                           "maelab 1, commit bbb + local changes"]
    record = json.loads((tmp_path / "c" / "steps.json").read_text())
    (tmp_path / "c" / "steps.json").write_text(json.dumps({"old": ["knn"], **record}))  # from before code.json
    assert steps.chains_code({"mask_ratio=0.5": tmp_path / "c"}) == (
        "maelab 1, commit aaa (mask_ratio=0.5/knn_a, mask_ratio=0.5/ft); maelab 1, commit bbb + local changes "
        "(mask_ratio=0.5/ft, mask_ratio=0.5/knn_b); not recorded (mask_ratio=0.5/old)")
    (tmp_path / "c" / "code.json").write_text("{")
    with pytest.raises(MaelabError, match="code.json is unreadable"):
        steps.Chain(tmp_path / "c", ["--seed", "0"], [])


@pytest.mark.parametrize("args,message", [
    ([], "--data is required"),
    (["--data", "MISSING"], "no such folder"),
    (["--data", "DATA", "--pretrain-budget", "soon"], "not a duration"),
    (["--data", "DATA", "--mask-ratios", "1.5"], "--mask-ratios"),
    (["--data", "DATA", "--probe-base-lr", "0"], "--probe-base-lr must be positive"),
    (["--data", "ALONE"], "--val-data is required"),
    # what a later step would refuse at its start is refused before the steps before it spend their budgets
    (["--data", "DATA", "--finetune-preset", "finetune_cifar_tyni"], "--finetune-preset finetune_cifar_tyni: config"),
    (["--data", "DATA", "--probe-preset", "nope"], "--probe-preset nope: config 'nope' not found (presets: "),
    (["--data", "DATA", "--pretrain-preset", "nope"], "--pretrain-preset nope: config 'nope' not found"),
    (["--data", "DATA", "--img-size", "30"], "--img-size 30: image size 30x30 is not divisible by the patch size 4"),
    (["--data", "DATA", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data", "DATA", "--limit-images", "-5"], "--limit-images must be 0 (all images) or a positive count"),
    (["--data", "DATA", "--val-data", "MISSING"], "--val-data MISSING_PATH: no such folder"),
    (["--data", "DATA", "--pretrain-budget", "abc"], "--pretrain-budget 'abc' is not a duration"),
    (["--data", "DATA", "--finetune-budget", "0s"], "--finetune-budget must be longer than zero"),
    # another command's preset would fail only when its step starts, after the steps before it
    (["--data", "DATA", "--probe-preset", "pretrain_cifar10_tiny"],
     "--probe-preset pretrain_cifar10_tiny: not a `maelab linprobe` preset (unknown config field"),
    (["--data", "DATA", "--finetune-preset", "linprobe_cifar_tiny"],
     "--finetune-preset linprobe_cifar_tiny: not a `maelab finetune` preset ("),
])
def test_bad_recipes_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    (tmp_path / "alone" / "a").mkdir(parents=True)
    subst = {"DATA": str(tmp_path / "d" / "train"), "MISSING": str(tmp_path / "nope"), "ALONE": str(tmp_path / "alone")}
    monkeypatch.chdir(tmp_path)
    code, err = maelab_refusal(capsys, "recipe", *[subst.get(a, a) for a in args], "--out", str(tmp_path / "r"))
    assert code == 2 and message.replace("MISSING_PATH", subst["MISSING"]) in err, err
    assert not (tmp_path / "r").exists()


def test_what_the_evaluations_cannot_read_is_refused_before_the_pre_training(tmp_path, monkeypatch, capsys):
    """A flat folder, or too few images for one batch, used to spend the whole pre-training budget and then
    fail in kNN; under torchrun every process ran the whole chain into one folder."""
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(flat / f"{i}.png")
    labelled = make_subset(tmp_path / "c10" / "train", 2, classes=2)
    make_subset(tmp_path / "c10" / "test", 2, classes=2, split="test")
    out = ["--out", str(tmp_path / "r")]
    code, err = maelab_refusal(capsys, "recipe", "--data", str(flat), "--val-data", str(flat), *out)
    assert code == 2 and "the --data " in err and "must be an ImageFolder tree (<class>/<image>)" in err, err
    code, err = maelab_refusal(capsys, "recipe", "--data", str(labelled), "--batch-size", "8", *out)
    assert code == 2 and "pre-training takes whole batches of --batch-size 8, but it would read 4 image(s)" in err
    code, err = maelab_refusal(capsys, "recipe", "--data", str(labelled), "--val-data", str(flat), *out)
    assert code == 2 and "the --val-data " in err and "must be an ImageFolder tree" in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = maelab_refusal(capsys, "recipe", "--data", str(labelled), "--batch-size", "2", *out)
    assert code == 2 and "runs each of its steps as a process of its own: start it without torchrun" in err
    assert not (tmp_path / "r").exists()


def test_a_failed_step_says_why_and_a_moved_folder_matches_only_its_own_paths(tmp_path, monkeypatch):
    from maelab.commands import steps
    from maelab.commands.recipe import StepClock
    from maelab.errors import MaelabError

    log = tmp_path / "log.txt"
    log.write_text("maelab: error: an earlier attempt's error\n")
    monkeypatch.setattr(steps, "run_child", lambda args, log: log.open("a").write(
        "epoch 1\nmaelab: error: the run folder r/knn is in use by another maelab process (pid 12)\n") and 2)
    with pytest.raises(MaelabError, match=r"`maelab knn` failed \(exit 2\): the run folder r/knn is in use by another "
                                          r"maelab process \(pid 12\); its output is in"):
        steps.maelab(["knn"], log)
    monkeypatch.chdir(tmp_path)
    chain = steps.Chain(Path("r1"), [], [])  # a short relative --out, inside other flags' values ("cifa-r1-0")
    assert [chain.portable(t) for t in ("pretrain_cifar10_tiny", "r1", "r1/pretrain", "r10/x")] == \
        ["pretrain_cifar10_tiny", "{out}", "{out}/pretrain", "r10/x"]
    clock = StepClock(tmp_path / "minutes.json", chain)
    clock.run("knn_mae", lambda: None)  # found finished (an orphan of a killed recipe finished it): time unknown
    chain.ran.add("knn_random")
    clock.run("knn_random", lambda: None)
    assert clock.minutes["knn_mae"] is None and clock.minutes["knn_random"] == 0.0


def test_a_steps_time_counts_its_interrupted_attempts(tmp_path, monkeypatch):
    """A pre-training interrupted twice and finished by a third attempt took the three attempts' time: the
    recipe's minutes and ablate's pre-training time used to show the last attempt's alone."""
    from maelab.commands import steps
    from maelab.commands.recipe import StepClock
    from maelab.errors import RunInterrupted

    clock_now = [0.0]
    monkeypatch.setattr(steps.time, "perf_counter", lambda: clock_now[0])
    attempts = iter([60.0, 90.0, 30.0])  # seconds each attempt runs; the first two are interrupted

    def child(args, log):
        clock_now[0] += next(attempts)
        if clock_now[0] <= 150:
            raise RunInterrupted("interrupted during `maelab pretrain`")
        return 30.0

    monkeypatch.setattr(steps, "maelab", child)
    (tmp_path / "pretrain").mkdir()  # the run folder the interrupted attempts wrote
    args = ["pretrain", "--out", str(tmp_path / "pretrain")]
    for _ in range(2):
        with pytest.raises(RunInterrupted):
            steps.Chain(tmp_path, [], []).run("pretrain", args, False)
    assert json.loads((tmp_path / "unfinished.json").read_text()) == {"pretrain": 150.0}
    chain = steps.Chain(tmp_path, [], [])  # the third run of the same command finishes it
    clock = StepClock(tmp_path / "minutes.json", chain)  # the recipe's clock: the 30 s it saw, and the 150 before
    assert clock.run("pretrain", lambda: chain.run("pretrain", args, False)) == 180.0
    assert json.loads((tmp_path / "unfinished.json").read_text()) == {}
    assert clock.minutes["pretrain"] == 3.0


def test_a_step_run_anew_does_not_inherit_the_time_of_the_attempts_before(tmp_path, monkeypatch):
    """Deleting a step's record (the way the chain's refusal says to run it again with other flags) starts
    its time from zero."""
    from maelab.commands import steps

    (tmp_path / "unfinished.json").write_text('{"pretrain": 500.0}')
    monkeypatch.setattr(steps, "maelab", lambda args, log: 7.0)
    chain = steps.Chain(tmp_path, [], [])
    assert chain.run("pretrain", ["pretrain", "--out", str(tmp_path / "p")], False) == 7.0
    assert json.loads((tmp_path / "unfinished.json").read_text()) == {}


def test_a_chain_step_runs_this_maelab_even_beside_another_maelab_folder(tmp_path, monkeypatch):
    """`python -m` puts the working directory first on the path: a user standing in a folder that holds
    another `maelab/` (an older checkout) must still get the code that launched the chain."""
    from maelab.commands.steps import maelab
    from maelab.errors import MaelabError
    impostor = tmp_path / "maelab"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "cli.py").write_text("raise SystemExit('the other maelab ran')\n")
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "log.txt"
    maelab(["recipe", "--help"], log)  # exits 0 only if this checkout's cli ran
    assert "--pretrain-budget" in log.read_text() and "the other maelab ran" not in log.read_text()
    with pytest.raises(MaelabError, match="failed"):
        maelab(["recipe", "--no-such-flag"], log)


def test_a_step_run_with_other_settings_is_refused_not_read_back(tmp_path, monkeypatch):
    """Changing a setting and running the chain again in the same folder must not report the old run's
    result as the new setting's: every step's flags are recorded and compared."""
    from maelab.commands import steps
    from maelab.errors import MaelabError
    ran = []

    def fake_maelab(args, log):
        ran.append(args)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"val_top1": 40.0}))
        return 1.0

    monkeypatch.setattr(steps, "maelab", fake_maelab)
    common = ["--device", "cpu", "--seed", "0"]
    assert steps.Chain(tmp_path, common, []).linprobe("pre", 90, base_lr=4.0)["val_top1"] == 40.0
    assert len(ran) == 1 and "--base-lr" in ran[0]
    steps.Chain(tmp_path, ["--device", "auto", "--seed", "0"], []).linprobe("pre", 90, base_lr=4.0)  # same settings
    assert len(ran) == 1  # finished: read back (the device does not change what a step computes)
    with pytest.raises(MaelabError, match=r"linprobe was run with other settings \(--base-lr 4 -> 0.1\)"):
        steps.Chain(tmp_path, common, []).linprobe("pre", 90, base_lr=0.1)
    with pytest.raises(MaelabError, match=r"--epochs 90 -> 20, --warmup-epochs 9 -> 2"):
        steps.Chain(tmp_path, common, []).linprobe("pre", 20, base_lr=4.0)
    assert len(ran) == 1
    moved = tmp_path.with_name(tmp_path.name + "_moved")
    tmp_path.rename(moved)  # the folder moved: its paths in the flags follow it
    steps.Chain(moved, common, []).linprobe("pre", 90, base_lr=4.0)
    assert len(ran) == 1
    moved.rename(tmp_path)
    kept = (tmp_path / "steps.json").read_text()
    (tmp_path / "steps.json").write_text("{not json")
    with pytest.raises(MaelabError, match="steps.json is unreadable"):
        steps.Chain(tmp_path, common, [])
    (tmp_path / "steps.json").write_text(kept)

    def refused(args, log):  # a step that fails before it writes anything (a bad flag value, say)
        raise MaelabError("`maelab knn` failed (exit 2)")

    monkeypatch.setattr(steps, "maelab", refused)
    with pytest.raises(MaelabError, match="failed"):
        steps.Chain(tmp_path, common, []).knn("pre", "knn", ["--k", "0"])
    assert "knn" not in json.loads((tmp_path / "steps.json").read_text())  # so the corrected flags may run
    assert "knn" not in json.loads((tmp_path / "code.json").read_text())  # nor its code: it never ran
    def fake_knn(args, log):
        ran.append(args)
        Path(args[args.index("--out") + 1]).write_text(json.dumps({"top1": 30.0}))
        return 1.0

    monkeypatch.setattr(steps, "maelab", fake_knn)
    assert steps.Chain(tmp_path, common, []).knn("pre", "knn", ["--k", "20"]) == {"top1": 30.0}
    assert ran[-1][-3:] == ["20", "--out", str(tmp_path / "knn.json")]

    def cut_short(args, log):  # a step that wrote its output folder, then failed: its flags stay recorded
        Path(args[args.index("--out") + 1]).mkdir(parents=True)
        raise MaelabError("`maelab finetune` failed (exit 1)")

    monkeypatch.setattr(steps, "maelab", cut_short)
    with pytest.raises(MaelabError, match="failed"):
        steps.Chain(tmp_path, common, []).finetune("pre", ["--epochs", "2"], "ft", "finetune_cifar_tiny")
    with pytest.raises(MaelabError, match=r"ft was run with other settings \(--epochs 2 -> 3\)"):
        steps.Chain(tmp_path, common, []).finetune("pre", ["--epochs", "3"], "ft", "finetune_cifar_tiny")
    assert steps.changed_flags(["knn", "--k", "20"], ["knn", "--k", "20", "--no-augment"]) == \
        "--no-augment (not given) -> (set)"


def test_ctrl_c_during_a_chain_step_waits_for_the_step_to_save(tmp_path, monkeypatch):
    """Ctrl-C of `maelab recipe` / `ablate` reaches the chain while a step runs. `subprocess.run` would
    give the step a quarter of a second and then kill it, losing everything since its last checkpoint;
    the chain asks it to stop and waits for its save, then says how to resume."""
    import signal

    from maelab.commands import steps
    from maelab.train.loop import RunInterrupted

    monkeypatch.setattr(steps, "child_command", lambda args: saving_child(tmp_path))
    before = ctrl_c_when_ready(tmp_path)
    try:
        steps.maelab(["pretrain", "--out", str(tmp_path / "run")], tmp_path / "log.txt")
        pytest.fail("the chain did not stop")
    except KeyboardInterrupt:  # caught here, or pytest would take it as the user stopping the whole session
        pytest.fail("the Ctrl-C went past the chain's wait: the step was killed, not asked to stop")
    except RunInterrupted as e:
        stopped = e
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "saved").is_file()  # the step saved instead of being killed
    assert stopped.exit_code == 130
    assert str(stopped) == (f"interrupted during `maelab pretrain` (the end of {tmp_path / 'log.txt'} says where "
                            "it stopped); run the same command again to resume")


def test_sigterm_to_a_chain_waits_for_the_step_and_says_how_to_resume(tmp_path, monkeypatch):
    """A scheduler's SIGTERM to the recipe process: the step saves, and the chain says to run it again (it
    used to say "stopped by SIGTERM outside the training loop")."""
    import signal
    import threading

    from maelab.cli import _terminate
    from maelab.commands import steps
    from maelab.train.loop import RunInterrupted

    monkeypatch.setattr(steps, "child_command", lambda args: saving_child(tmp_path))

    def term():
        while not (tmp_path / "ready").exists():
            threading.Event().wait(0.05)
        threading.Event().wait(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.signal(signal.SIGTERM, _terminate)  # what `maelab` installs
    threading.Thread(target=term, daemon=True).start()
    try:
        with pytest.raises(RunInterrupted, match="run the same command again to resume") as stopped:
            steps.maelab(["pretrain", "--out", str(tmp_path / "run")], tmp_path / "log.txt")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert (tmp_path / "saved").is_file() and stopped.value.exit_code == 143


def test_the_steps_of_a_run_sized_by_epochs_are_read_from_its_log(tmp_path):
    """`ablate --budget none --pretrain-epochs 1` showed "–" in its steps column: only a budget records
    max_steps. The log's last step is what such a run took."""
    from maelab.commands.steps import steps_taken

    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  epochs: 1\n")
    assert steps_taken(run) is None  # nothing logged yet
    (run / "metrics.jsonl").write_text('{"step": 2, "epoch": 0, "loss": 1.0}\n{"step": 4, "epoch": 1, "epoch_loss": 1}\n'
                                       '{"step": 4, "epo')  # a line cut by a crash
    assert steps_taken(run) == 4
    (run / "config.yaml").write_text("optim:\n  epochs: 1\n  max_steps: 9\n")
    assert steps_taken(run) == 9  # a budget's plan
