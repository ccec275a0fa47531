"""`maelab detect`'s options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from maelab.choices import ANCHOR_SIZES, DETECTOR_HEADS, EMPTY_POLICIES
from maelab.commands.options.sections import EncoderConfig, OptimConfig, ProcessConfig, TrainRunConfig
from maelab.config import add_config_args, command_config, option, redefault


NAME = "detect"
DESCRIPTION = ("Object detection and instance segmentation: torchvision's Mask R-CNN on ViTDet's simple feature "
               "pyramid over any encoder maelab reads; COCO-format data, large-scale jitter, box and mask AP "
               "(pycocotools). `maelab detect train --help` lists the flags of each action.")
Config = None  # three actions, each with its own config (add_arguments)


@dataclass
class DetectModelConfig:
    init: str = redefault(EncoderConfig, "init", "")
    model: str | None = redefault(EncoderConfig, "model", None)
    num_heads: int | None = redefault(EncoderConfig, "num_heads", None)
    img_size: list[int] = option([1024], "training square (large-scale jitter crops / pads to it) and the longer "
                                         "side at inference; the patch size must divide it (ViTDet: 1024)")
    drop_path: float = option(0.1, "stochastic depth rate of the ViT (ViTDet: B 0.1, L 0.4)")
    window_size: int | None = option(None, "windowed attention: window side in patches for the blocks not in "
                                           "--global-blocks (ViTDet at 1024 px: 14); none = global attention everywhere")
    global_blocks: list[int] | None = option(None, "blocks that keep global attention when --window-size is set "
                                                    "(ViTDet-B: 2 5 8 11)")
    out_channels: int = option(256, "channels of every pyramid level")
    anchor_sizes: list[int] = option(list(ANCHOR_SIZES), "RPN anchor size per level (strides 4, 8, 16, 32, 64)")
    head_width: int = option(DETECTOR_HEADS["head_width"], "channels of the RPN / box / mask head convolutions")
    fc_width: int = option(DETECTOR_HEADS["fc_width"], "width of the box head's fully connected layer")
    roi_batch: int = option(DETECTOR_HEADS["roi_batch"], "RoIs sampled per image for the box and mask losses")
    proposals: int = option(DETECTOR_HEADS["proposals"], "RPN proposals per image in training (half at inference)")


@dataclass
class CocoDataConfig:
    data: str = option("", "a COCO-style folder holding instances_train.json, instances_val.json and images/ "
                           "(the coco128 layout); --ann / --images / --val-ann / --val-images override its parts")
    ann: str = option("", "training annotation file (COCO instances JSON)")
    images: str = option("", "folder the training file's image file_names are relative to")
    val_ann: str = option("", "validation annotation file (default: instances_val.json in --data; none = no "
                              "evaluation)")
    val_images: str = option("", "folder of the validation images (default: --images)")
    batch_size: int = option(2, "images per process per (micro-)batch (ViTDet: 64 in total)")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    limit_images: int = option(0, "use a fixed seeded random subset of N images of each split (0 = all); for "
                                  "quick runs")
    empty_images: str = option("skip", "training images without a usable annotation: skip (detectron2 / ViTDet) "
                                      "or keep as negatives; evaluation always keeps them", choices=EMPTY_POLICIES)


@dataclass
class JitterConfig:
    """Large-scale jitter (ViTDet): flip, resize by a random factor of the target size, crop / pad."""

    scale_range: list[float] = option([0.1, 2.0], "random resize factor of the target size (LSJ: 0.1 2.0)")
    hflip: bool = option(True, "random horizontal flip")


@dataclass
class DetectOptimConfig(OptimConfig):
    """ViTDet's recipe: AdamW (0.9, 0.999), lr 1e-4 at batch 64, weight decay 0.1, layer decay 0.7; the
    loop's warm-up + cosine replaces ViTDet's step decay."""

    epochs: int = redefault(OptimConfig, "epochs", 100)
    warmup_epochs: float = redefault(OptimConfig, "warmup_epochs", 0.25)
    base_lr: float = option(4e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256 (ViTDet: 1e-4 "
                                  "at batch 64)")
    weight_decay: float = redefault(OptimConfig, "weight_decay", 0.1)
    betas: list[float] = option([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    layer_decay: float = option(0.7, "layer-wise lr decay: block i of d gets layer_decay^(d - i) (ViTDet: B 0.7, "
                                     "L 0.8; 1 = off)")


@dataclass
class DetectRunConfig(TrainRunConfig):
    out: str = redefault(TrainRunConfig, "out", "runs/detect")
    eval_every: int = option(1, "box / mask AP on the validation file every N epochs (0 = only after the last)")
    vis_images: int = option(4, "validation images drawn with their detections at the end (0 = none)")
    score_threshold: float = option(0.5, "detections drawn from this score up")


DetectTrainConfig = command_config("DetectTrainConfig", __name__, model=DetectModelConfig, data=CocoDataConfig,
                                   augment=JitterConfig, optim=DetectOptimConfig, run=DetectRunConfig)


@dataclass
class CheckpointConfig:
    checkpoint: str = option("", "a `maelab detect train` run folder, checkpoint folder or model.safetensors")


@dataclass
class EvalDataConfig:
    data: str = option("", "a COCO-style folder (instances_<split>.json, images/)")
    split: str = option("val", "which instances_<split>.json of --data")
    ann: str = option("", "annotation file (overrides --data / --split)")
    images: str = option("", "image folder of --ann (default: <data>/images)")
    batch_size: int = option(1, "images per forward pass")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    limit_images: int = option(0, "a fixed seeded random subset of N images (0 = all)")


@dataclass
class DetectEvalRunConfig(ProcessConfig):
    out: str = option("", "also write the results as JSON to this file")
    seed: int = option(0, "seed of the --limit-images subset")
    min_score: float = option(0.05, "detections scored from this score up (torchvision / detectron2: 0.05); 0 keeps "
                                    "the 100 best per image, for weak models whose scores are all low")


DetectEvalConfig = command_config("DetectEvalConfig", __name__, model=CheckpointConfig, data=EvalDataConfig,
                                  run=DetectEvalRunConfig)


@dataclass
class PredictInputConfig:
    images: list[str] = option([], "image files or folders of images to detect on")
    max_images: int = option(16, "draw at most this many images (the first, in sorted order)")


@dataclass
class PredictRunConfig(ProcessConfig):
    out: str = option("detections.png", "the picture to write (PNG); the detections go beside it as JSON")
    score_threshold: float = option(0.5, "detections drawn and listed from this score up")


DetectPredictConfig = command_config("DetectPredictConfig", __name__, model=CheckpointConfig,
                                     input=PredictInputConfig, run=PredictRunConfig)

ACTIONS = {
    "train": (DetectTrainConfig, "train Mask R-CNN on the encoder (COCO-format data)"),
    "eval": (DetectEvalConfig, "box and mask AP of a trained detector on an annotation file"),
    "predict": (DetectPredictConfig, "draw a trained detector's boxes and masks on images (PNG)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    for name, (cls, help_text) in ACTIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + ". Every flag is a config field; --config "
                           "loads a YAML preset first (flags override it).")
        add_config_args(p, cls)
