"""One module per `maelab` subcommand, named as the command, with ``run(cfg_or_args)``; its options sit
apart in :mod:`maelab.commands.options` (same name): ``NAME``, ``DESCRIPTION`` and ``Config`` (its config
dataclass, whose fields become the flags; ``None`` for commands with hand-written arguments and an
``add_arguments(parser)``). ``COMMANDS`` lists them with their one-line help, in the order `maelab --help`
shows them.

Why two modules per command: the options import nothing heavy, so `maelab <command> --help` and a
refused flag answer at once; the CLI imports the command's own module (and with it torch, timm and
torchvision) only to run it. What every command does around its work is
:mod:`maelab.commands.session`. A command never imports another command.
"""

from importlib import import_module
from types import ModuleType

COMMANDS = {
    "pretrain": "MAE pre-training on a folder of images",
    "visualize": "reconstruction pictures from a run or checkpoint",
    "convert": "convert MAE weights between maelab, official MAE and Hugging Face, and export them to timm",
    "models": "list model presets",
    "finetune": "fine-tune the encoder as a classifier (or train it from scratch with --init none)",
    "linprobe": "linear probe: BatchNorm + Linear head on frozen features, LARS",
    "knn": "weighted kNN accuracy of frozen features (k=20, T=0.07)",
    "features": "embeddings of a folder of images to .npy / .safetensors, with the image paths",
    "ablate": "sweep one pre-training setting: pre-train per value, then kNN / linear probe / fine-tune, table + plot",
    "recipe": "pre-train -> kNN (vs random init) -> linear probe -> fine-tune (vs from scratch), each to a budget",
    "shards": "write an image folder as WebDataset tar shards (for streaming: --data DIR, a pattern, URLs)",
    "segment": "semantic segmentation: UPerNet on the encoder (train | eval | predict)",
    "detect": "Mask R-CNN on a ViTDet feature pyramid of the encoder: train | eval | predict (COCO-format data)",
}


def options_of(name: str) -> ModuleType:
    """The options of command ``name``: ``DESCRIPTION``, ``Config`` or ``add_arguments`` (no torch)."""
    return import_module(f"maelab.commands.options.{name}")


def load(name: str) -> ModuleType:
    """The module that runs command ``name`` (its ``run``)."""
    return import_module(f"maelab.commands.{name}")


__all__ = ["COMMANDS", "load", "options_of"]
