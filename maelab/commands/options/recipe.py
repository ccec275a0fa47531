"""`maelab recipe`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.commands.options.sections import ChainDataConfig, ProcessConfig
from maelab.config import command_config, option, redefault


NAME = "recipe"
DESCRIPTION = ("The paper's protocol in one command: --config recipe_quick (about 30 min on 2 CPU cores) or "
               "recipe_full (the public small-scale CIFAR recipe, for a GPU). Re-running resumes.")
RATIOS = (0.75, 0.85, 0.95)


@dataclass
class RecipeSteps:
    """What each step runs (a preset of its command) and for how long (a budget, or epochs)."""

    pretrain_preset: str = option("pretrain_cifar10_tiny", "`maelab pretrain` preset")
    pretrain_budget: str = option("15m", "pre-training wall-clock budget (e.g. 15m, 2h; none: --pretrain-epochs)")
    pretrain_epochs: int = option(0, "pre-training epochs when the budget is none (0: the preset's)")
    probe_preset: str = option("linprobe_cifar_tiny", "`maelab linprobe` preset")
    probe_epochs: int = option(90, "linear-probe epochs (on cached features)")
    probe_base_lr: float | None = option(None, "linear-probe LARS base lr (default: the probe preset's)")
    finetune_preset: str = option("finetune_cifar_tiny", "`maelab finetune` preset")
    finetune_budget: str = option("5m", "budget of each fine-tune: from the MAE encoder, and from scratch "
                                        "(none: --finetune-epochs)")
    finetune_epochs: int = option(0, "fine-tuning epochs when the budget is none (0: the preset's)")
    mask_ratios: list[float] = option(list(RATIOS), "mask ratios of the reconstruction picture")
    img_size: int = option(0, "input size of every step (0: the pre-training preset's)")


@dataclass
class RecipeRun(ProcessConfig):
    precision: str = redefault(ProcessConfig, "precision", "fast")  # a budget buys more steps in bf16
    out: str = option("runs/recipe", "recipe folder: one sub-folder per step, results.json / .md, pictures")
    seed: int = option(0, "seed of every step")


RecipeConfig = Config = command_config("RecipeConfig", __name__, steps=RecipeSteps, data=ChainDataConfig, run=RecipeRun)
