"""Peak memory per process of `maelab pretrain` under 2 torchrun processes: DDP (every process holds
the whole model, gradients and AdamW state), FSDP (``--fsdp``: each holds half) and FSDP with
activation checkpointing; with the epoch loss, which must agree. The numbers are the ones the run logs
itself (``peak memory per process``: max RSS on a CPU, allocated CUDA memory on a GPU).

    python benchmarks/bench_fsdp_memory.py                      # ViT-B/16 MAE, 224 px, batch 2 per process, CPU
    python benchmarks/bench_fsdp_memory.py --model mae_vit_large_patch16 --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import torch

from common import REPO, at_least, cli, maelab_run, md_table, publish, stamp, torchrun  # noqa: E402

VARIANTS = {"DDP": [], "FSDP": ["--fsdp"], "FSDP + activation checkpointing": ["--fsdp", "--activation-checkpointing"]}


def run(args, extra: list[str], out: Path) -> tuple[list[float], list[float]]:
    log = maelab_run(torchrun(2), [
        "pretrain", "--data", args.data, "--limit-images", str(args.images), "--model", args.model, "--img-size", "224",
        "--batch-size", str(args.batch_size), "--epochs", "1", "--warmup-epochs", "0", "--vis-every", "0",
        "--num-workers", "0", "--in-memory", "no", "--device", args.device, "--out", str(out), *extra])
    peak = re.search(r"peak memory per process during the training steps \([^)]*\): ([0-9., ]+) GiB", log)
    losses = [float(x) for x in re.findall(r"epoch \d+/\d+  loss ([0-9.]+)", log)]
    return [float(x) for x in peak.group(1).split(",")], losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "cifar10" / "train"))
    ap.add_argument("--model", default="mae_vit_base_patch16")
    ap.add_argument("--images", type=at_least(1), default=12)
    ap.add_argument("--batch-size", type=at_least(1), default=2, help="per process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(args, extra, Path(tmp) / str(i)) for i, (name, extra) in enumerate(VARIANTS.items())}
    kind = "allocated CUDA memory" if args.device.startswith("cuda") else "max RSS (the interpreter and torch included)"
    rows = [[name, " / ".join(f"{x:.2f}" for x in peak), f"{max(peak) - max(results['DDP'][0]):+.2f}",
             " / ".join(f"{x:.4f}" for x in losses)] for name, (peak, losses) in results.items()]
    body = (
        "## FSDP: peak memory per process (2 processes)\n\n" + stamp(torch.device(args.device))
        + f"\n`maelab pretrain --model {args.model} --img-size 224`, {args.images} CIFAR-10 images upsampled to "
        f"224 px, batch {args.batch_size} per process x 2 processes, 1 epoch, on {args.device} (gloo between CPU "
        f"processes); peak memory = {kind} over the first epoch's training steps, before the first checkpoint (under "
        f"FSDP rank 0 then gathers the full weights and AdamW state to write the single-process checkpoint), as "
        f"each run logs it.\n\n"
        + md_table(["variant", "peak memory per process (GiB)", "vs DDP (GiB)", "epoch loss"], rows) + "\n"
    )
    publish("bench_fsdp_memory", body, not args.no_write)


if __name__ == "__main__":
    cli(main)
