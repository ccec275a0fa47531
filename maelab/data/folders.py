"""Image folders: an ImageFolder tree (``root/<class>/**/<image>``) or a flat folder of images.

Every image is converted to 3-channel RGB (grayscale, 16-bit, RGBA, palette and CMYK included). An
unreadable file raises ``MaelabError`` naming it, or is left out under ``bad_files="skip"``.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import re
import signal
import struct
import warnings
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from maelab.choices import SHARD_MANIFEST
from maelab.data.seeding import make_generator
from maelab.data.transforms import EvalTransform
from maelab.data.workers import cpu_cores
from maelab.errors import MaelabError, SameOnEveryRank, warn_for_job

# torchvision's list, plus what Pillow reads that cameras and the web write (a GIF gives its first frame)
IMAGE_EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS) | {".jpeg", ".jfif", ".tif", ".tiff", ".webp", ".gif"}))


@dataclass
class ImageList:
    """Sorted image paths with class indices (-1 for images outside a class folder)."""

    root: str
    paths: list[str]
    labels: list[int]
    classes: list[str]
    left_out: dict[str, int] = field(default_factory=dict)  # files that are not images, by extension
    # where each image came from when ``paths`` are not the user's own files (shard samples: the file
    # `maelab shards make` read), for what a command writes out; None: ``paths`` themselves
    sources: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: list[int]) -> "ImageList":
        return ImageList(self.root, [self.paths[i] for i in keep], [self.labels[i] for i in keep], self.classes,
                         sources=[self.sources[i] for i in keep] if self.sources is not None else None)

    def names(self) -> list[str]:
        """The images as a user knows them: their source files where recorded, else their paths."""
        return self.sources if self.sources is not None else self.paths


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_files(entries: list[str], flag: str = "--images", limit: int = 0, limit_flag: str = "--limit") -> list[str]:
    """Images named on a command line (``predict``): files as given, folders by the images directly in
    them (sorted), each file once; the first ``limit`` (0 = all), with a warning naming ``limit_flag`` when
    that leaves images out (a folder of 12 gave 8 masks without a word). A missing path or no image at all is
    an error."""
    if not entries:
        raise MaelabError(f"{flag} is required: image files or folders of images")
    found: list[str] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            found += sorted(str(f) for f in p.iterdir() if f.is_file() and _is_image(f.name))
        elif p.exists():
            found.append(str(p))
        else:
            raise MaelabError(f"{flag} {p} does not exist")
    if not found:
        raise MaelabError(f"no images in {', '.join(entries)}")
    unique: dict[str, str] = {}  # a file named and also inside a named folder is drawn once, as first named
    for f in found:
        unique.setdefault(os.path.realpath(f), f)
    found = list(unique.values())
    if 0 < limit < len(found):
        warnings.warn(f"{flag} holds {len(found)} images: only the first {limit} are taken (files in the order given, "
                      f"a folder's images sorted; {limit_flag} {limit}; a larger {limit_flag} for more)")
        found = found[:limit]
    return found


def _inside_itself(root: Path, rel: Path) -> bool:
    """Whether folder ``root / rel`` is (through a symlink) one of the folders above it: walking it would
    never end. Two links to one folder elsewhere are two class folders, as torchvision reads them."""
    real = os.path.realpath(root / rel)
    return any(os.path.realpath(root / Path(*rel.parts[:i])) == real for i in range(len(rel.parts)))


def scan_images(root: str | os.PathLike) -> ImageList:
    """List the images under ``root``; class = first-level sub-folder (sorted), as torchvision does."""
    root = Path(root).expanduser()
    if not root.exists():
        raise SameOnEveryRank(f"data folder {root} does not exist")
    if not root.is_dir():
        raise SameOnEveryRank(f"data path {root} is not a folder")
    paths: list[str] = []
    tops: list[str] = []
    left_out: Counter[str] = Counter()
    unlisted: list[str] = []

    def unreadable(err: OSError) -> None:  # os.walk passed over a folder it could not list without a word
        folder = Path(os.fspath(err.filename))
        if folder.name == "lost+found":  # a file system's own (root-only at a volume's top), never data
            return
        if folder == root or folder.parent == root:  # --data, or a class: left out, it renumbered the classes
            raise SameOnEveryRank(f"cannot list {folder}: {err.strerror or err}")  # after it
        unlisted.append(f"{folder} ({err.strerror or err})")  # deeper: its images are left out, said below

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        rel = Path(dirpath).relative_to(root)
        if _inside_itself(root, rel):  # a symlink cycle: do not walk forever
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        top = rel.parts[0] if rel.parts else ""
        for name in sorted(filenames):
            if _is_image(name):
                paths.append(os.path.join(dirpath, name))
                tops.append(top)
            elif not name.startswith("."):
                left_out[Path(name).suffix.lower() or "(no extension)"] += 1
    if unlisted:  # said once under torchrun
        warn_for_job(f"{len(unlisted)} folder(s) under {root} could not be listed, so their images are left out: "
                     f"{', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''}")
    if not paths:
        tars = left_out.get(".tar", 0)
        raise MaelabError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})" + (
            f"; it holds {tars} .tar file(s) but no {SHARD_MANIFEST}: if `maelab shards make` wrote them, it did not "
            f"finish (run it again); other tar shards are read by a brace pattern, e.g. {root}/name-{{0000..0009}}.tar"
            if tars else ""))
    classes = sorted({t for t in tops if t})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[t] if t else -1 for t in tops]
    return ImageList(str(root), paths, labels, classes, dict(left_out))


# Images above MAX_PIXELS (Pillow's own warning limit, ~9459 x 9459) are decoded downscaled to fit under
# it (JPEG: at reduced scale by the decoder itself, others: reduced after decoding); images above
# Pillow's hard limit (twice that) are refused as unreadable: decoding them could exhaust memory.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


FLOAT_UNIT_MAX = 1.5  # a float image whose values stay under this is on the [0, 1] scale


def to_rgb(img: Image.Image, bits: int | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit integer grayscale is scaled by its bit depth (never by its
    values); 32-bit integer grayscale by the range its values use (a 32-bit container scaled by 2^32
    would be black); float images whose values stay under :data:`FLOAT_UNIT_MAX` by 255 (a [0, 1] image with an
    overshoot, clipped), other float images as 0-255; transparency (RGBA, LA, palette or
    ``transparency`` info) is composited over white; everything else (L, 1, P, CMYK, ...) is converted.
    ``bits``: the bit depth when ``img`` is a copy that lost its file header (see :func:`bit_depth`)."""
    mode = img.mode
    bits = bits or (bit_depth(img) if mode.startswith("I") else 8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":  # [0, 1] up to an overshoot (1.02 after resampling: clipped, it was read as 0-255, black);
            if arr.size and np.isfinite(arr).any() and np.nanmax(arr) <= FLOAT_UNIT_MAX:  # a 0-255 image that
                arr = arr * 255.0  # stays under 1.5 is black on either reading
        elif bits > 16:
            low, high = min(float(arr.min()), 0.0), float(arr.max()) if arr.size else 0.0
            arr = (arr - low) * (255.0 / max(high - low, 1.0))
        else:
            arr = arr * (255.0 / (2**bits - 1))
        arr = np.nan_to_num(arr, nan=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# An image stored inside an uncompressed tar shard: "<shard>.tar@<offset>+<size>/<member name>" (see
# maelab.data.shards.shard_images); every reader here opens it with one seek, as it opens a file.
TAR_MEMBER = re.compile(r"^(.+\.tar)@(\d+)\+(\d+)/(.+)$")  # the member's name may hold folders


def member_path(tar: str, offset: int, size: int, name: str) -> str:
    return f"{tar}@{offset}+{size}/{name}"


def image_file(path: str | os.PathLike):
    """What ``Image.open`` reads for ``path``: the path itself, or the bytes of a tar member path."""
    m = TAR_MEMBER.match(str(path))
    if m is None:
        return path
    try:
        with open(m.group(1), "rb") as f:
            f.seek(int(m.group(2)))
            data = f.read(int(m.group(3)))
    except OSError as e:
        raise FileNotFoundError(f"shard {m.group(1)}: {e}") from None
    if len(data) != int(m.group(3)):
        raise OSError(f"shard {m.group(1)} ends inside {m.group(4)} (truncated?)")
    return io.BytesIO(data)


def open_rgb(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """The one image decoder of maelab (training, evaluation, pictures): decode fully, apply the EXIF
    orientation (photos from phones), convert to RGB (:func:`to_rgb`). A missing or unreadable file
    raises :class:`MaelabError` naming it. ``data``: the file's bytes when they come from elsewhere (a
    tar shard); ``path`` then only names the image in messages."""
    try:
        with warnings.catch_warnings():  # the size policy is ours (MAX_PIXELS), not a warning per file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            source = image_file(path) if data is None else io.BytesIO(data)
            if data is None and isinstance(source, io.BytesIO):
                data = source.getvalue()
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    scale = (MAX_PIXELS / (img.width * img.height)) ** 0.5
                    img.draft(img.mode, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
                img.load()
                if img.format == "PNG" and _png_data_missing(path, data):
                    raise OSError("the PNG image data ends before the last row (incomplete file)")
                if img.width * img.height > MAX_PIXELS:
                    img = img.reduce(math.ceil((img.width * img.height / MAX_PIXELS) ** 0.5))
                bits = bit_depth(img) if img.mode.startswith("I") else 8  # the header, before a copy drops it
                return to_rgb(ImageOps.exif_transpose(img) or img, bits)
    except FileNotFoundError as e:
        raise MaelabError(f"image {path} does not exist" + (f" ({e})" if TAR_MEMBER.match(str(path)) else "")) from None
    except IsADirectoryError:
        raise MaelabError(f"not an image file: {path} is a folder") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MaelabError(f"cannot read image {path}: {why_unreadable(e)}") from None


def why_unreadable(error: Exception) -> str:
    """PIL's reason, without the file object it names for an image read from a tar shard
    ("cannot identify image file <_io.BytesIO object at 0x7f...>")."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can identify (an empty, cut-short or non-image file)"
    return str(error)


def _png_data_missing(path: str | os.PathLike, data: bytes | None = None) -> bool:
    """Whether a non-interlaced PNG's image data decompresses to fewer bytes than its header needs:
    Pillow fills such files with black rows without an error. (Interlaced files are not checked.)"""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    pos, need, got, stream = 8, None, 0, zlib.decompressobj()
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            if interlace:
                return False
            need = height * (1 + (width * _PNG_CHANNELS.get(colour, 4) * depth + 7) // 8)
        elif kind == b"IDAT":
            try:
                got += len(stream.decompress(body))
            except zlib.error:
                return True
        elif kind == b"IEND":
            break
        pos += 12 + length
    return need is not None and got < need


def bit_depth(img: Image.Image) -> int:
    """Bits per sample of an integer grayscale image, from its mode or header, never from its values: a
    guess from the pixels decoded two nearly identical 16-bit images to very different RGB."""
    if img.mode.startswith("I;16"):
        return 16
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample: "I" for 32-bit samples
    if bits:
        return int(bits[0] if isinstance(bits, (tuple, list)) else bits)
    # other "I" images hold 16-bit samples: PGM/PPM with maxval > 255 (Pillow rescales them to 16 bits)
    # and 16-bit grayscale PNG in Pillow < 10
    return 16


def _open_header(path: str) -> Image.Image:
    """The image's header, without Pillow's warning for a big image: the size policy is ours (MAX_PIXELS,
    :func:`open_rgb`), and the warning came as two raw lines per file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(image_file(path))


def _probe(path: str) -> str | None:
    """Cheap readability check (header + structure, no full decode); the reason if it fails."""
    try:
        with _open_header(path) as img:
            img.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"cannot read image {path}: {why_unreadable(e)}"


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def _header_size(path: str) -> tuple[int, int] | None:
    """(height, width) after the EXIF orientation, from the file header without decoding the pixels;
    None if it cannot be read. Pillow's TIFF reader already reports a rotated TIFF's size as displayed
    (it turns the pixels itself when it decodes them)."""
    try:
        with _open_header(path) as img:
            if img.format != "TIFF" and img.getexif().get(0x0112) in _ROTATED:
                return img.width, img.height
            return img.height, img.width
    except Exception:  # noqa: BLE001 - the decode that follows names the file
        return None


def _map_files(fn, paths: list[str]) -> list:
    """``[fn(p) for p in paths]`` for cheap per-file probes. Header parsing is Python code, so threads
    fight over the GIL (measured 2-3x slower than one loop on 50 000 cached CIFAR files); forked
    processes use every core and still overlap the disk reads. Short lists stay in this process."""
    workers = min(8, cpu_cores())
    if len(paths) < 4096 or workers < 2 or "fork" not in mp.get_all_start_methods():
        return [fn(p) for p in paths]
    # A stop signal while the workers fork would meet maelab's handler inside Python's at-fork hooks, which
    # swallow its exception (the command then ran to its end), and in the workers (tracebacks). So the
    # signals wait until the pool is done -- shutting it down waits for its work anyway -- and the workers
    # leave them to this process.
    stop = {signal.SIGINT, signal.SIGTERM}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_probe_worker) as pool:
            return list(pool.map(fn, paths, chunksize=-(-len(paths) // (4 * workers))))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _probe_worker() -> None:
    """A probe worker: Ctrl-C is for the command (which waits for the pool), SIGTERM ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def unreadable(paths: list[str]) -> list[str]:
    """Why each path that fails the quick probe cannot be read (the others are left out), in parallel."""
    return [r for r in _map_files(_probe, paths) if r]


def check_readable(paths: list[str]) -> list[int]:
    """Indices of the paths that pass a quick probe, in parallel; used by ``bad_files="skip"``.
    A file that passes but fails to decode later is replaced by a neighbour at load time."""
    reasons = _map_files(_probe, paths)
    for reason in filter(None, reasons):
        warnings.warn(f"skipping unreadable image: {reason}", stacklevel=2)
    return [i for i, r in enumerate(reasons) if r is None]


def image_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """(height, width) of every image from its header (no decoding), in parallel; None where unreadable."""
    return _map_files(_header_size, paths)


def load_images(paths, size: int | tuple[int, int]) -> torch.Tensor:
    """Image files as one model input batch (N, 3, H, W): decoded by :func:`maelab.data.folders.open_rgb`,
    resized (bicubic) to cover ``size`` and centre-cropped, ImageNet-normalised."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise MaelabError("no image paths given")
    try:
        size = (int(size), int(size)) if not isinstance(size, (tuple, list)) else tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise MaelabError(f"image size must be one number or (height, width), got {size!r}") from None
    if len(size) != 2 or min(size) <= 0:
        raise MaelabError(f"image size must be one or two positive numbers, got {size}")
    view = EvalTransform(size, 1.0)
    return torch.stack([view(open_rgb(p)) for p in paths])


def prepare_images(root: str, bad_files: str, limit: int = 0, seed: int = 0, scan=scan_images) -> ImageList:
    """Scan ``root`` (with ``scan``: a folder; ``maelab.data.shards.shard_images``: local shards); optionally
    keep a fixed seeded subset of ``limit`` images; apply the bad-file policy."""
    images = scan(root)
    if images.left_out and os.environ.get("RANK", "0") == "0":  # said once under torchrun
        kinds = ", ".join(f"{ext}: {n}" for ext, n in sorted(images.left_out.items()))
        warnings.warn(f"{sum(images.left_out.values())} file(s) under {root} are not images by their extension and "
                      f"were left out ({kinds})", stacklevel=2)
    if limit < 0:
        raise MaelabError(f"--limit-images must be 0 (all) or positive, got {limit}")
    if 0 < limit < len(images):
        keep = torch.randperm(len(images), generator=make_generator(seed, 6))[:limit].sort().values
        images = images.subset(keep.tolist())
    if bad_files == "skip":
        keep = check_readable(images.paths)
        if not keep:
            raise MaelabError(f"none of the {len(images)} images under {root} could be read")
        images = images.subset(keep)
    return images


def subsample(images: ImageList, max_images: int | None, seed: int) -> ImageList:
    """At most ``max_images`` images, a fixed seeded choice kept in folder order (all if None/0)."""
    if not max_images or max_images >= len(images):
        return images
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(images), generator=g)[:max_images].tolist())
    return images.subset(keep)


def _spread_order(images: ImageList, k: int):
    """Every path once: the first image of each class, then a stride through the rest, then the others."""
    seen_classes, seen = set(), set()
    for p, y in zip(images.paths, images.labels):
        if y not in seen_classes:
            seen_classes.add(y)
            seen.add(p)
            yield p
    step = max(1, len(images.paths) // k)
    for p in (*images.paths[::step], *images.paths):
        if p not in seen:
            seen.add(p)
            yield p


def spread_sample(images: ImageList, k: int, bad_files: str = "error") -> list[str]:
    """A fixed, spread-out sample of ``k`` paths (one per class first), so every run draws the same pictures.
    Under ``bad_files="skip"`` a file that does not decode is named once and the next one takes its place."""
    chosen = []
    for p in _spread_order(images, k):
        if bad_files == "skip":
            try:
                open_rgb(p)
            except MaelabError as e:
                warnings.warn(f"leaving out unreadable image: {e}", stacklevel=2)
                continue
        chosen.append(p)
        if len(chosen) == k:
            break
    return chosen


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey pixels
