"""Config sections shared by several commands, and the checks of the numbers in them.

A command's own sections sit in its options module (:mod:`maelab.commands.options.pretrain`, ...); like
them, this module imports no torch. Defaults follow the official ViT-B recipes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from maelab.choices import POOLS
from maelab.config import option
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.train.budget import check_history, parse_duration


@dataclass
class ScheduleConfig:
    """What every optimizer shares: length, per-iteration warm-up + cosine, decay, accumulation."""

    epochs: int = option(10, "training epochs")
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs (per-iteration schedule)")
    base_lr: float = option(1.5e-4, "learning rate per 256 images: lr = base_lr * effective batch / 256")
    lr: float | None = option(None, "absolute learning rate (overrides base_lr)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to biases, norms, tokens, position embeddings)")
    accum_iter: int = option(1, "micro-steps accumulated per optimizer step")
    clip_grad: float | None = option(None, "clip the gradient norm to this value (> 0; none = no clipping)")
    budget: str | None = option(None, "wall-clock budget for the whole run (90s, 30m, 2h, 1h30m): this machine's "
                                      "step time is measured and the step count set to fit, evaluation and pictures "
                                      "included (replaces --epochs; recorded in the run's config)")
    max_steps: int | None = option(None, "total optimizer steps (default: epochs x steps per epoch; --budget sets it)")
    plan_history: list[int] | None = option(None, "written by --budget when it re-sizes a run as it goes: the first "
                                                  "plan's total steps, then step / new total pairs; the schedule "
                                                  "follows it, so a resumed run stays exact (leave it out)")


@dataclass
class OptimConfig(ScheduleConfig):
    betas: list[float] = option([0.9, 0.95], "AdamW betas, two numbers in [0, 1)")


PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto | fast | fp32 | bf16 | fp16 (autocast; fp16 also uses a GradScaler when training). auto = bf16 "
                  "on a CUDA GPU that has it, fp32 elsewhere; fast = bf16 wherever the hardware has it (CPUs with "
                  "AVX-512 BF16 / AMX too), fp32 elsewhere")


@dataclass
class ProcessConfig:
    """Where a command runs: every command's run section starts with these."""

    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS)


@dataclass
class TrainRunConfig(ProcessConfig):
    out: str = option("runs/finetune", "run folder (config, checkpoints, logs, results.json); an existing run resumes")
    seed: int = option(0, "seed for initialisation, data order, augmentation and mixup")
    resume: str = option("auto", "auto (continue a run found in --out) | never | PATH of a checkpoint")
    log_every: int = option(20, "optimizer steps between log lines / host syncs")
    save_every: int = option(5, "keep a checkpoint every N >= 1 epochs (the latest is always saved)")
    keep: int = option(3, "periodic checkpoints to keep (0 = all)")
    save_every_minutes: float = option(10.0, "also write a checkpoint inside an epoch once this many minutes have "
                                       "passed since the last one (it replaces the previous such one; the "
                                       "epoch's end removes it), so a killed run loses at most that much; 0: "
                                       "epoch ends only")
    compile: bool = option(False, "torch.compile the model")


@dataclass
class EncoderConfig:
    init: str = option("", "encoder weights: a maelab run / checkpoint folder / .safetensors, an official MAE .pth, a "
                       "timm checkpoint, a Hugging Face ViTMAE folder, or `none` (random init, the baseline)")
    model: str | None = option(None, "model preset: the architecture for --init none; with a checkpoint it must "
                                 "match (default: the checkpoint's)")
    img_size: list[int] | None = option(None, "input size, one or two numbers (default: the checkpoint's); position "
                                          "embeddings are resized bicubically when it differs")
    global_pool: str = option("token", "features: the cls token after the final norm (token) or the mean of the "
                                   "patch tokens after it (avg)", choices=POOLS)
    num_heads: int | None = option(None, "encoder attention heads, for files that do not record them (official .pth, "
                                     "timm); default: the paper's table (192: 3, 384: 6, 768: 12, 1024/1280: 16)")


@dataclass
class ImagesConfig:
    data: str = option("", "image folder: an ImageFolder tree (<class>/<image>) or a flat folder of images; or "
                           "local tar shards (`maelab shards make` folder, index.json or brace pattern)")
    batch_size: int = option(128, "images per process per (micro-)batch")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    in_memory: str = option("auto", "decode images once into RAM: auto (when they fit and already have the input "
                                "size) | yes | no", choices=("auto", "yes", "no"))
    crop_pct: float = option(0.875, "evaluation view: resize to size / crop_pct and centre-crop (images already at "
                                "the input size are used as they are)")
    bad_files: str = option("error", "unreadable image: stop with its path (error) or leave it out (skip)",
                        choices=("error", "skip"))


@dataclass
class ClassDataConfig(ImagesConfig):
    data: str = option("", "training split: an ImageFolder tree (<class>/<image>) or local tar shards "
                           "(`maelab shards make` folder, index.json or brace pattern)")
    val_data: str = option("", "validation split, same class folders (default: a sibling val / validation / valid / "
                           "test folder when --data is called train)")
    num_classes: int | None = option(None, "expected number of classes, checked against the class folders")
    limit_images: int = option(0, "use a fixed seeded random subset of N images of each split (0 = all); for quick runs")
    subset_seed: int | None = option(None, "seed of the --limit-images subsets (default: --seed); the same value "
                                           "for every run scores runs of different seeds on the same images")


