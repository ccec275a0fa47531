"""Semantic-segmentation data: images paired with single-channel label PNGs, and their joint augmentation.

Two folder layouts are read by the same code (found by what is on disk):

* split first (CamVid, SegNet release): ``ROOT/<split>/images/*.jpg`` + ``ROOT/<split>/labels/*.png``;
* kind first (ADE20K): ``ROOT/images/<split>/*.jpg`` + ``ROOT/annotations/<split>/*.png``.

Images and labels are paired by file stem. What a raw label value means is the dataset's
:class:`LabelSpec`: CamVid's 0-10 are classes and 11 is void; ADE20K's 0 is "other" (ignored) and
1-150 become classes 0-149 (mmseg's ``reduce_zero_label``). Every target holds class indices or
:data:`IGNORE`. A label file that is missing, has another size than its image, is not single-channel,
or holds a value outside the class range stops the run with a :class:`MaelabError` naming the file.

Training views (:class:`SegTrainTransform`): random resize (short side ``base_size`` x a ratio in
``ratio_range``), random crop (padding with ignore where the image is smaller), horizontal flip and
photometric distortion (brightness, contrast, saturation, hue), drawn from the per-sample generator so
a resumed run sees the same pixels. Images go through :func:`maelab.data.folders.open_rgb`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from maelab.data.folders import IMAGE_EXTENSIONS, ImageList, image_sizes, open_rgb
from maelab.data.seeding import make_generator
from maelab.data.transforms import normalize
from maelab.errors import MaelabError, SameOnEveryRank

# target value of pixels that count in neither the loss nor the metrics: never a class index, however many
# classes (16-bit labels may hold class 255); cross-entropy's own default
IGNORE = -100
NOT_ALLOWED = -1  # in a label lookup table: a raw value that is neither a class nor ignored

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
                  "pedestrian", "bicyclist")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
LABEL_EXTENSIONS = (".png",)


@dataclass(frozen=True)
class LabelSpec:
    """How raw label values become targets: ``target = raw - offset`` for ``offset <= raw < offset +
    num_classes``; the ``ignore`` values become :data:`IGNORE`; anything else is an error."""

    name: str
    classes: tuple[str, ...]
    offset: int = 0
    ignore: tuple[int, ...] = ()
    splits: tuple[str, str] = ("train", "val")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lookup(self) -> np.ndarray:
        """A table raw value -> target (:data:`NOT_ALLOWED` for other values), for uint8 and wider labels alike."""
        table = np.full(max(256, self.offset + self.num_classes, *(v + 1 for v in self.ignore)), NOT_ALLOWED,
                        np.int64)
        table[self.offset : self.offset + self.num_classes] = np.arange(self.num_classes)
        for v in self.ignore:
            table[v] = IGNORE
        return table

    def describe_values(self) -> str:
        allowed = f"{self.offset}..{self.offset + self.num_classes - 1}"
        return allowed + (f" (classes) and {', '.join(map(str, self.ignore))} (ignored)" if self.ignore else "")


SPECS = {
    "camvid": LabelSpec("camvid", CAMVID_CLASSES, offset=0, ignore=(11,), splits=("train", "val")),
    "ade20k": LabelSpec("ade20k", ADE20K_CLASSES, offset=1, ignore=(0,), splits=("training", "validation")),
}


def label_spec(dataset: str, num_classes: int | None = None, ignore_value: int | None = None) -> LabelSpec:
    """The named spec, or ``custom``: classes ``0..num_classes-1`` and ``ignore_value`` ignored."""
    if dataset in SPECS:
        given = [f"--{flag} {v}" for flag, v in (("num-classes", num_classes), ("ignore-value", ignore_value)) if v is not None]
        if given:  # they were recorded in config.yaml and did nothing: the spec's own classes were trained
            spec = SPECS[dataset]
            raise MaelabError(f"{' '.join(given)}: {dataset}'s classes are fixed ({len(spec.classes)}); those flags "
                              f"describe a --dataset custom")
        return SPECS[dataset]
    if dataset != "custom":
        raise MaelabError(f"--dataset must be one of {', '.join([*SPECS, 'custom'])}, got {dataset!r}")
    if not num_classes or num_classes < 2:
        raise MaelabError("--dataset custom needs --num-classes (at least 2)")
    ignore = () if ignore_value is None else (int(ignore_value),)
    if any(not 0 <= v < 65536 for v in ignore) or (ignore and ignore[0] < num_classes):
        raise MaelabError(f"--ignore-value must be at least --num-classes ({num_classes}) and below 65536, "
                          f"got {ignore_value}")
    return LabelSpec("custom", tuple(f"class {i}" for i in range(num_classes)), 0, ignore)


@dataclass
class SegList:
    """Image paths and their label paths (same order), with the spec that reads the labels."""

    root: str
    images: list[str]
    labels: list[str]
    spec: LabelSpec
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def image_list(self) -> ImageList:
        """The images as an :class:`ImageList` (for the step plan and the feeder)."""
        return ImageList(self.root, list(self.images), [-1] * len(self.images), list(self.spec.classes))

    def subset(self, keep: list[int]) -> "SegList":
        return SegList(self.root, [self.images[i] for i in keep], [self.labels[i] for i in keep], self.spec,
                       [self.sizes[i] for i in keep] if self.sizes else [])


def split_folders(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images folder, labels folder) of ``split`` under ``root``, in either layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SameOnEveryRank(f"segmentation data folder {root} does not exist")
    candidates = [(root / split / "images", root / split / "labels"),
                  (root / split / "images", root / split / "annotations"),
                  (root / "images" / split, root / "annotations" / split),
                  (root / "images" / split, root / "labels" / split)]
    for images, labels in candidates:
        if images.is_dir() and labels.is_dir():
            return images, labels
    for images, labels in candidates:
        if images.is_dir():
            raise MaelabError(f"{images} has no label folder beside it (looked for {labels})")
    raise MaelabError(f"{root} has no split {split!r}: expected {root}/{split}/images + {root}/{split}/labels "
                      f"(CamVid layout) or {root}/images/{split} + {root}/annotations/{split} (ADE20K layout)")


def _files(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """The files of ``folder`` by stem; two of one stem (``a.jpg`` and ``a.png``) are an error, as the
    pairing by stem would keep one of them without a word."""
    found: dict[str, str] = {}
    for n in sorted(os.listdir(folder)):
        if n.lower().endswith(extensions) and not n.startswith("."):
            stem = Path(n).stem
            if stem in found:
                raise MaelabError(f"{folder} holds {Path(found[stem]).name} and {n}: images and labels are paired by "
                                  f"file name without the extension, so keep one of them")
            found[stem] = str(folder / n)
    return found


def scan_segmentation(root: str | Path, split: str, spec: LabelSpec, limit: int = 0, seed: int = 0) -> SegList:
    """The image / label pairs of ``split``: every image needs a label PNG of the same stem and the same
    size (checked from the file headers, no decoding); label files without an image are ignored.
    ``limit``: a fixed seeded subset."""
    image_dir, label_dir = split_folders(root, split)
    images, labels = _files(image_dir, IMAGE_EXTENSIONS), _files(label_dir, LABEL_EXTENSIONS)
    if not images:
        raise MaelabError(f"no images in {image_dir} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    missing = [images[s] for s in images if s not in labels]
    if missing:
        stem = Path(missing[0]).stem
        other = sorted(f.name for f in label_dir.glob(glob.escape(stem) + ".*")) if label_dir.is_dir() else []
        jpeg = any(Path(n).suffix.lower() in (".jpg", ".jpeg") for n in other)
        seen = (f"; {label_dir} holds {', '.join(other[:3])}: labels are read from PNG files only"
                + (", as a JPEG's compression changes the class values along every edge" if jpeg else "")) if other else ""
        raise MaelabError(f"{len(missing)} image(s) in {image_dir} have no label PNG of the same name in {label_dir}, "
                          f"e.g. {missing[0]} (expected {label_dir / (stem + '.png')}){seen}")
    stems = sorted(images)
    if limit < 0:
        raise MaelabError(f"--limit-images must be 0 (all) or positive, got {limit}")
    if 0 < limit < len(stems):
        keep = torch.randperm(len(stems), generator=make_generator(seed, 6))[:limit].sort().values.tolist()
        stems = [stems[i] for i in keep]
    out = SegList(str(root), [images[s] for s in stems], [labels[s] for s in stems], spec)
    img_sizes, lab_sizes = image_sizes(out.images), image_sizes(out.labels)
    for img, lab, a, b in zip(out.images, out.labels, img_sizes, lab_sizes):
        if a is None:
            raise MaelabError(f"cannot read image {img}")
        if b is None:
            raise MaelabError(f"cannot read label file {lab}")
        if a != b:
            raise MaelabError(f"label {lab} is {b[1]}x{b[0]} but its image {img} is {a[1]}x{a[0]} (width x height); "
                              f"labels must have the size of their image")
    out.sizes = list(img_sizes)
    return out


def png_gray_bits(path: str) -> int | None:
    """The bit depth of a grayscale PNG, from its header (IHDR: depth at byte 24, colour type 0 at 25)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    return head[24] if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[25] == 0 else None


