"""WebDataset tar shards: writing them from an image folder, and streaming them into training.

A shard set is tar files of samples ``<index>.<ext>`` (the image file's own bytes, never re-encoded),
``<index>.cls`` (class index, -1 outside a class folder) and ``<index>.src.txt`` (the image's path
inside the source folder), plus ``index.json`` (:data:`SHARD_MANIFEST`: shard names, sample counts, class
names). ``--data`` takes a shard folder, a manifest, a brace pattern (``train-{0000..0127}.tar``),
``https://`` URLs or ``pipe:`` commands (``pipe:aws s3 cp s3://b/train-{0000..0127}.tar -``); URLs are
expanded and opened by the ``webdataset`` package, tar streams parsed by it.

How a streamed epoch is read (:class:`ShardPlan`, :class:`ShardStream`):

- rank ``r`` of ``W`` reads shards ``r, r+W, r+2W, ...`` (a fixed split: no shard is read twice);
  each epoch it permutes them (seed, epoch, rank) and DataLoader worker ``w`` of ``n`` reads every
  ``n``-th of that order, through its own shuffle buffer (seed, epoch, rank, worker). Over all ranks
  and workers every sample is read exactly once per epoch.
- every rank trains ``min over ranks of its samples // (batch x accumulation)`` steps, so DDP ranks
  stay in step; the samples past that (at most one global batch per rank plus the imbalance between
  ranks' shard counts) are left out of that epoch -- which ones changes from epoch to epoch.
- augmentation is the folder path's (:class:`~maelab.data.transforms.PretrainTransform`) with each
  sample's generator seeded by (seed, epoch, sample index), whichever worker reads it.
- resuming at step ``s`` of an epoch replays the epoch's stream without decoding and skips its first
  ``s`` global batches, so the resumed run trains on exactly the samples (and pixels) the uninterrupted
  one would, provided the number of processes and of loader workers is the same. The replay re-reads
  the bytes of the skipped part of the epoch (I/O, no decoding). With another number of processes or
  workers the order differs: the rest of that epoch then skips the same number of samples of the new
  order, so some of its samples are seen twice and others not at all; later epochs are whole again.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from maelab.choices import SHARD_MANIFEST
from maelab.data.folders import ImageList, member_path, open_rgb, prepare_images, scan_images
from maelab.data.loader import Batch, StepPlan
from maelab.data.seeding import make_generator, mix_seed
from maelab.data.transforms import EvalTransform
from maelab.data.workers import ignore_stop_signals, stop_workers, worker_batches
from maelab.errors import MaelabError, SameOnEveryRank
from maelab.io import fsync_dir, write_json

FORMAT = "maelab-shards/1"
TMP_MARK = ".tmp-"


# --- writing ------------------------------------------------------------------------------------------

def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:0{max(4, len(str(n - 1)))}d}.tar"


def make_shards(images: ImageList, out: str | Path, shard_size: int, prefix: str = "train", seed: int = 0,
                progress: bool = True) -> dict:
    """Write ``images`` as tar shards of ``shard_size`` samples into ``out`` and return the manifest.

    The images go in a seeded random order, so every shard mixes the classes (a streamed shuffle
    buffer only mixes nearby samples). Each shard is written to a temp file, fsynced and renamed;
    ``index.json`` is written last, atomically: a killed run leaves complete shards and temp files,
    never a half shard under a shard's name, and no manifest, so the folder is not taken as a shard set."""
    if shard_size < 1:
        raise MaelabError(f"--shard-size must be at least 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise MaelabError(f"--prefix {prefix!r}: use letters, digits, '_', '-' and '.' only")
    out = Path(out).expanduser()
    if (out / SHARD_MANIFEST).exists():
        raise MaelabError(f"{out} already holds a shard set ({SHARD_MANIFEST}); choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{prefix}-*.tar{TMP_MARK}*"):  # left by a killed run
        stale.unlink()
    root = Path(os.path.abspath(Path(images.root).expanduser()))  # the manifest's source: a path from anywhere
    order = torch.randperm(len(images), generator=make_generator(seed, 9)).tolist()
    n = math.ceil(len(images) / shard_size)
    shards = []
    bar = tqdm(total=len(images), unit="img", desc="shards", disable=not progress)
    for s in range(n):
        name = shard_name(prefix, s, n)
        part = order[s * shard_size:(s + 1) * shard_size]
        tmp = out / f"{name}{TMP_MARK}{os.getpid()}"
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=0) as tar:
                for k, i in enumerate(part):
                    path = Path(images.paths[i])
                    try:
                        data = path.read_bytes()
                    except OSError as e:
                        raise MaelabError(f"cannot read image {path}: {e}") from None
                    full = Path(os.path.abspath(path))
                    tar.write({"__key__": f"{s * shard_size + k:09d}", path.suffix.lower().lstrip("."): data,
                               "cls": str(images.labels[i]).encode(),
                               "src.txt": str(full.relative_to(root) if full.is_relative_to(root) else full).encode()})
                    bar.update()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
        shards.append({"name": name, "count": len(part)})
    bar.close()
    fsync_dir(out)
    manifest = {"format": FORMAT, "total": len(images), "classes": images.classes, "shards": shards,
                "source": str(root), "shard_size": shard_size, "seed": seed}
    write_json(out / SHARD_MANIFEST, manifest)
    ours = {sh["name"] for sh in shards}
    others = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in ours and re.fullmatch(
        rf"{re.escape(prefix)}-\d+\.tar", p.name))
    if others:  # an earlier, killed run's shards (or the user's): never deleted, but a pattern would read them
        warnings.warn(f"{out} also holds {len(others)} shard(s) this set does not list ({', '.join(others[:3])}"
                      f"{', ...' if len(others) > 3 else ''}), from an earlier run: `--data {out}` reads only the "
                      f"{len(shards)} in {SHARD_MANIFEST}, but a pattern or glob over the folder would read them "
                      f"too; remove them", stacklevel=2)
    return manifest


