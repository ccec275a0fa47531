"""`maelab ablate`: sweep one pre-training setting and measure what each value gives.

For every value: `maelab pretrain` with that setting (to a wall-clock ``--budget``), then the chosen
evaluations of its encoder -- weighted kNN, a linear probe on cached features, a fine-tune (to
``--finetune-budget``) -- each as its own `maelab` process in a sub-folder of ``--out``. The sweep
writes ``results.json``, a Markdown table ``results.md``, ``ablation.png`` (accuracy and
pre-training time per value) and ``losses.png`` (the loss curves of every run, one line per value).
Running the same command again skips what is finished and resumes what is not; a step that ran with
other flags is refused (``steps.json`` in each value's folder records them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from maelab.commands.options.ablate import AblateConfig, NAME
from maelab.commands.options.pretrain import PretrainConfig
from maelab.commands.steps import (Chain, check_buildable, check_chain_data, check_chain_splits, check_image_counts,
                                   chains_code, invoked, length_flags, machine, no_budget,
                                   refuse_torchrun, steps_taken, STEPS)
from maelab.config import add_config_args, config_from_args, is_switch, load_yaml
from maelab.data.splits import subset_seed
from maelab.errors import MaelabError
from maelab.io import atomic_write_bytes, refuse_out_inside, write_json
from maelab.train.budget import parse_duration
from maelab.viz import plot_loss_overlay, save_figure_atomic


NOT_SETTINGS = {  # `maelab pretrain` flags that say where and on what a run works, not how it trains
    "out": "every value's run has its own folder under ablate's --out",
    "resume": "every value's run has its own folder under ablate's --out, and resumes there",
    "config": "ablate's --preset names the pretrain preset every value starts from",
    "data": "every evaluation reads ablate's --data: run one sweep per data set",
    "knn-data": "the evaluations read ablate's --data and --val-data",
    "device": "ablate's --device places every run",
    "limit-images": "ablate's --pretrain-images sizes the pre-training subset",
    "subset-seed": "ablate's --subset-seed draws the subsets",
    "plan-history": "it is the budget planner's record of a run",
}


def validate(cfg: AblateConfig) -> None:
    refuse_torchrun(NAME)
    sw = cfg.sweep
    if not sw.setting or not sw.values:
        raise MaelabError("--setting and --values are required, e.g. --setting mask-ratio --values 0.5 0.75")
    if (why := NOT_SETTINGS.get(flag_name(sw.setting))) is not None:
        raise MaelabError(f"--setting {sw.setting} is not a setting to sweep: {why}")
    if is_switch(PretrainConfig, flag_name(sw.setting)):  # one spelling per state: folders and tables say true / false,
        out = Path(cfg.run.out).expanduser()  # except where a sweep of another spelling (=on) already ran
        sw.values = [v if value_folder(out, sw.setting, v).is_dir() else switch_word(v) for v in sw.values]
    if len(set(sw.values)) != len(sw.values):
        raise MaelabError(f"--values repeats a value: {sw.values}")
    if cfg.run.img_size and flag_name(sw.setting) == "img-size":
        raise MaelabError("--img-size fixes the size of every value; --setting img-size sweeps it: give one of them")
    if cfg.run.img_size < 0:
        raise MaelabError(f"--img-size must be 0 (the preset's) or a positive size, got {cfg.run.img_size}")
    if not cfg.data.data:
        raise MaelabError("--data is required: an ImageFolder tree")
    refuse_out_inside(cfg.run.out, cfg.data.data, cfg.data.val_data)
    parse_duration(cfg.run.finetune_budget, "--finetune-budget")
    if not no_budget(cfg.run.budget):
        parse_duration(cfg.run.budget)
        if flag_name(sw.setting) in ("epochs", "max-steps"):  # every value trained alike, labelled as different
            raise MaelabError(f"--setting {sw.setting} under --budget {cfg.run.budget}: the budget sets every run's "
                              f"length (the steps that fit in it), so every value would train alike; sweep it with "
                              f"--budget none")
    if cfg.run.pretrain_epochs is not None and cfg.run.pretrain_epochs < 1:
        raise MaelabError(f"--pretrain-epochs must be at least 1 (leave it out for the preset's), got "
                          f"{cfg.run.pretrain_epochs}")
    check_chain_data(cfg.data)
    check_image_counts(pretrain_images=cfg.data.pretrain_images)
    if len(set(cfg.run.seeds)) != len(cfg.run.seeds):
        raise MaelabError(f"--seeds repeats a seed: {cfg.run.seeds}")
    if is_seed_sweep(sw.setting):
        if cfg.run.seeds:
            raise MaelabError("--setting seed already runs one seed per value; --seeds repeats the values of "
                              "another setting, e.g. --setting mask-ratio --values 0.5 0.75 --seeds 0 1 2")
        bad = [v for v in sw.values if not v.isdigit()]
        if bad:
            raise MaelabError(f"--setting seed takes whole numbers as --values, got {' '.join(bad)}")
    if cfg.run.probe_epochs < 1:
        raise MaelabError(f"--probe-epochs must be at least 1, got {cfg.run.probe_epochs}")
    if not cfg.run.probe_base_lr > 0:
        raise MaelabError(f"--probe-base-lr must be positive, got {cfg.run.probe_base_lr}")
    check_values(cfg)
    d = cfg.data
    # the validation folder found beside --data is passed to every step by name and recorded with it, so a
    # folder added later (a `valid` beside `test`) cannot score some values on one split and some on another
    d.val_data = str(check_chain_splits(d.data, d.val_data, d.limit_images if d.pretrain_images is None
                                        else d.pretrain_images, d.batch_size))


class _RefusingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage and exit; check_values names the value
        raise MaelabError(message)


def check_values(cfg: AblateConfig) -> None:
    """Read every value the way `maelab pretrain` will and check it as pretrain does at its start, so a
    misspelt setting, a value pretrain refuses or a model shape that cannot be built (a decoder width its
    heads do not divide) fails now, not after the earlier values spent their budgets."""
    parser = _RefusingParser(prog="maelab pretrain", add_help=False)
    add_config_args(parser, PretrainConfig)
    passed = ["--config", cfg.run.preset, "--data", cfg.data.data, "--batch-size", str(cfg.data.batch_size),
              *size_flags(cfg)]
    read: dict[str, str] = {}  # what pretrain reads -> the value that gave it: 0.5, 0.50 and .5 are one run
    for value in cfg.sweep.values:
        flags = setting_flags(cfg.sweep.setting, value)
        try:
            pre = config_from_args(PretrainConfig, parser.parse_args([*passed, *flags]))
            check_buildable(pre)
        except MaelabError as e:
            raise MaelabError(f"--setting {cfg.sweep.setting} --values {value}: `maelab pretrain "
                              f"{' '.join(flags)}` would refuse it: {e}") from None
        key = repr(dataclasses.asdict(pre))
        if key in read and not is_seed_sweep(cfg.sweep.setting):
            raise MaelabError(f"--values {read[key]} and {value} are the same {cfg.sweep.setting} for `maelab pretrain`: "
                              f"give each value once")
        read[key] = value


def trained_size(cfg: AblateConfig, folder: dict[str, Path]) -> list[int] | None:
    """The input size the pre-trainings ran at, as the first one recorded it (None in a sweep of the size)."""
    if flag_name(cfg.sweep.setting) == "img-size":
        return None
    value = cfg.sweep.values[0]
    config = runs_of(cfg, value, folder[value])[0][1] / "pretrain" / "config.yaml"
    return (load_yaml(config).get("model") or {}).get("img_size") if config.is_file() else None


def size_flags(cfg: AblateConfig) -> list[str]:
    """``--img-size N`` for every pre-training when the sweep sets one (nothing: the preset's size)."""
    return ["--img-size", str(cfg.run.img_size)] if cfg.run.img_size else []


def value_folder(out: Path, setting: str, value: str) -> Path:
    """Where a value's runs live: ``<out>/mask-ratio=0.75``."""
    return out / f"{flag_name(setting)}={value}"


def flag_name(setting: str) -> str:
    """A setting as its `maelab pretrain` flag is spelled: ``--mask_ratio`` -> ``mask-ratio``."""
    return setting.strip("-").replace("_", "-")


SWITCH_ON, SWITCH_OFF = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def switch_word(value: str) -> str:
    """An on/off value as ``true`` / ``false``; anything else unchanged (pretrain's parser then names it)."""
    low = value.lower()
    return "true" if low in SWITCH_ON else "false" if low in SWITCH_OFF else value


def setting_flags(setting: str, value: str) -> list[str]:
    """``--name value``; an on/off setting's ``true`` / ``false`` (``1`` / ``0``, ...) become ``--name`` /
    ``--no-name``."""
    flag = flag_name(setting)
    if is_switch(PretrainConfig, flag) and (word := switch_word(value)) in ("true", "false"):
        return [f"--{flag}" if word == "true" else f"--no-{flag}"]
    return [f"--{flag}", value]


def is_seed_sweep(setting: str) -> bool:
    return flag_name(setting) == "seed"


def seeds_of(cfg: AblateConfig) -> list[int]:
    return list(cfg.run.seeds) or [cfg.run.seed]


def runs_of(cfg: AblateConfig, value: str, value_folder: Path) -> list[tuple[int, Path]]:
    """(seed, folder) of each run of a value. In a ``seed`` sweep the value is the seed of the whole
    chain -- pre-training and evaluations -- and is recorded as such."""
    if is_seed_sweep(cfg.sweep.setting):
        return [(int(value), value_folder)]
    return [(seed, seed_folder(cfg, value_folder, seed)) for seed in seeds_of(cfg)]


def seed_folder(cfg: AblateConfig, value_folder: Path, seed: int) -> Path:
    """Where one seed's run of a value lives: the value's folder for ``--seed`` (so a one-seed sweep and
    its later extension with ``--seeds`` share it), ``seed=S/`` inside it for any other seed."""
    return value_folder if seed == cfg.run.seed else value_folder / f"seed={seed}"


def recorded_seed(folder: Path, result: dict[str, Any]) -> int | None:
    """The seed of the run in ``folder`` whose ``result`` was recorded (else its pre-training config's)."""
    if "seed" in result:
        return result["seed"]
    config = folder / "pretrain" / "config.yaml"
    return (load_yaml(config).get("run") or {}).get("seed") if config.is_file() else None


def probe_name(cfg: AblateConfig) -> str:
    """The probe's folder: named by its settings, so a probe with other settings never reads this one."""
    return f"linprobe_{cfg.run.probe_epochs}ep_lr{cfg.run.probe_base_lr:g}"


def probe_label(cfg: AblateConfig) -> str:
    return f"{cfg.run.probe_epochs} epochs, base lr {cfg.run.probe_base_lr:g}"


def finished(result: dict[str, Any], cfg: AblateConfig) -> bool:
    """Whether a value's recorded result has every evaluation asked for, the probe with today's settings."""
    if not all(f"{e}_top1" in result for e in cfg.sweep.evaluate):
        return False
    return "linprobe" not in cfg.sweep.evaluate or result.get("probe") == probe_label(cfg)


def run_value(cfg: AblateConfig, value: str, folder: Path, seed: int) -> dict[str, Any]:
    """Pre-train and evaluate one value with one seed. What is finished is kept: the pre-training (its
    time and steps in ``pretrain.json``, so a sweep cut during an evaluation never re-times it), each
    evaluation's own result file, and a probe with other settings runs again in a folder of its own. Every
    step, finished or not, is held to the flags it ran with (``steps.json``): a sweep run again with another
    preset, batch or length is refused, never answered with the old result."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "result.json"
    result: dict[str, Any] = json.loads(done.read_text()) if done.is_file() else {}
    recorded = recorded_seed(folder, result) if result else None
    if recorded not in (seed, None):
        raise MaelabError(f"{folder} holds the run with seed {recorded}, not seed {seed}: use another --out, "
                          f"or --seed {recorded}")
    d, r = cfg.data, cfg.run
    subsets = subset_seed(d, seed)
    drawn = result.get("subset_seed", recorded) if result else None  # older results: drawn with the run's seed
    if drawn not in (subsets, None):
        raise MaelabError(f"{folder} holds a run evaluated on the subsets of seed {drawn}, not {subsets}: use another "
                          f"--out, or --subset-seed {drawn}")
    if result and finished(result, cfg) and not (folder / STEPS[0]).is_file():
        return {**result, "seed": seed, "subset_seed": subsets}  # a sweep from before steps.json: nothing to check
    common = ["--device", r.device, "--precision", r.precision, "--seed", str(seed), "--data", d.data,
              "--batch-size", str(d.batch_size), *([] if subsets == seed else ["--subset-seed", str(subsets)])]
    chain = Chain(folder, common, ["--limit-images", str(d.limit_images)] + (["--val-data", d.val_data] if d.val_data else []))
    pre, timing = folder / "pretrain", folder / "pretrain.json"
    if "pretrain_s" in result and not timing.is_file():  # a result written before pretrain.json existed
        write_json(timing, {k: result.get(k) for k in ("pretrain_s", "pretrain_steps")})
    pretrain_images = d.limit_images if d.pretrain_images is None else d.pretrain_images
    seconds = chain.run("pretrain", ["pretrain", "--config", r.preset, *size_flags(cfg), *common,
                                     "--limit-images", str(pretrain_images),
                                     *length_flags(r.budget, r.pretrain_epochs), "--out", str(pre),
                                     *([] if is_seed_sweep(cfg.sweep.setting) else setting_flags(cfg.sweep.setting, value))],
                        timing.is_file())
    if seconds is not None:
        write_json(timing, {"pretrain_s": seconds,
                            "pretrain_steps": steps_taken(pre)})
    result = {**result, "value": value, "seed": seed, "subset_seed": subsets, **json.loads(timing.read_text())}
    if result.get("pretrain_steps") is None:  # timed before steps were read from the log (a run sized by epochs)
        result["pretrain_steps"] = steps_taken(pre)
    if "knn" in cfg.sweep.evaluate:
        result["knn_top1"] = chain.knn(str(pre), "knn")["knn_top1"]
    if "linprobe" in cfg.sweep.evaluate:
        result["linprobe_top1"] = chain.linprobe(str(pre), r.probe_epochs, probe_name(cfg),
                                                 base_lr=r.probe_base_lr)["val_top1"]
        result["probe"] = probe_label(cfg)
    if "finetune" in cfg.sweep.evaluate:
        result["finetune_top1"] = chain.finetune(str(pre), ["--budget", r.finetune_budget])["val_top1"]
    write_json(done, result)
    return result


COLUMNS = (("knn_top1", "kNN top-1"), ("linprobe_top1", "linear probe top-1"), ("finetune_top1", "fine-tune top-1"))


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per value from its runs with several seeds: each accuracy's mean, with the seeds' values
    (``<key>_runs``) and standard deviation (``<key>_std``); time and steps averaged."""
    if len(runs) == 1:
        return runs[0]
    row: dict[str, Any] = {"value": runs[0]["value"], "seeds": [r["seed"] for r in runs],
                           "pretrain_s": statistics.mean(r["pretrain_s"] for r in runs)}
    steps = [r["pretrain_steps"] for r in runs if r.get("pretrain_steps")]
    if len(steps) == len(runs):
        row["pretrain_steps"] = round(statistics.mean(steps))
    for key, _ in COLUMNS:
        if all(key in r for r in runs):
            scores = [r[key] for r in runs]
            row.update({key: statistics.mean(scores), f"{key}_runs": scores, f"{key}_std": statistics.stdev(scores)})
    return row


def cell(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "–"
    return f"{row[key]:.2f} ± {row[key + '_std']:.2f}" if key + "_std" in row else f"{row[key]:.2f}"


def table(setting: str, rows: list[dict[str, Any]]) -> str:
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    seeds = max(len(r.get("seeds", [0])) for r in rows) if rows else 1
    lines = ([f"Mean ± standard deviation over {seeds} seeds; time and steps are the seeds' mean.", ""] if seeds > 1 else [])
    lines += [f"| {setting} | " + " | ".join(t for _, t in cols) + " | pre-training time | steps |",
              "|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [cell(r, k) for k, _ in cols]
        lines.append(f"| {r['value']} | " + " | ".join(cells) + f" | {r['pretrain_s'] / 60:.1f} min | "
                     f"{r.get('pretrain_steps') or '–'} |")
    return "\n".join(lines) + "\n"


def plot(setting: str, rows: list[dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(8, 3.2))
    acc, tim = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = list(range(len(rows)))
    for key, title in COLUMNS:
        if any(key in r for r in rows):
            acc.errorbar(x, [r.get(key, float("nan")) for r in rows], yerr=[r.get(key + "_std", 0.0) for r in rows],
                         marker="o", capsize=3, label=title)
    acc.set_ylabel("top-1 (%)")
    acc.legend(fontsize=8)
    tim.bar(x, [r["pretrain_s"] / 60 for r in rows])
    tim.set_ylabel("pre-training (min)")
    for ax in (acc, tim):
        ax.set_xticks(x, [r["value"] for r in rows])
        ax.set_xlabel(setting)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def plot_losses(cfg: AblateConfig, folders: dict[str, Path], out: Path, setting: str) -> Path:
    """Every run's loss curve (``folders``: value -> its first seed's run): one panel per kind of run
    (pre-training, probe, fine-tune), a line per value."""
    runs = (("pretrain", "pre-training"), (probe_name(cfg), "linear probe"), ("finetune", "fine-tune"))
    panels = {title: {value: folder / name / "metrics.jsonl" for value, folder in folders.items()}
              for name, title in runs}
    return plot_loss_overlay(panels, out / "losses.png", title=f"{setting} sweep: training loss of every run")


def run(cfg: AblateConfig) -> list[dict[str, Any]]:
    validate(cfg)
    out = Path(cfg.run.out).expanduser()
    setting = flag_name(cfg.sweep.setting)
    rows, seeds = [], seeds_of(cfg)
    folder = {value: value_folder(out, setting, value) for value in cfg.sweep.values}
    for value in cfg.sweep.values:
        runs = []
        for seed, where in runs_of(cfg, value, folder[value]):
            print(f"ablate: {setting} = {value}" + (f", seed {seed}" if len(seeds) > 1 else ""), file=sys.stderr, flush=True)
            runs.append(run_value(cfg, value, where, seed))
        rows.append(combine(runs))
    if is_seed_sweep(setting):
        seeds = [int(v) for v in cfg.sweep.values]
    summary = {"setting": setting, "budget": cfg.run.budget, "data": cfg.data.data, "val_data": cfg.data.val_data,
               "img_size": trained_size(cfg, folder),
               "rows": rows,
               "preset": cfg.run.preset, "seed": seeds[0], "seeds": seeds, "precision": cfg.run.precision, "machine": machine(),
               "code": chains_code({str(where.relative_to(out)): where for value in cfg.sweep.values
                                    for _, where in runs_of(cfg, value, folder[value])}),
               "evaluated_images": cfg.data.limit_images, "pretrain_images": cfg.data.pretrain_images,
               "subset_seed": cfg.data.subset_seed,
               "probe": probe_label(cfg) if "linprobe" in cfg.sweep.evaluate else None,
               "command": invoked(NAME)}
    write_json(out / "results.json", summary)
    size = summary["img_size"]
    scored = (f"Evaluated on {cfg.data.val_data} (validation), {cfg.data.data} (training / kNN bank)"
              + (f"; input {size[0]}x{size[1]} px" if size else "") + ".\n\n")
    atomic_write_bytes(out / "results.md", (scored + table(setting, rows)).encode())
    plot(setting, rows, out / "ablation.png")
    plot_losses(cfg, {v: runs_of(cfg, v, f)[0][1] for v, f in folder.items()}, out, setting)
    print(scored + table(setting, rows) + f"ablate: wrote {out / 'results.md'}, {out / 'ablation.png'} and "
          f"{out / 'losses.png'}", flush=True)
    return rows
