"""The ground every layer may stand on: writes that a kill cannot leave half done, and weights files.

* :func:`atomic_path` / :func:`atomic_write_bytes` write beside the target, fsync, then rename over it:
  a reader sees the old file or the new one, never a torn one. Files get the umask's permissions.
* :func:`save_weights` / :func:`read_weights`: safetensors with an optional maelab description (JSON)
  in the header, so a weights file says which model it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from maelab.errors import MaelabError, SameOnEveryRank


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
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


def default_mode(directory: bool = False) -> int:
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


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output file path that cannot be written *before* the work that fills it."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MaelabError(f"{flag} {p} is a folder; give a file name")
    check_writable_folder(p.parent, flag, p)


def refuse_out_inside(out: str | Path, *inputs: str | None) -> None:
    """Refuse a run folder inside a folder the run reads: the next run would read its pictures as data (in
    an image folder, a class of them), and a resume would train on other images than the run began with."""
    if not out:
        return
    try:
        target = Path(out).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop ("Symlink loop from ...")
        raise SameOnEveryRank(f"--out {out} cannot be resolved to a folder: {e}") from None
    for data in inputs:
        root = Path(data).expanduser().resolve() if data else None
        if root is not None and root.is_dir() and (target == root or root in target.parents):
            raise SameOnEveryRank(f"--out {out} is inside {data}, which this run reads: its pictures and files would be "
                              f"read as images by the next run (in an image folder, as a class of their own); choose "
                              f"an --out outside it")


def temp_prefix(name: str) -> str:
    """Prefix of a temp file or folder written for ``name``: hidden, and naming the writing process, so
    a later run can tell what a killed writer left from a write still in progress."""
    return f".{name}.{os.getpid()}."


def _temp_shape(name: str) -> re.Pattern:
    """The exact names :func:`temp_prefix` gives (``name`` a regex): ``.<name>.<pid>.`` then tempfile's 8
    random characters (``.tmp`` for a file, ``.d`` for a scratch folder, nothing for a checkpoint folder), or
    ``old`` (a checkpoint being replaced). A user's ``.notes.2024.txt`` does not match."""
    return re.compile(rf"^\.({name})\.(\d+)\.([a-z0-9_]{{8}}(\.tmp|\.d)?|old)$")


_ANY_TEMP = _temp_shape(".+")
_OLD_TEMP = re.compile(r"^\.(epoch_\d+|step_\d+|latest)\.[a-z0-9_]{8}(\.tmp)?$")  # checkpoints' before pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the hidden temp files and folders in ``folder`` that no live process is writing: a SIGKILL
    mid-write leaves them behind (for a weights file, a scratch folder with the safetensors writer's own
    temp file of the whole weights inside). Only names of :func:`temp_prefix`'s exact shape count, one whose
    writer's pid is alive is kept, and a checkpoint's temp named before pids were recorded
    (``.epoch_0001.x8dk3l2q``) is stale; a user's hidden files (``.gitkeep``, ``.notes.2024.txt``) are not
    maelab's and stay. ``name``: only the temps of that file. Returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    shape = _ANY_TEMP if name is None else _temp_shape(re.escape(name))
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = shape.match(p.name)
        if m and _alive(int(m.group(2))) or not m and (name is not None or not _OLD_TEMP.match(p.name)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | Path, scratch_folder: bool = False):
    """Yield a temp path beside ``path`` to write to; on success fsync it and rename it over
    ``path`` (then fsync the folder); on any failure remove it. Readers never see a partial file.

    ``scratch_folder``: the temp path lies in a hidden folder of its own, named for this process. For
    writers that make temp files of their own beside their target (safetensors does, unnamed): a SIGKILL
    then leaves one folder that the next write of ``path`` knows as a dead process's and removes."""
    path = Path(path)
    if path.is_dir():  # os.replace said "Is a directory" naming the temp file
        raise MaelabError(f"{path} is a folder: give the name of the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    box = None
    if scratch_folder:
        remove_stale_temps(path.parent, path.name)
        box = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".d"))
        tmp = str(box / path.name)
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if box is not None:
            shutil.rmtree(box, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes, scratch_folder: bool = False) -> None:
    with atomic_path(path, scratch_folder) as tmp:
        Path(tmp).write_bytes(data)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), (json.dumps(data, indent=1) + "\n").encode())


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Weights as safetensors, atomically; ``metadata`` (JSON-able) goes into the header under ``maelab``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"maelab": json.dumps(metadata)} if metadata else None
    with atomic_path(path, scratch_folder=True) as tmp:
        save_file(tensors, tmp, metadata=header)


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's raw header metadata (string -> string; ``{}`` when it has none), tensors unread."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise MaelabError(f"cannot read weights {path}: {e}{damaged(e, path)}") from None


def damaged(error: Exception, path: str | Path | None = None) -> str:
    """What a reader's complaint about a safetensors file's bytes means (a disk error says it itself): a
    truncated or damaged one, or no safetensors file at all (named by what its first bytes show)."""
    if isinstance(error, OSError):
        return ""
    if path is not None:
        try:
            kind = weights_format(path)
        except MaelabError:
            kind = SAFETENSORS
        if kind != SAFETENSORS:
            return f" (it is not a safetensors file but {'a PyTorch checkpoint' if kind == TORCH else kind})"
    return " (a truncated or damaged safetensors file: copy or download it again)"


# --- what a weights file is, by its first bytes ---------------------------------------------------
TORCH, SAFETENSORS = "torch", "safetensors"
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors reader's own limit
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip archive"), (b"\x89HDF", "an HDF5 file"),
          (b"%PDF", "a PDF document"))
_TEXT_BYTES = set(b"\t\n\r\f") | set(range(32, 127)) | set(range(128, 256))


def weights_format(path: str | Path) -> str:
    """What a file holds, judged by its first bytes and never by its name: ``"torch"`` (``torch.save``
    output: zip or legacy pickle), ``"safetensors"`` (8-byte little-endian header length, then a JSON
    header), or a few words saying what else it is ("a text file", "a PNG image", "an empty file", ...)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError as e:
        raise MaelabError(f"cannot read weights {path}: {e.strerror or e}") from None
    if not head:
        return "an empty file"
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    looks_safetensors = head[8:9] == b"{" and 2 <= header_len <= _MAX_SAFETENSORS_HEADER
    if looks_safetensors and 8 + header_len <= size:
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a zip's full magic: a safetensors header of 19 280
        return TORCH  # bytes starts with "PK" too
    if looks_safetensors:
        return SAFETENSORS  # truncated: the safetensors reader says so
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if all(b in _TEXT_BYTES for b in head):
        return "a text file"
    return "a file of an unknown format"


def read_header(path: str | Path) -> dict[str, Any]:
    """The maelab description in a safetensors file's header (``{}`` for foreign files), tensors unread."""
    meta = read_metadata(path)
    try:
        return json.loads(meta["maelab"]) if "maelab" in meta else {}
    except json.JSONDecodeError:
        raise MaelabError(f"cannot read weights {path}: its maelab header is not valid JSON") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, maelab metadata) from a safetensors file."""
    info = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MaelabError(f"cannot read weights {path}: {e}{damaged(e, path)}") from None
    return tensors, info


def file_digest(path: str | Path, part: int = 8 << 20) -> str:
    """A fingerprint of a (weights) file's content: its size and a hash of its first and last ``part``
    bytes -- other weights written to the same path differ there, at a few milliseconds for a GB file."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(part))
        if size > 2 * part:
            f.seek(size - part)
        h.update(f.read(part))
    return h.hexdigest()[:16]
