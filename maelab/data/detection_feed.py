"""Feeding detection batches to the training loop: images with per-image targets.

The same :class:`~maelab.data.loader.StepPlan` as the image feeder (which image every epoch, step,
micro-step and rank gets; a sample's augmentation seeded by (seed, epoch, image)), so resume and
multi-process runs see exactly the images and crops an uninterrupted single process sees. Images are
large-scale-jittered to one fixed square, so a batch is one (B, 3, S, S) tensor; the targets
(``boxes``, ``labels``, ``masks``) travel in :attr:`Batch.targets`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from maelab.data.coco import CocoData, instance_targets, read_image
from maelab.data.folders import open_rgb
from maelab.data.loader import Batch, StepPlan, _BatchSampler, index_seed
from maelab.data.lsj import large_scale_jitter
from maelab.data.seeding import mix_seed
from maelab.data.workers import ignore_stop_signals, stop_workers, worker_batches


class JitteredInstances(Dataset):
    """(uint8 (3, S, S) image, target) of ``data.images[index]``, jittered with a generator seeded per
    (epoch, image) by the sampler."""

    def __init__(self, data: CocoData, size: int, scale_range: tuple[float, float], hflip: bool):
        self.data, self.size, self.scale_range, self.hflip = data, size, tuple(scale_range), hflip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        image = self.data.images[index]
        g = torch.Generator()
        g.manual_seed(seed)
        return large_scale_jitter(read_image(image), instance_targets(image, self.data), self.size,
                                  self.scale_range, self.hflip, g)


def collate(samples):
    images, targets = zip(*samples)
    return torch.stack(images), list(targets)


class DetectionFeeder:
    """What :class:`~maelab.train.loop.Trainer` needs of a feeder (``plan``, ``steps_per_epoch``,
    ``check_start``, ``epoch``, ``close``), for images with instance targets. Images arrive as float
    pixels in [0, 1]; the detector normalises them itself."""

    def __init__(self, data: CocoData, plan: StepPlan, device: torch.device, size: int,
                 scale_range: tuple[float, float], hflip: bool = True, num_workers: int = 0):
        self.data, self.plan, self.device = data, plan, device
        self.sampler = _BatchSampler(plan)
        self.generator = torch.Generator()  # worker base seeds, kept off the global RNG (see loader.Feeder)
        self.loader = DataLoader(JitteredInstances(data, size, scale_range, hflip), batch_sampler=self.sampler,
                                 collate_fn=collate, generator=self.generator, worker_init_fn=ignore_stop_signals,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 prefetch_factor=2 if num_workers > 0 else None)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def check_start(self, epoch: int, step: int) -> None:
        """Decode the first micro-batch's images before the run folder is written (a missing or
        unreadable file fails here, leaving nothing behind)."""
        if step >= self.plan.steps_per_epoch:
            return
        for i in self.plan.indices(self.plan.order(epoch), step, 0).tolist():
            open_rgb(self.data.images[i].path)

    def close(self) -> None:
        stop_workers(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.plan
        self.sampler.set_position(epoch, start_step)
        self.generator.manual_seed(mix_seed(plan.seed, 7, epoch))
        step, micro = start_step, 0
        for images, targets in worker_batches(self.loader):
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
            yield Batch(epoch, step, micro, images, None, plan.offset(micro), plan.global_size, targets=targets)
            micro += 1
            if micro == plan.accum:
                step, micro = step + 1, 0