# --- finding a shard set -----------------------------------------------------------------------------

@dataclass
class ShardSet:
    """The shards of one ``--data``: their URLs, sample counts and class names, and the folder each shard's
    images were read from (its manifest's ``source``; "" where none says)."""

    source: str
    urls: list[str]
    counts: list[int]
    classes: list[str] = field(default_factory=list)
    made_from: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def first_index(self) -> list[int]:
        """Index of each shard's first sample in the whole set (it seeds the sample's augmentation)."""
        out, n = [], 0
        for c in self.counts:
            out.append(n)
            n += c
        return out


def is_shard_source(spec: str) -> bool:
    """Whether ``--data`` names shards (folder with a manifest, manifest, .tar, pattern, URL, pipe)
    rather than an image folder."""
    if spec.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", spec):
        return True
    if "{" in spec and ".." in spec:
        return True
    p = Path(spec).expanduser()
    return spec.endswith((".tar", ".json")) or (p.is_dir() and (p / SHARD_MANIFEST).is_file())


def _read_url(url: str) -> bytes:
    with wds.gopen(url, "rb") as f:
        return f.read()


def _manifest_beside(url: str) -> tuple[str, dict] | None:
    """The manifest in the folder of ``url`` (local or http(s)); None if there is none."""
    if url.startswith("pipe:"):
        return None
    if re.match(r"^https?://", url):
        where = urllib.parse.urljoin(url, SHARD_MANIFEST)
        try:
            return where, json.loads(_read_url(where))
        except Exception:  # noqa: BLE001 - no manifest there: the shards are counted instead
            return None
    where = Path(url.removeprefix("file://")).expanduser().parent / SHARD_MANIFEST
    if not where.is_file():
        return None
    return str(where), _load_manifest(where)


