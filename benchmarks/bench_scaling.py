"""Throughput of `maelab pretrain` in 1 process and in 2 torchrun processes (DDP, gloo on CPU / NCCL on
GPUs) with the same global batch: img/s from the run's own metrics.jsonl, and the epoch losses, which
must agree (the same images, crops and masks at every step).

    python benchmarks/bench_scaling.py                       # 2048 CIFAR-10 images, global batch 64, 1 epoch
    python benchmarks/bench_scaling.py --device cuda --model mae_vit_base_patch16 --data /imagenet/train
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common import REPO, at_least, cli, maelab_run, md_table, publish, stamp, torchrun  # noqa: E402


def run(nproc: int, args, out: Path) -> dict:
    flags = ["pretrain", "--data", args.data, "--limit-images", str(args.images), "--model", args.model,
             "--batch-size", str(args.global_batch // nproc), "--epochs", str(args.epochs), "--warmup-epochs", "0",
             "--log-every", str(args.log_every), "--vis-every", "0", "--num-workers", "0", "--device", args.device,
             "--out", str(out)]
    maelab_run(torchrun(nproc), flags, args.threads)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]  # the first interval includes warm-up
    return {"img_s": statistics.median(steps), "losses": [r["epoch_loss"] for r in rows if "epoch_loss" in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "train"))
    ap.add_argument("--images", type=at_least(1), default=2048)
    ap.add_argument("--model", default="mae_vit_tiny_patch4")
    ap.add_argument("--global-batch", type=at_least(1), default=64)
    ap.add_argument("--epochs", type=at_least(1), default=1)
    ap.add_argument("--log-every", type=at_least(1), default=4)
    ap.add_argument("--threads", type=at_least(1), default=1, help="OMP threads per process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.global_batch % 2:  # the 2-process run splits it in halves
        ap.error(f"--global-batch must be even (two processes take half each), got {args.global_batch}")
    steps = args.images // args.global_batch * args.epochs
    if steps // args.log_every < 2:  # the first interval is left out: one would leave no measurement
        ap.error(f"{steps} steps give {steps // args.log_every} log interval(s) of {args.log_every} steps, and the "
                 f"first is left out: raise --images or --epochs, or lower --log-every")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, args, Path(tmp) / f"p{n}") for n in (1, 2)}
    one, two = results[1], results[2]
    rows = [[f"{n} process{'es' if n > 1 else ''}", f"{args.global_batch // n} x {n}", f"{r['img_s']:.0f}",
             f"{r['img_s'] / one['img_s']:.2f}x", f"{r['img_s'] / one['img_s'] / n:.0%}",
             " / ".join(f"{x:.4f}" for x in r["losses"])] for n, r in results.items()]
    body = (
        "## Scaling: 1 -> 2 processes, same global batch\n\n" + stamp(torch.device(args.device))
        + f"\n`maelab pretrain`, {args.model}, {args.images} CIFAR-10 images, global batch {args.global_batch}, "
        f"{args.epochs} epoch(s), {args.threads} thread(s) per process, on {args.device} (gloo between CPU "
        f"processes); img/s = median over the run's log intervals of {args.log_every} steps (first one left "
        f"out), from its metrics.jsonl.\n\n"
        + md_table(["run", "batch per process x processes", "img/s", "speed-up", "efficiency", "epoch loss"], rows)
        + f"\n\nThe epoch losses agree to {max(abs(a - b) for a, b in zip(one['losses'], two['losses'])):.1e} "
        f"(tested in tests/test_training.py and tests/test_multinode.py). With 2 CPU cores shared with other "
        f"work, 2 processes cannot reach 2x; on GPUs each process has its own device.\n"
    )
    publish("bench_scaling", body, not args.no_write)


if __name__ == "__main__":
    cli(main)
