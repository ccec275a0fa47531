"""`maelab ablate`: sweep one pre-training setting and measure what each value gives.

For every value: `maelab pretrain` with that setting (to a wall-clock ``--budget``), then the chosen
evaluations of its encoder -- weighted kNN, a linear probe on cached features, a fine-tune (to
``--finetune-budget``) -- each as its own `maelab` process in a sub-folder of ``--out``. The sweep
writes ``results.json``, a Markdown table ``results.md`` and ``ablation.png`` (accuracy and
pre-training time per value). Running the same command again skips what is finished and resumes
what is not.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from maelab.commands.sections import ProcessConfig
from maelab.commands.steps import Chain, ChainDataConfig, length_flags, machine, maelab, no_budget
from maelab.config import command_config, load_yaml, option, redefault
from maelab.errors import MaelabError
from maelab.io import atomic_write_bytes, write_json
from maelab.train.budget import parse_duration
from maelab.viz import save_figure_atomic

NAME = "ablate"
HELP = "sweep one pre-training setting: pre-train per value, then kNN / linear probe / fine-tune, table + plot"
DESCRIPTION = ("Ablation of one setting, e.g. --setting mask-ratio --values 0.25 0.5 0.75 0.9 (paper Table 1). "
               "Every value is pre-trained to --budget, then evaluated.")
EVALUATIONS = ("knn", "linprobe", "finetune")


@dataclass
class SweepConfig:
    setting: str = option("", "the `maelab pretrain` flag to vary, without dashes: mask-ratio, decoder-depth, "
                              "decoder-embed-dim, mask-type, norm-pix-loss, min-crop-scale, ...")
    values: list[str] = option([], "the values to try (for on/off flags: true false)")
    evaluate: list[str] = option(["knn", "linprobe"], "evaluations of every encoder: knn, linprobe, finetune",
                                 choices=EVALUATIONS)


@dataclass
class SweepDataConfig(ChainDataConfig):
    limit_images: int = option(0, "a fixed seeded subset of N images of each split, pre-training too (0 = all)")
    pretrain_images: int | None = option(None, "images of the pre-training subset when it should differ from "
                                               "--limit-images (0 = all): pre-train on everything, evaluate on a subset")
    batch_size: int = redefault(ChainDataConfig, "batch_size", 128)


@dataclass
class SweepRunConfig(ProcessConfig):
    precision: str = redefault(ProcessConfig, "precision", "fast")  # a budget buys more steps in bf16
    out: str = option("runs/ablate", "sweep folder: one sub-folder per value, results.json / .md, ablation.png")
    preset: str = option("pretrain_cifar10_tiny", "`maelab pretrain` preset every value starts from")
    budget: str = option("5m", "wall-clock budget of each pre-training (none: --pretrain-epochs, else the preset's)")
    pretrain_epochs: int | None = option(None, "pre-training epochs when --budget is none")
    finetune_budget: str = option("5m", "wall-clock budget of each fine-tune (with --evaluate finetune)")
    probe_epochs: int = option(20, "linear-probe epochs (on cached features)")
    seed: int = option(0, "seed of every run")


AblateConfig = Config = command_config("AblateConfig", __name__, sweep=SweepConfig, data=SweepDataConfig,
                                       run=SweepRunConfig)


def validate(cfg: AblateConfig) -> None:
    sw = cfg.sweep
    if not sw.setting or not sw.values:
        raise MaelabError("--setting and --values are required, e.g. --setting mask-ratio --values 0.5 0.75")
    if len(set(sw.values)) != len(sw.values):
        raise MaelabError(f"--values repeats a value: {sw.values}")
    if not cfg.data.data:
        raise MaelabError("--data is required: an ImageFolder tree")
    parse_duration(cfg.run.finetune_budget)
    if not no_budget(cfg.run.budget):
        parse_duration(cfg.run.budget)
    for name, n in (("--limit-images", cfg.data.limit_images), ("--pretrain-images", cfg.data.pretrain_images)):
        if n is not None and n < 0:
            raise MaelabError(f"{name} must be 0 (all images) or a positive count, got {n}")
    if cfg.run.probe_epochs < 1:
        raise MaelabError(f"--probe-epochs must be at least 1, got {cfg.run.probe_epochs}")


def setting_flags(setting: str, value: str) -> list[str]:
    """``--name value``; on/off settings (``true`` / ``false``) become ``--name`` / ``--no-name``."""
    flag = setting.strip("-").replace("_", "-")
    if value.lower() in ("true", "on", "yes"):
        return [f"--{flag}"]
    if value.lower() in ("false", "off", "no"):
        return [f"--no-{flag}"]
    return [f"--{flag}", value]


def run_value(cfg: AblateConfig, value: str, folder: Path) -> dict[str, Any]:
    """Pre-train and evaluate one value (finished parts are skipped, unfinished ones resume)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    d, r = cfg.data, cfg.run
    common = ["--device", r.device, "--precision", r.precision, "--seed", str(r.seed), "--data", d.data,
              "--batch-size", str(d.batch_size)]
    chain = Chain(folder, common, ["--limit-images", str(d.limit_images)] + (["--val-data", d.val_data] if d.val_data else []))
    pre = folder / "pretrain"
    result: dict[str, Any] = {"value": value}
    length = length_flags(r.budget, r.pretrain_epochs)
    pretrain_images = d.limit_images if d.pretrain_images is None else d.pretrain_images
    result["pretrain_s"] = maelab(["pretrain", "--config", r.preset, *common, "--limit-images", str(pretrain_images),
                                   *length, "--out", str(pre),
                                   *setting_flags(cfg.sweep.setting, value)], chain.log)
    result["pretrain_steps"] = (load_yaml(pre / "config.yaml").get("optim") or {}).get("max_steps")
    if "knn" in cfg.sweep.evaluate:
        result["knn_top1"] = chain.knn(str(pre), "knn")["knn_top1"]
    if "linprobe" in cfg.sweep.evaluate:
        result["linprobe_top1"] = chain.linprobe(str(pre), r.probe_epochs)["val_top1"]
    if "finetune" in cfg.sweep.evaluate:
        result["finetune_top1"] = chain.finetune(str(pre), ["--budget", r.finetune_budget])["val_top1"]
    write_json(done, result)
    return result


