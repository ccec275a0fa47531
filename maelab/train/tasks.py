"""What differs per task inside the one training loop. Pre-training lives here; fine-tuning and
linear probing add their own task classes with the same four methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from maelab.data.loader import Batch, make_generator
from maelab.models.mae import MaskedAutoencoder
from maelab.train.optim import param_groups


class PretrainTask:
    """MAE objective: masking noise drawn per (seed, epoch, step) for the whole global batch, so each
    process and each accumulation micro-step takes its rows of the same noise."""

    def __init__(self, model: MaskedAutoencoder, model_meta: dict[str, Any], seed: int, weight_decay: float,
                 epoch_hook: Callable[[int, bool], dict[str, float]] | None = None):
        self.model, self._meta, self.seed, self.weight_decay = model, model_meta, seed, weight_decay
        self.epoch_hook = epoch_hook

    def noise(self, batch: Batch) -> torch.Tensor:
        device = batch.images.device
        g = make_generator(self.seed, 5, batch.epoch, batch.step, device=device)
        full = torch.rand(batch.global_size, self.model.num_patches, generator=g, device=device)
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
