"""`maelab pretrain`: wire data, model, task and the training loop together, then draw pictures."""

from __future__ import annotations

from pathlib import Path

import torch

from maelab.config import PretrainConfig, check_schedule
from maelab.data.loader import Feeder, StepPlan, choose_in_memory, default_workers, prepare_images
from maelab.errors import MaelabError
from maelab.models.loading import model_meta
from maelab.models.mae import MaskedAutoencoder, num_visible
from maelab.models.presets import preset_kwargs
from maelab.train import checkpoint as ckpt
from maelab.train.distributed import cleanup, init_distributed
from maelab.train.loop import LoopResult, Trainer, resolve_precision
from maelab.train.optim import adamw, scaled_lr
from maelab.train.tasks import PretrainTask

VIS_IMAGES = 8


def model_kwargs(cfg: PretrainConfig) -> dict:
    m = cfg.model
    img = None
    if m.img_size:
        if len(m.img_size) not in (1, 2):
            raise MaelabError(f"--img-size takes one or two numbers, got {m.img_size}")
        img = tuple(m.img_size) if len(m.img_size) == 2 else (m.img_size[0], m.img_size[0])
    return preset_kwargs(m.model, img_size=img, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                         decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                         decoder_num_heads=m.decoder_num_heads)


def validate(cfg: PretrainConfig) -> None:
    """Cheap checks before anything is read or written."""
    if not cfg.data.data:
        raise MaelabError("--data is required: a folder of images (ImageFolder tree or flat)")
    num_visible(1, cfg.model.mask_ratio)
    for name, value in [("batch-size", cfg.data.batch_size), ("log-every", cfg.run.log_every)]:
        if value < 1:
            raise MaelabError(f"--{name} must be at least 1, got {value}")
    check_schedule(cfg.optim, cfg.data.batch_size)
    if not 0 < cfg.data.min_crop_scale <= 1:
        raise MaelabError(f"--min-crop-scale must be in (0, 1], got {cfg.data.min_crop_scale}")


def find_resume(cfg: PretrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (``--resume``), checking ``--out`` can hold a run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MaelabError(f"--out {run_dir} exists and is not a folder; choose a folder for the run")
    ckpt.check_writable_folder(run_dir, "--out", run_dir)
    existing = ckpt.latest_checkpoint(run_dir)
    mode = cfg.run.resume
    if mode == "never":
        if existing:
            raise MaelabError(f"{run_dir} already holds checkpoints; choose another --out or use --resume auto")
        return None
    if mode == "auto":
        return existing
    p = Path(mode).expanduser()
    if not p.exists():
        raise MaelabError(f"--resume {p} does not exist")
    if (p / ckpt.META).is_file():
        return p
    found = ckpt.latest_checkpoint(p)
    if found is None:
        raise MaelabError(f"--resume {p} holds no complete checkpoint")
    return found


def pick_vis_images(paths: list[str], labels: list[int], k: int = VIS_IMAGES) -> list[str]:
    """A fixed, spread-out sample (one per class first) so every run draws the same pictures."""
    chosen, seen = [], set()
    for p, y in zip(paths, labels):
        if y not in seen:
            seen.add(y)
            chosen.append(p)
        if len(chosen) == k:
            return chosen
    step = max(1, len(paths) // k)
    for p in paths[::step]:
        if p not in chosen:
            chosen.append(p)
        if len(chosen) == k:
            break
    return chosen


def run_pretrain(cfg: PretrainConfig) -> LoopResult:
    validate(cfg)
    kwargs = model_kwargs(cfg)
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(**kwargs)  # validates sizes before any file is written
    info, device = init_distributed(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    try:
        run_dir = Path(cfg.run.out).expanduser()
        resume = find_resume(cfg, run_dir)
        images = prepare_images(cfg.data.data, cfg.data.bad_files, cfg.data.limit_images, cfg.run.seed)
        workers = default_workers(cfg.data.num_workers)
        in_memory = choose_in_memory(cfg.data.in_memory, images, model.img_size)
        plan = StepPlan(len(images), cfg.data.batch_size, cfg.optim.accum_iter, info.world, info.rank, cfg.run.seed)
        from maelab.data.transforms import PretrainTransform

        feeder = Feeder(images, plan, device, model.img_size, in_memory,
                        transform=PretrainTransform(model.img_size, cfg.data.min_crop_scale, cfg.data.hflip),
                        min_scale=cfg.data.min_crop_scale, hflip=cfg.data.hflip, num_workers=workers,
                        bad_files=cfg.data.bad_files, progress=info.is_main)
        model.to(device)
        vis_paths = pick_vis_images(images.paths, images.labels)
        from maelab.evaluate.knn import pretrain_knn_monitor

        knn_monitor = pretrain_knn_monitor(cfg, images, model.img_size, device, workers)

        def epoch_hook(epoch: int, last: bool) -> dict[str, float]:
            every = cfg.run.vis_every
            if info.is_main and (last or (every > 0 and (epoch + 1) % every == 0)):
                from maelab.viz import save_reconstruction_grid

                save_reconstruction_grid(model, vis_paths, [cfg.model.mask_ratio],
                                         run_dir / "reconstructions" / f"epoch_{epoch + 1:04d}.png", seed=cfg.run.seed)
            if knn_monitor is not None and info.is_main and (last or (epoch + 1) % cfg.monitor.knn_every == 0):
                return knn_monitor(model)  # rank 0 only; the others wait at the checkpoint barrier
            return {}

        meta = model_meta(cfg.model.model, kwargs)
        task = PretrainTask(model, meta, cfg.run.seed, cfg.optim.weight_decay, epoch_hook)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        trainer = Trainer(task, feeder, cfg.optim, cfg.run, run_dir, info, device,
                          lambda groups: adamw(groups, lr, tuple(cfg.optim.betas), device))
        logger = trainer.open_run(cfg, resume)  # checks a resumed checkpoint before writing
        if info.is_main:
            logger.info(f"maelab pretrain: {len(images)} images ({'in RAM' if in_memory else 'streamed'}), "
                        f"{cfg.model.model} {tuple(model.img_size)} on {device} x{info.world} ({cfg.run.precision}), global batch "
                        f"{plan.global_size}, lr {lr:.3g}, {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
            if resume is not None:
                done = trainer.epoch >= cfg.optim.epochs
                logger.info(f"resumed from {resume}: " + ("all epochs already done" if done else
                            f"continuing at epoch {trainer.epoch + 1}, step {trainer.step}"))
        try:
            result = trainer.fit()
        finally:
            logger.close()
        if info.is_main:
            finish_pictures(model, run_dir, vis_paths, cfg)
        return result
    finally:
        cleanup(info)


def finish_pictures(model: MaskedAutoencoder, run_dir: Path, vis_paths: list[str], cfg: PretrainConfig) -> None:
    from maelab.viz import plot_curves, save_reconstruction_grid

    ratios = sorted({cfg.model.mask_ratio, 0.75, 0.9})
    out = save_reconstruction_grid(model, vis_paths, ratios, run_dir / "reconstruction.png", seed=cfg.run.seed)
    curve = run_dir / "loss_curve.png"
    try:
        plot_curves(run_dir / "metrics.jsonl", curve)
    except MaelabError:
        curve = None
    print(f"reconstructions: {out}" + (f"\nloss curve: {curve}" if curve else ""), flush=True)
