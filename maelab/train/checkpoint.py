"""Checkpoints that survive a kill at any instant, and load without executing pickled code.

A checkpoint is a folder ``checkpoints/<name>/`` holding ``model.safetensors`` (weights, with the
model's constructor arguments in the header), ``state.pt`` (optimizer, scaler, schedule position,
RNG states; read with ``weights_only=True``) and ``meta.json``, written last. The folder is written
under a temporary name, fsynced and renamed into place; ``checkpoints/latest`` (a one-line file
replaced atomically) names the newest. An incomplete folder is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from maelab.errors import MaelabError, is_disk_full, megabytes
from maelab.io import atomic_path, atomic_write_bytes, default_mode, fsync_dir, read_weights, save_weights, temp_prefix
from maelab.train.run_lock import writer_of

WEIGHTS, STATE, META, LATEST = "model.safetensors", "state.pt", "meta.json", "latest"


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts / lists: about what a checkpoint of ``obj`` takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    state_dict: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``checkpoints/<name>/`` atomically and point ``latest`` at it. A full disk is one
    :class:`MaelabError` naming the folder and the space needed; earlier checkpoints stay as they were."""
    ckpt_root = Path(run_dir) / "checkpoints"
    try:
        return _save(ckpt_root, name, state_dict, train_state, meta)
    except (OSError, RuntimeError, SafetensorError) as e:
        if not is_disk_full(e):
            raise
        needed = tensor_bytes(state_dict) + tensor_bytes(train_state) + 2**20
        free = shutil.disk_usage(ckpt_root if ckpt_root.is_dir() else run_dir).free
        previous = latest_checkpoint(run_dir)
        raise MaelabError(
            f"no space left in {ckpt_root} to save checkpoint {name}: it needs about {megabytes(needed)} free "
            f"({megabytes(free)} now); " + (f"{previous} is intact" if previous else "no checkpoint was written")
            + "; free some space and run the same command again to resume") from None


def _save(ckpt_root: Path, name: str, state_dict: dict[str, torch.Tensor], train_state: dict[str, Any],
          meta: dict[str, Any]) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=temp_prefix(name)))
    try:
        os.chmod(tmp, default_mode(directory=True))
        save_weights(tmp / WEIGHTS, state_dict, meta.get("model"))
        with atomic_path(tmp / STATE) as state_tmp:
            torch.save(train_state, state_tmp)
        atomic_write_bytes(tmp / META, json.dumps(meta, indent=1).encode())
        final = ckpt_root / name
        if final.exists():
            trash = ckpt_root / f"{temp_prefix(name)}old"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_root / LATEST, (name + "\n").encode())
    return final


def _complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / WEIGHTS).is_file() and (folder / STATE).is_file()


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` (step, epoch, model, stream workers); damaged is a one-line error."""
    try:
        meta = json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError) as e:
        raise MaelabError(f"cannot read {Path(folder) / META}: {e}") from None
    if not isinstance(meta, dict):
        raise MaelabError(f"{Path(folder) / META} is not a checkpoint's meta (a JSON object)")
    return meta


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (by the global step in their meta)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and _complete(d):
            try:
                step = read_meta(d).get("global_step", -1)
            except MaelabError:
                continue
            found.append((step, d.name, d))
    return [d for _, _, d in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` names, or the newest complete one if that pointer is missing/stale."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir() and _complete(target):
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep_names: set[str]) -> None:
    """Delete every complete checkpoint folder whose name is not in ``keep_names``."""
    for d in list_checkpoints(run_dir):
        if d.name not in keep_names:
            shutil.rmtree(d, ignore_errors=True)


def load_train_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same user error
        raise MaelabError(f"cannot read training state {folder / STATE}: {e}".splitlines()[0]) from None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, training state) to resume from. A save never leaves a damaged file, but an interrupted
    copy of a run or a failing disk can: then the error also names the run's other checkpoints, since
    resuming from one of them loses only the steps between the two."""
    try:
        weights, _ = read_weights(folder / WEIGHTS)
        return weights, load_train_state(folder)
    except MaelabError as e:
        others = [d for d in list_checkpoints(folder.parent.parent) if d.resolve() != folder.resolve()]
        if not others:
            raise
        names = ", ".join(d.name for d in others)
        raise MaelabError(f"{str(e).rstrip('.')}. The run has other checkpoints ({names}): continue from the newest "
                          f"of them with --resume {others[-1]}") from None


def resolve_weights_path(path: str | Path) -> Path:
    """A run folder, a checkpoint folder or a weights file -> the weights file to read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MaelabError(f"checkpoint {p} does not exist")
    if p.is_file():
        return p
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    latest = latest_checkpoint(p)
    if latest is None and (p / LATEST).is_file():  # the checkpoints/ folder itself
        latest = latest_checkpoint(p.parent)
    run = latest.parent.parent if latest is not None else None
    if run is not None and (pid := writer_of(run)) is not None:
        warnings.warn(f"{run} is being trained by process {pid}: reading its newest checkpoint, {latest.name}, which "
                      f"that run will replace (name a checkpoint folder, e.g. {latest}, to read a fixed one)")
    if latest is None:
        # a recipe's steps (pretrain/, ...); an ablate sweep's (mask-ratio=0.75/pretrain, ...)
        runs = sorted(str(r.parent) for pattern in ("*/config.yaml", "*=*/*/config.yaml") for r in p.glob(pattern))
        hint = f"; it holds runs, e.g. {', '.join(runs[:3])}" if runs else ""
        raise MaelabError(f"{p} holds no checkpoint (expected a run folder, a checkpoint folder or a file){hint}")
    return latest / WEIGHTS
