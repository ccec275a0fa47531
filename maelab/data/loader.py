"""Feeding batches to the training loop, identically for 1 or N processes and across resumes.

Each optimizer step consumes one *global batch* of ``G = batch_size x accum_iter x world_size``
images: positions ``[step*G, (step+1)*G)`` of a permutation seeded by (seed, epoch). Micro-batch ``m``
of rank ``r`` takes the slice at offset ``(m*world + r) * batch_size``. All randomness (order,
augmentation, masking) is derived from (seed, epoch, step), so a run resumed at any step, or split over
more processes with the same global batch, sees exactly the same images and masks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from maelab.data.folders import ImageList, image_sizes, open_rgb, unreadable
from maelab.data.memory import augment_batch, decode_all, fits_in_memory
from maelab.data.seeding import clone_generator, make_generator, mix_seed
from maelab.data.workers import ignore_stop_signals, stop_workers, worker_batches
from maelab.errors import MaelabError, SameOnEveryRank


@dataclass
class Batch:
    """One micro-batch for this process."""

    epoch: int
    step: int  # optimizer step within the epoch
    micro: int  # accumulation index within the step
    images: torch.Tensor
    labels: torch.Tensor | None
    offset: int  # first row of this micro-batch inside the global batch
    global_size: int
    targets: list | None = None  # per-image targets (detection: boxes, labels, masks)


class StepPlan:
    """Which dataset indices every (epoch, step, micro, rank) gets."""

    def __init__(self, num_items: int, batch_size: int, accum_iter: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.accum, self.world, self.rank = num_items, batch_size, accum_iter, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_size = batch_size * accum_iter * world
        self.steps_per_epoch = num_items // self.global_size
        if self.steps_per_epoch == 0 and num_items < world:
            raise SameOnEveryRank(
                f"{world} processes but only {num_items} image(s): every process needs at least one image per "
                f"step; run at most {num_items} process(es) (torchrun --nproc_per_node)")
        if self.steps_per_epoch == 0:
            raise SameOnEveryRank(
                f"the dataset has {num_items} images, fewer than one global batch of {self.global_size} "
                f"(batch size {batch_size} x accumulation {accum_iter} x {world} processes); lower --batch-size"
            )

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=make_generator(self.seed, 1, epoch))

    def offset(self, micro: int) -> int:
        return (micro * self.world + self.rank) * self.batch_size

    def indices(self, order: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        start = step * self.global_size + self.offset(micro)
        return order[start : start + self.batch_size]


def plan_for(images: ImageList, batch_size: int, accum_iter: int, world: int, rank: int, seed: int,
             shuffle: bool = True) -> StepPlan:
    """The :class:`StepPlan` over ``images``. When they are fewer than one global batch, unreadable
    files are named first: they are the likelier cause (three broken files are no reason to lower
    ``--batch-size``), and such a folder is small, so probing it is cheap."""
    try:
        return StepPlan(len(images), batch_size, accum_iter, world, rank, seed, shuffle)
    except MaelabError:
        bad = unreadable(images.paths)
        if bad:
            raise SameOnEveryRank(f"{len(bad)} of the {len(images)} images cannot be read, e.g. {bad[0]} "
                              f"(use --bad-files skip to leave them out)") from None
        raise


class _BatchSampler(Sampler):
    """Yields this rank's micro-batches of (index, sample seed) from a start position."""

    def __init__(self, plan: StepPlan):
        self.plan, self.epoch, self.start_step = plan, 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.accum

    def __iter__(self):
        order = self.plan.order(self.epoch)
        for step in range(self.start_step, self.plan.steps_per_epoch):
            for micro in range(self.plan.accum):
                idx = self.plan.indices(order, step, micro).tolist()
                yield [(i, mix_seed(self.plan.seed, 2, self.epoch, i)) for i in idx]


class FolderDataset(Dataset):
    """Images from an ``ImageList``, each transformed with a generator seeded per (epoch, image)."""

    def __init__(self, images: ImageList, transform: Callable, bad_files: str = "error"):
        self.images, self.transform, self.bad_files = images, transform, bad_files

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        try:
            img = open_rgb(self.images.paths[index])
        except MaelabError:
            if self.bad_files == "error":
                raise
            # "skip" policy for a file that passed the quick probe but does not decode: a deterministic
            # stand-in (the next readable image)
            warnings.warn(f"replacing unreadable image {self.images.paths[index]}", stacklevel=2)
            for step in range(1, len(self.images)):
                try:
                    index = (index + step) % len(self.images)
                    img = open_rgb(self.images.paths[index])
                    break
                except MaelabError:
                    continue
            else:
                raise
        g = torch.Generator()
        g.manual_seed(seed)
        return self.transform(img, g), self.images.labels[index]


def index_seed(index: int) -> int:
    return mix_seed(0, 3, index)


