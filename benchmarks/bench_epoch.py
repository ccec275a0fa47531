"""End-to-end pre-training throughput, data loading included: maelab's default pipeline (decode once
into RAM, vectorised batch augmentation) against the official MAE pipeline (per-sample PIL
ImageFolder + torchvision transforms in a DataLoader) feeding the same model, optimizer and batch.

Reported per pipeline: training img/s, the share of the step time spent waiting for data, and the
loader's own delivery rate (no model) against what the model consumes. Segments of each pipeline are
alternated (A B A B ...) so outside load hits both alike; medians over segments.

    python benchmarks/bench_epoch.py                      # 10 000 CIFAR-10 images, 4 segments x 20 steps
    python benchmarks/bench_epoch.py --images 0 --segments 2 --steps 0   # full epochs (slow on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from common import REPO, at_least, cli, md_table, pick_device, stamp, synchronize, write_section  # noqa: E402

from maelab.data.folders import prepare_images  # noqa: E402
from maelab.data.loader import Feeder, StepPlan  # noqa: E402
from maelab.data.workers import default_workers
from maelab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from maelab.models.mae import create_model
from maelab.train.optim import adamw, param_groups


def official_loader(root: str, keep: list[int], batch: int, workers: int, seed: int) -> DataLoader:
    tf = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    ds = Subset(datasets.ImageFolder(root, transform=tf), keep)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, generator=g,
                      persistent_workers=workers > 0, pin_memory=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "train"))
    ap.add_argument("--images", type=at_least(0), default=10000, help="fixed random subset (0 = all)")
    ap.add_argument("--batch-size", type=at_least(1), default=128)
    ap.add_argument("--segments", type=at_least(1), default=4, help="segments per pipeline, alternated")
    ap.add_argument("--steps", type=at_least(0), default=20, help="training steps per segment (0 = a full epoch)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.device)
    workers = default_workers(-1)
    torch.manual_seed(0)

    images = prepare_images(args.data, "error", args.images, seed=0)
    path_index = {p: i for i, p in enumerate(prepare_images(args.data, "error").paths)}
    keep = [path_index[p] for p in images.paths]
    plan = StepPlan(len(images), args.batch_size, 1, 1, 0, seed=0)
    steps = args.steps or plan.steps_per_epoch

    t0 = time.perf_counter()
    feeder = Feeder(images, plan, device, (32, 32), in_memory=True, num_workers=workers)
    decode_s = time.perf_counter() - t0
    official = official_loader(args.data, keep, args.batch_size, workers, seed=0)

    model = create_model("mae_vit_tiny_patch4", norm_pix_loss=True).to(device)
    opt = adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def train_step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(x, return_pred=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def maelab_batches(epoch):
        for b in feeder.epoch(epoch):
            yield b.images

    def official_batches(epoch):
        for x, _ in official:
            yield x.to(device)

    pipes = {"maelab (RAM + batched aug)": maelab_batches, "official (PIL DataLoader)": official_batches}
    results = {name: {"train": [], "wait": [], "load": []} for name in pipes}

    def segment(name, fn, epoch, with_model: bool):
        it = fn(epoch)
        wait = 0.0
        synchronize(device)
        t_start = time.perf_counter()
        n = 0
        for _ in range(steps):
            t = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t
            if with_model:
                train_step(x)
                synchronize(device)
            n += x.shape[0]
        total = time.perf_counter() - t_start
        return n / total, wait / total

    # warm-up: one short segment of each (workers start, caches fill, kernels pick algorithms)
    for name, fn in pipes.items():
        segment(name, fn, 999, True)
    for s in range(args.segments):
        order = list(pipes.items()) if s % 2 == 0 else list(pipes.items())[::-1]
        for name, fn in order:
            ips, wait = segment(name, fn, s, True)
            results[name]["train"].append(ips)
            results[name]["wait"].append(wait)
            ips_load, _ = segment(name, fn, 100 + s, False)
            results[name]["load"].append(ips_load)
            print(f"segment {s + 1}: {name}: train {ips:.0f} img/s (waiting {wait:.0%}), loader alone {ips_load:.0f} img/s", flush=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    a, b = list(pipes)
    rows = [[n, f"{m['train']:.0f}", f"{m['wait']:.1%}", f"{m['load']:.0f}", f"{m['load'] / m['train']:.1f}x"]
            for n, m in med.items()]
    body = (
        "## End-to-end pre-training throughput (data loading included)\n\n"
        + stamp(device)
        + f"\nViT-Tiny/4 MAE (32 px, decoder 128x4, norm-pix), batch {args.batch_size}, {args.precision}, "
        f"{len(images)} CIFAR-10 images, {workers} loader workers for the DataLoader path; {args.segments} "
        f"alternated segments of {steps} training steps per pipeline, medians. maelab decoded the images into "
        f"RAM once in {decode_s:.1f} s (not included below).\n\n"
        + md_table(["pipeline", "train img/s", "time waiting for data", "loader alone img/s",
                    "loader / model consumption"], rows)
        + f"\n\nmaelab end-to-end speed-up over the official pipeline: **{med[a]['train'] / med[b]['train']:.2f}x** "
        f"(target >= 2x); maelab's loader delivers **{med[a]['load'] / med[a]['train']:.1f}x** what the model "
        f"consumes (target >= 3x).\n"
    )
    print(body)
    if not args.no_write:
        write_section("bench_epoch", body)


if __name__ == "__main__":
    cli(main)
