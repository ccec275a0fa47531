"""`maelab shards make`: write an image folder as WebDataset tar shards that every command taking
``--data`` streams (see :mod:`maelab.data.shards`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maelab.config import check_seed
from maelab.data.folders import prepare_images
from maelab.data.shards import make_shards


def run(args: argparse.Namespace) -> dict:
    check_seed(args.seed)
    images = prepare_images(args.data, args.bad_files, args.limit_images, args.seed)
    manifest = make_shards(images, args.out, args.shard_size, args.prefix, args.seed,
                           progress=sys.stderr.isatty())
    out = Path(args.out).expanduser()
    print(f"wrote {len(manifest['shards'])} shard(s) of up to {args.shard_size} images ({manifest['total']} in all, "
          f"{len(manifest['classes'])} classes) to {out}; train with --data {out}", flush=True)
    return manifest