class Feeder:
    """Iterates this process's micro-batches for an epoch, from any step, on ``device``."""

    def __init__(
        self,
        images: ImageList,
        plan: StepPlan,
        device: torch.device,
        out_size: tuple[int, int],
        in_memory: bool,
        transform: Callable | None = None,
        min_scale: float = 0.2,
        hflip: bool = True,
        num_workers: int = 0,
        bad_files: str = "error",
        progress: bool = False,
        crop: str = "random-size",
        color_jitter: float = 0.0,
        dataset: Dataset | None = None,
    ):
        """``dataset``: items ``(index, seed) -> (input, label)`` in place of the image folder's (masks for
        segmentation); streamed path only."""
        self.images, self.plan, self.device = images, plan, device
        self.crop, self.color_jitter = crop, color_jitter
        self.out_size, self.in_memory, self.bad_files = tuple(out_size), in_memory, bad_files
        self.min_scale, self.hflip = min_scale, hflip
        self.labels = torch.tensor(images.labels)
        if in_memory:
            data, bad = decode_all(images.paths, self.out_size, num_workers, progress=progress)
            if bad and bad_files == "skip" and len(bad) < len(images):
                good = sorted(set(range(len(images))) - set(bad))
                for i in bad:  # a deterministic stand-in, as the streamed path does
                    data[i] = data[next((g for g in good if g > i), good[0])]
                warnings.warn(f"{len(bad)} image(s) failed to decode and were replaced, e.g. {images.paths[bad[0]]}",
                              stacklevel=2)
            elif bad:
                raise MaelabError(f"{len(bad)} unreadable image(s), e.g. {images.paths[bad[0]]} "
                                  f"(use --bad-files skip to leave them out)")
            self.data = data.to(device) if device.type == "cuda" else data
        else:
            self.sampler = _BatchSampler(plan)
            # Its own generator: creating an iterator draws the workers' base seed, which from the global
            # RNG would shift drop path / mixup in a resumed run (it creates the iterator at another
            # point). Worker seeds do not reach the pixels: every sample's seed comes from the sampler.
            self.generator = torch.Generator()
            self.loader = DataLoader(
                dataset if dataset is not None else FolderDataset(images, transform, bad_files),
                batch_sampler=self.sampler,
                generator=self.generator,
                worker_init_fn=ignore_stop_signals,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers > 0 else None,
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def check_start(self, epoch: int, step: int) -> None:
        """Decode the images of the first micro-batch the run will read, before its folder is written:
        streamed images are not decoded up front, and a folder of unreadable ones must fail here, leaving
        nothing behind (one batch of decodes, once per run; no random numbers drawn)."""
        if self.in_memory or self.bad_files != "error" or step >= self.plan.steps_per_epoch:
            return
        for i in self.plan.indices(self.plan.order(epoch), step, 0).tolist():
            open_rgb(self.images.paths[i])

    def close(self) -> None:
        """Stop the loader's worker processes (the training loop calls this however it ends)."""
        if not self.in_memory:
            stop_workers(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan = self.plan
        if self.in_memory:
            order = plan.order(epoch)
            for step in range(start_step, plan.steps_per_epoch):
                g = make_generator(plan.seed, 4, epoch, step)
                for micro in range(plan.accum):
                    idx = plan.indices(order, step, micro)
                    raw = self.data[idx.to(self.data.device)]
                    imgs = augment_batch(raw.to(self.device, non_blocking=True), self.out_size, clone_generator(g),
                                         self.min_scale, self.hflip, plan.global_size, plan.offset(micro),
                                         self.crop, self.color_jitter)
                    yield Batch(epoch, step, micro, imgs, self.labels[idx].to(self.device), plan.offset(micro), plan.global_size)
        else:
            self.sampler.set_position(epoch, start_step)
            self.generator.manual_seed(mix_seed(plan.seed, 7, epoch))
            step, micro = start_step, 0
            for imgs, labels in worker_batches(self.loader):
                yield Batch(epoch, step, micro, imgs.to(self.device, non_blocking=True),
                            labels.to(self.device, non_blocking=True), plan.offset(micro), plan.global_size)
                micro += 1
                if micro == plan.accum:
                    step, micro = step + 1, 0


def choose_in_memory(setting: str, images: ImageList, size: tuple[int, int]) -> bool:
    """``auto``: RAM path when every image already has the training size (the RAM copy cannot be
    resized or cropped as the streamed path does) and the uint8 tensor takes under a quarter of RAM.
    Sizes come from the file headers, so this stays cheap (1.5-2.5 s for 50 000 CIFAR files on 2 busy cores).
    ``yes`` is checked when the images are decoded (``decode_all``)."""
    if setting == "yes":
        return True
    if setting == "no":
        return False
    if not fits_in_memory(len(images), size):
        return False
    return all(s == tuple(size) for s in image_sizes(images.paths))
