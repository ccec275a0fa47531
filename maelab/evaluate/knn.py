"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, as used by
DINO): each query takes its ``k`` most cosine-similar training features; neighbour ``j`` votes for its
class with weight ``exp(sim_j / T)``; the class with the largest summed vote wins. Defaults k = 20,
T = 0.07. Similarities are computed for a chunk of queries at a time, so a 50k-image bank and 10k
queries never need the full 10k x 50k matrix.

:class:`KnnMonitor` runs this during pre-training on a fixed subsample, so the representation quality
can be watched while the loss falls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from maelab.data.folders import ImageList, subsample
from maelab.data.loader import choose_in_memory
from maelab.data.splits import check_same_classes, default_val_dir, labelled_split, subset_seed, warn_if_training_split
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit, extract_features
from maelab.evaluate.metrics import top5_percent, topk_correct


@torch.no_grad()
def check_knn_settings(k: int, temperature: float) -> None:
    """k >= 1 and a positive finite T (inf: every neighbour's vote the same; NaN scored at chance)."""
    if k < 1 or not 0 < temperature < float("inf"):
        raise MaelabError(f"--k must be >= 1 and --temperature a positive finite number, got {k}, {temperature}")


def check_labels(name: str, labels: Any, rows: int, num_classes: int) -> None:
    """One integer class index in ``0..num_classes-1`` per feature row."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != (rows,):
        raise MaelabError(f"kNN's {name} labels must be one integer tensor of {rows} class indices, got "
                          f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise MaelabError(f"kNN's {name} labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), "
                          f"got {int(labels.min())}..{int(labels.max())}")


def check_knn_inputs(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                     num_classes: int) -> None:
    """Shapes, label range and finite features, said in one line: torch's own errors ("index 5 is out of bounds
    for dimension 1") named none of them, and NaN features (a diverged encoder) scored at chance."""
    if not all(isinstance(t, torch.Tensor) for t in (train_feats, query_feats)):
        raise MaelabError("kNN takes tensors: features (N, D) and integer labels (N,)")
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise MaelabError(f"kNN needs (N, D) bank and query features of one width, got {tuple(train_feats.shape)} "
                          f"and {tuple(query_feats.shape)}")
    check_labels("bank", train_labels, train_feats.shape[0], num_classes)
    for name, feats in (("bank", train_feats), ("query", query_feats)):
        if not bool(torch.isfinite(feats).all()):
            raise MaelabError(f"the {name} features are not finite (NaN / inf): the encoder's weights or its input "
                              f"hold NaN or inf (a diverged run?); a kNN of them would score at chance")


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 512,
               with_voted: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(Q, num_classes) summed votes ``sum_j exp(cos(q, x_j) / T)`` over the ``k`` nearest ``x_j``, each
    query's divided by its nearest neighbour's vote ``exp(cos(q, x_1) / T)``: one factor per query, so the
    same ranking, and finite where ``exp(1 / T)`` alone overflows (T < 0.0113 in float32 made every vote
    inf, and the tie went to class 0). ``with_voted``: also (Q, num_classes) True where a neighbour voted
    for the class (at a small T a far neighbour's vote underflows to 0 but is still a vote)."""
    if train_feats.shape[0] == 0:
        raise MaelabError("kNN needs at least one training feature")
    check_knn_settings(k, temperature)
    check_knn_inputs(train_feats, train_labels, query_feats, num_classes)
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device)
    out, voted = [], []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float().to(bank.device), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        weights = ((sims - sims[:, :1]) / temperature).exp()  # topk sorts: column 0 is the nearest
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes)
        if with_voted:
            voted.append(torch.zeros_like(votes, dtype=torch.bool).scatter_(1, labels[idx], True))
    empty = torch.zeros(0, num_classes, device=bank.device)
    scores = torch.cat(out) if out else empty
    return (scores, torch.cat(voted) if voted else empty.bool()) if with_voted else scores


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 512) -> dict[str, float]:
    """Top-1 / top-5 (percent) of weighted kNN; top-5 is None for 5 classes or fewer (always 100 there),
    and counts only classes that got a vote (with k = 1 it equals top-1)."""
    if query_feats.shape[0] == 0:
        raise MaelabError("kNN needs at least one query image")
    check_labels("query", query_labels, query_feats.shape[0], num_classes)  # the rest: in knn_scores
    scores, voted = knn_scores(train_feats, train_labels, query_feats, num_classes, k, temperature, chunk, True)
    correct = topk_correct(scores, query_labels.to(scores.device), (1, 5), voted=voted)
    n = query_feats.shape[0]
    return {"knn_top1": 100.0 * float(correct[1]) / n, "knn_top5": top5_percent(float(correct[5]), n, num_classes)}


