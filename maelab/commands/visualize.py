"""`maelab visualize`: reconstruction pictures (Figs. 2-4 of the paper) from a run or a checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maelab.choices import RECONSTRUCTION_PNG
from maelab.config import check_seed, load_yaml
from maelab.data.folders import spread_sample
from maelab.data.shards import is_shard_source, scan_any
from maelab.errors import MaelabError
from maelab.interop.encoders import img_size_arg
from maelab.interop.mae_weights import load_mae, require_decoder
from maelab.models.checks import check_masks_something, num_visible, warn_if_one_is_kept
from maelab.models.masking import check_mask_type
from maelab.train.distributed import pick_device
from maelab.viz import PICTURE_IMAGES, save_reconstruction_grid
from maelab.viz.curves import png_out
from maelab.viz.reconstruct import row_title


def output_path(out: str) -> Path:
    """``--out``: a file, or a folder (existing, or named with a trailing slash) that gets ``reconstruction.png``.
    A file must be named ``.png``: the grid is always a PNG, and ``recon.txt`` would hold one."""
    path = Path(out).expanduser()
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / RECONSTRUCTION_PNG
    return png_out(out, "visualize", " (or end --out with / for a folder)")


def sample_of(data: str) -> tuple[list[str], list[str]]:
    """A fixed spread-out sample of an image folder or of local shards, with row titles (shard samples are
    titled by the file they were made from)."""
    images = scan_any(data)
    chosen = spread_sample(images, PICTURE_IMAGES)
    name = dict(zip(images.paths, images.names()))
    return chosen, [row_title(name[p]) for p in chosen]


def run_images(path: Path) -> tuple[list[str], list[str]]:
    """Images of the run's own data (the ones its pictures show) and their row titles, when pointed at a run
    folder without --images."""
    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file():
            data = (load_yaml(folder / "config.yaml").get("data") or {}).get("data")
            if not data:
                break
            try:
                return sample_of(data)
            except MaelabError as e:
                raise MaelabError(f"the run's data: {e}; or name the images to draw with --images") from None
    raise MaelabError("--images is required unless --checkpoint is a run folder whose data is still there")


def run(args: argparse.Namespace) -> Path:
    out = output_path(args.out)
    check_seed(args.seed)
    for r in args.mask_ratio:
        num_visible(1, r)  # the range, before the checkpoint is read
    model, meta = load_mae(args.checkpoint, pick_device(args.device), img_size=img_size_arg(args.img_size))
    require_decoder(meta, args.checkpoint, "a reconstruction")
    if model.in_chans != 3:  # the model's own shape error named a tensor the user never made
        raise MaelabError(f"the MAE of {args.checkpoint} takes {model.in_chans}-channel images; maelab reads every "
                          f"image as 3-channel RGB, so its pictures need a 3-channel model")
    for note in meta.get("notes", []):
        print(f"maelab visualize: {note}", flush=True)
    for r in args.mask_ratio:
        check_masks_something(model.num_patches, r)
        warn_if_one_is_kept(model.num_patches, r)
        check_mask_type(args.mask_type, model.grid, r)
    if not args.images:
        images, titles = run_images(Path(args.checkpoint))
    elif len(args.images) == 1 and is_shard_source(args.images[0]):
        images, titles = sample_of(args.images[0])  # shards: a spread sample of them
    else:
        images, titles = args.images, None
    out = save_reconstruction_grid(model, images, args.mask_ratio, out, seed=args.seed, titles=titles,
                                   mask_type=args.mask_type)
    print(f"wrote {out}")
    return out
