"""`maelab finetune`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.choices import POOLS
from maelab.commands.options.sections import ClassDataConfig, EncoderConfig, OptimConfig, TrainRunConfig
from maelab.config import command_config, option, redefault


NAME = "finetune"
DESCRIPTION = ("End-to-end fine-tuning with the official MAE recipe (global-average-pool + fc_norm head, layer-wise lr "
               "decay, drop path, RandAugment, mixup / cutmix, label smoothing, random erasing, AdamW, warm-up + "
               "cosine); top-1 / top-5 on the validation split after every epoch; the headline is the final epoch.")


@dataclass
class FinetuneModelConfig(EncoderConfig):
    global_pool: str = option("avg", "head input: mean of the patch tokens + a new fc_norm (avg, the recipe) or the "
                                 "cls token after the final norm (token)", choices=POOLS)
    drop_path: float = option(0.1, "stochastic depth rate (recipe: ViT-B 0.1, L 0.2, H 0.3)")


@dataclass
class AugmentConfig:
    """The official fine-tuning augmentation (timm): crop + flip, RandAugment, random erasing, mixup / cutmix."""

    min_crop_scale: float = option(0.08, "RandomResizedCrop minimum area fraction")
    hflip: bool = option(True, "random horizontal flip")
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "RandAugment policy in timm syntax (rand-m9-mstd0.5-inc1, "
                                                          "augmix-m5-w4-d2, original, v0, ...); none = off")
    reprob: float = option(0.25, "random erasing probability (pixel mode)")
    mixup: float = option(0.8, "mixup alpha (0 = off)")
    cutmix: float = option(1.0, "cutmix alpha (0 = off)")
    mixup_prob: float = option(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on")
    smoothing: float = option(0.1, "label smoothing")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The official fine-tuning recipe: AdamW (0.9, 0.999), layer-wise lr decay, warm-up + cosine."""

    epochs: int = option(100, "training epochs (recipe: ViT-B 100, L/H 50)")
    warmup_epochs: float = redefault(OptimConfig, "warmup_epochs", 5.0)
    base_lr: float = option(5e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256 (ViT-B 5e-4, L/H 1e-3)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    betas: list[float] = option([0.9, 0.999], "AdamW betas, two numbers in [0, 1)")
    layer_decay: float = option(0.65, "layer-wise lr decay: block i of d gets layer_decay^(d - i) (ViT-B 0.65, L/H 0.75; 1 = off)")


FinetuneConfig = Config = command_config(
    "FinetuneConfig", __name__, model=FinetuneModelConfig, data=ClassDataConfig, augment=AugmentConfig,
    optim=FinetuneOptimConfig, run=TrainRunConfig)
