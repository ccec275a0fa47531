"""`maelab segment`'s options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from maelab.choices import LR_SCHEDULES, SEGMENT_MODES
from maelab.commands.options.sections import EncoderConfig, EvalRunConfig, OptimConfig, ProcessConfig, TrainRunConfig
from maelab.config import add_config_args, command_config, option, redefault


NAME = "segment"
DESCRIPTION = ("UPerNet semantic segmentation on a ViT encoder (BEiT / MAE recipe): `train` fine-tunes it on a "
               "CamVid- or ADE20K-layout folder, `eval` gives mIoU / mAcc / aAcc / per-class IoU of a run, "
               "`predict` draws predicted masks.")
Config = None  # three sub-commands, each with its own config (add_arguments)


@dataclass
class SegModelConfig:
    init: str = redefault(EncoderConfig, "init", "")
    model: str | None = redefault(EncoderConfig, "model", None)
    num_heads: int | None = redefault(EncoderConfig, "num_heads", None)
    img_size: list[int] | None = option(None, "training crop, one or two numbers divisible by the patch size "
                                          "(default: the checkpoint's input size; recipe: 512)")
    drop_path: float = option(0.1, "stochastic depth rate of the encoder (recipe: ViT-B 0.1)")
    out_indices: list[int] | None = option(None, "encoder blocks whose outputs feed the pyramid (default: 4 evenly "
                                             "spaced, the last included: 3 6 9 12 in 1-based terms for depth 12)")
    window_size: int | None = option(None, "windowed attention (ViTDet) with windows of this many patches; none = "
                                       "global attention in every block")
    global_blocks: list[int] = option([], "with --window-size: blocks that keep global attention (0-based)")
    decoder_channels: int = option(512, "UPerNet width (recipe: 512; smaller for quick CPU runs)")
    aux_weight: float = option(0.4, "weight of the auxiliary FCN loss on the stride-16 map (0 = no auxiliary head)")


@dataclass
class SegSplitConfig:
    """The data of one split, as evaluation reads it."""
    data: str = option("", "dataset root: <split>/images + <split>/labels (CamVid) or images/<split> + "
                       "annotations/<split> (ADE20K)")
    dataset: str = option("camvid", "what label values mean: camvid (0-10, 11 = void), ade20k (1-150, 0 = ignored) "
                          "or custom (--num-classes, --ignore-value)", choices=("camvid", "ade20k", "custom"))
    num_classes: int | None = option(None, "classes of a custom dataset (labels 0..N-1)")
    ignore_value: int | None = option(None, "label value ignored in a custom dataset")
    val_split: str | None = option(None, "validation split name (default: val, or validation for ADE20K)")
    batch_size: int = option(8, "images per process per (micro-)batch (at least 2: the head uses BatchNorm)")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    limit_images: int = option(0, "a fixed seeded random subset of N images of each split (0 = all); for quick runs")
    base_size: int | None = option(None, "short side the images are resized to before the random ratio, and for "
                                     "evaluation (default: the crop's short side; ADE20K recipe 512)")


@dataclass
class SegDataConfig(SegSplitConfig):
    """Training's data: the evaluation split's settings, the training split and its augmentation (eval and
    predict do not take these: they listed them and did nothing with them)."""
    train_split: str | None = option(None, "training split name (default: train, or training for ADE20K)")
    ratio_range: list[float] = option([0.5, 2.0], "random resize: base size x a ratio drawn from this range")
    hflip: bool = option(True, "random horizontal flip")
    photometric: bool = option(True, "random brightness / contrast / saturation / hue (mmseg PhotoMetricDistortion)")


@dataclass
class SegInferenceConfig:
    eval_mode: str = option("whole", "inference: the whole image at once, or sliding crop-sized windows",
                            choices=SEGMENT_MODES)
    eval_stride: list[int] | None = option(None, "sliding-window stride in pixels (default: 2/3 of the crop, "
                                             "as 341 for 512)")


@dataclass
class SegEvalConfig(SegInferenceConfig):
    """Inference, and when training evaluates and draws."""
    eval_every: int = option(1, "evaluate on the validation split every N epochs (and always after the last)")
    pictures: int = option(4, "validation images drawn at the end of training (0 = none)")


@dataclass
class SegOptimConfig(OptimConfig):
    """The BEiT / MAE ADE20K recipe: AdamW (0.9, 0.999), lr 1e-4 at batch 16, weight decay 0.05, layer decay
    0.65, linear warm-up then poly decay."""

    epochs: int = option(10, "training epochs (ADE20K recipe: 160k iterations at batch 16 = 127 epochs)")
    warmup_epochs: float = redefault(OptimConfig, "warmup_epochs", 1.0)
    base_lr: float = option(1.6e-3, "learning rate per 256 images (1.6e-3 = the recipe's 1e-4 at batch 16)")
    betas: list[float] = option([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    layer_decay: float = option(0.65, "layer-wise lr decay (ViT-B 0.65; 1 = off)")
    schedule: str = option("poly", "after the warm-up: poly (power 1, mmseg) or cosine", choices=LR_SCHEDULES)


@dataclass
class SegTrainRunConfig(TrainRunConfig):
    out: str = option("runs/segment", "run folder (config, checkpoints, logs, results.json, pictures); an existing "
                      "run resumes")


@dataclass
class SegCheckpointConfig:
    checkpoint: str = option("", "a `maelab segment train` run folder, checkpoint folder or weights file")


@dataclass
class PredictConfig:
    images: list[str] = option([], "image files or folders of images")
    labels: str = option("", "folder of label PNGs with the images' stems: drawn beside the prediction")
    limit: int = option(8, "predict and draw at most this many images (the first: files in the order given, a folder's sorted; 0 = all)")
    base_size: int | None = option(None, "short side the images are resized to for inference, the long side "
                                     "at most 4 times that (default: the training crop's short side)")


@dataclass
class PredictRunConfig(ProcessConfig):
    out: str = option("segmentation.png", "picture to write; the masks go to <out stem>_masks/ as PNGs of class "
                      "indices")


TrainConfig = command_config("SegmentTrainConfig", __name__, model=SegModelConfig, data=SegDataConfig,
                             eval=SegEvalConfig, optim=SegOptimConfig, run=SegTrainRunConfig)
EvalConfig = command_config("SegmentEvalConfig", __name__, weights=SegCheckpointConfig, data=SegSplitConfig,
                            eval=SegInferenceConfig, run=EvalRunConfig)
PredictCommandConfig = command_config("SegmentPredictConfig", __name__, weights=SegCheckpointConfig,
                                      predict=PredictConfig, eval=SegInferenceConfig,
                                      run=PredictRunConfig)
SUBCOMMANDS = {"train": TrainConfig, "eval": EvalConfig, "predict": PredictCommandConfig}
SUB_HELP = {"train": "train UPerNet on the encoder (resumes a run found in --out)",
            "eval": "mIoU / mAcc / aAcc / per-class IoU of a trained run on a split",
            "predict": "draw predicted masks of images (PNG) and write the masks"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="segment_command", metavar="{train,eval,predict}", required=True)
    for name, cls in SUBCOMMANDS.items():
        add_config_args(sub.add_parser(name, help=SUB_HELP[name], description=SUB_HELP[name]), cls)