COLUMNS = (("knn_top1", "kNN top-1"), ("linprobe_top1", "linear probe top-1"), ("finetune_top1", "fine-tune top-1"))


def table(setting: str, rows: list[dict[str, Any]]) -> str:
    cols = [(k, t) for k, t in COLUMNS if any(k in r for r in rows)]
    lines = [f"| {setting} | " + " | ".join(t for _, t in cols) + " | pre-training time | steps |",
             "|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "–" for k, _ in cols]
        lines.append(f"| {r['value']} | " + " | ".join(cells) + f" | {r['pretrain_s'] / 60:.1f} min | "
                     f"{r.get('pretrain_steps') or '–'} |")
    return "\n".join(lines) + "\n"


def plot(setting: str, rows: list[dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(8, 3.2))
    acc, tim = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = list(range(len(rows)))
    for key, title in COLUMNS:
        if any(key in r for r in rows):
            acc.plot(x, [r.get(key, float("nan")) for r in rows], marker="o", label=title)
    acc.set_ylabel("top-1 (%)")
    acc.legend(fontsize=8)
    tim.bar(x, [r["pretrain_s"] / 60 for r in rows])
    tim.set_ylabel("pre-training (min)")
    for ax in (acc, tim):
        ax.set_xticks(x, [r["value"] for r in rows])
        ax.set_xlabel(setting)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def run(cfg: AblateConfig) -> list[dict[str, Any]]:
    validate(cfg)
    out = Path(cfg.run.out).expanduser()
    setting = cfg.sweep.setting.strip("-").replace("_", "-")
    rows = []
    for value in cfg.sweep.values:
        print(f"ablate: {setting} = {value}", file=sys.stderr, flush=True)
        rows.append(run_value(cfg, value, out / f"{setting}={value}"))
    summary = {"setting": setting, "budget": cfg.run.budget, "data": cfg.data.data, "rows": rows,
               "preset": cfg.run.preset, "seed": cfg.run.seed, "precision": cfg.run.precision, "machine": machine(),
               "evaluated_images": cfg.data.limit_images, "pretrain_images": cfg.data.pretrain_images,
               "command": " ".join(["maelab", "ablate", *sys.argv[2:]]) if sys.argv[1:2] == ["ablate"] else None}
    write_json(out / "results.json", summary)
    atomic_write_bytes(out / "results.md", table(setting, rows).encode())
    plot(setting, rows, out / "ablation.png")
    print(table(setting, rows) + f"ablate: wrote {out / 'results.md'} and {out / 'ablation.png'}", flush=True)
    return rows
