"""`maelab linprobe`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.commands.options.sections import ClassDataConfig, EncoderConfig, ScheduleConfig, TrainRunConfig
from maelab.config import command_config, option, redefault


NAME = "linprobe"
DESCRIPTION = ("Linear probing as in the paper: frozen encoder in eval mode, cls-token features after the final "
               "norm, BatchNorm1d(affine=False) + Linear head, LARS. --no-augment caches the features once (fast "
               "on a CPU).")


@dataclass
class ProbeAugmentConfig:
    """RandomResizedCrop + flip as in the paper, or the fixed evaluation view with cached features."""

    augment: bool = option(True, "RandomResizedCrop + flip on the training split (the paper); --no-augment trains "
                             "on the evaluation view")
    min_crop_scale: float = option(0.08, "RandomResizedCrop minimum area fraction")
    hflip: bool = option(True, "random horizontal flip")
    cache_features: bool = option(True, "with --no-augment: extract the features once and train the head on the "
                                    "cached tensor (minutes instead of hours on a CPU; same result)")


@dataclass
class ProbeOptimConfig(ScheduleConfig):
    """The paper's linear-probe recipe (appendix A.2): LARS, no weight decay, warm-up + cosine."""

    epochs: int = option(90, "training epochs (recipe: 90 for ViT-B, 50 for L/H)")
    warmup_epochs: float = redefault(ScheduleConfig, "warmup_epochs", 10.0)
    base_lr: float = redefault(ScheduleConfig, "base_lr", 0.1)
    weight_decay: float = option(0.0, "LARS weight decay on the Linear weight (never on 1-D parameters)")
    momentum: float = option(0.9, "LARS momentum")


@dataclass
class ProbeRunConfig(TrainRunConfig):
    out: str = option("runs/linprobe", "run folder (config, head checkpoints, logs, results.json); an existing run resumes")


LinprobeConfig = Config = command_config(
    "LinprobeConfig", __name__, model=EncoderConfig, data=ClassDataConfig, augment=ProbeAugmentConfig,
    optim=ProbeOptimConfig, run=ProbeRunConfig)