class KnnMonitor:
    """kNN accuracy of a model's features on fixed subsamples of a labelled bank and query set.

    Images are decoded once (into RAM when they fit at the model's input size) and reused at every
    call; one process computes it (call it on rank 0)."""

    def __init__(self, bank: ImageList, queries: ImageList, size: tuple[int, int], device: torch.device,
                 max_images: int = 5000, batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 k: int = 20, temperature: float = 0.07, precision: str = "fp32", in_memory: str = "auto",
                 bad_files: str = "error"):
        check_same_classes(bank, queries, "pre-training data", "kNN data")
        self.bank = subsample(bank, max_images, seed)
        self.queries = subsample(queries, max_images, seed + 1)
        self.num_classes = len(bank.classes)
        self.size, self.device, self.batch_size, self.workers = tuple(size), device, batch_size, num_workers
        self.k, self.temperature, self.precision, self.in_memory = k, temperature, precision, in_memory
        self._choose, self.bad_files = choose_in_memory, bad_files
        self._splits: tuple[EvalSplit, EvalSplit] | None = None

    def splits(self) -> tuple[EvalSplit, EvalSplit]:
        if self._splits is None:
            self._splits = tuple(
                EvalSplit(im, self.size, self.batch_size, self._choose(self.in_memory, im, self.size), self.workers,
                          bad_files=self.bad_files)
                for im in (self.bank, self.queries))
        return self._splits

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        bank, queries = self.splits()
        fb, lb, _ = extract_features(model, bank, self.device, "token", self.precision)
        fq, lq, _ = extract_features(model, queries, self.device, "token", self.precision)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        return knn_accuracy(fb.to(dev), lb.to(dev), fq.to(dev), lq.to(dev), self.num_classes, self.k, self.temperature)


def pretrain_knn_monitor(cfg, images: ImageList, size: tuple[int, int], device: torch.device,
                         num_workers: int = 0, precision: str = "fp32", say: bool = False) -> KnnMonitor | None:
    """The ``--knn-every`` monitor of `maelab pretrain` (None when off), checked before training starts:
    the bank is the (labelled) pre-training data, the queries ``--knn-data`` or a sibling val / test
    folder, each subsampled to ``--knn-max`` images."""
    m = cfg.monitor
    if m.knn_every < 0 or m.knn_max < 0:
        raise MaelabError(f"--knn-every and --knn-max must be >= 0, got {m.knn_every}, {m.knn_max}")
    if m.knn_every == 0:
        return None
    if not images.classes or any(y < 0 for y in images.labels):
        raise MaelabError("--knn-every needs class folders in --data (an ImageFolder tree): the kNN memory "
                          "bank is the labelled pre-training data")
    queries_root = m.knn_data or default_val_dir(cfg.data.data)
    if not queries_root:
        raise MaelabError(f"--knn-every needs labelled held-out images: pass --knn-data (no sibling val / test "
                          f"folder next to {cfg.data.data})")
    if not m.knn_data:  # recorded in config.yaml: a resume that finds another folder says so among its changes
        m.knn_data = str(queries_root)
        if say:
            print(f"maelab: kNN monitor queries {queries_root} (the folder beside --data; --knn-data chooses another)",
                  flush=True)
    warn_if_training_split(cfg.data.data, queries_root, "kNN accuracy (--knn-data)",
                           "classified (each image finds itself)")
    queries = labelled_split(queries_root, cfg.data.bad_files, "kNN data", min_classes=1)
    return KnnMonitor(images, queries, size, device, m.knn_max, cfg.data.batch_size, num_workers,
                      subset_seed(cfg.data, cfg.run.seed), precision=precision, in_memory=cfg.data.in_memory,
                      bad_files=cfg.data.bad_files)
