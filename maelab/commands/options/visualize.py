"""`maelab visualize`'s options."""

from __future__ import annotations

import argparse

from maelab.choices import MASK_TYPES, PICTURE_IMAGES, RECONSTRUCTION_PNG


NAME = "visualize"
DESCRIPTION = ("Per image a row: original | masked | reconstruction | reconstruction with the visible patches "
               "pasted in, for each mask ratio.")
Config = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, .safetensors or official .pth")
    p.add_argument("--images", nargs="+", help=f"image files, or one shard set of `maelab shards make` "
                   f"({PICTURE_IMAGES} of its samples; default: {PICTURE_IMAGES} images of the run's data)")
    p.add_argument("--mask-ratio", nargs="+", type=float, default=[0.75], help="one or more mask ratios")
    p.add_argument("--mask-type", default="random", choices=MASK_TYPES,
                   help="which patches are masked: random, block or grid (as `maelab pretrain --mask-type`; grid "
                        "needs a lattice ratio: 0.75, 0.8888888888888888, 0.9375)")
    p.add_argument("--seed", type=int, default=0, help="masking seed (same seed, same picture)")
    p.add_argument("--out", default=RECONSTRUCTION_PNG,
                   help=f"output PNG; a folder (existing, or written with a trailing /) gets {RECONSTRUCTION_PNG}")
    p.add_argument("--img-size", nargs="+", type=int, default=None, metavar="PX",
                   help="draw at this input size (one number, or height width) instead of the checkpoint's: the "
                        "model keeps its weights and takes the position tables of the new patch grid")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
