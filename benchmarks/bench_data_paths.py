"""Images per second the three data paths deliver to the training loop, no model: an image folder
(per-sample decode + crop in DataLoader workers), tar shards (the same per sample, streamed from
``maelab shards make`` output through a shuffle buffer) and the in-RAM path (decoded once, batched crop
on the tensor), for 0..N loader workers, at the 32 px CIFAR size and at ViT-B/16's 224 px.

It also states what ViT-B/16 MAE pre-training consumes on one GPU: the FLOPs of one training image
(forward + backward, counted here with ``FlopCounterMode``) over an assumed GPU rate (``--gpu-tflops``
x ``--gpu-mfu``; defaults: A100 dense bf16 peak 312 TFLOP/s at 50 % utilisation).

    python benchmarks/bench_data_paths.py                        # 4096 CIFAR-10 images, 0-2 workers, 32 and 224 px
    python benchmarks/bench_data_paths.py --images 2048 --workers 0 1 --sizes 32 --reps 1 --no-write   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import REPO, at_least, cli, count_flops, md_table, publish, stamp  # noqa: E402

from maelab.data.folders import prepare_images  # noqa: E402
from maelab.data.loader import Feeder, StepPlan  # noqa: E402
from maelab.data.shards import ShardFeeder, ShardPlan, make_shards, open_shards  # noqa: E402
from maelab.data.transforms import PretrainTransform  # noqa: E402
from maelab.models.mae import create_model  # noqa: E402

CPU = torch.device("cpu")


def delivered(feeder, epoch: int) -> float:
    """Images per second from the first batch's arrival to the end of the epoch (worker start-up and
    the in-RAM decode are not counted)."""
    n, t0 = 0, None
    for b in feeder.epoch(epoch):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += b.images.shape[0]
    feeder.close()
    return n / (time.perf_counter() - t0)


def vit_b_flops_per_image() -> float:
    model = create_model("mae_vit_base_patch16", norm_pix_loss=True)
    x = torch.randn(1, 3, 224, 224)

    def step():
        loss, _, _ = model(x, return_pred=False)
        loss.backward()

    return count_flops(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "train"))
    ap.add_argument("--images", type=at_least(1), default=4096, help="fixed random subset")
    ap.add_argument("--batch-size", type=at_least(1), default=128)
    ap.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=at_least(1), nargs="+", default=[32, 224])
    ap.add_argument("--shard-size", type=at_least(1), default=512)
    ap.add_argument("--reps", type=at_least(1), default=2, help="interleaved rounds; medians")
    ap.add_argument("--gpu-tflops", type=float, default=312.0, help="assumed GPU dense bf16 peak (A100: 312)")
    ap.add_argument("--gpu-mfu", type=float, default=0.5, help="assumed share of the peak MAE training reaches")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    images = prepare_images(args.data, "error", args.images, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_shards(images, f"{tmp}/shards", args.shard_size, progress=False)
        make_s = time.perf_counter() - t0
        shards = open_shards(f"{tmp}/shards")

        def folder(size, w, in_memory=False):
            plan = StepPlan(len(images), args.batch_size, 1, 1, 0, seed=0)
            return Feeder(images, plan, CPU, (size, size), in_memory, transform=PretrainTransform((size, size)),
                          num_workers=w)

        def streamed(size, w):
            plan = ShardPlan(shards, args.batch_size, 1, 1, 0, seed=0, num_workers=w)
            return ShardFeeder(plan, CPU, PretrainTransform((size, size)))

        configs = []
        for size in args.sizes:
            for w in args.workers:
                configs += [("folder", size, w, lambda s=size, w=w: folder(s, w)),
                            ("shards", size, w, lambda s=size, w=w: streamed(s, w))]
            if size == 32:  # CIFAR images already have this size: the in-RAM path applies
                configs.append(("in RAM", size, max(args.workers), lambda s=size: folder(s, max(args.workers), True)))
        rates: dict[tuple, list[float]] = {c[:3]: [] for c in configs}
        for r in range(args.reps):
            for name, size, w, build in (configs if r % 2 == 0 else configs[::-1]):
                rate = delivered(build(), r)
                rates[(name, size, w)].append(rate)
                print(f"round {r + 1}: {name} {size}px {w} workers: {rate:.0f} img/s", flush=True)

    flops = vit_b_flops_per_image()
    need = args.gpu_tflops * 1e12 * args.gpu_mfu / flops
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = [[name, f"{size} px", str(w) if name != "in RAM" else f"{w} (decode only)", f"{rate:.0f}",
             f"{rate / need:.2f}x" if size == 224 else "-"] for (name, size, w), rate in med.items()]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = (f"The machine was oversubscribed during this run (load average {load:.1f} on {cores} cores, other "
            f"work included), so extra loader workers mostly added contention: the rows compare the paths on "
            f"this machine as it was, not its ceiling. " if load > cores else "")
    best224 = max((v for (n, s, _), v in med.items() if s == 224 and n == "shards"), default=None)
    body = (
        "## Data paths: images/s delivered to the training loop (no model)\n\n" + stamp(CPU)
        + f"\n{len(images)} CIFAR-10 images (32x32 JPEG), batch {args.batch_size}, RandomResizedCrop + flip to the "
        f"given size, one torch thread per process; the time from the first batch to the end of the epoch, median "
        f"of {args.reps} interleaved round(s). Shards: {len(shards.urls)} shards of {args.shard_size} written by "
        f"`make_shards` in {make_s:.1f} s, read from local disk through a 1000-sample shuffle buffer per worker. "
        f"The in-RAM path decodes once (not counted) and crops whole batches; it needs every image at the "
        f"training size, so it has no 224 px row.\n\n"
        f"**What ViT-B/16 consumes on one GPU** (assumed, not measured here): one MAE training image at 224 px "
        f"(mask 0.75, decoder 512x8) costs {flops / 1e9:.1f} GFLOP forward + backward (counted by this script); "
        f"an A100 runs {args.gpu_tflops:.0f} TFLOP/s dense bf16 at peak, and we assume MAE training reaches "
        f"{args.gpu_mfu:.0%} of it: **{need:.0f} img/s**. The last column is delivered / that figure at "
        f"ViT-B/16's input size (the issue asks for 3x).\n\n"
        + md_table(["path", "output", "loader workers", "img/s", "vs ViT-B/16 on one GPU"], rows)
        + "\n\n" + busy
        + (f"At 224 px the streamed path reaches **{best224:.0f} img/s** here, {best224 / need:.2f}x the assumed "
           f"GPU consumption: 2 CPU cores cannot feed a modern GPU with per-sample PIL augmentation at 224 px "
           f"(bicubic antialiased resize of every crop dominates), whatever the storage. A GPU node has 8-16 cores "
           f"per GPU, and ImageNet JPEGs (~110 kB, ~400x350) cost more to decode than CIFAR's 32x32 files, so "
           f"measure on the node: `python benchmarks/bench_data_paths.py --data /imagenet/train --workers 4 8 16`.\n"
           if best224 is not None else "")
    )
    publish("bench_data_paths", body, not args.no_write)


if __name__ == "__main__":
    cli(main)
