"""`maelab convert`'s options."""

from __future__ import annotations

import argparse


NAME = "convert"
DESCRIPTION = ("SRC (recognised by content): a maelab pre-training run / checkpoint folder / .safetensors, an "
               "official MAE .pth, or a Hugging Face ViTMAE folder; also a fine-tuned classifier (a maelab fine-tune "
               "run, an official / timm fine-tuned checkpoint) for --to timm / maelab / official. timm is a write-only target: timm and other encoder-only files have no decoder, so they "
               "cannot become MAE checkpoints (use them with --init of finetune / linprobe / knn / features). OUT: a "
               "file (maelab, official, timm; .safetensors / .pth is added when it has no suffix) or a folder (hf).")
Config = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="weights to read")
    p.add_argument("out", help="where to write")
    p.add_argument("--to", required=True, choices=("maelab", "official", "timm", "hf"), help="output format")
    p.add_argument("--global-pool", default=None, choices=("token", "avg"),
                   help="timm export: head pooling the checkpoint is meant for (default: token; a fine-tuned "
                        "classifier keeps its own)")
    p.add_argument("--hf-naming", default=None, choices=("v5", "v4"),
                   help="Hugging Face export: transformers parameter names (default: v5)")
    p.add_argument("--encoder-only", action="store_true", help="official export: drop the decoder")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX",
                   help="the image size (one side, or height width) of a file that records none and whose position "
                        "table does not show its grid (timm / official files written elsewhere); an MAE that records "
                        "another size is converted with its position tables resized to this one")
    p.add_argument("--num-heads", type=int, default=None,
                   help="encoder attention heads of a file that does not record them (an official .pth or timm "
                        "classifier; default: the paper's table for its width); a count contradicting the file's own "
                        "record is refused")
