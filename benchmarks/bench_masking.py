"""What choosing the patches to mask costs, per strategy (random / block-wise / grid, paper Fig. 6), as a
share of one maelab training step on the same batch, both timed in the same interleaved rounds.

A masking strategy that is slow to draw buys fewer steps at a wall-clock budget, so a `maelab ablate
--setting mask-type` sweep would score the strategy and its cost together; this script checks that the
cost is small against a step. Configurations as in bench_step.py: ``tiny`` (ViT-Tiny/4, 32 px, 8 x 8
patches, batch 128) and ``base`` (ViT-Base/16, 224 px, 14 x 14 patches, batch 16); mask ratio 0.75.

    python benchmarks/bench_masking.py                  # tiny, bf16 where the CPU has it -> docs/benchmarks.md
    python benchmarks/bench_masking.py --config base --reps 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common, peers  # noqa: E402
from benchmarks.bench_step import images, make_step  # noqa: E402
from maelab.models.masking import MASK_TYPES, mask_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(peers.SIZES), default="tiny")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fast"), default="fast",
                    help="the step's autocast; fast = bf16 where the hardware has it (the ablation runs' setting)")
    ap.add_argument("--reps", type=common.at_least(1), default=7)
    ap.add_argument("--quick", action="store_true", help="2 rounds: a smoke test")
    ap.add_argument("--threads", type=common.at_least(0), default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet-wait", type=float, default=0.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    size = peers.SIZES[args.config]
    precision = args.precision
    if precision == "fast":
        from maelab.train.precision import native_bf16
        precision = "bf16" if native_bf16(device) else "fp32"
    cand = peers.maelab_candidate(size)
    cand.model.to(device).train()
    opt = torch.optim.AdamW(cand.model.parameters(), lr=1e-4)
    grid = (size.img // size.patch,) * 2
    g = torch.Generator(device=device).manual_seed(0)
    fns = {"training step": make_step(cand, opt, images(size, device), device, precision)}
    for kind in MASK_TYPES:
        fns[f"mask {kind}"] = lambda kind=kind: mask_noise(kind, size.batch, grid, peers.MASK_RATIO, g, device)
    reps = 2 if args.quick else args.reps
    times = common.interleaved(fns, reps, device, log=lambda m: print(m, file=sys.stderr, flush=True),
                               quiet_wait=args.quiet_wait)
    step = common.median(times["training step"])
    rows = [["training step (fwd + bwd + AdamW)", f"{step * 1e3:.1f}", common.spread(times["training step"]), "100%"]]
    for kind in MASK_TYPES:
        t = times[f"mask {kind}"]
        share = common.median([m / s for m, s in zip(t, times["training step"])])
        rows.append([f"mask noise: {kind}", f"{common.median(t) * 1e3:.2f}", common.spread(t), f"{share:.2%}"])
    body = (f"## Mask sampling cost per step ({args.config})\n\n" + common.stamp(device)
            + f"\n{size.label}, mask ratio {peers.MASK_RATIO}, {grid[0]} x {grid[1]} patches, step in {precision}; "
            f"{common.rounds_note(times)}. The masks of one batch (`maelab.models.masking.mask_noise`) against "
            "one training step on that batch; share = median over rounds of mask time / step time.\n\n"
            + common.md_table(["what", "ms (median)", "spread", "share of a step"], rows))
    common.publish(f"bench_masking:{args.config}", body, write=not args.no_write)
    print(f"command: {common.command_line()}", file=sys.stderr)


if __name__ == "__main__":
    common.cli(main)
