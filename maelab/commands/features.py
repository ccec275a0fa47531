"""`maelab features`: embeddings of a folder of images (ImageFolder tree or flat), never masked, in a
fixed order, written with the image paths.

* ``out.npy``: (N, D) float32; ``out.paths.txt`` (one path per line, row order); ``out.labels.npy``
  (class index per row, -1 outside a class folder) and ``out.classes.txt`` when there are class folders.
* ``out.safetensors``: tensors ``features`` (and ``labels``); the header holds ``paths``, ``classes``
  and how the features were made (JSON); ``out.paths.txt`` as well.

For shards the paths are the files the samples were made from (what a user knows them by); the header's
``members`` says where each row is inside its shard.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maelab.commands.options.features import FeaturesConfig
from maelab.commands.options.sections import check_data_numbers
from maelab.commands.session import Session, device_name, encoder_header
from maelab.data.shards import prepare_any
from maelab.errors import MaelabError
from maelab.evaluate.features import extract_features, gather_split
from maelab.io import atomic_write_bytes, check_output_file, read_weights, save_weights
from maelab.models.vit import describe

FORMATS = (".npy", ".safetensors")


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def write_features(out: Path, feats: torch.Tensor, labels: torch.Tensor | None, paths: list[str],
                   classes: list[str], info: dict[str, Any]) -> list[Path]:
    """Write the features and their side files; an earlier features file at ``out`` is removed first and the new
    one written last, so a run stopped half-way (a full disk, Ctrl-C) leaves no features file beside another
    run's side files: the old rows beside the new paths were read as one set when both had as many rows
    (:func:`read_features` checks only the counts)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    written = []
    if out.suffix == ".npy":
        label_files = [_sidecar(out, ".labels.npy"), _sidecar(out, ".classes.txt")]
        if labels is not None:
            buf = io.BytesIO()
            np.save(buf, labels.numpy().astype(np.int64))
            atomic_write_bytes(label_files[0], buf.getvalue())
            atomic_write_bytes(label_files[1], _lines(classes))
            written += label_files
        else:  # an earlier run's labels would be read as these rows'
            for f in label_files:
                f.unlink(missing_ok=True)
    atomic_write_bytes(_sidecar(out, ".paths.txt"), _lines(paths))
    written.append(_sidecar(out, ".paths.txt"))
    if out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, feats.numpy().astype(np.float32))
        atomic_write_bytes(out, buf.getvalue(), scratch_folder=True)  # (a killed run's GBs removed by the next)
    else:
        tensors = {"features": feats.float().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.long().contiguous()
        save_weights(out, tensors, {"paths": paths, "classes": classes, **info})
    return [out, *written]


def check_line_breaks(names: list[str], out: Path) -> None:
    """``<stem>.paths.txt`` holds one path per line: a file name with a line break in it (legal on Linux)
    would shift every row after it. Said before any image is encoded."""
    broken = next((n for n in names if "\n" in n or "\r" in n), None)
    if broken is not None:
        raise MaelabError(f"the image file name {broken!r} holds a line break, which {_sidecar(out, '.paths.txt')} "
                          f"(one path per line) cannot hold: rename it")


def _lines(names: list[str]) -> bytes:
    """One name per line, as UTF-8 (a file name that is no valid UTF-8 keeps its bytes)."""
    return ("\n".join(names) + "\n").encode("utf-8", "surrogateescape")


def _read_lines(file: Path) -> list[str]:
    """:func:`_lines` read back: "\n" alone ends a line (``splitlines`` would also split a name at U+2028,
    \x1c, ...), whatever the locale's encoding."""
    text = file.read_bytes().decode("utf-8", "surrogateescape") if file.is_file() else ""
    return text.removesuffix("\n").split("\n") if text else []


def read_features(path: str | Path) -> dict[str, Any]:
    """``{"features", "labels" (or None), "paths", "classes"}`` from a file written by `maelab features`."""
    p = Path(path)
    paths_file = _sidecar(p, ".paths.txt")
    paths = _read_lines(paths_file)
    if p.suffix == ".npy":
        labels_file, classes_file = _sidecar(p, ".labels.npy"), _sidecar(p, ".classes.txt")
        got = {"features": torch.from_numpy(np.load(p)), "paths": paths,
               "labels": torch.from_numpy(np.load(labels_file)) if labels_file.is_file() else None,
               "classes": _read_lines(classes_file)}
    else:
        tensors, meta = read_weights(p)
        got = {"features": tensors["features"], "labels": tensors.get("labels"), "paths": meta.get("paths", paths),
               "classes": meta.get("classes", []), "meta": meta}
    rows = len(got["features"])
    sides = {"paths": len(got["paths"]) or rows, "labels": rows if got["labels"] is None else len(got["labels"])}
    for name, n in sides.items():
        if n != rows:
            raise MaelabError(f"{p} has {rows} rows but its {name} {n}: the files are from different runs "
                              f"(run `maelab features` again)")
    return got


def run(cfg: FeaturesConfig) -> dict[str, Any]:
    check_data_numbers(cfg.data)
    out = Path(cfg.run.out).expanduser()
    if out.suffix not in FORMATS:
        raise MaelabError(f"--out must end in {' or '.join(FORMATS)}, got {out}")
    check_output_file(out)
    other = next((out.with_suffix(f) for f in FORMATS if f != out.suffix and out.with_suffix(f).is_file()), None)
    if other is not None:  # f.npy and f.safetensors share f.paths.txt: writing one gave the other another run's paths
        raise MaelabError(f"{other} is beside --out {out}: features of one name share {_sidecar(out, '.paths.txt').name}, "
                          f"which this run would replace under that file's rows; give --out another name (or remove "
                          f"{other.name})")
    if not cfg.data.data:
        raise MaelabError("--data is required: a folder of images (ImageFolder tree or flat)")
    with Session(cfg.run.device, cfg.run.precision, cfg.run.seed) as s:
        images = prepare_any(cfg.data.data, cfg.data.bad_files)
        check_line_breaks(images.names(), out)
        encoder, enc, arch, size, notes = s.frozen_encoder(cfg.model)
        if s.is_main:
            print(f"maelab features: {encoder_header(enc, arch, size, notes)}; on {s.where}", flush=True)
        split = s.eval_split(images, size, cfg.data)
        feats, labels, index = gather_split(*extract_features(encoder, split, s.device, cfg.model.global_pool,
                                                              s.precision, s.is_main), s.device)
        result = {"out": str(out), "images": len(images), "dim": int(feats.shape[1])}
        if s.is_main:
            rows, names = index.tolist(), images.names()
            paths = [names[i] for i in rows]
            meta = {"init": cfg.model.init, "source": enc.source if enc else "none", "global_pool": cfg.model.global_pool,
                    "encoder": describe(dict(arch, img_size=size)), "root": images.root,
                    "device": device_name(s.device), "precision": s.precision}
            if images.sources is not None:  # shard samples: where each one is inside its shard, too
                meta["members"] = [images.paths[i] for i in rows]
            written = write_features(out, feats, labels if images.classes else None, paths, images.classes, meta)
            print(f"features: {tuple(feats.shape)} ({cfg.model.global_pool}) -> " + ", ".join(map(str, written)),
                  flush=True)
            result["files"] = [str(w) for w in written]
        return result
