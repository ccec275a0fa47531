"""`maelab <command>`: parse flags into a typed config and call one run function. No training logic."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from maelab.errors import MaelabError


def _pretrain_parser(sub) -> None:
    from maelab.config import PretrainConfig, add_config_args

    p = sub.add_parser("pretrain", help="MAE pre-training on a folder of images",
                       description="Masked Autoencoder pre-training. Every flag is a config field; "
                                   "--config loads a YAML preset first (flags override it).")
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from maelab.config import PretrainConfig, config_from_args
    from maelab.pretrain import run_pretrain

    cfg = config_from_args(PretrainConfig, args)
    args.out = cfg.run.out  # named by the OSError line in main()
    run_pretrain(cfg)
    return 0


def _visualize_parser(sub) -> None:
    p = sub.add_parser("visualize", help="reconstruction pictures from a run or checkpoint",
                       description="Per image a row: original | masked | reconstruction | reconstruction with "
                                   "the visible patches pasted in, for each mask ratio.")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, .safetensors or official .pth")
    p.add_argument("--images", nargs="+", help="image files (default: 8 images of the run's data)")
    p.add_argument("--mask-ratio", nargs="+", type=float, default=[0.75], help="one or more mask ratios")
    p.add_argument("--seed", type=int, default=0, help="masking seed (same seed, same picture)")
    p.add_argument("--out", default="reconstruction.png",
                   help="output PNG; a folder (existing, or written with a trailing /) gets reconstruction.png")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    p.set_defaults(func=_run_visualize)


VIS_NAME = "reconstruction.png"


def _visualize_out(out: str) -> Path:
    """``--out``: a file, or a folder (existing, or named with a trailing slash) that gets ``reconstruction.png``."""
    path = Path(out).expanduser()
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / VIS_NAME
    return path


def _run_visualize(args: argparse.Namespace) -> int:
    from maelab.models.loading import load_mae, require_decoder
    from maelab.models.mae import check_masks_something, num_visible
    from maelab.train.distributed import pick_device

    out = _visualize_out(args.out)
    for r in args.mask_ratio:
        num_visible(1, r)  # the range, before the checkpoint is read
    model, meta = load_mae(args.checkpoint, pick_device(args.device))
    require_decoder(meta, args.checkpoint, "a reconstruction")
    for r in args.mask_ratio:
        check_masks_something(model.num_patches, r)
    images = args.images
    if not images:
        images = _run_images(Path(args.checkpoint))
    from maelab.viz import save_reconstruction_grid

    out = save_reconstruction_grid(model, images, args.mask_ratio, out, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _run_images(path) -> list[str]:
    """Images of the run's own data, when visualize is pointed at a run folder without --images."""
    from maelab.config import PretrainConfig, build_config
    from maelab.data.folders import scan_images
    from maelab.pretrain import pick_vis_images

    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file():
            cfg = build_config(PretrainConfig, yaml_path=str(folder / "config.yaml"))
            found = scan_images(cfg.data.data)
            return pick_vis_images(found.paths, found.labels)
    raise MaelabError("--images is required unless --checkpoint is a run folder whose data is still there")


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert MAE weights between maelab, official MAE and Hugging Face, "
                                       "and export them to timm",
                       description="SRC (recognised by content): a maelab pre-training run / checkpoint folder / "
                                   ".safetensors, an official MAE .pth, or a Hugging Face ViTMAE folder; with --to "
                                   "timm also a maelab fine-tune run (its classifier). timm is a write-only target: "
                                   "timm and other encoder-only files have no decoder, so they cannot become MAE "
                                   "checkpoints (use them with --init of finetune / linprobe / knn / features). "
                                   "OUT: a file (maelab, official, timm; .safetensors / .pth is added when it has "
                                   "no suffix) or a folder (hf).")
    p.add_argument("src", help="weights to read")
    p.add_argument("out", help="where to write")
    p.add_argument("--to", required=True, choices=("maelab", "official", "timm", "hf"), help="output format")
    p.add_argument("--global-pool", default=None, choices=("token", "avg"),
                   help="timm export: head pooling the checkpoint is meant for (default: token; a fine-tuned "
                        "classifier keeps its own)")
    p.add_argument("--hf-naming", default="v5", choices=("v5", "v4"), help="transformers parameter names")
    p.add_argument("--encoder-only", action="store_true", help="official export: drop the decoder")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from maelab.convert import convert

    out = convert(args.src, args.out, args.to, args.global_pool, args.hf_naming, not args.encoder_only)
    added = out.name != Path(args.out).expanduser().name
    print(f"wrote {out}" + (f" ({out.suffix} added: {args.out} had no file extension)" if added else ""))
    return 0


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list model presets")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from maelab.models.presets import PRESETS

    for name, kw in PRESETS.items():
        size = kw["img_size"]
        print(f"{name:24s} img {size}  patch {kw['patch_size']:2d}  encoder {kw['embed_dim']}x{kw['depth']} "
              f"({kw['num_heads']} heads)  decoder {kw['decoder_embed_dim']}x{kw['decoder_depth']} "
              f"({kw['decoder_num_heads']} heads)")
    return 0


