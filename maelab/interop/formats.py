"""What a weights file is, judged by its first bytes and never by its name.

Every reader of foreign or maelab weights asks here first, so a text file, a picture or a truncated
download named ``model.pth`` gets one line saying what it is instead of a pickle traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maelab.errors import MaelabError
from maelab.io import read_header
from maelab.train.checkpoint import resolve_weights_path

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
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return TORCH
    if looks_safetensors:
        return SAFETENSORS  # truncated: the safetensors reader says so
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if all(b in _TEXT_BYTES for b in head):
        return "a text file"
    return "a file of an unknown format"


def check_weights_file(path: str | Path) -> str:
    """``"torch"`` or ``"safetensors"`` (see :func:`weights_format`); any other file is a one-line error."""
    fmt = weights_format(path)
    if fmt not in (TORCH, SAFETENSORS):
        raise MaelabError(f"cannot read weights {path}: it is {fmt}, not a PyTorch (.pth / .pt / .bin) or "
                          f"safetensors checkpoint")
    return fmt



def maelab_file(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(weights file, its maelab header) when ``path`` is a maelab run / checkpoint folder or a
    safetensors file; None for an official / timm ``.pth`` or a Hugging Face folder."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return None
    if p.is_file() and check_weights_file(p) != SAFETENSORS:
        return None
    weights_path = resolve_weights_path(p)
    return weights_path, read_header(weights_path)
