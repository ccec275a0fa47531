"""Write docs/results.md from the outputs of `maelab recipe`, `maelab ablate` and
benchmarks/quality_per_minute.py -- no hand-typed numbers.

    python scripts/results_page.py --recipe runs/recipe_quick runs/recipe_full \
        --ablation runs/ablate_mask_ratio ... --quality runs/quality_per_minute --out docs/results.md

Each recipe folder contributes its results.json (accuracy per step, minutes, machine, seed, budgets) and
the command that re-creates it (recipe folders named again in ``--recipe-repeats``, runs of one
configuration on one machine with other seeds, also make one table: mean ± standard deviation, and in
how many runs each signal held); each sweep folder its results.json table, command and plot; the quality
benchmark its curve. What the page reads -- each folder's results, tables, pictures and its runs'
configs, never checkpoints or logs -- is first archived next to the page (``docs/results/runs/<folder
name>/``) and the page is rendered from that archive, with ``index.json`` naming the folders: run
folders stay on the machine that trained them, so without the archive nobody else could regenerate the
page. `python scripts/results_page.py` with no folders re-renders the page from the archive alone; a
folder given again replaces its archived copy. A folder that has not been run (no results.json) is listed as not run, so the page never
implies a number nobody measured. The paper's own numbers (ViT-L/16, ImageNet-1K, Table 1) stand beside
each sweep so a reader sees where the small-scale shape differs. The preset's own configuration comes
back in every sweep (mask ratio 0.75 in the mask-ratio sweep, decoder depth 4 in the depth sweep, ...,
and a `--setting seed` sweep): those repeats give the run-to-run spread at their budget on their CPU (a
budget buys other step counts on another machine), and a sweep's winner is called a difference from the
paper only when it beats the paper's value by more than the spread at its own budget and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from maelab.commands.options.pretrain import PretrainConfig
from maelab.config import build_config
from maelab.errors import MaelabError
from maelab.models.presets import PRESETS
from maelab.train.budget import latest_by, parse_duration

RECIPES = {"recipe_quick": "about 30 minutes on 2 CPU cores", "recipe_full": "the public small-scale recipe; needs a GPU"}
STEPS = (("knn_mae_top1", "kNN (k=20, T=0.07), MAE encoder", "knn_mae"),
         ("knn_random_top1", "kNN, random-init encoder", "knn_random"),
         ("linprobe_top1", "linear probe, MAE encoder", "linprobe"),
         ("finetune_mae_top1", "fine-tune from the MAE encoder", "finetune_mae"),
         ("finetune_scratch_top1", "fine-tune from scratch (same budget)", "finetune_scratch"))
# The paper's findings for each sweepable setting (He et al. 2021, Table 1 / Fig. 5; ViT-L/16, 800 epochs on
# ImageNet-1K; fine-tune / linear-probe top-1) and the value it found best.
PAPER = {
    "mask-ratio": ("0.75", "Fig. 5: 0.75 is best for both fine-tuning and linear probing (84.9 / 73.5); linear "
                   "probing climbs steadily up to 0.75, fine-tuning is nearly flat from 0.4 to 0.8"),
    "decoder-depth": ("8", "Table 1a: depth 1: 84.8 / 65.5, 2: 84.9 / 70.0, 4: 84.9 / 71.9, 8: 84.9 / 73.5, "
                      "12: 84.4 / 73.3"),
    "decoder-embed-dim": ("512", "Table 1b: width 128: 84.9 / 69.1, 256: 84.8 / 71.3, 512: 84.9 / 73.5, "
                          "768: 84.4 / 73.1, 1024: 84.3 / 73.1"),
    "encoder-mask-tokens": ("false", "Table 1c: mask tokens in the encoder 84.2 / 59.6 at 3.3x the encoder FLOPs; "
                            "without (the MAE) 84.9 / 73.5"),
    "norm-pix-loss": ("true", "Table 1d: pixels 84.9 / 73.5; per-patch normalised pixels 85.4 / 73.9"),
    "crop": ("random-size", "Table 1e: no augmentation 84.0 / 65.7; fixed-size crop 84.7 / 73.1; random-size "
             "crop 84.9 / 73.5; random-size crop + colour jitter 84.3 / 71.9"),
    "color-jitter": ("0", "Table 1e: random-size crop 84.9 / 73.5; + colour jitter 84.3 / 71.9"),
    "mask-type": ("random", "Table 1f: random (0.75) 84.9 / 73.5; block-wise (0.5) 83.9 / 72.3; block-wise "
                  "(0.75) 82.8 / 63.9; grid (0.75) 84.0 / 66.0"),
}
SCORES = (("knn_top1", "kNN"), ("linprobe_top1", "linear probe"), ("finetune_top1", "fine-tune"))


# What a run folder keeps for the page: its results, tables and pictures, and for a sweep each value's
# result, kNN record and pre-training config (planned steps, seed, precision). No checkpoints, no logs.
ARCHIVED = ("results.json", "results.md", "*.png", "curves/*.png", "*/**/result.json", "*/**/knn.json",
            "*/**/pretrain/config.yaml")
REPO = Path(__file__).resolve().parents[1]


def portable(text: str, repo: Path = REPO) -> str:
    """A record's machine paths made relative to the repository, as a reader's clone has them: runs record
    resolved paths (``<repo>/runs/x``, ``<repo's parent>/shared/...``), which name one machine."""
    for prefix, short in ((repo, ""), (repo.parent, "../")):
        text = text.replace(f"{prefix}/", short)
    return text


def read_json(path: Path):
    return read_record(path, json.loads)


def read_record(path: Path, parse=str):
    """A run record (text, or parsed), or a one-line stop naming the file when it is missing or damaged
    (a run cut while writing it)."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"results_page: cannot read {path}: {e}; re-run the command that wrote it, or leave "
                         "its folder out") from None


class Page:
    """The lines of the page, and the archive (``<page dir>/results/runs/``) its numbers and pictures come from."""

    def __init__(self, out: Path):
        self.out, self.lines = out, []
        self.replaced: list[tuple[Path, Path]] = []  # (archived folder, the copy it replaced)
        self.assets = out.parent / "results"
        self.archive = self.assets / "runs"

    def picture(self, src: Path, caption: str) -> None:
        """Show ``src`` (a file in the archive) with a link relative to the page."""
        if src.is_file():
            self.lines += [f"![{caption}]({Path(os.path.relpath(src, self.out.parent)).as_posix()})", ""]

    def earlier_pages(self) -> list[Path]:
        return sorted(self.assets.glob("earlier/*.md"))

    def measured_earlier(self, heading: str) -> str:
        """A pointer to the earlier pages that have a measured ``heading`` section (not a 'Not run yet')."""
        found = []
        for p in self.earlier_pages():
            lines = p.read_text().splitlines()
            at = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
            after = next((line for line in lines[at + 1:] if line.strip()), "") if at is not None else ""
            if at is not None and not after.startswith("Not run yet"):
                found.append(f"[{p.stem}]({p.relative_to(self.out.parent).as_posix()})")
        return f" Measured earlier, on another machine: {', '.join(found)}." if found else ""

    def keep(self, folder: Path) -> Path:
        """Archive the records of a run ``folder`` that has finished (it has results.json) and return the
        archived copy; a folder never run returns its archived copy from an earlier page, if any. Every JSON
        record is read from ``folder`` before the archive changes (a damaged one stops here, named), and the
        copy it replaces is set aside until the page is written (:meth:`commit`; :meth:`roll_back` on failure)."""
        kept = self.archive / folder.name
        if (folder / "results.json").is_file() and folder.resolve() != kept.resolve():
            staging = self.archive / f".{folder.name}.new"
            shutil.rmtree(staging, ignore_errors=True)
            for pattern in ARCHIVED:
                for src in sorted(folder.glob(pattern)):
                    dst = staging / src.relative_to(folder)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if src.suffix == ".png":
                        shutil.copyfile(src, dst)
                    else:
                        text = read_record(src)
                        if src.suffix == ".json":
                            read_record(src, json.loads)
                        dst.write_text(portable(text))
            old = self.archive / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if kept.exists():
                kept.rename(old)
            staging.rename(kept)
            self.replaced.append((kept, old))
        return kept if (kept / "results.json").is_file() else folder

    def commit(self, index: dict) -> None:
        """Write the index and the page, then drop the archived copies the new ones replaced."""
        (self.archive / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        self.out.write_text("\n".join(self.lines).rstrip() + "\n")
        for _, old in self.replaced:
            shutil.rmtree(old, ignore_errors=True)

    def roll_back(self) -> None:
        """Put back the archived copies that this run replaced: the page and the index were not written."""
        for kept, old in reversed(self.replaced):
            shutil.rmtree(kept, ignore_errors=True)
            if old.exists():
                old.rename(kept)


def recipe_section(page: Page, folder: Path) -> None:
    name = folder.name
    res_file = folder / "results.json"
    page.lines += [f"## `{name}`", ""]
    if not res_file.is_file():
        what = RECIPES.get(name, "")
        preset = name if name in RECIPES else "recipe_quick"
        state = (f"Not finished ({folder} has no results.json: the chain was stopped; running its command again "
                 f"finishes it)" if folder.is_dir() else f"Not run yet{f' ({what})' if what else ''}")
        page.lines += [f"{state}. Run `maelab recipe --config {preset} --data .../cifar10/train --out runs/{name}` and "
                       f"regenerate this page."
                       + page.measured_earlier(f"## `{name}`"), ""]
        return
    res = read_json(res_file)
    b = res["budgets"]
    command = res.get("command") or f"maelab recipe --config {name} --data {res['data']} --out {res['recipe']}"
    page.lines += [f"Command: `{command}` (seed {res['seed']}; precision {res.get('precision', 'auto')}; pre-training budget "
                   f"{b['pretrain']}, fine-tune budget {b['finetune']} each).",
                   f"Machine: {res['machine']}.{code_of(res)} Accuracy: final epoch, on `{res['val_data']}`; one seed.", ""]
    if "probe" in res:  # recorded from the runs' own configs (results written before that lack it)
        images, probe = res.get("evaluated_images") or {}, res["probe"]
        steps = f"{res['pretrain_steps']} pre-training steps; " if res.get("pretrain_steps") else ""
        ft = res.get("finetune_steps") or {}
        if ft.get("mae") and ft.get("scratch"):
            steps += f"fine-tune {ft['mae']} steps from the MAE encoder, {ft['scratch']} from scratch; "
        page.lines += [f"What ran: {steps}evaluations on {images.get('train')} train / {images.get('val')} validation "
                       f"images; linear probe {probe.get('epochs')} epochs at LARS base lr {probe.get('base_lr')} on "
                       "cached features.", ""]
    def minutes(step: str):  # null: a step another process finished, whose time the recipe did not see
        m = res["minutes"].get(step)
        return "–" if m is None else m

    page.lines += ["| step | top-1 (%) | minutes |", "|---|---|---|",
                   f"| pre-training (MAE) | – | {minutes('pretrain')} |"]
    for key, title, step in STEPS:
        page.lines.append(f"| {title} | {res[key]:.2f} | {minutes(step)} |")
    s = res["signals"]
    total = sum(v for v in res["minutes"].values() if isinstance(v, (int, float)))
    page.lines += ["", f"Total {total:.1f} minutes. MAE kNN beats random init: "
                       f"**{'yes' if s['knn_mae_beats_random'] else 'no'}** "
                       f"({res['knn_mae_top1']:.2f} vs {res['knn_random_top1']:.2f}); MAE fine-tune beats from scratch "
                       f"at equal fine-tune time: **{'yes' if s['finetune_mae_beats_scratch'] else 'no'}** "
                       f"({res['finetune_mae_top1']:.2f} vs {res['finetune_scratch_top1']:.2f}).", ""]
    if (folder / "reconstruction.png").is_file():
        page.lines += ["Reconstructions of validation images at mask ratios 0.75 / 0.85 / 0.95 (paper Fig. 4), rows "
                       "labelled with class and file:", ""]
        page.picture(folder / "reconstruction.png", "reconstructions")
    for curve in sorted((folder / "curves").glob("*.png")):
        page.picture(curve, f"loss curve: {curve.stem}")


REPEATED = ("machine", "budgets", "precision")  # what the runs of a repeats table must share


def recipe_repeats_section(page: Page, folders: list[Path]) -> None:
    """Recipe runs that repeat one configuration on one machine (same command apart from --seed and --out):
    every run's numbers, their mean ± standard deviation, and in how many runs each signal held. One run
    cannot say whether its signal is robust; this table can."""
    runs = [(f.name, read_json(f / "results.json")) for f in folders]
    first = runs[0][1]
    for name, res in runs[1:]:
        for key in REPEATED:
            if res.get(key) != first.get(key):
                raise SystemExit(f"results_page: --recipe-repeats: {name} has {key} {res.get(key)!r}, "
                                 f"{runs[0][0]} has {first.get(key)!r}; repeats must share {', '.join(REPEATED)}")
    b = first["budgets"]
    words = first.get("command", "").split()
    preset = words[words.index("--config") + 1] if "--config" in words[:-1] else "the recipe"
    page.lines += [f"## Repeats of `{preset}`: {cpu_of(first)}", "",
                   f"The same recipe ({len(runs)} runs, seeds {', '.join(str(r['seed']) for _, r in runs)}) on "
                   f"{first['machine']}, precision {first.get('precision', 'auto')}, pre-training budget "
                   f"{b['pretrain']}, fine-tune budget {b['finetune']} each. Their sections above give each run's "
                   "command and pictures." + (" Runs of one seed differ in the steps their budgets bought (the "
                   "machine's speed when each measured it)." if len({r["seed"] for _, r in runs}) < len(runs) else "")
                   + " Accuracy: final epoch, top-1 (%).", "",
                   "| run | seed | pre-training steps | " + " | ".join(title for _, title, _ in STEPS) + " |",
                   "|---|---|---|" + "---|" * len(STEPS)]
    for name, res in runs:
        page.lines.append(f"| `{name}` | {res['seed']} | {res.get('pretrain_steps', '–')} | "
                          + " | ".join(f"{res[key]:.2f}" for key, _, _ in STEPS) + " |")
    steps = [r["pretrain_steps"] for _, r in runs if r.get("pretrain_steps")]
    page.lines.append("| mean ± sd | | " + (f"{statistics.mean(steps):.0f}" if steps else "–") + " | "
                      + " | ".join(mean_sd([r[key] for _, r in runs]) for key, _, _ in STEPS) + " |")
    knn = [r["knn_mae_top1"] - r["knn_random_top1"] for _, r in runs]
    ft = [r["finetune_mae_top1"] - r["finetune_scratch_top1"] for _, r in runs]
    page.lines += ["", f"MAE kNN beats random init in **{sum(g > 0 for g in knn)} of {len(runs)}** runs (lead "
                       f"{mean_sd(knn)} points, smallest {min(knn):+.2f}); MAE fine-tune beats from scratch at equal "
                       f"fine-tune time in **{sum(g > 0 for g in ft)} of {len(runs)}** runs (lead {mean_sd(ft)} "
                       f"points, smallest {min(ft):+.2f}).", ""]


def best(rows: list[dict], key: str) -> dict | None:
    scored = [r for r in rows if key in r]
    return max(scored, key=lambda r: r[key]) if scored else None


def same_value(a, b) -> bool:
    """A sweep value (text) against a config value: numbers by value, the rest as lower-case text."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def preset_value(preset: str, setting: str):
    """The value a sweep's preset gives ``setting`` (``decoder-depth`` -> the model preset's when the
    config leaves it to the model); None when it is not a pre-training setting."""
    cfg = build_config(PretrainConfig, yaml_path=preset)
    name = setting.replace("-", "_")
    for section in (cfg.model, cfg.data, cfg.optim, cfg.run):
        if hasattr(section, name):
            value = getattr(section, name)
            return PRESETS.get(cfg.model.model, {}).get(name) if value is None else value
    return None


def code_of(res: dict) -> str:
    """The page's note of the code a run recorded (maelab version, commit); empty for results written before
    runs recorded it."""
    return f" Code: {res['code']}." if res.get("code") else ""


def cpu_of(res: dict) -> str:
    """The machine a run recorded (``CPU: <name> (...)`` from a benchmark, ``<name>, N threads[, native
    bf16][, <GPU>]`` from maelab), named so that two machines a budget buys different step counts on
    differ: the same CPU model without native bf16 (it trains in fp32, ~1.8x fewer steps) or with a GPU."""
    machine = res.get("machine", "not recorded")
    parts = machine.removeprefix("CPU: ").split(" (")[0].split(", ")
    if len(parts) < 2 or not parts[1].endswith(" threads"):
        return parts[0]
    gpu = [p for p in parts[2:] if p != "native bf16"]
    if gpu:
        return f"{parts[0]} + {gpu[0]}"
    return parts[0] if "native bf16" in parts[2:] else f"{parts[0]} (no native bf16)"


class Group(NamedTuple):
    budget: str
    preset: str
    evaluated_images: int | None
    pretrain_images: int | None
    precision: str | None
    cpu: str


def group_key(sweep: dict) -> Group:
    """Sweeps whose preset runs are repeats of each other: same budget, preset, images, precision and
    CPU (a budget buys a different number of steps on another machine, so runs there are not repeats)."""
    return Group(sweep["budget"], sweep.get("preset", "pretrain_cifar10_tiny"), sweep.get("evaluated_images"),
                 sweep.get("pretrain_images"), sweep.get("precision"), cpu_of(sweep))


PresetRuns = dict[Group, list[tuple[str, dict[str, float]]]]
"""What :func:`preset_runs` returns: per group, (where, {score key: accuracy}) of each preset run."""


def preset_runs(sweeps: list[dict]) -> PresetRuns:
    """:func:`group_key` -> [(where, {score key: accuracy})] of every run of the preset's own
    configuration: the sweep row whose value is the preset's (each seed of it), and every row of a
    ``seed`` sweep. Only runs with a kNN score count."""
    groups: PresetRuns = {}
    for res in sweeps:
        seeds = res["setting"] == "seed"
        default = None if seeds else preset_value(group_key(res).preset, res["setting"])
        fixed = res.get("subset_seed")  # the seed of every run's evaluation subsets; None: each run's own
        for row in res["rows"]:
            if "knn_top1" not in row or not (seeds or same_value(row["value"], default)):
                continue
            where = f"{res['setting']}={row['value']}" + (f" on the subsets of seed {fixed}" if fixed is not None else "")
            if "knn_top1_runs" not in row:
                seed = int(row["value"]) if seeds else res.get("seed", 0)
                scores = {k: row[k] for k, _ in SCORES if k in row}
                groups.setdefault(group_key(res), []).append((where, {**scores, "subset_seed": fixed if fixed is not None else seed}))
                continue
            for i, seed in enumerate(row["seeds"]):  # a value run with several seeds: each run
                scores = {k: row[f"{k}_runs"][i] for k, _ in SCORES if f"{k}_runs" in row}
                groups.setdefault(group_key(res), []).append((f"{where} seed {seed}",
                                                              {**scores, "subset_seed": fixed if fixed is not None else seed}))
    return groups


def subset_note(runs: list[tuple[str, dict]]) -> str:
    """Which runs were scored on other evaluation subsets than most (their seed drew them), if any."""
    drawn = [v.get("subset_seed") for _, v in runs]
    usual = max(set(drawn), key=drawn.count)
    other = [where for (where, _), d in zip(runs, drawn) if d != usual]
    if not other:
        return f" All were scored on the same evaluation subsets (drawn with seed {usual})."
    return (f" {', '.join(other)} {'was' if len(other) == 1 else 'were'} scored on other evaluation subsets than "
            f"the rest (drawn with {'its' if len(other) == 1 else 'their'} own seed; `--subset-seed` fixes them), "
            f"so {'its' if len(other) == 1 else 'their'} difference mixes training noise with which images were scored.")


def paper_row(rows: list[dict], paper: str) -> dict | None:
    """The sweep row of the paper's best value, if it was run and scored by kNN."""
    return next((r for r in rows if same_value(r["value"], paper) and "knn_top1" in r), None)


def mean_sd(scores: list[float]) -> str:
    """``mean ± standard deviation`` of at least two accuracies, as the page prints them."""
    return f"{statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f}"


def spread_at(key: Group, groups: PresetRuns) -> float | None:
    """max - min kNN of the preset's repeated runs in one :func:`group_key` group (None: fewer than 3)."""
    scores = [v["knn_top1"] for _, v in groups.get(key, [])]
    return max(scores) - min(scores) if len(scores) >= 3 else None


def spread_of(sweep: dict, groups: PresetRuns) -> float | None:
    """The run-to-run spread at this sweep's budget, preset, images and precision."""
    return spread_at(group_key(sweep), groups)


def unmeasured(sweep: dict, groups: PresetRuns) -> str:
    """What to say when this sweep's budget and machine have no spread of their own: that it is not
    measured, and the spread measured at other budgets or on other machines with the same preset, images
    and precision (a guide, not a test)."""
    key = group_key(sweep)
    known = [f"at {other.budget}{'' if other.cpu == key.cpu else f' on {other.cpu}'} it is {spread:.2f} points"
             for other in groups  # the same runs but for budget and CPU
             if other._replace(budget=key.budget, cpu=key.cpu) == key and other != key
             and (spread := spread_at(other, groups)) is not None]
    return "the run-to-run spread at this budget on this machine is not measured" + (f"; {', '.join(known)}" if known else "")


def noise_section(page: Page, groups: PresetRuns) -> None:
    for (budget, preset, images, _, precision, cpu), runs in groups.items():
        if len(runs) < 3:
            continue
        scores = [v["knn_top1"] for _, v in runs]
        listed = ", ".join(f"{where}: {v:.2f}" for (where, _), v in zip(runs, scores))
        others = []
        for key, title in SCORES[1:]:
            more = [v[key] for _, v in runs if key in v]
            if len(more) >= 3:
                others.append(f"{title} {mean_sd(more)} "
                              f"(spread {max(more) - min(more):.2f}, {len(more)} runs)")
        page.lines += [f"## Run-to-run spread: {budget} on {cpu}", "",
                       f"The preset `{preset}`'s own configuration was pre-trained {len(runs)} times at the {budget} "
                       f"budget in precision {precision} on {cpu} ({listed}): "
                       f"kNN **{mean_sd(scores)}** "
                       f"(mean ± standard deviation), spread {max(scores) - min(scores):.2f} points, on "
                       f"{images or 'all'} images of each split"
                       + (f"; {'; '.join(others)}" if others else "") + ". With one seed the runs differ only in how many steps "
                       "the budget bought (the machine's speed when each run measured it); the `seed=` runs add "
                       "seed noise." + subset_note(runs)
                       + " Below, a sweep's winner counts as a difference from the paper only when it beats the "
                       "paper's value by more than this spread (at this budget, on this machine).", ""]


def shape_table(page: Page, sweeps: list[dict], groups: PresetRuns) -> None:
    """One line per Table-1 sweep: the paper's best value, ours, and whether the difference is real."""
    rows = []
    for res in sweeps:
        setting = res["setting"]
        if setting not in PAPER or not any("knn_top1" in r for r in res["rows"]):
            continue
        paper, _ = PAPER[setting]
        top = best(res["rows"], "knn_top1")
        at_paper = paper_row(res["rows"], paper)
        spread = spread_of(res, groups)
        if at_paper is None:
            verdict = "the paper's value was not run"
        elif same_value(top["value"], paper):
            others = [r["knn_top1"] for r in res["rows"] if r is not top and "knn_top1" in r]
            margin = top["knn_top1"] - max(others) if others else None
            if margin is None or (spread is not None and margin > spread):
                verdict = "same winner"
            elif spread is None:
                verdict = f"same winner, by {margin:.2f} ({unmeasured(res, groups)})"
            else:
                verdict = f"same winner, but by {margin:.2f}: within the {spread:.2f}-point spread"
        elif spread is not None and top["knn_top1"] - at_paper["knn_top1"] <= spread:
            verdict = f"within the {spread:.2f}-point spread: no real difference"
        elif spread is None:  # no noise estimate at this budget: report the gap, claim nothing
            verdict = (f"{top['value']} beats {paper} by {top['knn_top1'] - at_paper['knn_top1']:.2f}, but "
                       f"{unmeasured(res, groups)}")
        else:
            verdict = (f"**differs**: {top['value']} beats {paper} by {top['knn_top1'] - at_paper['knn_top1']:.2f} "
                       f"(> the {spread:.2f}-point spread)")
            if top.get("pretrain_steps") and at_paper.get("pretrain_steps"):
                verdict += f"; the budget bought {top['pretrain_steps']} against {at_paper['pretrain_steps']} steps"
        there = f"{at_paper['knn_top1']:.2f}" if at_paper else "–"
        rows.append(f"| `{setting}` | {res['budget']} | {cpu_of(res)} | {paper} | {there} | {top['value']} | {top['knn_top1']:.2f} | "
                    f"{verdict} |")
    if rows:
        page.lines += ["## Our small-scale shape against the paper's", "",
                       "kNN top-1 of each sweep's value that the paper found best, against our best value (the "
                       "sweeps below have the details and the paper's own numbers).", "",
                       "| setting | budget | machine | paper's best | our kNN there | our best | its kNN | verdict |",
                       "|---|---|---|---|---|---|---|---|", *rows, ""]


def run_facts(run: Path) -> dict:
    """What one sweep value's own outputs say (for summaries written before they recorded it):
    the pre-training config's image count, precision and seed, and the images kNN scored."""
    facts: dict = {}
    config = run / "pretrain" / "config.yaml"
    if config.is_file():
        cfg = yaml.safe_load(config.read_text())
        facts.update(pretrain_images=cfg["data"]["limit_images"], precision=cfg["run"]["precision"],
                     seed=cfg["run"]["seed"])
    knn = run / "knn.json"
    if knn.is_file():
        res = read_json(knn)
        if res["train_images"] == res["val_images"]:
            facts["evaluated_images"] = res["train_images"]
    return facts


def overran(res: dict) -> list[str]:
    """Say which values' pre-training took well over the budget: the step count was planned for the
    budget, so their accuracy stands, but their time includes whatever else the machine was doing."""
    try:
        budget_s = parse_duration(res["budget"])
    except MaelabError:  # "none": trained for epochs, no budget to overrun
        return []
    late = [f"{r['value']} ({r['pretrain_s'] / 60:.1f} min)" for r in res["rows"] if r["pretrain_s"] > 1.25 * budget_s]
    if not late:
        return []
    return [f"Over the budget: {', '.join(late)}. Those runs took the steps planned for the budget, but the "
            f"machine was shared while they ran (another job took its cores), so their time column is not "
            f"their own cost.", ""]


def knn_gap(rows: list[dict], paper: str, spread: float | None, noise: str) -> str:
    """How far the paper's value trails our best in kNN, measured against the run-to-run spread, so a
    sweep whose values all tie is not read as a reversal of the paper (``noise``: what to say when the
    spread at this budget is not measured)."""
    top = best(rows, "knn_top1")
    there = paper_row(rows, paper)
    if top is None or there is None:
        return ""
    gap = top["knn_top1"] - there["knn_top1"]
    where = (f"; {noise}" if spread is None else
             f", within the {spread:.2f}-point run-to-run spread: no real difference" if gap <= spread else
             f", more than the {spread:.2f}-point run-to-run spread")
    return f": {paper} trails {top['value']} by {gap:.2f} kNN points{where}"


def seed_sentence(rows: list[dict], in_spread: bool) -> str:
    """A seed sweep has no best value: say what its runs measure and how far they scatter."""
    text = ("Each value is the seed of its whole run (initialisation, data order, crops, flips, masks), so "
            "no seed is \"best\"" + (": these runs count in the run-to-run spread above." if in_spread else "."))
    spreads = []
    for key, title in SCORES:
        scores = [r[key] for r in rows if key in r]
        if len(scores) >= 2:
            spreads.append(f"{title} {mean_sd(scores)} ({min(scores):.2f}-{max(scores):.2f})")
    if spreads:
        text += f" Across these {len(rows)} seeds (mean ± standard deviation, range): {'; '.join(spreads)}."
    return text


def ablation_section(page: Page, folder: Path, groups: PresetRuns) -> None:
    res_file = folder / "results.json"
    if not res_file.is_file():
        page.lines += [f"## Sweep `{folder.name}`", "",
                       f"Not finished: {folder} has no results.json (the sweep was stopped; running its `maelab "
                       f"ablate` command again finishes it)." if folder.is_dir() else "Not run yet.", ""]
        return
    res = read_json(res_file)
    spread = spread_of(res, groups)
    setting, rows = res["setting"], res["rows"]
    facts = run_facts(folder / f"{setting}={rows[0]['value']}") if rows else {}
    evaluated = res.get("evaluated_images", facts.get("evaluated_images", "an unrecorded number of"))
    pretrained = res.get("pretrain_images", facts.get("pretrain_images", evaluated))
    res.setdefault("precision", facts.get("precision", "not recorded"))
    res.setdefault("seed", facts.get("seed", "not recorded"))
    seeds = res.get("seeds") or [res["seed"]]
    page.lines += [f"## Sweep: `{setting}` (`{folder.name}`)", ""]  # the folder tells repeats of a setting apart
    if res.get("command"):
        page.lines += [f"Command: `{res['command']}`", ""]
    elif isinstance(evaluated, int):  # an older summary: its recorded settings, every other flag a default
        evals = [name for key, name in (("knn_top1", "knn"), ("linprobe_top1", "linprobe"), ("finetune_top1", "finetune"))
                 if any(key in r for r in rows)]
        page.lines += [f"Command (re-created from the recorded settings, every other flag its default): `maelab "
                       f"ablate --setting {setting} --values {' '.join(str(r['value']) for r in rows)} --budget "
                       f"{res['budget']} --evaluate {' '.join(evals)} --limit-images {evaluated} --pretrain-images "
                       f"{pretrained} --data {res['data']} --out runs/{folder.name}`", ""]
    page.lines += [f"Each value pre-trained from preset `{res.get('preset', 'pretrain_cifar10_tiny')}` to a "
                   f"{res['budget']} budget on {'all' if not pretrained else pretrained} images of `{res['data']}`"
                   f" ({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}, precision {res['precision']}), then evaluated on "
                   f"{'all' if not evaluated else evaluated} images of each split"
                   + (f" (subsets drawn with seed {res['subset_seed']} for every run)"
                      if res.get("subset_seed") is not None and evaluated else "")
                   + (f" (linear probe: {res['probe']}, on cached features)" if res.get("probe") else "")
                   + f". Machine: {res.get('machine', 'not recorded')}.{code_of(res)}", "", read_record(folder / "results.md"), ""]
    page.lines += overran(res)
    ours = [f"best {title} at **{b['value']}** ({b[key]:.2f})" for key, title in SCORES if (b := best(rows, key))]
    if setting in PAPER:
        value, finding = PAPER[setting]
        agree = [title for key, title in SCORES if (b := best(rows, key)) and str(b["value"]).lower() == value]
        page.lines += [f"Paper: {finding} (best: {value}). Ours: {'; '.join(ours)} -- "
                       + (f"the paper's best value wins for {', '.join(agree)}." if agree else
                          f"the paper's best value does not win here at this scale"
                          f"{knn_gap(rows, value, spread, unmeasured(res, groups))}."), ""]
    elif setting == "seed":
        page.lines += [seed_sentence(rows, spread is not None), ""]
    elif ours:
        page.lines += [f"Ours: {'; '.join(ours)}.", ""]
    page.picture(folder / "ablation.png", f"sweep of {setting}")
    page.picture(folder / "losses.png", f"loss curves of every run of the {setting} sweep")


def equal_minutes(ours: list[dict], theirs: list[dict], arms: list[str]) -> str:
    """The smallest lead of ours at equal or less time: each of their snapshots against our latest one
    taken no later."""
    ours_at = [latest_by([o["minutes"] for o in ours], t["minutes"]) for t in theirs]
    pairs = [(ours[i], t) for i, t in zip(ours_at, theirs) if i is not None]
    if not pairs:
        return ""
    lead = min(min(o[pool] - t[pool] for pool in ("token", "avg")) for o, t in pairs)
    early = [f"{t['minutes']:.1f}" for i, t in zip(ours_at, theirs) if i is None]
    each = f"each {arms[1]} snapshot" + (f" from {pairs[0][1]['minutes']:.1f} min on" if early else "")
    return (f"At equal or less time: against {each}, the latest {arms[0]} snapshot taken no later "
            f"leads by at least {lead:+.2f} points (cls and mean-pool)"
            + (f"; {arms[0]} has no snapshot as early as its {', '.join(early)}-min one"
               f"{'s' if len(early) > 1 else ''}, so {'that is' if len(early) == 1 else 'those are'} not compared"
               if early else "") + ".\n")


def steps_taken(res: dict, arms: list[str]) -> str:
    """The pre-training steps each arm took in its budget, as far as the run recorded them (older runs
    recorded only the alternative's)."""
    parts = []
    if res.get("maelab_steps") and arms:
        parts.append(f"{arms[0]} {res['maelab_steps']} (the count its budget planner settled on)")
    hf = res.get("hf_schedule") or {}
    if hf.get("steps_done") and len(arms) > 1:
        parts.append(f"{arms[1]} {hf['steps_done']}" + (f" (planned {hf['planned_steps']} from its first 12 steps' time)"
                                                        if hf.get("planned_steps") else ""))
    return f"Pre-training steps in the budget: {'; '.join(parts)}.\n" if parts else ""


def frozen(points: list[dict], arm: str) -> str:
    """Say so when an arm's last snapshots score exactly the same: its weights had stopped changing."""
    same = len(points) - 1
    while same > 0 and all(points[same - 1][k] == points[-1][k] for k in ("token", "avg")):
        same -= 1
    if same >= len(points) - 1:
        return ""
    return (f"{arm}'s snapshots from {points[same]['minutes']:.1f} min on score exactly the same: its learning-rate "
            f"schedule, sized to the budget from the step time it measured at the start, had reached zero by then at "
            f"the latest, so it trained for less than the budget (the run's `hf_schedule`, when recorded, gives the planned "
            f"and finished steps).\n")


QUALITY = "## Quality per CPU-minute: maelab against HF ViTMAE + torchvision"


def quality_sections(page: Page, folders: list[Path]) -> None:
    """One section; with runs from several machines, one sub-section per run, named by its CPU."""
    page.lines += [QUALITY, ""]
    measured = [f for f in folders if (f / "results.json").is_file()]
    if not measured:
        page.lines += ["Not run yet: `python benchmarks/quality_per_minute.py --data .../cifar10/train --val-data "
                       ".../cifar10/test --budget 30m --out runs/quality_per_minute` (about 1.5 hours on 2 CPU "
                       "cores: two 30-minute pre-trainings, then kNN of every snapshot)." + page.measured_earlier(QUALITY),
                       ""]
    for folder in measured:
        res = read_json(folder / "results.json")
        if len(measured) > 1:
            page.lines += [f"### {cpu_of(res)} (`{folder.name}`)", ""]
        quality_run(page, folder, res)


def quality_run(page: Page, folder: Path, res: dict) -> None:
    page.lines += [f"Command: `{res['command']}`; {res['machine']}; {res['load']}. kNN k=20, T=0.07 on "
                   f"{res['eval_images'] or 'all'} images of each split; seed {res['seed']}; the alternative in "
                   f"{res.get('hf_precision', 'fp32')}.", "", read_record(folder / "results.md"), ""]
    curves = res["curves"]
    arms = list(curves)
    if steps := steps_taken(res, arms):
        page.lines.append(steps)
    if len(arms) == 2 and all(curves[a] for a in arms):
        ours, theirs = (curves[a][-1] for a in arms)
        gaps = {pool: ours[pool] - theirs[pool] for pool in ("token", "avg")}
        page.lines += [f"At the end of the budget: {arms[0]} {ours['token']:.2f} (cls) / {ours['avg']:.2f} (mean-pool) "
                       f"after {ours['minutes']:.1f} min against {theirs['token']:.2f} / {theirs['avg']:.2f} for "
                       f"{arms[1]} after {theirs['minutes']:.1f} min: "
                       f"{gaps['token']:+.2f} / {gaps['avg']:+.2f} points. Target (at least +4): "
                       f"**{'met' if min(gaps.values()) >= 4 else 'not met'}**.", ""]
        page.lines += [line for line in (equal_minutes(curves[arms[0]], curves[arms[1]], arms), frozen(curves[arms[1]], arms[1]))
                       if line]
    page.picture(folder / "curve.png", "kNN top-1 against minutes of pre-training")


def earlier_section(page: Page) -> None:
    """Link the frozen pages of runs whose folders were lost before the archive existed."""
    pages = page.earlier_pages()
    if pages:
        page.lines += ["## Earlier runs", "",
                       "Pages generated by this script before it archived its inputs; their run folders stayed on the "
                       "machines that ran them, so they are kept as they were generated and cannot be re-rendered:", ""]
        page.lines += [f"- [{p.read_text().splitlines()[0].lstrip('# ')}]({p.relative_to(page.out.parent).as_posix()})"
                       for p in pages] + [""]


def _index_quality(index: dict) -> list[str]:
    quality = index["quality"]  # one name in indexes written before several machines' runs were shown
    return [quality] if isinstance(quality, str) else quality


def _index_names(index: dict) -> list[str]:
    return [*index["recipe"], *index["ablation"], *_index_quality(index)]


def inputs(args: argparse.Namespace, page: Page,
           argv: list[str]) -> tuple[list[Path], list[Path], list[Path], list[str], str]:
    """The folders to show, the names of the recipe folders that repeat one configuration, and the command
    that named them (``argv``): the ones given, else the archive's index."""
    index_file = page.archive / "index.json"
    given = (args.recipe, args.ablation, args.quality, args.recipe_repeats)
    if all(g is None for g in given) and index_file.is_file():
        index = read_json(index_file)
        return ([page.archive / n for n in index["recipe"]], [page.archive / n for n in index["ablation"]],
                [page.archive / n for n in _index_quality(index)],
                index.get("recipe_repeats", []), index["command"])
    recipe = [Path(f) for f in (["runs/recipe_quick", "runs/recipe_full"] if args.recipe is None else args.recipe)]
    ablation = [Path(f) for f in args.ablation or []]
    quality = [Path(f) for f in (["runs/quality_per_minute"] if args.quality is None else args.quality)]
    names = [f.name for f in (*recipe, *ablation, *quality)]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise SystemExit(f"results_page: folders are archived by name, and {', '.join(twice)} is named twice: "
                         "rename one of the run folders")
    for folder in [Path(f) for f in (args.recipe or []) + (args.ablation or []) + (args.quality or [])]:
        known = folder.name in RECIPES  # a recipe not run (yet) has its place on the page
        if not known and not folder.is_dir() and not (page.archive / folder.name / "results.json").is_file():
            raise SystemExit(f"results_page: no such run folder: {folder} (nor an archived copy in {page.archive})")
    if index_file.is_file():
        dropped = sorted(set(_index_names(read_json(index_file))) - set(names))
        if dropped:
            print(f"results_page: the page drops {len(dropped)} archived folder(s) not named here: "
                  f"{', '.join(dropped)}; their copies stay in {page.archive} (name them again from there to keep "
                  f"them, e.g. --ablation {page.archive / dropped[0]})", file=sys.stderr)
    repeats = [Path(f).name for f in args.recipe_repeats or []]
    if repeats and (len(repeats) < 2 or not set(repeats) <= {f.name for f in recipe}):
        raise SystemExit("results_page: --recipe-repeats names two or more of the --recipe folders (runs of one "
                         f"configuration); got {', '.join(repeats)}")
    return recipe, ablation, quality, repeats, " ".join(["python scripts/results_page.py", *argv])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", nargs="*", default=None,
                    help="`maelab recipe` output folders (default: runs/recipe_quick runs/recipe_full)")
    ap.add_argument("--ablation", nargs="*", default=None, help="`maelab ablate` output folders (tuning sweeps too)")
    ap.add_argument("--quality", nargs="*", default=None,
                    help="output folders of benchmarks/quality_per_minute.py (maelab vs HF ViTMAE + torchvision), "
                         "one per machine (default: runs/quality_per_minute)")
    ap.add_argument("--recipe-repeats", nargs="*", default=None,
                    help="--recipe folders that repeat one configuration on one machine (another --seed): a table "
                         "of their mean ± standard deviation and in how many runs each signal held")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args(argv)
    page = Page(Path(args.out))
    recipe, ablation, quality, repeats, command = inputs(args, page, sys.argv[1:] if argv is None else argv)
    page.archive.mkdir(parents=True, exist_ok=True)
    try:
        recipe, ablation, quality = ([page.keep(f) for f in folders] for folders in (recipe, ablation, quality))
        render(page, recipe, ablation, quality, [f for f in recipe if f.name in repeats], command)
        page.commit({"command": command, "recipe": [f.name for f in recipe], "ablation": [f.name for f in ablation],
                     "quality": [f.name for f in quality],
                     "recipe_repeats": [f.name for f in recipe if f.name in repeats]})
    except (KeyError, TypeError, IndexError) as e:  # valid JSON of another kind (a recipe's given as a sweep)
        page.roll_back()
        raise SystemExit(f"results_page: a results.json lacks {e} or holds another kind of value: is each folder "
                         "the output of its flag's command (--recipe: maelab recipe, --ablation: maelab ablate, "
                         "--quality: benchmarks/quality_per_minute.py)? The archive is unchanged") from None
    except BaseException:
        page.roll_back()
        raise
    print(f"wrote {page.out}")


def render(page: Page, recipe: list[Path], ablation: list[Path], quality: list[Path], repeats: list[Path],
           command: str) -> None:
    page.lines += ["# Results", "",
                   f"Generated by `{command}` from the run folders named below. What it read is archived in "
                   f"[{page.archive.relative_to(page.out.parent).as_posix()}/]"
                   f"({page.archive.relative_to(page.out.parent).as_posix()}/), and `python scripts/results_page.py` "
                   "alone re-renders this page from that archive. Nothing on this page is typed by hand except the "
                   "paper's own numbers quoted beside each sweep. Re-run the commands to check any number.", ""]
    for folder in recipe:
        recipe_section(page, folder)
    if repeats:
        recipe_repeats_section(page, repeats)
    quality_sections(page, quality)
    sweeps = [read_json(f / "results.json") for f in ablation if (f / "results.json").is_file()]
    groups = preset_runs(sweeps)
    noise_section(page, groups)
    shape_table(page, sweeps, groups)
    for folder in ablation:
        ablation_section(page, folder, groups)
    if not ablation:
        page.lines += ["## Ablations", "", "No ablation sweep has been run for this page yet (`maelab ablate`, see "
                       "the README).", ""]
    earlier_section(page)


if __name__ == "__main__":
    main()
