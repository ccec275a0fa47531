"""What differs per task inside the one training loop: pre-training (:class:`PretrainTask`),
fine-tuning (:class:`FinetuneTask`) and linear probing (:class:`LinprobeTask`), each with the same four
methods (``forward``, ``param_groups``, ``meta``, ``on_epoch_end``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from maelab.data.loader import Batch
from maelab.data.seeding import make_generator, mix_seed
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import mask_noise
from maelab.models.vit import encode
from maelab.train.optim import param_groups


class PretrainTask:
    """MAE objective: masking noise drawn per (seed, epoch, step) for the whole global batch, so each
    process and each accumulation micro-step takes its rows of the same noise."""

    def __init__(self, model: MaskedAutoencoder, model_meta: dict[str, Any], seed: int, weight_decay: float,
                 epoch_hook: Callable[[int, bool], dict[str, float]] | None = None, mask_type: str = "random",
                 legacy_grid: bool = False):
        self.model, self._meta, self.seed, self.weight_decay = model, model_meta, seed, weight_decay
        self.mask_type, self.legacy_grid = mask_type, legacy_grid
        self.epoch_hook = epoch_hook

    def noise(self, batch: Batch) -> torch.Tensor:
        device = batch.images.device
        if self.mask_type == "random":
            g = make_generator(self.seed, 5, batch.epoch, batch.step, device=device)
            full = torch.rand(batch.global_size, self.model.num_patches, generator=g, device=device)
        else:  # block / grid masks are drawn on the CPU (a few batched tensor ops), then moved
            g = make_generator(self.seed, 5, batch.epoch, batch.step)
            full = mask_noise(self.mask_type, batch.global_size, self.model.grid, self.model.mask_ratio, g, device,
                              self.legacy_grid)
        return full[batch.offset : batch.offset + batch.images.shape[0]]

    def forward(self, runner: torch.nn.Module, batch: Batch):
        loss, _, _ = runner(batch.images, noise=self.noise(batch), return_pred=False)
        return loss, {}

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.weight_decay)

    def meta(self) -> dict[str, Any]:
        return self._meta

    def on_epoch_end(self, epoch: int, last: bool) -> dict[str, float]:
        return self.epoch_hook(epoch, last) if self.epoch_hook else {}


class SupervisedTask:
    """What every supervised task shares (classification, segmentation, detection): its optimizer groups,
    the model description its checkpoints record, and ``evaluate(epoch, last)`` after every epoch, which
    leaves the model in training mode however it ends. Subclasses add ``forward``."""

    def __init__(self, model: torch.nn.Module, model_meta: dict[str, Any], groups: list[dict],
                 evaluate: Callable[[int, bool], dict[str, float]]):
        self.model, self._meta, self._groups, self.evaluate = model, model_meta, groups, evaluate
        self.legacy_groups: tuple[list[dict], str] | None = None  # (groups, why): see Trainer.resume_from
        self.model.train()

    def param_groups(self) -> list[dict]:
        return self._groups

    def meta(self) -> dict[str, Any]:
        return self._meta

    def on_epoch_end(self, epoch: int, last: bool) -> dict[str, float]:
        try:
            return self.evaluate(epoch, last)
        finally:
            self.model.train()


class ClassifyTask(SupervisedTask):
    """Supervised classification of ``batch.labels``: cross-entropy (label smoothing, or soft targets
    with mixup / cutmix); after every epoch ``evaluate()`` gives top-1 / top-5 on the validation split.

    Mixup / cutmix use timm's ``Mixup``, which draws from NumPy's global generator: it is seeded per
    (seed, epoch, step, micro-step, rank) and the caller's NumPy state is restored, so a resumed run
    mixes exactly as an uninterrupted one."""

    def __init__(self, model: torch.nn.Module, model_meta: dict[str, Any], groups: list[dict],
                 evaluate: Callable[[], dict[str, float]], seed: int = 0, rank: int = 0,
                 mixup: Callable | None = None, smoothing: float = 0.0):
        super().__init__(model, model_meta, groups, lambda epoch, last: evaluate())
        self.seed, self.rank, self.mixup = seed, rank, mixup
        if mixup is not None:
            self.criterion = SoftTargetCrossEntropy()  # mixup already smooths the targets
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def inputs(self, batch: Batch) -> torch.Tensor:
        return batch.images

    def forward(self, runner: torch.nn.Module, batch: Batch):
        x, y = self.inputs(batch), batch.labels
        if self.mixup is not None:
            state = np.random.get_state()
            np.random.seed(mix_seed(self.seed, 6, batch.epoch, batch.step, batch.micro, self.rank) % (1 << 32))
            try:
                x, y = self.mixup(x, y)
            finally:
                np.random.set_state(state)
        return self.criterion(runner(x).float(), y), {}


class FinetuneTask(ClassifyTask):
    """End-to-end fine-tuning of a timm ViT (layer-decay AdamW groups, mixup / cutmix, smoothing)."""


class LinprobeTask(ClassifyTask):
    """Linear probe: ``model`` is the head only (BatchNorm without affine + Linear); the frozen
    ``encoder`` (eval mode, no grad) turns images into features inside ``forward``. With
    ``encoder=None`` the batches already hold cached features."""

    def __init__(self, head: torch.nn.Module, encoder: torch.nn.Module | None, global_pool: str,
                 model_meta: dict[str, Any], groups: list[dict], evaluate: Callable[[], dict[str, float]],
                 seed: int = 0, rank: int = 0):
        super().__init__(head, model_meta, groups, evaluate, seed, rank)
        self.encoder, self.global_pool = encoder, global_pool
        if encoder is not None:
            for p in encoder.parameters():
                p.requires_grad_(False)
            encoder.eval()

    def inputs(self, batch: Batch) -> torch.Tensor:
        if self.encoder is None:
            return batch.images
        with torch.no_grad():
            return encode(self.encoder, batch.images, self.global_pool)
