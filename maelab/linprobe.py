"""`maelab linprobe`: a linear classifier on frozen features, as in the paper (appendix A.2).

The encoder stays frozen and in eval mode; features are the cls token after the final norm
(``--global-pool avg``: the mean of the patch tokens after it); the head is
``BatchNorm1d(affine=False)`` + ``Linear`` trained with LARS (momentum 0.9, trust coefficient 0.001,
no weight decay or adaptation for 1-D parameters), warm-up + cosine.

Two paths through the same training loop:

* augmentation on (the paper: RandomResizedCrop + flip): the encoder runs on every training batch;
* ``--no-augment``: the training features are extracted once and the head trains on the cached
  tensor -- minutes instead of hours on a CPU, with the same result as running the encoder every step.

The validation features never change (frozen encoder, fixed view), so they are always extracted once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from maelab.config import LinprobeConfig, check_schedule
from maelab.data.loader import Batch, Feeder, StepPlan, choose_in_memory, default_workers
from maelab.data.transforms import EvalTransform, PretrainTransform
from maelab.downstream import (at_least, check_data_numbers, device_name, load_splits, report,
                               resolve_encoder, run_header, summarize, write_json)
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit, extract_features, gather_split
from maelab.evaluate.metrics import evaluate_classifier
from maelab.models.heads import LinearProbeHead
from maelab.models.vit import describe, features_model
from maelab.train.distributed import cleanup, init_distributed
from maelab.train.loop import Trainer, resolve_precision
from maelab.train.optim import lars, lars_param_groups, scaled_lr
from maelab.train.tasks import LinprobeTask


class TensorFeeder:
    """The Feeder interface over tensors already in memory (cached features): the same
    :class:`~maelab.data.loader.StepPlan`, so step ``s`` of epoch ``e`` holds the same images as the
    image Feeder would give."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, plan: StepPlan, device: torch.device):
        if features.shape[0] != plan.n:
            raise MaelabError(f"{features.shape[0]} cached features for a plan of {plan.n} images")
        self.plan, self.device = plan, device
        self.features = features.to(device) if device.type == "cuda" else features
        self.labels = labels.to(self.features.device)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.plan
        order = plan.order(epoch).to(self.features.device)
        for step in range(start_step, plan.steps_per_epoch):
            for micro in range(plan.accum):
                idx = plan.indices(order, step, micro)
                yield Batch(epoch, step, micro, self.features[idx].to(self.device, non_blocking=True),
                            self.labels[idx].to(self.device, non_blocking=True), plan.offset(micro), plan.global_size)


def validate(cfg: LinprobeConfig) -> None:
    check_data_numbers(cfg.data)
    check_schedule(cfg.optim, cfg.data.batch_size)
    at_least(log_every=(cfg.run.log_every, 1))
    if cfg.data.batch_size < 2:
        raise MaelabError("--batch-size must be at least 2 (the head's BatchNorm needs a batch)")
    if not 0 < cfg.augment.min_crop_scale <= 1:
        raise MaelabError(f"--min-crop-scale must be in (0, 1], got {cfg.augment.min_crop_scale}")


def run_linprobe(cfg: LinprobeConfig) -> dict[str, Any]:
    from maelab.pretrain import find_resume

    validate(cfg)
    info, device = init_distributed(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    try:
        train, val = load_splits(cfg.data, cfg.run.seed)
        num_classes = len(train.classes)
        torch.manual_seed(cfg.run.seed)
        enc, arch, size = resolve_encoder(cfg.model)
        encoder = features_model(enc, arch, size).to(device)
        head = LinearProbeHead(arch["embed_dim"], num_classes).to(device)
        run_dir = Path(cfg.run.out).expanduser()
        resume = find_resume(cfg, run_dir)
        workers = default_workers(cfg.data.num_workers)
        d, aug, pool, prec = cfg.data, cfg.augment, cfg.model.global_pool, cfg.run.precision
        cached = not aug.augment and aug.cache_features

        def split(images):
            return EvalSplit(images, size, d.batch_size, choose_in_memory(d.in_memory, images, size), workers,
                             d.crop_pct, d.bad_files, info.rank, info.world, progress=info.is_main)

        val_feats, val_labels, _ = extract_features(encoder, split(val), device, pool, prec, info.is_main)
        plan = StepPlan(len(train), d.batch_size, cfg.optim.accum_iter, info.world, info.rank, cfg.run.seed)
        if cached:
            feats, labels, _ = gather_split(*extract_features(encoder, split(train), device, pool, prec, info.is_main),
                                            device)
            feeder = TensorFeeder(feats, labels, plan, device)
        elif aug.augment:
            in_memory = choose_in_memory(d.in_memory, train, size)
            feeder = Feeder(train, plan, device, size, in_memory,
                            transform=PretrainTransform(size, aug.min_crop_scale, aug.hflip),
                            min_scale=aug.min_crop_scale, hflip=aug.hflip, num_workers=workers,
                            bad_files=d.bad_files, progress=info.is_main)
        else:
            feeder = Feeder(train, plan, device, size, in_memory=False, transform=EvalTransform(size, d.crop_pct),
                            num_workers=workers, bad_files=d.bad_files)

        def evaluate() -> dict[str, float]:
            head.eval()
            bs = max(d.batch_size, 256)
            chunks = ((val_feats[i : i + bs], val_labels[i : i + bs]) for i in range(0, len(val_feats), bs))
            return evaluate_classifier(head, chunks, device, prec)

        meta = {"arch": "linprobe", "dim": arch["embed_dim"], "num_classes": num_classes, "classes": train.classes,
                "global_pool": pool, "init": cfg.model.init, "encoder": describe(dict(arch, img_size=size))}
        task = LinprobeTask(head, None if cached else encoder, pool, meta,
                            lars_param_groups(head, cfg.optim.weight_decay), evaluate, cfg.run.seed, info.rank)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=cfg.run, run_dir=run_dir, info=info,
                          device=device, optimizer_factory=lambda g: lars(g, lr, cfg.optim.momentum))
        logger = trainer.open_run(cfg, resume)  # checks a resumed checkpoint before writing
        if info.is_main:
            mode = ("cached features (--no-augment)" if cached else
                    "RandomResizedCrop + flip, encoder every step" if aug.augment else "no augmentation, encoder every step")
            logger.info(f"maelab linprobe: {run_header(cfg.model.init, enc, arch, size)}; {pool} features; "
                        f"{mode}; {num_classes} classes, {len(train)} train / {len(val)} val images, on {device} "
                        f"x{info.world} ({cfg.run.precision}), global batch {plan.global_size}, LARS lr {lr:.3g}, "
                        f"{plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        try:
            result = trainer.fit()
        finally:
            logger.close()
        extra = {"init": cfg.model.init, "source": enc.source if enc else "none", "img_size": list(size),
                 "global_pool": pool, "cached_features": cached, "augment": aug.augment, "num_classes": num_classes,
                 "train_images": len(train), "val_images": len(val), "global_batch": plan.global_size,
                 "processes": info.world, "device": device_name(device), "checkpoint": str(run_dir / "checkpoints")}
        results = summarize(run_dir, "linprobe", None if info.is_main else result.history, extra)
        if info.is_main:
            write_json(run_dir / "results.json", results)
            report(results)
        return results
    finally:
        cleanup(info)
