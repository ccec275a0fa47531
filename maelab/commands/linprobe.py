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

from maelab.commands.options.linprobe import LinprobeConfig
from maelab.commands.options.sections import check_crop_scale, check_data_numbers, check_run_numbers, check_schedule
from maelab.commands.session import Session, encoder_header
from maelab.data.loader import Batch, Feeder, StepPlan, choose_in_memory, plan_for
from maelab.data.splits import load_splits
from maelab.data.transforms import EvalTransform, PretrainTransform
from maelab.data.workers import default_workers
from maelab.errors import MaelabError
from maelab.evaluate.features import extract_features, gather_split
from maelab.evaluate.metrics import evaluate_classifier
from maelab.io import file_digest
from maelab.models.heads import LinearProbeHead
from maelab.models.vit import describe
from maelab.train.budget import timed_pass
from maelab.train.distributed import share_buffers
from maelab.train.loop import Trainer
from maelab.train.optim import batch_and_lr, lars, lars_param_groups, scaled_lr
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

    def check_start(self, epoch: int, step: int) -> None:
        """Features are already computed: nothing left to read."""

    def close(self) -> None:
        """No worker processes to stop."""

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
    check_run_numbers(cfg.run)
    if cfg.data.batch_size < 2:
        raise MaelabError("--batch-size must be at least 2 (the head's BatchNorm needs a batch)")
    check_crop_scale(cfg.augment.min_crop_scale)


def run(cfg: LinprobeConfig) -> dict[str, Any]:
    validate(cfg)
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        encoder, enc, arch, size, notes = s.frozen_encoder(cfg.model)
        train, val = load_splits(cfg.data, cfg.run.seed, say=s.is_main)
        num_classes = len(train.classes)
        head = LinearProbeHead(arch["embed_dim"], num_classes).to(s.device)
        run_dir, resume = s.run_folder(cfg.run, cfg.data.data, cfg.data.val_data)
        workers = default_workers(cfg.data.num_workers)
        d, aug, pool = cfg.data, cfg.augment, cfg.model.global_pool
        cached = not aug.augment and aug.cache_features

        def features(images):
            return extract_features(encoder, s.eval_split(images, size, d), s.device, pool, s.precision, s.is_main)

        val_feats, val_labels, _ = features(val)
        plan = plan_for(train, d.batch_size, cfg.optim.accum_iter, s.info.world, s.info.rank, cfg.run.seed)
        if cached:
            feats, labels, _ = gather_split(*features(train), s.device)
            feeder = TensorFeeder(feats, labels, plan, s.device)
        elif aug.augment:
            feeder = Feeder(train, plan, s.device, size, choose_in_memory(d.in_memory, train, size),
                            transform=PretrainTransform(size, aug.min_crop_scale, aug.hflip),
                            min_scale=aug.min_crop_scale, hflip=aug.hflip, num_workers=workers,
                            bad_files=d.bad_files, progress=s.is_main)
        else:
            feeder = Feeder(train, plan, s.device, size, in_memory=False, transform=EvalTransform(size, d.crop_pct),
                            num_workers=workers, bad_files=d.bad_files)

        chunk = max(d.batch_size, 256)

        def val_batches():
            return ((val_feats[i : i + chunk], val_labels[i : i + chunk]) for i in range(0, len(val_feats), chunk))

        def evaluate(batches=None) -> dict[str, float]:
            share_buffers(head, s.info)  # every process scores rank 0's head: the one that is saved
            head.eval()
            return evaluate_classifier(head, val_batches() if batches is None else batches, s.device, s.precision)

        meta = {"arch": "linprobe", "dim": arch["embed_dim"], "num_classes": num_classes, "classes": train.classes,
                "global_pool": pool, "init": cfg.model.init, "encoder": describe(dict(arch, img_size=size)),
                # a resume checks both: --init of a run trained on since, or other weights written to the same file
                "encoder_weights": str(Path(enc.path).resolve()) if enc else None,
                "encoder_digest": file_digest(enc.path) if enc and Path(enc.path).is_file() else None}
        task = LinprobeTask(head, None if cached else encoder, pool, meta,
                            lars_param_groups(head, cfg.optim.weight_decay), evaluate, cfg.run.seed, s.info.rank)
        lr = scaled_lr(cfg.optim.base_lr, cfg.optim.lr, plan.global_size)
        cfg.model.img_size = list(size)  # config.yaml records the size the run trains at
        trainer = Trainer(task=task, feeder=feeder, optim=cfg.optim, run=cfg.run, run_dir=run_dir, info=s.info,
                          device=s.device, optimizer_factory=lambda g: lars(g, lr, cfg.optim.momentum))
        def measure() -> tuple[float, float]:  # the validation pass after every epoch, from its first batches
            seconds = timed_pass(evaluate, val_batches(), -(-len(val_feats) // chunk))
            head.train()
            return seconds, 0.0

        s.plan_budget(trainer, cfg, resume, measure)
        mode = ("cached features (--no-augment)" if cached else
                "RandomResizedCrop + flip, encoder every step" if aug.augment else "no augmentation, encoder every step")
        header = (f"maelab linprobe: {encoder_header(enc, arch, size, notes)}; {pool} features; {mode}; {num_classes} "
                  f"classes, {len(train)} train / {len(val)} val images, on {s.where}, LARS: "
                  + batch_and_lr(plan.batch_size, plan.accum, plan.world, cfg.optim.base_lr, cfg.optim.lr)
                  + f", {plan.steps_per_epoch} steps/epoch, run folder {run_dir}")
        result = s.fit(trainer, cfg, resume, header)
        return s.finish(run_dir, "linprobe", result, {
            "init": cfg.model.init, "source": enc.source if enc else "none", "img_size": list(size),
            "global_pool": pool, "cached_features": cached, "augment": aug.augment, "num_classes": num_classes,
            "train_images": len(train), "val_images": len(val), "global_batch": plan.global_size})
