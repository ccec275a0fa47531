"""`maelab finetune`: end-to-end fine-tuning of the encoder as a timm ViT classifier (the official
recipe: global average pool + fc_norm head, layer-wise lr decay, drop path, RandAugment, mixup /
cutmix, label smoothing, random erasing, AdamW, warm-up + cosine), evaluated on the validation split
after every epoch. ``--init none`` trains the same ViT from scratch: the baseline MAE is measured
against. Runs in the one training loop (:class:`maelab.train.loop.Trainer`) with a
:class:`~maelab.train.tasks.FinetuneTask`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maelab.config import FinetuneConfig, check_augment, check_schedule
from maelab.data.loader import Feeder, StepPlan, choose_in_memory, default_workers
from maelab.data.transforms import finetune_transform
from maelab.downstream import (at_least, check_data_numbers, device_name, load_splits, report,
                               resolve_encoder, run_header, summarize, write_json)
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit
from maelab.evaluate.metrics import evaluate_classifier
from maelab.models.vit import build_vit, init_head, load_encoder_into, vit_meta
from maelab.train.distributed import cleanup, init_distributed
from maelab.train.loop import Trainer, resolve_precision
from maelab.train.optim import adamw, layer_decay_groups, scaled_lr
from maelab.train.tasks import FinetuneTask

HEAD_INIT_STD = 2e-5  # official fine-tuning: trunc_normal(head.weight, std=2e-5) on a pre-trained encoder


def validate(cfg: FinetuneConfig) -> None:
    check_data_numbers(cfg.data)
    o, a = cfg.optim, cfg.augment
    check_schedule(o, cfg.data.batch_size)
    check_augment(a)
    at_least(log_every=(cfg.run.log_every, 1))
    if not 0 < o.layer_decay <= 1:
        raise MaelabError(f"--layer-decay must be in (0, 1], got {o.layer_decay}")
    if not 0 < a.min_crop_scale <= 1:
        raise MaelabError(f"--min-crop-scale must be in (0, 1], got {a.min_crop_scale}")
    for name, v in (("mixup", a.mixup), ("cutmix", a.cutmix)):
        if v < 0:
            raise MaelabError(f"--{name} must be >= 0, got {v}")
    for name, v in (("reprob", a.reprob), ("mixup-prob", a.mixup_prob), ("mixup-switch-prob", a.mixup_switch_prob)):
        if not 0 <= v <= 1:
            raise MaelabError(f"--{name} must be in [0, 1], got {v}")
    if not 0 <= a.smoothing < 1:
        raise MaelabError(f"--smoothing must be in [0, 1), got {a.smoothing}")
    if uses_mixup(cfg) and cfg.data.batch_size % 2:
        raise MaelabError(f"mixup / cutmix pair images within a batch: --batch-size must be even, got "
                          f"{cfg.data.batch_size} (or turn them off with --mixup 0 --cutmix 0)")


def uses_mixup(cfg: FinetuneConfig) -> bool:
    a = cfg.augment
    return (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0


def make_mixup(cfg: FinetuneConfig, num_classes: int):
    if not uses_mixup(cfg):
        return None
    from timm.data import Mixup

    a = cfg.augment
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode="batch", label_smoothing=a.smoothing, num_classes=num_classes)


def build_model(cfg: FinetuneConfig, num_classes: int):
    """(model, architecture, input size, encoder weights or None, notes)."""
    enc, arch, size = resolve_encoder(cfg.model)
    model = build_vit(arch, num_classes, cfg.model.global_pool, cfg.model.drop_path, size)
    notes: list[str] = []
    if enc is not None:
        notes = load_encoder_into(model, enc)
        init_head(model, HEAD_INIT_STD)
    return model, arch, size, enc, notes


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from maelab.pretrain import find_resume

    validate(cfg)
    info, device = init_distributed(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    try:
        train, val = load_splits(cfg.data, cfg.run.seed)
        num_classes = len(train.classes)
        torch.manual_seed(cfg.run.seed)
        model, arch, size, enc, notes = build_model(cfg, num_classes)
        run_dir = Path(cfg.run.out).expanduser()
        resume = find_resume(cfg, run_dir)
        workers = default_workers(cfg.data.num_workers)
        plan = StepPlan(len(train), cfg.data.batch_size, cfg.optim.accum_iter, info.world, info.rank, cfg.run.seed)
        a = cfg.augment
        aa = a.auto_augment if a.auto_augment and a.auto_augment.lower() != "none" else None
        feeder = Feeder(train, plan, device, size, in_memory=False,
                        transform=finetune_transform(size, a.min_crop_scale, a.hflip, aa, a.reprob),
                        num_workers=workers, bad_files=cfg.data.bad_files)
        val_split = EvalSplit(val, size, cfg.data.batch_size, choose_in_memory(cfg.data.in_memory, val, size),
                              workers, cfg.data.crop_pct, cfg.data.bad_files, info.rank, info.world,
                              progress=info.is_main)
        model.to(device)

        def evaluate() -> dict[str, float]:
            model.eval()
            return evaluate_classifier(model, ((x, y) for x, y, _ in val_split.batches(device)), device,
                                       cfg.run.precision)

        meta = vit_meta(arch, size, num_classes=num_classes, global_pool=cfg.model.global_pool,
                        classes=train.classes, init=cfg.model.init)
        groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        task = FinetuneTask(model, meta, groups, evaluate, cfg.run.seed, info.rank,
                            make_mixup(cfg, num_classes), cfg.augment.smoothing)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=cfg.run, run_dir=run_dir, info=info,
                          device=device, optimizer_factory=lambda g: adamw(g, lr, tuple(cfg.optim.betas), device))
        logger = trainer.open_run(cfg, resume)  # checks a resumed checkpoint before writing
        if info.is_main:
            logger.info(f"maelab finetune: {run_header(cfg.model.init, enc, arch, size)}; "
                        + "".join(f"{n}; " for n in notes)
                        + f"{num_classes} classes, {len(train)} train / {len(val)} val images, on {device} "
                          f"x{info.world} ({cfg.run.precision}), global batch {plan.global_size}, lr {lr:.3g}, layer decay "
                          f"{cfg.optim.layer_decay}, {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
            if resume is not None:
                logger.info(f"resumed from {resume} (epoch {trainer.epoch + 1}, step {trainer.step})")
        try:
            result = trainer.fit()
        finally:
            logger.close()
        extra = {"init": cfg.model.init, "source": enc.source if enc else "none", "img_size": list(size),
                 "global_pool": cfg.model.global_pool, "num_classes": num_classes, "train_images": len(train),
                 "val_images": len(val), "global_batch": plan.global_size, "processes": info.world,
                 "device": device_name(device), "checkpoint": str(run_dir / "checkpoints")}
        results = summarize(run_dir, "finetune", None if info.is_main else result.history, extra)
        if info.is_main:
            write_json(run_dir / "results.json", results)
            report(results)
        return results
    finally:
        cleanup(info)