def _load_manifest(path: str | Path, text: bytes | None = None) -> dict:
    try:
        data = json.loads(text if text is not None else Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise MaelabError(f"cannot read the shard manifest {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MaelabError(f"{path} is not a maelab shard manifest (written by `maelab shards make`)")
    return data


def open_shards(spec: str, labelled: bool = False) -> ShardSet:
    """The :class:`ShardSet` of ``--data``. Counts come from the manifest (``index.json`` given, in the
    folder given, or beside each shard); shards it does not list are counted by reading them once.
    ``labelled``: the labels will be used, so a pattern over shard sets with different class lists, or over
    sets with and without a manifest, is refused (pre-training ignores labels and may mix them)."""
    p = Path(spec).expanduser()
    if p.is_dir() or spec.endswith(".json"):
        where = p / SHARD_MANIFEST if p.is_dir() else spec
        if p.is_dir() and not (p / SHARD_MANIFEST).is_file():
            raise MaelabError(f"{p} has no {SHARD_MANIFEST}: `maelab shards make` did not finish writing it; run it again")
        manifest = (_load_manifest(where) if not re.match(r"^https?://", spec)
                    else _load_manifest(spec, _read_url(spec)))
        base = str(where).rsplit("/", 1)[0] + "/" if "/" in str(where) else ""
        urls = [s["name"] if re.match(r"^[a-z]+:", s["name"]) else base + s["name"] for s in manifest["shards"]]
        return ShardSet(spec, urls, [int(s["count"]) for s in manifest["shards"]], list(manifest.get("classes", [])),
                        [str(manifest.get("source", ""))] * len(urls))
    urls = wds.shardlists.expand_urls(spec)
    beside: dict[str, tuple[str, dict] | None] = {}  # manifest of each folder the pattern spans
    for u in urls:
        if _folder(u) not in beside:
            beside[_folder(u)] = _manifest_beside(u)
    manifests = [m for m in beside.values() if m is not None]
    if labelled and manifests and len(manifests) < len(beside):
        bare = sorted(f or "." for f, m in beside.items() if m is None)
        raise MaelabError(f"the shards of {spec} in {', '.join(bare)} have no {SHARD_MANIFEST} beside them, so the class "
                          f"list their labels count is unknown, while other shards have one: write the images as one "
                          f"set with `maelab shards make`")
    classes = {tuple(m.get("classes", [])) for _, m in manifests}
    if labelled and len(classes) > 1:
        raise MaelabError(f"the shards of {spec} come from shard sets with different classes ("
                          + "; ".join(f"{where}: {', '.join(m.get('classes', [])) or 'none'}" for where, m in manifests)
                          + "): each set's labels count its own class list, so they cannot be mixed; write the "
                          "images as one set with `maelab shards make`")
    counts = []
    for u in urls:
        found = beside[_folder(u)]
        listed = {s["name"]: int(s["count"]) for s in found[1]["shards"]} if found else {}
        count = listed.get(_basename(u))
        counts.append(count if count is not None else count_samples(u))
    made_from = [str(beside[_folder(u)][1].get("source", "")) if beside[_folder(u)] else "" for u in urls]
    return ShardSet(spec, urls, counts, list(manifests[0][1].get("classes", [])) if manifests else [], made_from)


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def _basename(url: str) -> str:
    return re.split(r"[/\s]", url.rstrip(" -").split("?")[0])[-1]


def count_samples(url: str) -> int:
    return sum(1 for _ in read_samples(url))


# --- random access, for the evaluation commands -------------------------------------------------------

def shard_images(spec: str) -> ImageList:
    """The samples of local shards as an :class:`ImageList` of tar member paths
    (:data:`maelab.data.folders.TAR_MEMBER`), so every command that reads images by index (evaluation
    splits, fine-tuning's exact step plan, features) reads shards as it reads a folder: one seek per
    image. The order is the shards' own; the labels are their ``.cls``, the classes the manifest's."""
    shards = open_shards(spec, labelled=True)
    paths, labels, sources = [], [], []
    for url, count, root in zip(shards.urls, shards.counts, shards.made_from or [""] * len(shards.urls)):
        local = url.removeprefix("file://")
        if re.match(r"^[a-z][a-z0-9+.-]*:", local) or not Path(local).is_file():
            raise MaelabError(f"this command reads shards by random access, from local files; {url} is not one "
                              f"(copy the shards to a local or mounted folder, or use an image folder)")
        try:
            with tarfile.open(local, "r:") as tar:
                found: dict[str, dict] = {}
                for m in tar.getmembers():
                    key, ext = wds.tariterators.base_plus_ext(m.name)  # the stream's own key rule
                    if m.isreg() and key is not None:
                        found.setdefault(key, {})[ext.lower()] = m
                if len(found) != count:
                    raise MaelabError(f"cannot read shard {url}: it holds {len(found)} samples, its manifest says "
                                      f"{count} (a truncated or replaced file?)")
                for key, members in found.items():
                    ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if ext is None:
                        raise MaelabError(f"cannot read shard {url}: sample {key} holds no image file "
                                          f"({', '.join(sorted(members))})")
                    m = members[ext]
                    paths.append(member_path(local, m.offset_data, m.size, m.name))
                    cls, src = members.get("cls"), members.get("src.txt")
                    labels.append(int(tar.extractfile(cls).read()) if cls is not None else -1)
                    name = tar.extractfile(src).read().decode(errors="replace").strip() if src is not None else ""
                    sources.append(_source_name(root, name) if name else paths[-1])
        except (OSError, tarfile.TarError, ValueError) as e:
            raise MaelabError(f"cannot read shard {url}: {_reason(e)}") from None
    top = max(labels, default=-1)
    classes = shards.classes or [str(c) for c in range(top + 1)]
    if top >= len(classes):
        raise MaelabError(f"the shards of {spec} hold label {top}, but their {SHARD_MANIFEST} lists "
                          f"{len(classes)} classes: the shards and the manifest do not belong together")
    return ImageList(spec, paths, labels, classes, sources=sources)


def _source_name(root: str, name: str) -> str:
    """A sample's ``src.txt`` (the path inside the folder `maelab shards make` read) as that file's path. A
    relative source (manifests written before it was made absolute) says nothing of where it was relative
    to, so the name inside the source folder is all that is known."""
    return name if not root or not Path(root).is_absolute() or Path(name).is_absolute() else str(Path(root) / name)


def scan_any(data: str) -> ImageList:
    """The images of an image folder or of local shards (:func:`scan_images` / :func:`shard_images`)."""
    return shard_images(data) if is_shard_source(data) else scan_images(data)


def prepare_any(data: str, bad_files: str, limit: int = 0, seed: int = 0) -> ImageList:
    """:func:`maelab.data.folders.prepare_images` of an image folder or of local shards."""
    return prepare_images(data, bad_files, limit, seed, scan=scan_any)


# --- reading -----------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One raw sample of a shard: the image bytes (undecoded), its label and where it came from."""

    url: str
    key: str
    ext: str
    data: bytes
    label: int
    source: str = ""  # the file `maelab shards make` read (its ``src.txt``), "" in shards written without it


# every extension of an image folder (what `maelab shards make` writes), the usual photo formats first: a
# sample with two images (a photo and its mask) is read by its first
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "jfif", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


def read_samples(url: str, expected: int | None = None) -> Iterator[Sample]:
    """The samples of one shard in file order (the webdataset package opens and parses the tar). Any
    error opening or reading it, or fewer / more samples than ``expected``, becomes a
    :class:`MaelabError` naming the shard and the error."""
    n, stream = 0, None
    try:
        stream = wds.gopen(url, "rb")
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for s in wds.tariterators.group_by_keys(files):
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                raise MaelabError(f"cannot read shard {url}: sample {s['__key__']} holds no image file "
                                  f"({', '.join(sorted(s))}); is the shard truncated?")
            n += 1
            yield Sample(url, s["__key__"], ext, s[ext], int(s["cls"]) if "cls" in s else -1,
                         s["src.txt"].decode(errors="replace").strip() if "src.txt" in s else "")
        failed = _command_failed(stream)
        if failed:
            raise MaelabError(f"cannot read shard {url}: {failed}")
    except MaelabError:
        raise
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise MaelabError(f"cannot read shard {url}: {_command_failed(stream) or _reason(e)}") from None
    finally:
        if stream is not None:
            try:
                stream.close()
            except OSError:  # a failed command's status: reported above
                pass
    if expected is not None and n != expected:
        raise MaelabError(f"cannot read shard {url}: it holds {n} samples, its manifest says {expected} "
                          f"(a truncated or replaced file?)")


def _reason(e: BaseException) -> str:
    """What went wrong, without the stream and URL webdataset appends to ``args``."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e.args[0]) if e.args else type(e).__name__


def _command_failed(stream) -> str | None:
    """For a ``pipe:`` or ``https://`` shard (webdataset runs a command, ``curl`` for URLs): the exit status of
    a command that failed, which explains an empty or cut-off stream better than the tar error does."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - still running or gone: fall back to the tar error
        return None
    if status in (0, None):
        return None
    args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
    return f"the command `{args}` exited with status {status}"


def decode_sample(s: Sample):
    return open_rgb(f"{s.url}#{s.key}.{s.ext}", s.data)


STREAM_WORKERS = "stream_workers"


class ShardPlan(StepPlan):
    """Which shards each rank and loader worker reads, and how many steps an epoch has."""

    def __init__(self, shards: ShardSet, batch_size: int, accum_iter: int, world: int, rank: int, seed: int,
                 num_workers: int):
        n = len(shards.urls)
        if world > n:
            raise SameOnEveryRank(f"{world} processes but only {n} shard(s) in {shards.source}: every process reads "
                                  f"whole shards; run at most {n} process(es) or write smaller shards "
                                  f"(maelab shards make --shard-size)")
        self.shards = shards
        self.rank_shards = [list(range(r, n, world)) for r in range(world)]
        per_rank = [sum(shards.counts[i] for i in s) for s in self.rank_shards]
        super().__init__(world * min(per_rank), batch_size, accum_iter, world, rank, seed)
        self.requested_workers = num_workers  # recorded in checkpoints: a resume reads the shards alike
        self.workers = min(num_workers, len(self.rank_shards[rank]))
        self.first = shards.first_index()

    def worker_shards(self, epoch: int, worker: int) -> list[int]:
        mine = self.rank_shards[self.rank]
        perm = torch.randperm(len(mine), generator=make_generator(self.seed, 8, epoch, self.rank)).tolist()
        return [mine[i] for i in perm][worker::max(self.workers, 1)]

    def skipped(self, epoch: int, samples: int) -> list[int]:
        """How many leading chunks (of ``batch_size``) each worker may leave undecoded when the rank's
        first ``samples`` are skipped: the DataLoader takes one chunk from each worker in turn, passing
        over workers that are done."""
        chunks = []
        for w in range(max(self.workers, 1)):
            n = sum(self.shards.counts[i] for i in self.worker_shards(epoch, w))
            chunks.append([self.batch_size] * (n // self.batch_size) + ([n % self.batch_size] if n % self.batch_size else []))
        done, pos = [0] * len(chunks), [0] * len(chunks)
        while samples > 0 and any(pos[w] < len(c) for w, c in enumerate(chunks)):
            for w, c in enumerate(chunks):
                if pos[w] >= len(c):
                    continue
                if samples < c[pos[w]]:
                    return done
                samples -= c[pos[w]]
                done[w] += 1
                pos[w] += 1
        return done


class ShardStream(IterableDataset):
    """This rank's samples of one epoch as chunks ``(count, images, labels, sample indices)`` of up to ``batch_size``,
    per worker: its shards in order, through a seeded shuffle buffer, each sample decoded by
    :func:`maelab.data.folders.open_rgb` and transformed with a generator seeded by (seed, epoch,
    sample index). The first ``skip[worker]`` chunks come back undecoded (``images`` None)."""

    def __init__(self, plan: ShardPlan, transform: Callable, bad_files: str = "error", buffer: int = 1000):
        self.plan, self.transform, self.bad_files, self.buffer = plan, transform, bad_files, buffer
        self.epoch, self.skip = 0, []

    def set_position(self, epoch: int, skip: list[int]) -> None:
        self.epoch, self.skip = epoch, skip

    def samples(self, worker: int) -> Iterator[tuple[int, Sample]]:
        """(sample index in the whole set, sample) of this worker, shuffled through the buffer."""
        plan = self.plan
        g = make_generator(plan.seed, 10, self.epoch, plan.rank, worker)
        held: list[tuple[int, Sample]] = []
        for s in plan.worker_shards(self.epoch, worker):
            for k, sample in enumerate(read_samples(plan.shards.urls[s], plan.shards.counts[s])):
                held.append((plan.first[s] + k, sample))
                if len(held) >= self.buffer:
                    j = int(torch.randint(len(held), (1,), generator=g))
                    held[j], held[-1] = held[-1], held[j]
                    yield held.pop()
        while held:
            j = int(torch.randint(len(held), (1,), generator=g))
            held[j], held[-1] = held[-1], held[j]
            yield held.pop()

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        skip = self.skip[worker] if worker < len(self.skip) else 0
        chunk: list[tuple[int, Sample]] = []
        for item in self.samples(worker):
            chunk.append(item)
            if len(chunk) == self.plan.batch_size:
                yield self._chunk(chunk, skip > 0)
                skip, chunk = skip - 1, []
        if chunk:
            yield self._chunk(chunk, skip > 0)

    def _chunk(self, chunk: list[tuple[int, Sample]], undecoded: bool):
        labels = torch.tensor([s.label for _, s in chunk])
        indices = torch.tensor([i for i, _ in chunk])
        if undecoded:
            return len(chunk), None, labels, indices
        images = [None] * len(chunk)
        for k, (index, sample) in enumerate(chunk):
            try:
                img = decode_sample(sample)
            except MaelabError as e:
                if self.bad_files == "error":
                    raise MaelabError(f"{e} (use --bad-files skip to replace unreadable samples)") from None
                img = self._stand_in(chunk, k, e)
            g = torch.Generator()
            g.manual_seed(mix_seed(self.plan.seed, 2, self.epoch, index))
            images[k] = self.transform(img, g)
        return len(chunk), torch.stack(images), labels, indices

    @staticmethod
    def _stand_in(chunk, k: int, error: MaelabError):
        """``--bad-files skip``: the next readable sample of the chunk takes an unreadable one's place, as
        the next readable image does on the folder path (the step plan stays the same)."""
        warnings.warn(f"replacing unreadable sample: {error}", stacklevel=2)
        for j in range(1, len(chunk)):
            try:
                return decode_sample(chunk[(k + j) % len(chunk)][1])
            except MaelabError:
                continue
        raise MaelabError(f"every sample of a batch is unreadable, e.g. {error}") from None


class ShardFeeder:
    """The :class:`~maelab.data.loader.Feeder` of a shard set: the same micro-batches interface for the
    training loop (``plan``, ``steps_per_epoch``, ``epoch``, ``check_start``, ``close``)."""

    in_memory = False

    def __init__(self, plan: ShardPlan, device: torch.device, transform: Callable, bad_files: str = "error",
                 buffer: int = 1000):
        if buffer < 1:
            raise MaelabError(f"--shuffle-buffer must be at least 1, got {buffer}")
        self.plan, self.device, self.bad_files = plan, device, bad_files
        self.stream = ShardStream(plan, transform, bad_files, buffer)
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=plan.workers,
                                 worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda",
                                 prefetch_factor=2 if plan.workers > 0 else None)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def record(self) -> dict[str, int]:
        """For the checkpoint's meta: the order of a stream's samples depends on the loader worker count."""
        return {STREAM_WORKERS: self.plan.requested_workers}

    def check_start(self, epoch: int, step: int) -> None:
        """Open this rank's first shard and decode its first sample before the run folder is written,
        so an unreadable shard URL fails here, naming the shard."""
        first = self.plan.worker_shards(epoch, 0)[0]
        for sample in read_samples(self.plan.shards.urls[first]):
            if self.bad_files == "error":
                decode_sample(sample)
            return
        raise MaelabError(f"shard {self.plan.shards.urls[first]} holds no samples")

    def close(self) -> None:
        stop_workers(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        plan, bs = self.plan, self.plan.batch_size
        skip = start_step * plan.accum * bs
        self.stream.set_position(epoch, plan.skipped(epoch, skip))
        want = (plan.steps_per_epoch - start_step) * plan.accum
        images, labels, held, made = [], [], 0, 0
        step, micro = start_step, 0
        if want <= 0:
            return
        batches = worker_batches(self.loader)
        try:
            for count, imgs, labs, _ in batches:
                if skip >= count:
                    skip -= count
                    continue
                images.append(imgs[skip:])
                labels.append(labs[skip:])
                held += count - skip
                skip = 0
                while held >= bs:
                    x, y = torch.cat(images), torch.cat(labels)
                    images, labels, held = [x[bs:]], [y[bs:]], held - bs
                    yield Batch(epoch, step, micro, x[:bs].to(self.device, non_blocking=True),
                                y[:bs].to(self.device, non_blocking=True), plan.offset(micro), plan.global_size)
                    made, micro = made + 1, micro + 1
                    if micro == plan.accum:
                        step, micro = step + 1, 0
                    if made == want:
                        return
        finally:
            batches.close()
        raise MaelabError(f"the shards of {plan.shards.source} held fewer samples than their manifest says "
                          f"(epoch {epoch + 1} ended after {made} of {want} batches); rewrite the manifest or shards")


def shard_pictures(shards: ShardSet, k: int, size: tuple[int, int], bad_files: str = "error"):
    """The first ``k`` readable samples of the first shard in the evaluation view, with the names of the
    files they were made from ("shard/key" where the shard does not record it): the fixed images a
    pre-training run draws its reconstructions from."""
    view, images, titles = EvalTransform(size, 1.0), [], []
    for sample in read_samples(shards.urls[0]):
        try:
            images.append(view(decode_sample(sample)))
        except MaelabError as e:
            if bad_files == "error":
                raise
            warnings.warn(f"leaving out unreadable sample: {e}", stacklevel=2)
            continue
        titles.append(sample.source or f"{_basename(sample.url)}/{sample.key}")
        if len(images) == k:
            break
    return torch.stack(images), titles


__all__ = ["SHARD_MANIFEST", "ShardFeeder", "ShardPlan", "ShardSet", "ShardStream", "is_shard_source", "make_shards",
           "open_shards", "read_samples", "shard_pictures"]
