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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maelab.errors import MaelabError

WEIGHTS, STATE, META, LATEST = "model.safetensors", "state.pt", "meta.json", "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` / ``mkdir`` would give under the current umask (temp files are
    created owner-only, which would hide runs from other users of a shared machine)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_writable_folder(folder: str | Path, flag: str, shown: str | Path) -> None:
    """Refuse an output whose folder (or its nearest existing ancestor) cannot be written, *before*
    the work that fills it; ``shown`` is the path the user gave."""
    existing = Path(folder).expanduser().resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MaelabError(f"{flag} {shown}: cannot create or write in {existing}")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside ``path`` to write to; on success fsync it and rename it over
    ``path`` (then fsync the folder); on any failure remove it. Readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Weights as safetensors, atomically; ``metadata`` (JSON-able) goes into the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"maelab": json.dumps(metadata)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, maelab metadata) from a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MaelabError(f"cannot read weights {path}: {e}") from None
    info = json.loads(meta["maelab"]) if "maelab" in meta else {}
    return tensors, info


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    state_dict: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``checkpoints/<name>/`` atomically and point ``latest`` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        os.chmod(tmp, _default_mode(directory=True))
        save_weights(tmp / WEIGHTS, state_dict, meta.get("model"))
        with atomic_path(tmp / STATE) as state_tmp:
            torch.save(train_state, state_tmp)
        atomic_write_bytes(tmp / META, json.dumps(meta, indent=1).encode())
        final = ckpt_root / name
        if final.exists():
            trash = ckpt_root / f".old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_root / LATEST, (name + "\n").encode())
    return final


def _complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / WEIGHTS).is_file() and (folder / STATE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (by the global step in their meta)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and _complete(d):
            try:
                step = json.loads((d / META).read_text()).get("global_step", -1)
            except (OSError, json.JSONDecodeError):
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
    if latest is None:
        raise MaelabError(f"{p} holds no checkpoint (expected a run folder, a checkpoint folder or a file)")
    return latest / WEIGHTS


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                        optional: tuple[str, ...] = (), named: int = 4) -> str:
    """How ``given`` differs from ``expected`` in keys and shapes, as one readable phrase naming the first
    few of each (empty when they fit). Expected keys starting with ``optional`` may be missing."""
    def few(keys):
        keys = sorted(keys)
        return ", ".join(keys[:named]) + (f" (+{len(keys) - named} more)" if len(keys) > named else "")

    missing = [k for k in expected if k not in given and not k.startswith(optional)]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(expected)
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {few(unexpected)}")
    if shapes:
        more = f" (+{len(shapes) - named} more)" if len(shapes) > named else ""
        parts.append(f"shape mismatch {len(shapes)}: {'; '.join(shapes[:named])}{more}")
    return "; ".join(parts)


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict key/shape comparison with a readable message instead of a wall of text."""
    problem = state_dict_mismatch(model.state_dict(), state_dict)
    if problem:
        raise MaelabError(f"{source} does not fit this model ({problem})")
