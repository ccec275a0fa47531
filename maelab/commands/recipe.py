"""`maelab recipe`: the paper's whole protocol in one command, each part to a wall-clock budget.

pre-train (MAE) -> kNN of the MAE encoder and of a random-init encoder -> linear probe -> fine-tune from
the MAE encoder and, with the same fine-tune budget, from scratch -> reconstructions of validation
images at mask ratios 0.75 / 0.85 / 0.95 (paper Fig. 4) and the loss curves of every run. The recipes
are presets (``--config recipe_quick``: about 30 minutes on 2 CPU cores; ``recipe_full``: the public
small-scale recipe, for a GPU). Every step is its own `maelab` process in a sub-folder of ``--out``;
running the same command again skips what is finished and resumes what is not. ``results.json`` and
``results.md`` say what each step reached and whether the two signals hold: the MAE encoder's kNN beats
the random encoder's, and the MAE fine-tune beats the from-scratch one at equal fine-tune time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from maelab.commands.options import finetune as finetune_options, linprobe as linprobe_options
from maelab.commands.options.recipe import NAME, RecipeConfig
from maelab.commands.options.pretrain import PretrainConfig
from maelab.commands.steps import (Chain, check_buildable, check_chain_data, check_chain_splits, check_split_paths,
                                   invoked, length_flags, machine, no_budget, recorded_optim, refuse_torchrun,
                                   steps_taken)
from maelab.config import build_config, load_yaml, resolve_preset
from maelab.data.folders import scan_images, spread_sample
from maelab.data.shards import is_shard_source
from maelab.errors import MaelabError
from maelab.io import atomic_write_bytes, refuse_out_inside, write_json
from maelab.train.budget import parse_duration
from maelab.viz import PICTURE_IMAGES, plot_curves


def validate(cfg: RecipeConfig) -> Path:
    """The validation split; every budget, number and split checked before anything runs."""
    refuse_torchrun(NAME)
    if not cfg.data.data:
        raise MaelabError("--data is required: an ImageFolder tree with a class per sub-folder (or labelled shards)")
    check_split_paths(cfg.data.data, cfg.data.val_data)
    refuse_out_inside(cfg.run.out, cfg.data.data, cfg.data.val_data)
    check_chain_data(cfg.data)
    for name in ("pretrain_budget", "finetune_budget"):
        if not no_budget(getattr(cfg.steps, name)):
            parse_duration(getattr(cfg.steps, name), "--" + name.replace("_", "-"))
    if cfg.steps.probe_epochs < 1:
        raise MaelabError(f"--probe-epochs must be at least 1, got {cfg.steps.probe_epochs}")
    if cfg.steps.probe_base_lr is not None and not cfg.steps.probe_base_lr > 0:
        raise MaelabError(f"--probe-base-lr must be positive, got {cfg.steps.probe_base_lr}")
    if not cfg.steps.mask_ratios or not all(0 < r < 1 for r in cfg.steps.mask_ratios):
        raise MaelabError(f"--mask-ratios must be in (0, 1), got {cfg.steps.mask_ratios}")
    check_presets(cfg)
    return check_chain_splits(cfg.data.data, cfg.data.val_data, 0, cfg.data.batch_size)


def check_presets(cfg: RecipeConfig) -> None:
    """Refuse now what a step would refuse at its start: a misspelt or unreadable preset, and what `maelab
    pretrain` refuses in its preset with the flags the recipe passes it (--img-size, --batch-size). A
    refused later step would have cost the steps before it their budgets."""
    st = cfg.steps
    size = {"img_size": [st.img_size]} if st.img_size else {}
    passed = {"data": cfg.data.data, "batch_size": cfg.data.batch_size, **size}
    try:
        check_buildable(build_config(PretrainConfig, passed, st.pretrain_preset))
    except MaelabError as e:
        raise MaelabError(f"--pretrain-preset {st.pretrain_preset}"
                          + (f" --img-size {st.img_size}" if st.img_size else "") + f": {e}") from None
    for flag, preset, command in (("--probe-preset", st.probe_preset, linprobe_options),
                                  ("--finetune-preset", st.finetune_preset, finetune_options)):
        try:
            path = resolve_preset(preset)
        except MaelabError as e:
            raise MaelabError(f"{flag} {preset}: {e}") from None
        try:  # another command's preset (a pretrain preset given as the probe's) fails here, not hours later
            build_config(command.Config, yaml_path=str(path))
        except MaelabError as e:
            raise MaelabError(f"{flag} {preset}: not a `maelab {command.NAME}` preset ({e})") from None


def run(cfg: RecipeConfig) -> dict[str, Any]:
    val = validate(cfg)
    out = Path(cfg.run.out).expanduser()
    d, st, r = cfg.data, cfg.steps, cfg.run
    common = ["--device", r.device, "--precision", r.precision, "--seed", str(r.seed), "--data", d.data,
              "--batch-size", str(d.batch_size)]
    chain = Chain(out, common, ["--limit-images", str(d.limit_images), "--val-data", str(val)])
    say = lambda msg: print(f"recipe: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    clock = StepClock(out / "minutes.json", chain)
    pre = out / "pretrain"
    say(f"pre-training ({st.pretrain_preset}, budget {st.pretrain_budget})")
    size = ["--img-size", str(st.img_size)] if st.img_size else []
    clock.run("pretrain", lambda: chain.run("pretrain", ["pretrain", "--config", st.pretrain_preset, *common, *size,
                                                         *length_flags(st.pretrain_budget, st.pretrain_epochs),
                                                         "--out", str(pre)], "pretrain" in clock.done))
    recorded = load_yaml(pre / "config.yaml").get("model") or {}
    if not recorded.get("model") or not recorded.get("img_size"):
        raise MaelabError(f"{pre / 'config.yaml'} names no model preset and size; the random-init baselines need them")
    random = ["--model", recorded["model"], "--img-size", *map(str, recorded["img_size"])]  # the MAE's own shape
    say("kNN of the MAE encoder and of a random-init encoder")
    knn_mae = clock.run("knn_mae", lambda: chain.knn(str(pre), "knn_mae"))
    knn_random = clock.run("knn_random", lambda: chain.knn("none", "knn_random", random))
    say(f"linear probe ({st.probe_epochs} epochs on cached features)")
    probe = clock.run("linprobe", lambda: chain.linprobe(str(pre), st.probe_epochs, preset=st.probe_preset,
                                                         base_lr=st.probe_base_lr))
    say(f"fine-tune from the MAE encoder and from scratch, {st.finetune_budget} each")
    ft_length = length_flags(st.finetune_budget, st.finetune_epochs)
    ft_mae = clock.run("finetune_mae", lambda: chain.finetune(str(pre), ft_length, "finetune_mae", st.finetune_preset))
    ft_scratch = clock.run("finetune_scratch", lambda: chain.finetune("none", ft_length, "finetune_scratch",
                                                                      st.finetune_preset, random))
    pictures = out / "reconstruction.png"
    # shards: visualize draws its own spread sample of them, titled by the files the samples came from
    images = [str(val)] if is_shard_source(str(val)) else spread_sample(scan_images(val), PICTURE_IMAGES)
    chain.run("visualize", ["visualize", "--checkpoint", str(pre), "--images", *images, "--mask-ratio",
                            *map(str, st.mask_ratios), "--device", r.device, "--out", str(pictures)], pictures.is_file())
    curves = {name: str(plot_curves(out / name / "metrics.jsonl", out / "curves" / f"{name}.png"))
              for name in ("pretrain", "linprobe", "finetune_mae", "finetune_scratch")
              if (out / name / "metrics.jsonl").is_file()}
    probe_optim = recorded_optim(out / "linprobe")
    results = {
        "recipe": cfg.run.out, "data": d.data, "val_data": str(val), "seed": r.seed, "machine": machine(),
        "code": chain.code(), "precision": r.precision,
        "budgets": {"pretrain": st.pretrain_budget, "finetune": st.finetune_budget},
        "knn_mae_top1": knn_mae["knn_top1"], "knn_random_top1": knn_random["knn_top1"],
        "linprobe_top1": probe["val_top1"], "finetune_mae_top1": ft_mae["val_top1"],
        "finetune_scratch_top1": ft_scratch["val_top1"],
        "minutes": clock.minutes,
        # read back from the runs' own configs and outputs: what ran, not what was asked
        "pretrain_steps": steps_taken(pre),
        "finetune_steps": {"mae": steps_taken(out / "finetune_mae"),
                           "scratch": steps_taken(out / "finetune_scratch")},
        "probe": {k: probe_optim.get(k) for k in ("epochs", "base_lr")},
        "evaluated_images": {"train": knn_mae.get("train_images"), "val": knn_mae.get("val_images")},
        "pictures": str(pictures), "curves": curves, "command": invoked(NAME),
    }
    results["signals"] = {"knn_mae_beats_random": results["knn_mae_top1"] > results["knn_random_top1"],
                          "finetune_mae_beats_scratch": results["finetune_mae_top1"] > results["finetune_scratch_top1"]}
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", table(results).encode())
    print(table(results) + f"recipe: wrote {out / 'results.md'}", flush=True)
    return results


class StepClock:
    """Runs each named step once (a finished step is skipped when the recipe runs again) and keeps the
    wall-clock minutes in ``minutes.json``, those of its interrupted attempts included (``Chain``): null
    (shown as "–") for a step found finished by another process (the orphan of a killed recipe), whose time
    this one did not see."""

    def __init__(self, path: Path, chain: Chain):
        self.path, self.chain = path, chain
        self.minutes: dict[str, float | None] = json.loads(path.read_text()) if path.is_file() else {}
        self.done: set[str] = set(self.minutes)

    def run(self, name: str, step):
        """``step()``'s result; its minutes are recorded the first time it finishes (a step that is done
        and runs again only reads its result files)."""
        t0 = time.perf_counter()
        result = step()
        if name not in self.done:
            seconds = time.perf_counter() - t0 + self.chain.carried.get(name, 0.0)
            self.minutes[name] = round(seconds / 60, 2) if name in self.chain.ran else None
            self.done.add(name)
            write_json(self.path, self.minutes)
        return result


def table(res: dict[str, Any]) -> str:
    m = {k: res["minutes"].get(k) for k in ("pretrain", "knn_mae", "knn_random", "linprobe", "finetune_mae",
                                            "finetune_scratch")}
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [("pre-training (MAE)", None, m["pretrain"]),
            ("kNN (k=20, T=0.07), MAE encoder", res["knn_mae_top1"], m["knn_mae"]),
            ("kNN, random-init encoder", res["knn_random_top1"], m["knn_random"]),
            ("linear probe, MAE encoder", res["linprobe_top1"], m["linprobe"]),
            ("fine-tune from the MAE encoder", res["finetune_mae_top1"], m["finetune_mae"]),
            ("fine-tune from scratch (same budget)", res["finetune_scratch_top1"], m["finetune_scratch"])]
    lines = ["| step | top-1 (%) | minutes |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(acc)} | {fmt(mins)} |" for name, acc, mins in rows]
    s = res["signals"]
    lines += ["", f"MAE kNN beats random init: {'yes' if s['knn_mae_beats_random'] else 'NO'}; "
                  f"MAE fine-tune beats from scratch: {'yes' if s['finetune_mae_beats_scratch'] else 'NO'}."]
    if bought := steps_bought(res):
        lines += ["", bought]
    return "\n".join(lines) + "\n"


def steps_bought(res: dict[str, Any]) -> str:
    """What the budgets bought on this machine, in optimiser steps: a fine-tune comparison over a handful
    of steps (a slow machine's 5 minutes) says nothing about the encoders, and this is where it shows."""
    ft = res.get("finetune_steps") or {}
    parts = [f"pre-training {res['pretrain_steps']}"] if res.get("pretrain_steps") else []
    if ft.get("mae") and ft.get("scratch"):
        parts.append(f"fine-tune {ft['mae']} from the MAE encoder, {ft['scratch']} from scratch")
    return f"Steps the budgets bought: {'; '.join(parts)}." if parts else ""
