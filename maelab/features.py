"""`maelab features`: embeddings of a folder of images (ImageFolder tree or flat), never masked, in a
fixed order, written with the image paths.

* ``out.npy``: (N, D) float32; ``out.paths.txt`` (one path per line, row order); ``out.labels.npy``
  (class index per row, -1 outside a class folder) and ``out.classes.txt`` when there are class folders.
* ``out.safetensors``: tensors ``features`` (and ``labels``); the header holds ``paths``, ``classes``
  and how the features were made (JSON); ``out.paths.txt`` as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from maelab.config import FeaturesConfig
from maelab.data.loader import choose_in_memory, default_workers, prepare_images
from maelab.downstream import check_data_numbers, check_output_file, resolve_encoder
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit, extract_features, gather_split
from maelab.models.vit import describe, features_model
from maelab.train.checkpoint import atomic_write_bytes
from maelab.train.distributed import cleanup, init_distributed
from maelab.train.precision import resolve_precision

FORMATS = (".npy", ".safetensors")


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def write_features(out: Path, feats: torch.Tensor, labels: torch.Tensor | None, paths: list[str],
                   classes: list[str], info: dict[str, Any]) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    if out.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, feats.numpy().astype(np.float32))
        atomic_write_bytes(out, buf.getvalue())
        if labels is not None:
            buf = io.BytesIO()
            np.save(buf, labels.numpy().astype(np.int64))
            atomic_write_bytes(_sidecar(out, ".labels.npy"), buf.getvalue())
            atomic_write_bytes(_sidecar(out, ".classes.txt"), ("\n".join(classes) + "\n").encode())
            written += [_sidecar(out, ".labels.npy"), _sidecar(out, ".classes.txt")]
    else:
        from maelab.train.checkpoint import save_weights

        tensors = {"features": feats.float().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.long().contiguous()
        meta = {"paths": paths, "classes": classes, **info}
        save_weights(out, tensors, meta)
    atomic_write_bytes(_sidecar(out, ".paths.txt"), ("\n".join(paths) + "\n").encode())
    return written + [_sidecar(out, ".paths.txt")]


def read_features(path: str | Path) -> dict[str, Any]:
    """``{"features", "labels" (or None), "paths", "classes"}`` from a file written by `maelab features`."""
    p = Path(path)
    paths_file = _sidecar(p, ".paths.txt")
    paths = paths_file.read_text().splitlines() if paths_file.is_file() else []
    if p.suffix == ".npy":
        labels_file, classes_file = _sidecar(p, ".labels.npy"), _sidecar(p, ".classes.txt")
        return {"features": torch.from_numpy(np.load(p)), "paths": paths,
                "labels": torch.from_numpy(np.load(labels_file)) if labels_file.is_file() else None,
                "classes": classes_file.read_text().splitlines() if classes_file.is_file() else []}
    from maelab.train.checkpoint import read_weights

    tensors, meta = read_weights(p)
    return {"features": tensors["features"], "labels": tensors.get("labels"), "paths": meta.get("paths", paths),
            "classes": meta.get("classes", []), "meta": meta}


def run_features(cfg: FeaturesConfig) -> dict[str, Any]:
    check_data_numbers(cfg.data)
    out = Path(cfg.run.out).expanduser()
    if out.suffix not in FORMATS:
        raise MaelabError(f"--out must end in {' or '.join(FORMATS)}, got {out}")
    check_output_file(out)
    if not cfg.data.data:
        raise MaelabError("--data is required: a folder of images (ImageFolder tree or flat)")
    info, device = init_distributed(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    try:
        images = prepare_images(cfg.data.data, cfg.data.bad_files)
        torch.manual_seed(cfg.run.seed)
        enc, arch, size = resolve_encoder(cfg.model)
        encoder = features_model(enc, arch, size).to(device)
        d = cfg.data
        split = EvalSplit(images, size, d.batch_size, choose_in_memory(d.in_memory, images, size),
                          default_workers(d.num_workers), d.crop_pct, d.bad_files, info.rank, info.world,
                          progress=info.is_main)
        feats, labels, index = gather_split(*extract_features(encoder, split, device, cfg.model.global_pool,
                                                              cfg.run.precision, info.is_main), device)
        result = {"out": str(out), "images": len(images), "dim": int(feats.shape[1])}
        if info.is_main:
            paths = [images.paths[i] for i in index.tolist()]
            meta = {"init": cfg.model.init, "source": enc.source if enc else "none", "global_pool": cfg.model.global_pool,
                    "encoder": describe(dict(arch, img_size=size)), "root": images.root}
            written = write_features(out, feats, labels if images.classes else None, paths, images.classes, meta)
            print(f"features: {tuple(feats.shape)} ({cfg.model.global_pool}) -> " + ", ".join(map(str, written)),
                  flush=True)
            result["files"] = [str(w) for w in written]
        return result
    finally:
        cleanup(info)
