"""`maelab ablate`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.commands.options.sections import ChainDataConfig, ProcessConfig
from maelab.config import command_config, option, redefault


NAME = "ablate"
DESCRIPTION = ("Ablation of one setting, e.g. --setting mask-ratio --values 0.25 0.5 0.75 0.9 (paper Table 1). "
               "Every value is pre-trained to --budget, then evaluated.")
EVALUATIONS = ("knn", "linprobe", "finetune")


@dataclass
class SweepConfig:
    setting: str = option("", "the `maelab pretrain` flag to vary, without dashes: mask-ratio, decoder-depth, "
                              "decoder-embed-dim, mask-type, norm-pix-loss, min-crop-scale, ...")
    values: list[str] = option([], "the values to try (for on/off flags: true false, or 1 0)")
    evaluate: list[str] = option(["knn", "linprobe"], "evaluations of every encoder: knn, linprobe, finetune",
                                 choices=EVALUATIONS)


@dataclass
class SweepDataConfig(ChainDataConfig):
    limit_images: int = option(0, "a fixed seeded subset of N images of each split, pre-training too (0 = all)")
    pretrain_images: int | None = option(None, "images of the pre-training subset when it should differ from "
                                               "--limit-images (0 = all): pre-train on everything, evaluate on a subset")
    subset_seed: int | None = option(None, "seed of the --limit-images / --pretrain-images subsets (default: each "
                                           "run's seed); fix it (e.g. 0) to compare seeds on the same images")
    batch_size: int = redefault(ChainDataConfig, "batch_size", 128)


@dataclass
class SweepRunConfig(ProcessConfig):
    precision: str = redefault(ProcessConfig, "precision", "fast")  # a budget buys more steps in bf16
    out: str = option("runs/ablate", "sweep folder: one sub-folder per value, results.json / .md, ablation.png")
    preset: str = option("pretrain_cifar10_tiny", "`maelab pretrain` preset every value starts from")
    img_size: int = option(0, "input size of every pre-training (0: the preset's); the evaluations take the encoder's")
    budget: str = option("5m", "wall-clock budget of each pre-training (none: --pretrain-epochs, else the preset's)")
    pretrain_epochs: int | None = option(None, "pre-training epochs when --budget is none (default: the preset's)")
    finetune_budget: str = option("5m", "wall-clock budget of each fine-tune (with --evaluate finetune)")
    probe_epochs: int = option(90, "linear-probe epochs (on cached features: seconds per epoch)")
    probe_base_lr: float = option(4.0, "linear-probe LARS base lr (lr = base x batch / 256); the paper's 0.1 is "
                                       "sized for batch 16384 and leaves the head under-trained at CPU batches")
    seed: int = option(0, "seed of every run (with --setting seed, each value is the seed of its whole run)")
    seeds: list[int] = option([], "run every value once per seed and report mean ± standard deviation "
                                  "(default: --seed alone); adding seeds to a finished sweep runs only the new ones")


AblateConfig = Config = command_config("AblateConfig", __name__, sweep=SweepConfig, data=SweepDataConfig,
                                       run=SweepRunConfig)
