"""Encoder quality per wall-clock minute: maelab against what a user has today.

    python benchmarks/quality_per_minute.py --data ../shared/datasets/cifar10/train \
        --val-data ../shared/datasets/cifar10/test --budget 30m --out runs/quality_per_minute

Two arms on the same machine, one after the other, each with the same wall-clock pre-training budget:

* **maelab**: ``maelab pretrain --config pretrain_cifar10_tiny --budget B --precision fast`` (its tuned
  quick recipe; bf16 autocast where the CPU has native bf16), keeping every epoch's checkpoint and the timed
  ones it writes inside epochs (``--save-every-minutes``, B / points / 2 by default): each is hard-linked
  into ``maelab_snapshots/`` as it appears, since the next save replaces it;
* **the alternative**: Hugging Face ``ViTMAEForPreTraining`` (numerically the official model) of the same
  size, fed by a per-sample torchvision pipeline (``ImageFolder`` + ``RandomResizedCrop(32, scale 0.2-1,
  bicubic)`` + flip + normalise, ``DataLoader`` with one worker per core), trained with the paper's recipe
  scaled to the budget (AdamW 0.9/0.95, wd 0.05, lr 1.5e-4 x batch / 256, 5 % warm-up + cosine, the step
  count set from the measured step time), saved with ``save_pretrained`` every B / points; fp32 as HF runs
  on a CPU out of the box (``--hf-precision bf16`` gives it the same autocast).

The alternative's snapshots are scored, and for each of them maelab's latest snapshot taken no later (so
every comparison is at equal or less time for maelab), and maelab's last. Each is scored by the same
`maelab knn --precision fast` (k = 20, T = 0.07, cls token and mean-pool) on a fixed subset of both splits
(``--eval-images``); scoring time is not part of the budget. Writes ``results.json`` (with the steps each arm took),
``curve.png`` (kNN top-1 against minutes of pre-training) and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.peers import SIZES, hf_model  # noqa: E402
from maelab.commands.steps import child_command, recorded_optim, run_child, stop_child  # noqa: E402
from maelab.errors import MaelabError  # noqa: E402
from maelab.train import checkpoint as ckpt  # noqa: E402
from maelab.train.budget import latest_by, parse_duration  # noqa: E402
from maelab.train.precision import autocast  # noqa: E402

POOLS = ("token", "avg")
hf_schedule: dict = {}  # the alternative's planned and finished steps, for results.json


def maelab_cli(args: list[str], log: Path) -> None:
    code = run_child(args, log)
    if code:
        raise SystemExit(f"`maelab {args[0]}` failed (exit {code}); see {log}")


def harvest(run: Path, into: Path) -> None:
    """Hard-link every complete checkpoint of ``run`` that ``into`` lacks: a timed checkpoint is removed by
    the next save, and the link keeps its files (same inode, so the same modification time)."""
    for folder in ckpt.list_checkpoints(run):
        dest, part = into / folder.name, into / f".{folder.name}"
        if dest.exists():
            continue
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        try:
            for f in folder.iterdir():
                os.link(f, part / f.name)
        except FileNotFoundError:  # removed while being linked (the next save came first): not a snapshot
            shutil.rmtree(part, ignore_errors=True)
            continue
        part.rename(dest)


def run_maelab(args, out: Path) -> tuple[list[float], list[Path]]:
    """(minutes since the run started, snapshot) for every checkpoint of a budgeted maelab pre-training."""
    run, snaps = out / "maelab", out / "maelab_snapshots"
    if not args.rescore:  # the arm's clock starts at launch: start-up and the budget's calibration count
        (out / "maelab_started.json").write_text(json.dumps({"unix_time": time.time()}))
        every = args.snapshot_minutes or parse_duration(args.budget) / 60 / args.points / 2
        argv, env = child_command(["pretrain", "--config", "pretrain_cifar10_tiny", "--data", args.data, "--budget",
                                   args.budget, "--precision", "fast", "--batch-size", str(args.batch_size),
                                   "--save-every", "1", "--keep", "0", "--save-every-minutes", f"{every:g}",
                                   "--vis-every", "0", "--seed", str(args.seed), "--out", str(run)])
        with open(out / "log.txt", "a") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    harvest(run, snaps)
                    time.sleep(1.0)
            except BaseException:  # Ctrl-C or SIGTERM: the run saves and stops with the benchmark, not later
                stop_child(proc)
                raise
        harvest(run, snaps)
        if proc.returncode:
            raise SystemExit(f"`maelab pretrain` failed (exit {proc.returncode}); see {out / 'log.txt'}")
    # not config.yaml's time: the budget planner rewrites it with the final step count at the end
    start = json.loads((out / "maelab_started.json").read_text())["unix_time"]
    found = snaps if snaps.is_dir() else run / "checkpoints"  # runs before snapshots were kept: epochs only
    kept = sorted((p for p in found.iterdir() if not p.name.startswith(".") and (p / ckpt.WEIGHTS).is_file()),
                  key=lambda p: (p / ckpt.WEIGHTS).stat().st_mtime)
    return [((p / ckpt.WEIGHTS).stat().st_mtime - start) / 60 for p in kept], kept


def run_hf(args, out: Path) -> tuple[list[float], list[Path]]:
    """The alternative: HF ViTMAE + torchvision DataLoader + the paper's recipe scaled to the budget."""
    record = out / "hf" / "snapshots.json"
    if args.rescore:
        kept = json.loads(record.read_text())
        hf_schedule.update(kept["schedule"])
        return kept["minutes"], [out / "hf" / name for name in kept["folders"]]
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(args.seed)
    size = SIZES["tiny"]
    model = hf_model(size).train()
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size.img, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = datasets.ImageFolder(args.data, transform=tf)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=max(1, torch.get_num_threads()), persistent_workers=True)
    lr = 1.5e-4 * args.batch_size / 256
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    budget = parse_duration(args.budget)
    snapshots = [budget * (i + 1) / args.points for i in range(args.points)]
    t0, step, total, times, paths = time.perf_counter(), 0, None, [], []
    calibration = []
    while snapshots:
        for imgs, _ in loader:
            now = time.perf_counter() - t0
            calibration.append(now)
            if total is None and step == 12:  # the paper's schedule, sized to the steps the budget holds:
                per_step = statistics.median(b - a for a, b in zip(calibration[2:], calibration[3:]))
                total = max(10, int((budget - now) / per_step) + step)  # median after 2 warm-ups, as maelab plans
            if total is None:  # while measuring: ramp up no faster than any warm-up of 100+ steps
                scale = step / 100
            else:
                warm = max(1, int(0.05 * total))
                scale = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            for g in opt.param_groups:
                g["lr"] = lr * min(scale, 1.0)
            with autocast(torch.device("cpu"), args.hf_precision):
                loss = model(pixel_values=imgs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            now = time.perf_counter() - t0
            while snapshots and now >= snapshots[0]:
                folder = out / "hf" / f"snapshot_{len(paths) + 1:02d}"
                model.save_pretrained(folder)
                times.append(now / 60)
                paths.append(folder)
                snapshots.pop(0)
            if not snapshots:
                break
    hf_schedule.update(planned_steps=total, steps_done=step)
    record.write_text(json.dumps({"minutes": times, "folders": [p.name for p in paths], "schedule": hf_schedule}))
    return times, paths


def knn(init: Path, pool: str, args, out: Path) -> float:
    res = out / "knn" / f"{init.parent.name}_{init.name}_{pool}.json"
    if not res.is_file():
        res.parent.mkdir(parents=True, exist_ok=True)
        maelab_cli(["knn", "--init", str(init), "--data", args.data, "--val-data", args.val_data, "--global-pool",
                    pool, "--limit-images", str(args.eval_images), "--precision", "fast", "--out", str(res)],
                   out / "log.txt")
    return json.loads(res.read_text())["knn_top1"]


def maelab_steps(out: Path) -> int | None:
    """The steps maelab's budget planner settled on, or a one-line stop when its config.yaml is damaged."""
    try:
        return recorded_optim(out / "maelab").get("max_steps")
    except MaelabError as e:
        raise SystemExit(f"quality_per_minute: {e}; re-run without --rescore") from None


def pick(times: list[float], paths: list[Path], points: int) -> list[tuple[float, Path]]:
    """About ``points`` snapshots spread over the run, the last one always."""
    if len(paths) <= points:
        return list(zip(times, paths))
    idx = sorted({round(i * (len(paths) - 1) / (points - 1)) for i in range(points)})
    return [(times[i], paths[i]) for i in idx]


def no_later_than(times: list[float], paths: list[Path], targets: list[float]) -> list[tuple[float, Path]]:
    """For each target minute, the latest snapshot taken at or before it (none for a target earlier than
    every snapshot), and the last snapshot: the points that compare at equal or less time."""
    idx = {latest_by(times, target) for target in targets} - {None}
    if paths:
        idx.add(len(paths) - 1)
    return [(times[i], paths[i]) for i in sorted(idx)]


def main() -> None:
    # SIGTERM ends the benchmark through SystemExit, so the maelab run it started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--val-data", required=True)
    ap.add_argument("--budget", default="30m")
    ap.add_argument("--points", type=common.at_least(1), default=5, help="the alternative's snapshots, evenly over the budget")
    ap.add_argument("--snapshot-minutes", type=float, default=0.0,
                    help="maelab's timed checkpoints inside epochs (default: budget / points / 2)")
    ap.add_argument("--batch-size", type=common.at_least(1), default=256)
    ap.add_argument("--eval-images", type=common.at_least(1), default=5000, help="kNN on a fixed subset of N images of each split")
    ap.add_argument("--hf-precision", default="fp32", choices=("fp32", "bf16"),
                    help="the alternative's autocast (fp32: HF ViTMAE as it runs on a CPU out of the box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/quality_per_minute")
    ap.add_argument("--rescore", action="store_true",
                    help="train nothing: score and tabulate the snapshots a finished run in --out left (kNN results kept)")
    args = ap.parse_args()
    out = Path(args.out)
    missing = [p for p in (out / "maelab_started.json", out / "hf" / "snapshots.json") if not p.is_file()]
    if args.rescore and missing:
        raise SystemExit(f"--rescore: {', '.join(map(str, missing))} not found: re-score a run this script "
                         "finished (it records them), or run it without --rescore")
    out.mkdir(parents=True, exist_ok=True)
    ours, theirs = run_maelab(args, out), pick(*run_hf(args, out), args.points)
    arms = {"maelab": no_later_than(*ours, [t for t, _ in theirs]), "HF ViTMAE + torchvision": theirs}
    curves = {arm: [{"minutes": round(t, 2), **{pool: knn(p, pool, args, out) for pool in POOLS}} for t, p in snaps]
              for arm, snaps in arms.items()}
    results = {"budget": args.budget, "machine": common.machine_info(torch.device("cpu")), "load": common.load_note(),
               "command": common.command_line(),
               "batch_size": args.batch_size, "eval_images": args.eval_images, "hf_precision": args.hf_precision, "hf_schedule": hf_schedule,
               # the steps maelab's budget planner settled on (its config.yaml's max_steps: what ran)
               "maelab_steps": maelab_steps(out), "seed": args.seed, "curves": curves}
    if args.rescore and (out / "results.json").is_file():  # the run's own command, machine and load, not the re-scoring's
        ran = json.loads((out / "results.json").read_text())
        results.update({k: ran[k] for k in ("budget", "machine", "load", "command") if k in ran})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for arm, pts in curves.items():
        for pool, style in zip(POOLS, ("-", "--")):
            ax.plot([p["minutes"] for p in pts], [p[pool] for p in pts], style, marker="o", label=f"{arm} ({pool})")
    ax.set_xlabel("minutes of pre-training")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    lines = ["| arm | minutes | kNN top-1 (cls) | kNN top-1 (mean-pool) |", "|---|---|---|---|"]
    for arm, pts in curves.items():
        lines += [f"| {arm} | {p['minutes']:.1f} | {p['token']:.2f} | {p['avg']:.2f} |" for p in pts]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    common.cli(main)
