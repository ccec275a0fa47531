"""`maelab pretrain`: MAE pre-training on a folder of images -- data, model, task and the training
loop wired together, then reconstruction pictures and a loss curve."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maelab.commands.sections import (OptimConfig, TrainRunConfig, check_crop_scale, check_run_numbers,
                                      check_schedule)
from maelab.commands.session import Session
from maelab.config import command_config, option
from maelab.data.folders import ImageList, prepare_images, spread_sample
from maelab.data.loader import Feeder, choose_in_memory, plan_for
from maelab.data.shards import ShardFeeder, ShardPlan, is_shard_source, open_shards, shard_images, shard_pictures
from maelab.data.splits import subset_seed
from maelab.data.transforms import CROPS, PretrainTransform
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.evaluate.knn import pretrain_knn_monitor
from maelab.interop.mae_weights import model_meta
from maelab.models.checks import num_visible
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import MASK_TYPES
from maelab.models.presets import preset_kwargs
from maelab.train.loop import LoopResult, Trainer
from maelab.train.budget import timed
from maelab.train.distributed import plain_copy
from maelab.train.optim import adamw, batch_and_lr, scaled_lr
from maelab.train.tasks import PretrainTask
from maelab.viz import PICTURE_IMAGES, plot_curves, reconstruction_grid, save_reconstruction_grid

NAME = "pretrain"
HELP = "MAE pre-training on a folder of images"
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
    default_workers(cfg.data.num_workers)
    check_schedule(cfg.optim, cfg.data.batch_size)
    check_crop_scale(cfg.data.min_crop_scale)
    if not 0 <= cfg.data.color_jitter < 1:
        raise MaelabError(f"--color-jitter must be in [0, 1), got {cfg.data.color_jitter}")
    if cfg.run.fsdp and cfg.run.precision == "fp16":
        raise MaelabError("--fsdp with --precision fp16 is not supported (fp16's gradient scaler does not handle "
                          "sharded gradients); use --precision bf16")


def run(cfg: PretrainConfig) -> LoopResult:
    validate(cfg)
    kwargs = model_kwargs(cfg)
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(**kwargs)  # validates sizes before any file is written
    with Session(cfg.run.device, cfg.run.precision) as s:
        run_dir, resume = s.run_folder(cfg.run)
        workers = default_workers(cfg.data.num_workers)
        transform = PretrainTransform(model.img_size, cfg.data.min_crop_scale, cfg.data.hflip, cfg.data.crop,
                                      cfg.data.color_jitter)
        if is_shard_source(cfg.data.data):
            images, feeder, vis, titles = shard_data(cfg, model.img_size, s, workers, transform)
            plan, count, in_memory = feeder.plan, images.total, False
        else:
            images = prepare_images(cfg.data.data, cfg.data.bad_files, cfg.data.limit_images,
                                    subset_seed(cfg.data, cfg.run.seed))
            in_memory = choose_in_memory(cfg.data.in_memory, images, model.img_size)
            plan = plan_for(images, cfg.data.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank,
                            cfg.run.seed)
            feeder = Feeder(images, plan, s.device, model.img_size, in_memory, transform=transform,
                            min_scale=cfg.data.min_crop_scale, hflip=cfg.data.hflip, num_workers=workers,
                            bad_files=cfg.data.bad_files, progress=s.is_main, crop=cfg.data.crop,
                            color_jitter=cfg.data.color_jitter)
            vis, titles, count = spread_sample(images, PICTURE_IMAGES, cfg.data.bad_files), None, len(images)
        model.to(s.device)
        bank = images if isinstance(images, ImageList) else shard_images(cfg.data.data) if cfg.monitor.knn_every else None
        knn_monitor = pretrain_knn_monitor(cfg, bank, model.img_size, s.device, workers, s.precision)

        def viewed():
            """The model for rank 0's pictures and kNN (a plain copy under FSDP; every rank calls this)."""
            return plain_copy(model, lambda: MaskedAutoencoder(**kwargs), s.info, s.device)

        def epoch_hook(epoch: int, last: bool) -> dict[str, float]:
            every = cfg.run.vis_every
            picture = last or (every > 0 and (epoch + 1) % every == 0)
            knn = knn_monitor is not None and (last or (epoch + 1) % cfg.monitor.knn_every == 0)
            m = viewed() if picture or knn else None
            if s.is_main and picture:
                save_reconstruction_grid(m, vis, [cfg.model.mask_ratio], run_dir / "reconstructions" /
                                         f"epoch_{epoch + 1:04d}.png", seed=cfg.run.seed, titles=titles)
            if s.is_main and knn:
                return knn_monitor(m)  # rank 0 only; the others wait at the checkpoint barrier
            return {}

        task = PretrainTask(model, model_meta(cfg.model.model, kwargs), cfg.run.seed, cfg.optim.weight_decay,
                            epoch_hook, cfg.model.mask_type)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        cfg.model.img_size = list(model.img_size)  # config.yaml records the size the run trains at
        trainer = Trainer(task, feeder, cfg.optim, cfg.run, run_dir, s.info, s.device,
                          lambda groups: adamw(groups, lr, tuple(cfg.optim.betas), s.device))
        def measure() -> tuple[float, float]:
            """Seconds of the pictures / kNN after each epoch and at the end, timed once."""
            m = viewed()
            if not s.is_main:
                return 0.0, 0.0
            ratios = sorted({cfg.model.mask_ratio, 0.75, 0.9})
            picture = timed(reconstruction_grid, m, vis, ratios, 0, titles)
            knn = timed(knn_monitor, m) if knn_monitor is not None else 0.0
            every = (picture / cfg.run.vis_every if cfg.run.vis_every > 0 else 0.0) + (
                knn / cfg.monitor.knn_every if knn_monitor is not None else 0.0)
            return every, 2 * picture + knn + 1.0  # the last epoch's grid, the final grid, kNN, the loss curve

        s.plan_budget(trainer, cfg, resume, measure)
        source = f"{len(images.urls)} shards" if is_shard_source(cfg.data.data) else ("in RAM" if in_memory else "streamed")
        header = (f"maelab pretrain: {count} images ({source}), "
                  f"{cfg.model.model} {tuple(model.img_size)} on {s.where}"
                  + (", FSDP" if cfg.run.fsdp and s.info.enabled else "")
                  + (", activation checkpointing" if cfg.run.activation_checkpointing else "") + ", "
                  + batch_and_lr(plan.batch_size, plan.accum, plan.world, cfg.optim.base_lr, cfg.optim.lr)
                  + f", {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        result = s.fit(trainer, cfg, resume, header)
        m = viewed()
        if s.is_main:
            finish_pictures(m, run_dir, vis, cfg, titles)
        return result


def shard_data(cfg: PretrainConfig, size: tuple[int, int], s: Session, workers: int, transform):
    """(shard set, feeder, picture images, their titles) of a ``--data`` naming tar shards."""
    if cfg.data.limit_images:
        raise MaelabError("--limit-images needs an image folder; with shards, pass fewer of them (a brace "
                          "pattern such as train-{0000..0009}.tar) or write a subset (maelab shards make --limit-images)")
    if cfg.data.in_memory == "yes":
        raise MaelabError("--in-memory yes needs an image folder; shards are streamed (--in-memory auto or no)")
    shards = open_shards(cfg.data.data)
    plan = ShardPlan(shards, cfg.data.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank, cfg.run.seed,
                     workers)
    feeder = ShardFeeder(plan, s.device, transform, cfg.data.bad_files, cfg.data.shuffle_buffer)
    vis, titles = shard_pictures(shards, PICTURE_IMAGES, size, cfg.data.bad_files)
    return shards, feeder, vis, titles


def finish_pictures(model: MaskedAutoencoder, run_dir, vis, cfg: PretrainConfig, titles=None) -> None:
    ratios = sorted({cfg.model.mask_ratio, 0.75, 0.9})
    out = save_reconstruction_grid(model, vis, ratios, run_dir / "reconstruction.png", seed=cfg.run.seed,
                                   titles=titles)
    curve = run_dir / "loss_curve.png"
    try:
        plot_curves(run_dir / "metrics.jsonl", curve)
    except MaelabError:
        curve = None
    print(f"reconstructions: {out}" + (f"\nloss curve: {curve}" if curve else ""), flush=True)