def read_label(path: str, spec: LabelSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) int64 targets of a label PNG (class indices or :data:`IGNORE`)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            raw = np.asarray(img)
    except FileNotFoundError:
        raise MaelabError(f"label file {path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MaelabError(f"cannot read label file {path}: {e}") from None
    if mode == "1":  # a 1-bit mask: classes 0 and 1
        raw = raw.astype(np.uint8)
    elif mode == "L" and (bits := png_gray_bits(path)) in (2, 4):  # Pillow scales 2- / 4-bit samples to 8 bits
        raw = raw // (255 // (2**bits - 1))  # (x85, x17): the file holds 0..3 / 0..15
    if raw.ndim != 2 or mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise MaelabError(f"label {path} has mode {mode} ({raw.shape}); labels must be single-channel PNGs of class "
                          f"indices (mode 1, L, P or 16-bit)")
    if size is not None and tuple(raw.shape) != tuple(size):
        raise MaelabError(f"label {path} is {raw.shape[1]}x{raw.shape[0]} but its image is {size[1]}x{size[0]} "
                          f"(width x height)")
    table = spec.lookup()
    raw = raw.astype(np.int64)
    if raw.size and (raw.min() < 0 or raw.max() >= len(table)):
        bad = int(raw.max())
        raise MaelabError(f"label {path} holds value {bad}; {spec.name} labels take {spec.describe_values()}")
    target = table[raw]
    if (target == NOT_ALLOWED).any():
        bad = sorted(set(np.unique(raw[target == NOT_ALLOWED]).tolist()))
        raise MaelabError(f"label {path} holds value(s) {bad[:5]} outside the class range; {spec.name} labels "
                          f"take {spec.describe_values()}")
    return target


def load_pair(items: SegList, index: int) -> tuple[Image.Image, torch.Tensor]:
    """(RGB image, (H, W) long target) of item ``index``."""
    img = open_rgb(items.images[index])
    return img, torch.from_numpy(read_label(items.labels[index], items.spec, (img.height, img.width)))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=g))


