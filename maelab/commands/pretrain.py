"""`maelab pretrain`: MAE pre-training on a folder of images -- data, model, task and the training
loop wired together, then reconstruction pictures and a loss curve."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from maelab.commands.options.pretrain import PretrainConfig, model_kwargs, validate
from maelab.commands.session import Session
from maelab.config import load_yaml
from maelab.data.folders import ImageList, prepare_images, spread_sample
from maelab.data.loader import Feeder, choose_in_memory, plan_for
from maelab.data.shards import (STREAM_WORKERS, ShardFeeder, ShardPlan, is_shard_source, open_shards, shard_images,
                                shard_pictures)
from maelab.data.splits import subset_seed, warn_if_split_root
from maelab.data.transforms import PretrainTransform
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.evaluate.knn import pretrain_knn_monitor
from maelab.interop.mae_weights import model_meta
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import check_mask_type, legacy_grid_run
from maelab.train.loop import LoopResult, Trainer
from maelab.train.budget import timed
from maelab.train.checkpoint import read_meta
from maelab.train.distributed import plain_copy
from maelab.train.optim import adamw, batch_and_lr, scaled_lr
from maelab.train.tasks import PretrainTask
from maelab.viz import PICTURE_IMAGES, plot_curves, reconstruction_grid, save_reconstruction_grid
from maelab.viz.reconstruct import row_title


def run(cfg: PretrainConfig) -> LoopResult:
    validate(cfg)
    kwargs = model_kwargs(cfg)
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(**kwargs)  # validates sizes before any file is written
    run_config = Path(cfg.run.out or ".").expanduser() / "config.yaml"  # a run to resume, if any
    recorded = (load_yaml(run_config).get("model") or {}) if cfg.run.out and run_config.is_file() else {}
    legacy_grid = legacy_grid_run(cfg.model.mask_type, model.mask_ratio, recorded)
    if not legacy_grid:
        check_mask_type(cfg.model.mask_type, model.grid, model.mask_ratio)
    with Session(cfg.run.device, cfg.run.precision) as s:
        run_dir, resume = s.run_folder(cfg.run, cfg.data.data, cfg.monitor.knn_data)
        workers = default_workers(cfg.data.num_workers)
        transform = PretrainTransform(model.img_size, cfg.data.min_crop_scale, cfg.data.hflip, cfg.data.crop,
                                      cfg.data.color_jitter)
        if is_shard_source(cfg.data.data):
            images, feeder, vis, titles = shard_data(cfg, model.img_size, s, workers, transform, resume)
            plan, count, in_memory = feeder.plan, images.total, False
        else:
            images = prepare_images(cfg.data.data, cfg.data.bad_files, cfg.data.limit_images,
                                    subset_seed(cfg.data, cfg.run.seed))
            warn_if_split_root(images)
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
        knn_monitor = pretrain_knn_monitor(cfg, bank, model.img_size, s.device, workers, s.precision, s.is_main)

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
                                         f"epoch_{epoch + 1:04d}.png", seed=cfg.run.seed, titles=titles,
                                         mask_type=cfg.model.mask_type)
            if s.is_main and knn:
                return knn_monitor(m)  # rank 0 only; the others wait at the checkpoint barrier
            return {}

        task = PretrainTask(model, model_meta(cfg.model.model, kwargs), cfg.run.seed, cfg.optim.weight_decay,
                            epoch_hook, cfg.model.mask_type, legacy_grid)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        cfg.model.img_size = list(model.img_size)  # config.yaml records the size the run trains at
        trainer = Trainer(task, feeder, cfg.optim, cfg.run, run_dir, s.info, s.device,
                          lambda groups: adamw(groups, lr, tuple(cfg.optim.betas), s.device))
        def measure() -> tuple[float, float]:
            """Seconds of the pictures / kNN after each epoch and at the end, timed once. The kNN monitor's
            images are decoded first: that happens once per run (already spent when the plan is made), so
            it is not counted again for every kNN evaluation."""
            m = viewed()
            if not s.is_main:
                return 0.0, 0.0
            ratios = sorted({cfg.model.mask_ratio, 0.75, 0.9})
            picture = timed(lambda: reconstruction_grid(m, vis, ratios, 0, titles, mask_type=cfg.model.mask_type))
            if knn_monitor is not None:
                knn_monitor.splits()
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


def shard_data(cfg: PretrainConfig, size: tuple[int, int], s: Session, workers: int, transform,
               resume: Path | None = None):
    """(shard set, feeder, picture images, their titles) of a ``--data`` naming tar shards."""
    if cfg.data.limit_images:
        raise MaelabError("--limit-images needs an image folder; with shards, pass fewer of them (a brace "
                          "pattern such as train-{0000..0009}.tar) or write a subset (maelab shards make --limit-images)")
    if cfg.data.in_memory == "yes":
        raise MaelabError("--in-memory yes needs an image folder; shards are streamed (--in-memory auto or no)")
    shards = open_shards(cfg.data.data)
    workers = stream_workers(cfg.data.num_workers, workers, resume, s.is_main)
    plan = ShardPlan(shards, cfg.data.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank, cfg.run.seed,
                     workers)
    feeder = ShardFeeder(plan, s.device, transform, cfg.data.bad_files, cfg.data.shuffle_buffer)
    vis, names = shard_pictures(shards, PICTURE_IMAGES, size, cfg.data.bad_files)
    return shards, feeder, vis, [row_title(n) for n in names]


def stream_workers(requested: int, workers: int, resume: Path | None, say: bool) -> int:
    """The loader worker count of a streamed run: the order of a stream's samples depends on it, so a resume
    keeps the count its run started with when ``--num-workers`` is left at -1 (one per core), which would
    otherwise follow this machine's cores; an explicit other count is taken with a warning."""
    recorded = read_meta(resume).get(STREAM_WORKERS) if resume is not None else None
    if recorded is None or recorded == workers:
        return workers
    if requested == -1:
        if say:
            print(f"maelab pretrain: {recorded} loader workers, as when the run started (the order of streamed "
                  f"samples depends on the count; -1 would give {workers} here)", flush=True)
        return recorded
    if say:
        warnings.warn(f"--num-workers {workers} differs from the {recorded} this run started with: from here on "
                      f"the shards are read in another order than an uninterrupted run reads them (pass "
                      f"--num-workers {recorded} for an exact resume)", stacklevel=2)
    return workers


def finish_pictures(model: MaskedAutoencoder, run_dir, vis, cfg: PretrainConfig, titles=None) -> None:
    ratios = sorted({cfg.model.mask_ratio, 0.75, 0.9})
    out = save_reconstruction_grid(model, vis, ratios, run_dir / "reconstruction.png", seed=cfg.run.seed,
                                   titles=titles, mask_type=cfg.model.mask_type)
    curve = run_dir / "loss_curve.png"
    try:
        plot_curves(run_dir / "metrics.jsonl", curve)
    except MaelabError:
        curve = None
    print(f"reconstructions: {out}" + (f"\nloss curve: {curve}" if curve else ""), flush=True)
