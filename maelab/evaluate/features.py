"""Features without masking: read a split in a fixed order, run the encoder (eval mode, no grad),
take the cls token or the mean of the patch tokens after the final norm.

Works with any model whose ``forward_features`` returns ``(N, 1 + L, D)`` tokens after the final norm:
a timm ``VisionTransformer`` built by :func:`maelab.models.vit.build_vit` or a
:class:`~maelab.models.mae.MaskedAutoencoder` (whose ``forward_features`` never masks).

Under torchrun every process reads its shard (every ``world``-th image starting at ``rank``);
:func:`gather_rows` puts the rows of all processes together.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maelab.data.folders import ImageList, open_rgb
from maelab.data.memory import decode_all
from maelab.data.transforms import EvalTransform, from_uint8
from maelab.data.workers import ignore_stop_signals, worker_batches
from maelab.errors import MaelabError
from maelab.models.vit import encode
from maelab.train.precision import autocast


class _EvalImages(Dataset):
    """(evaluation view, decoded) per image; under ``bad_files="skip"`` a file that fails to decode is
    named once and marked, and :meth:`EvalSplit.batches` leaves it out."""

    def __init__(self, images: ImageList, view: EvalTransform, bad_files: str):
        self.images, self.view, self.bad_files = images, view, bad_files

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.view(open_rgb(self.images.paths[i])), True
        except MaelabError as e:
            if self.bad_files == "error":
                raise
            warnings.warn(f"leaving out unreadable image: {e}", stacklevel=2)
            return torch.zeros(3, *self.view.size), False


class EvalSplit:
    """A split read in a fixed order (no augmentation): this process's shard, decoded once into RAM
    (``in_memory``) or streamed through :class:`~maelab.data.transforms.EvalTransform` each pass.
    Under ``bad_files="skip"`` images that fail to decode are named and left out of every batch."""

    def __init__(self, images: ImageList, size: tuple[int, int], batch_size: int, in_memory: bool,
                 num_workers: int = 0, crop_pct: float = 0.875, bad_files: str = "error",
                 rank: int = 0, world: int = 1, progress: bool = False):
        self.images, self.size, self.batch_size = images, tuple(size), batch_size
        self.index = torch.arange(len(images))[rank::world]
        self.labels = torch.tensor(images.labels, dtype=torch.long)[self.index]
        mine = images.subset(self.index.tolist())
        self.in_memory = in_memory
        if in_memory:
            self.data, bad = decode_all(mine.paths, self.size, num_workers, progress=progress)
            if bad and bad_files == "error":
                raise MaelabError(f"{len(bad)} unreadable image(s), e.g. {mine.paths[bad[0]]} "
                                  f"(use --bad-files skip to leave them out)")
            if bad:
                warnings.warn(f"leaving out {len(bad)} unreadable image(s), e.g. {mine.paths[bad[0]]}", stacklevel=2)
                keep = torch.tensor(sorted(set(range(len(mine))) - set(bad)), dtype=torch.long)
                self.data, self.labels, self.index = self.data[keep], self.labels[keep], self.index[keep]
        else:
            self.loader = DataLoader(
                _EvalImages(mine, EvalTransform(self.size, crop_pct), bad_files),
                batch_size=batch_size, shuffle=False, num_workers=num_workers,
                persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                generator=torch.Generator(),  # its own: starting workers must not draw from the global RNG
                worker_init_fn=ignore_stop_signals)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_batches(self) -> int:
        """Batches in one pass over this process's shard (the last may be short)."""
        return -(-len(self) // self.batch_size)

    def batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(normalised images on ``device``, labels, dataset indices) in order."""
        if self.in_memory:
            for start in range(0, len(self), self.batch_size):
                raw = self.data[start : start + self.batch_size].to(device, non_blocking=True)
                stop = start + raw.shape[0]
                yield from_uint8(raw), self.labels[start:stop], self.index[start:stop]
        else:
            start = 0
            for imgs, ok in worker_batches(self.loader):
                stop = start + imgs.shape[0]
                labels, index = self.labels[start:stop], self.index[start:stop]
                if not ok.all():  # left out under bad_files="skip"
                    imgs, labels, index = imgs[ok], labels[ok], index[ok]
                yield imgs.to(device, non_blocking=True), labels, index
                start = stop


@torch.no_grad()  # also for the pre-training kNN monitor, whose model has trainable weights
def extract_features(model: nn.Module, split: EvalSplit, device: torch.device, global_pool: str = "token",
                     precision: str = "fp32", progress: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features float32 on the CPU, labels, dataset indices) of this process's shard, in eval mode
    (the model's mode is restored afterwards)."""
    device = torch.device(device)  # "cpu" as load_mae takes it
    was_training = model.training
    model.eval()
    feats, labels, index = [], [], []
    batches = it = split.batches(device)
    if progress:
        it = tqdm(it, total=split.num_batches, desc="features", unit="batch", leave=False, disable=None)
    try:
        for x, y, i in it:
            if not len(x):  # every image of the batch unreadable and skipped (--bad-files skip)
                continue
            with autocast(device, precision):
                f = encode(model, x, global_pool)
            if not bool(torch.isfinite(f).all()):  # a diverged encoder's NaN features scored a kNN at chance
                raise MaelabError("the encoder gives non-finite features (NaN / inf): its weights hold NaN or inf "
                                  "(a run that diverged?); evaluate an earlier checkpoint of it")
            feats.append(f.float().cpu())
            labels.append(y)
            index.append(i)
    finally:
        batches.close()  # an error here stops the loader's workers now (see data.workers.stop_workers)
        model.train(was_training)
    if not feats:
        dim = getattr(model, "embed_dim", 0)
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def gather_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every process (rank order); a no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    comm = device if device.type == "cuda" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=comm)
    padded[: t.shape[0]] = t.to(comm)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


def gather_split(feats: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every process's shard put together, in dataset order."""
    feats, labels, index = (gather_rows(t, device) for t in (feats, labels, index))
    order = torch.argsort(index)
    return feats[order], labels[order], index[order]
