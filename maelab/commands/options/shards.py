"""`maelab shards`'s options."""

from __future__ import annotations

import argparse

from maelab.choices import SHARD_MANIFEST


NAME = "shards"
DESCRIPTION = ("make: pack the images of --data (an ImageFolder tree or a flat folder) into tar shards of "
               "--shard-size samples in --out, in a seeded random order, with their labels, and an index.json "
               f"({SHARD_MANIFEST}: counts and class names). The image files are stored as they are (not re-encoded). "
               "Every shard is written to a temp file and renamed; index.json comes last, so a killed run "
               "leaves no shard set that looks complete (run it again).")
Config = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("make",), help="what to do")
    p.add_argument("--data", required=True, help="image folder to pack")
    p.add_argument("--out", required=True, help="folder for the shards and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--prefix", default="train", help="shard file names: PREFIX-0000.tar, ... (default: train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the images are packed in")
    p.add_argument("--bad-files", default="error", choices=("error", "skip"),
                   help="error (default): pack every file's bytes as they are, unchecked (a sample that cannot be decoded "
                        "is met when training reads it, which then stops naming it or, with --bad-files skip, "
                        "replaces it); skip: leave out files that fail a quick probe now (as for folders)")
    p.add_argument("--limit-images", type=int, default=0, help="pack a fixed seeded subset of N images (0 = all)")