@dataclass
class SegAugment:
    """The training augmentation's settings (mmseg's ADE20K pipeline, scaled by ``base_size``)."""

    crop: tuple[int, int]
    base_size: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    photometric: bool = True


class SegTrainTransform:
    """(PIL image, target) -> (normalised (3, h, w) tensor, (h, w) long target) at the crop size."""

    def __init__(self, aug: SegAugment):
        self.aug = aug

    def __call__(self, img: Image.Image, target: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.aug
        x = TF.pil_to_tensor(img)  # uint8 (3, H, W)
        h, w = x.shape[-2:]
        scale = a.base_size * _uniform(g, *a.ratio_range) / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = TF.resize(x, [nh, nw], TF.InterpolationMode.BILINEAR, antialias=True)
        y = TF.resize(target[None], [nh, nw], TF.InterpolationMode.NEAREST_EXACT)[0]
        ch, cw = a.crop
        top = int(torch.randint(0, max(nh - ch, 0) + 1, (1,), generator=g))
        left = int(torch.randint(0, max(nw - cw, 0) + 1, (1,), generator=g))
        x, y = x[:, top : top + ch, left : left + cw], y[top : top + ch, left : left + cw]
        flip = bool(torch.rand(1, generator=g) < 0.5)
        if a.hflip and flip:
            x, y = x.flip(-1), y.flip(-1)
        if a.photometric:
            x = photometric(x, g)
        x = normalize(TF.to_dtype(x, torch.float32, scale=True)[None])[0]
        ph, pw = ch - x.shape[1], cw - x.shape[2]
        if ph or pw:  # smaller than the crop: pad (zeros after normalisation = mean colour; ignore in the target)
            x = F.pad(x, (0, pw, 0, ph))
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        return x, y


def photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 image, each step with probability 1/2: brightness
    (+-32 levels), contrast (0.5-1.5), saturation (0.5-1.5), hue (+-18 degrees)."""
    draws = torch.rand(8, generator=g).tolist()
    if draws[0] < 0.5:
        delta = (draws[1] * 2 - 1) * 32
        x = (x.float() + delta).clamp(0, 255).to(torch.uint8)
    if draws[2] < 0.5:
        x = TF.adjust_contrast(x, 0.5 + draws[3])
    if draws[4] < 0.5:
        x = TF.adjust_saturation(x, 0.5 + draws[5])
    if draws[6] < 0.5:
        x = TF.adjust_hue(x, (draws[7] * 2 - 1) * 0.05)
    return x


class SegTrainDataset(Dataset):
    """Training pairs for the :class:`~maelab.data.loader.Feeder`: item ``(index, seed)`` ->
    (image, target), augmented with a generator seeded by the sampler (so resume is exact)."""

    def __init__(self, items: SegList, transform: SegTrainTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key
        img, target = load_pair(self.items, index)
        g = torch.Generator()
        g.manual_seed(seed)
        return self.transform(img, target, g)


MAX_ASPECT = 4  # the long side at most this many base sizes: mmseg's keep-ratio resize to (2048, 512)


def eval_image(img: Image.Image, base_size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """An evaluation view: (1, 3, h, w) normalised, the short side resized to ``base_size`` (None: as
    it is) with the long side at most ``MAX_ASPECT`` times that, and the original (H, W) the prediction is
    compared at. Without the cap a 1 x 500 strip became 32 x 16 000 pixels: minutes of windows."""
    x = TF.pil_to_tensor(img)
    h, w = x.shape[-2:]
    s = min(base_size / min(h, w), MAX_ASPECT * base_size / max(h, w)) if base_size else 1.0
    if s != 1.0:
        x = TF.resize(x, [max(1, round(h * s)), max(1, round(w * s))], TF.InterpolationMode.BILINEAR, antialias=True)
    return normalize(TF.to_dtype(x, torch.float32, scale=True)[None]), (int(h), int(w))
