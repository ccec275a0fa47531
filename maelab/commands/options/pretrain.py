"""`maelab pretrain`'s options and the cheap checks on them. The commands which run pre-trainings
(`maelab ablate`, `maelab recipe`) read them too, to refuse what `maelab pretrain` would refuse before they
start, not after earlier steps have spent their budgets (with the model built on the meta device:
:func:`maelab.commands.steps.check_buildable`)."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.choices import CROPS, MASK_TYPES
from maelab.commands.options.sections import (OptimConfig, TrainRunConfig, at_least, check_crop_scale, check_run_numbers,
                                      check_schedule)
from maelab.config import command_config, option
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.models.checks import num_visible
from maelab.models.presets import preset_kwargs


NAME = "pretrain"
DESCRIPTION = "Masked Autoencoder pre-training."


@dataclass
class ModelConfig:
    model: str = option("mae_vit_tiny_patch4", "model preset (see `maelab models`)")
    img_size: list[int] | None = option(None, "input size: one number (square) or two (height width); default: the preset's")
    mask_ratio: float = option(0.75, "fraction of patches removed, in (0, 1): at least one patch must be masked and "
                                 "one stay visible")
    mask_type: str = option("random", "which patches are masked: random (the paper), block (BEiT-style rectangles) or "
                                      "grid (a regular lattice is kept); paper Fig. 6", choices=MASK_TYPES)
    norm_pix_loss: bool = option(True, "regress per-patch normalised pixels (better representations)")
    decoder_embed_dim: int | None = option(None, "decoder width (default: the preset's)")
    decoder_depth: int | None = option(None, "decoder blocks (default: the preset's)")
    decoder_num_heads: int | None = option(None, "decoder attention heads (default: the preset's)")
    encoder_mask_tokens: bool = option(False, "ablation (paper Table 1c): mask tokens in the encoder, which then sees "
                                              "every position; MAE's choice is off")


@dataclass
class DataConfig:
    data: str = option("", "image folder (an ImageFolder tree <class>/<image> or a flat folder of images), or tar "
                           "shards: a `maelab shards make` folder, index.json, a brace pattern "
                           "(train-{0000..0127}.tar), https:// URLs or pipe: commands")
    batch_size: int = option(128, "images per process per micro-step")
    num_workers: int = option(-1, "data-loading processes; -1 = one per CPU core, at most 8")
    in_memory: str = option("auto", "decode the dataset once into RAM and augment whole batches: auto | yes | no", choices=("auto", "yes", "no"))
    min_crop_scale: float = option(0.2, "RandomResizedCrop minimum area fraction")
    hflip: bool = option(True, "random horizontal flip")
    crop: str = option("random-size", "crop: random-size (RandomResizedCrop, the paper's), fixed-size (the mean area "
                                      "of the random-size crop, the image's aspect, random position) or none",
                       choices=CROPS)
    color_jitter: float = option(0.0, "colour jitter strength s: brightness, contrast, saturation in [1-s, 1+s] "
                                      "(0 = off, as the paper)")
    bad_files: str = option("error", "unreadable image: stop with its path (error) or leave it out (skip)", choices=("error", "skip"))
    limit_images: int = option(0, "train on a fixed seeded random subset of N images (0 = all); for quick runs")
    subset_seed: int | None = option(None, "seed of the --limit-images subset and of the --knn-every monitor's "
                                           "subsets (default: --seed)")
    shuffle_buffer: int = option(1000, "shards: samples each loader worker holds in its shuffle buffer")


@dataclass
class RunConfig(TrainRunConfig):
    out: str = option("runs/pretrain", "run folder (config, checkpoints, logs, pictures); an existing run resumes")
    seed: int = option(0, "seed for initialisation, data order, augmentation and masking")
    vis_every: int = option(5, "reconstruction grid every N epochs (0 = only at the end)")
    fsdp: bool = option(False, "under torchrun, shard weights, gradients and AdamW state across the processes "
                               "(FSDP fully_shard, one unit per transformer block) instead of replicating them "
                               "(DDP); for ViT-L/H. Checkpoints are the same files either way")
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the "
                                                   "backward pass (less memory, ~1/3 more compute)")


@dataclass
class MonitorConfig:
    knn_every: int = option(0, "weighted kNN accuracy of the encoder's features every N epochs and at the end "
                           "(0 = off); needs class folders in --data")
    knn_data: str = option("", "labelled held-out images for the kNN monitor (default: a sibling val / test folder of --data)")
    knn_max: int = option(5000, "images of each split the kNN monitor uses (a fixed seeded subsample; 0 = all)")


PretrainConfig = Config = command_config(
    "PretrainConfig", __name__, model=ModelConfig, data=DataConfig,
    optim=OptimConfig, run=RunConfig, monitor=MonitorConfig)


def model_kwargs(cfg: PretrainConfig) -> dict:
    m = cfg.model
    img = None
    if m.img_size:
        if len(m.img_size) not in (1, 2):
            raise MaelabError(f"--img-size takes one or two numbers, got {m.img_size}")
        img = tuple(m.img_size) if len(m.img_size) == 2 else (m.img_size[0], m.img_size[0])
    return preset_kwargs(m.model, img_size=img, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                         decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                         decoder_num_heads=m.decoder_num_heads,
                         encoder_mask_tokens=m.encoder_mask_tokens or None)


def validate(cfg: PretrainConfig) -> None:
    """Cheap checks before anything is read or written."""
    if not cfg.data.data:
        raise MaelabError("--data is required: a folder of images (ImageFolder tree or flat)")
    num_visible(1, cfg.model.mask_ratio)
    if cfg.data.batch_size < 1:
        raise MaelabError(f"--batch-size must be at least 1, got {cfg.data.batch_size}")
    check_run_numbers(cfg.run)
    at_least(vis_every=(cfg.run.vis_every, 0), knn_every=(cfg.monitor.knn_every, 0), knn_max=(cfg.monitor.knn_max, 0))
    default_workers(cfg.data.num_workers)
    check_schedule(cfg.optim, cfg.data.batch_size)
    check_crop_scale(cfg.data.min_crop_scale)
    if not 0 <= cfg.data.color_jitter < 1:
        raise MaelabError(f"--color-jitter must be in [0, 1), got {cfg.data.color_jitter}")
    if cfg.run.fsdp and cfg.run.precision == "fp16":
        raise MaelabError("--fsdp with --precision fp16 is not supported (fp16's gradient scaler does not handle "
                          "sharded gradients); use --precision bf16")