def _config_command(name: str, config: str, run: str, help: str, description: str) -> Callable:
    """A subcommand whose flags are the fields of ``maelab.config.<config>`` and which calls
    ``maelab.<module>.<function>`` (``run`` = "module:function") with the built config."""

    def add(sub) -> None:
        import maelab.config as config_module

        p = sub.add_parser(name, help=help, description=description + " Every flag is a config field; --config "
                                                                       "loads a YAML preset first (flags override it).")
        config_module.add_config_args(p, getattr(config_module, config))
        p.set_defaults(func=lambda args: _run_config_command(args, config, run))

    add.__name__ = f"_{name}_parser"
    return add


def _run_config_command(args: argparse.Namespace, config: str, run: str) -> int:
    import importlib

    import maelab.config as config_module

    module, function = run.split(":")
    cfg = config_module.config_from_args(getattr(config_module, config), args)
    args.out = cfg.run.out  # named by the OSError line in main()
    getattr(importlib.import_module(module), function)(cfg)
    return 0


_finetune_parser = _config_command(
    "finetune", "FinetuneConfig", "maelab.finetune:run_finetune",
    "fine-tune the encoder as a classifier (or train it from scratch with --init none)",
    "End-to-end fine-tuning with the official MAE recipe (global-average-pool + fc_norm head, layer-wise lr "
    "decay, drop path, RandAugment, mixup / cutmix, label smoothing, random erasing, AdamW, warm-up + cosine); "
    "top-1 / top-5 on the validation split after every epoch; the headline is the final epoch.")
_linprobe_parser = _config_command(
    "linprobe", "LinprobeConfig", "maelab.linprobe:run_linprobe",
    "linear probe: BatchNorm + Linear head on frozen features, LARS",
    "Linear probing as in the paper: frozen encoder in eval mode, cls-token features after the final norm, "
    "BatchNorm1d(affine=False) + Linear head, LARS. --no-augment caches the features once (fast on a CPU).")
_knn_parser = _config_command(
    "knn", "KnnConfig", "maelab.knn:run_knn",
    "weighted kNN accuracy of frozen features (k=20, T=0.07)",
    "Weighted k-nearest-neighbour classification on L2-normalised features: the training split is the "
    "memory bank, the validation split the queries.")
_features_parser = _config_command(
    "features", "FeaturesConfig", "maelab.features:run_features",
    "embeddings of a folder of images to .npy / .safetensors, with the image paths",
    "Encoder features (cls token or mean of the patch tokens after the final norm; never masked) for every "
    "image of a folder, in a fixed order.")


COMMANDS: list[Callable] = [_pretrain_parser, _visualize_parser, _convert_parser, _models_parser,
                            _finetune_parser, _linprobe_parser, _knn_parser, _features_parser]


def build_parser() -> argparse.ArgumentParser:
    from maelab import __version__

    parser = argparse.ArgumentParser(prog="maelab", description="Masked Autoencoder pre-training and evaluation")
    parser.add_argument("--version", action="version", version=f"maelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    msg = str(err).strip()
    if msg.startswith("Caught ") and "\n" in msg:  # re-raised from a DataLoader worker
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(err).__name__


def _os_error_line(err: OSError, out: str | None) -> str:
    """One line for a file-system error that escaped a command: the path, what went wrong, and, when the
    path is (inside) the command's output, that it could not be written."""
    reason = err.strerror or _one_line(err)
    if err.filename is None:
        return reason
    path = Path(os.fsdecode(err.filename))
    writing = False
    if out:
        target, where = Path(out).expanduser(), path.absolute()
        writing = where == target.absolute() or target.absolute() in where.parents
        temp_of_target = where.parent == target.absolute().parent and where.name.startswith(f".{target.name}.")
        if where in target.absolute().parents or temp_of_target:  # on the way to --out: name --out itself
            path, writing = target, True
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if isinstance(err, (FileExistsError, NotADirectoryError)) and blocked is not None:
        reason = f"{blocked} is a file, not a folder"
    return f"cannot {'write' if writing else 'use'} {path}: {reason}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from maelab.train.loop import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
            print(f"maelab: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except MaelabError as e:
        print(f"maelab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the system refused (exists as a file, no such folder, permission): no traceback
        print(f"maelab: error: {_os_error_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