@dataclass
class EvalRunConfig(ProcessConfig):
    out: str = option("", "also write the results as JSON to this file")
    seed: int = option(0, "seed for --limit-images subsets and --init none")


@dataclass
class ChainDataConfig:
    """The data section of a chain of commands (``ablate``, ``recipe``)."""

    data: str = option("", "training images: an ImageFolder tree (labels for kNN / probe / fine-tune)")
    val_data: str = option("", "labelled validation images (default: a sibling val / validation / valid / test folder)")
    limit_images: int = option(0, "a fixed seeded subset of N images of each split for the evaluations (0 = all)")
    batch_size: int = option(256, "images per process per step, for pre-training and evaluation")


def _finite(flag: str, value: float) -> float:
    if not math.isfinite(value):
        raise MaelabError(f"{flag} must be a finite number, got {value}")
    return value


def check_schedule(optim: ScheduleConfig, batch_size: int | None = None) -> None:
    """The numbers of an optimizer section (``ScheduleConfig`` and its subclasses: ``OptimConfig``,
    ``FinetuneOptimConfig``, ``ProbeOptimConfig``), each refused with its flag: epochs, accumulation,
    warm-up, learning rates, weight decay, gradient clipping, and AdamW betas / LARS momentum where the
    section has them. ``batch_size`` (images per process per micro-step), when given, also checks
    ``--min-lr`` against the learning rate that ``--base-lr`` scales to (x accumulation x processes
    (WORLD_SIZE) / 256); an explicit ``--lr`` is always checked."""
    o = optim
    if o.budget:
        parse_duration(o.budget)
    if o.max_steps is not None and o.max_steps < 1:
        raise MaelabError(f"--max-steps must be at least 1, got {o.max_steps}")
    check_history(o.plan_history)
    for flag, value in (("--epochs", o.epochs), ("--accum-iter", o.accum_iter)):
        if value < 1:
            raise MaelabError(f"{flag} must be at least 1, got {value}")
    if _finite("--warmup-epochs", o.warmup_epochs) < 0:
        raise MaelabError(f"--warmup-epochs must be >= 0, got {o.warmup_epochs}")
    if _finite("--base-lr", o.base_lr) <= 0:
        raise MaelabError(f"--base-lr must be positive, got {o.base_lr}")
    if o.lr is not None and _finite("--lr", o.lr) <= 0:
        raise MaelabError(f"--lr must be positive, got {o.lr} (leave it out to scale --base-lr)")
    if _finite("--min-lr", o.min_lr) < 0:
        raise MaelabError(f"--min-lr must be >= 0, got {o.min_lr}")
    peak, how = o.lr, f"--lr {o.lr}"
    if peak is None and batch_size is not None:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        batch = batch_size * o.accum_iter * world
        peak, how = o.base_lr * batch / 256, f"--base-lr {o.base_lr} x {batch} images per step / 256"
    if peak is not None and o.min_lr > peak:
        raise MaelabError(f"--min-lr {o.min_lr} is larger than the learning rate {peak:.4g} ({how}); the cosine "
                          f"decays from the learning rate down to --min-lr")
    if _finite("--weight-decay", o.weight_decay) < 0:
        raise MaelabError(f"--weight-decay must be >= 0, got {o.weight_decay}")
    if o.clip_grad is not None and _finite("--clip-grad", o.clip_grad) <= 0:
        raise MaelabError(f"--clip-grad must be positive, got {o.clip_grad} (leave it out, or `none`, for no clipping)")
    betas = getattr(o, "betas", None)
    if betas is not None:
        if len(betas) != 2:
            raise MaelabError(f"--betas takes two numbers, got {betas}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
            raise MaelabError(f"--betas must both be in [0, 1), got {betas}")
    momentum = getattr(o, "momentum", None)
    if momentum is not None and not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise MaelabError(f"--momentum must be in [0, 1), got {momentum}")


def at_least(**values) -> None:
    """``name=(value, minimum)`` pairs: each value must be >= its minimum."""
    for name, (value, low) in values.items():
        if value is not None and value < low:
            raise MaelabError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def check_data_numbers(data) -> None:
    """``--batch-size``, ``--num-workers``, ``--crop-pct``, ``--limit-images``, ``--num-classes`` of an
    images section."""
    at_least(batch_size=(data.batch_size, 1))
    default_workers(data.num_workers)
    if not 0 < data.crop_pct <= 1:
        raise MaelabError(f"--crop-pct must be in (0, 1], got {data.crop_pct}")
    if getattr(data, "limit_images", 0) < 0:
        raise MaelabError(f"--limit-images must be 0 (all) or positive, got {data.limit_images}")
    if getattr(data, "num_classes", None) is not None:
        at_least(num_classes=(data.num_classes, 2))


def check_run_numbers(run: TrainRunConfig) -> None:
    """``--log-every``, ``--save-every``, ``--keep`` and ``--save-every-minutes`` of a training run section
    (``--keep -1`` used to keep everything silently, ``--save-every -2`` every epoch)."""
    at_least(log_every=(run.log_every, 1), save_every=(run.save_every, 1))
    if run.keep < 0:
        raise MaelabError(f"--keep must be 0 (keep all) or more, got {run.keep}")
    if not 0 <= run.save_every_minutes < math.inf:
        raise MaelabError(f"--save-every-minutes must be 0 (epoch ends only) or a positive number of minutes, "
                          f"got {run.save_every_minutes}")


def check_crop_scale(value: float) -> None:
    if not 0 < value <= 1:
        raise MaelabError(f"--min-crop-scale must be in (0, 1], got {value}")
