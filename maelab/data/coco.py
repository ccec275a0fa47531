"""COCO-format instance annotations (boxes, polygon and RLE masks) for detection.

:func:`load_coco` reads an annotation file and checks it up front, so a broken file fails before a
run folder is written, naming what is wrong: a missing file, no categories, an annotation whose
category or image id is not declared, a box that is not four finite numbers, an image file that is
not there. Category ids (any integers, COCO's have gaps) map to contiguous labels ``1..K`` in sorted
id order (0 is torchvision's background) and back (:meth:`CocoData.cat_id`).

Documented behaviour (no error):

* boxes reaching outside the image are clipped to it; a box with no area left inside is dropped;
* crowd annotations (``iscrowd: 1``) are never training targets (COCOeval still uses them to ignore
  detections on crowds);
* an annotation without a segmentation gets its box as a rectangular mask;
* images without (usable) annotations are kept for evaluation (detections on them are false
  positives) and, for training, skipped by default as detectron2 / ViTDet do
  (``empty="keep"`` trains on them as negatives).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maelab.choices import EMPTY_POLICIES
from maelab.data.folders import image_sizes, open_rgb, unreadable
from maelab.errors import MaelabError, SameOnEveryRank


@dataclass
class CocoImage:
    id: int
    path: str
    width: int
    height: int
    anns: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CocoData:
    """The images of one annotation file with their annotations, and the category mapping."""

    ann_file: str
    images: list[CocoImage]
    cat_ids: list[int]  # sorted; label i + 1 is cat_ids[i]
    names: list[str]
    dataset: dict[str, Any]  # the JSON as read: COCOeval's ground truth

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Foreground classes (torchvision's ``num_classes`` is this + 1, the background)."""
        return len(self.cat_ids)

    def label(self, cat_id: int) -> int:
        return self.cat_ids.index(cat_id) + 1

    def cat_id(self, label: int) -> int:
        return self.cat_ids[int(label) - 1]

    def subset(self, keep: list[int]) -> "CocoData":
        return CocoData(self.ann_file, [self.images[i] for i in keep], self.cat_ids, self.names, self.dataset)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise MaelabError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaelabError(f"cannot read {what} {path}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise MaelabError(f"{what} {path} is not a COCO annotation file (a JSON object with images, annotations, "
                          f"categories)")
    return data


def _box_ok(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box) and box[2] >= 0 and box[3] >= 0)


def load_coco(ann_file: str | os.PathLike, images_dir: str | os.PathLike, categories: list[dict] | None = None,
              check_files: bool = True) -> CocoData:
    """Read and check a COCO instances file; image ``file_name``s are relative to ``images_dir``.

    ``categories``: those of the training file, for a validation file (which must declare the same
    ids, so labels mean the same classes)."""
    path = Path(ann_file).expanduser()
    data = _read_json(path, "annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise MaelabError(f"annotation file {path} has no {key!r} list: is it a COCO instances file?")
    cats = data["categories"]
    if not cats:
        raise MaelabError(f"annotation file {path} declares no categories: a detector needs at least one class")
    try:
        cat_names = {int(c["id"]): str(c["name"]) for c in cats}
    except (KeyError, TypeError, ValueError):
        raise MaelabError(f"annotation file {path}: every category needs an integer id and a name") from None
    if len(cat_names) != len(cats):
        raise MaelabError(f"annotation file {path} declares a category id twice")
    if categories is not None and {int(c["id"]) for c in categories} != set(cat_names):
        raise MaelabError(f"annotation file {path} declares other category ids than the training file; both "
                          f"splits must share one category list")
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise MaelabError(f"image folder {root} does not exist" if not root.exists() else
                          f"image path {root} is not a folder")
    images: dict[int, CocoImage] = {}
    for img in data["images"]:
        try:
            entry = CocoImage(int(img["id"]), str(root / img["file_name"]), int(img["width"]), int(img["height"]))
        except (KeyError, TypeError, ValueError):
            raise MaelabError(f"annotation file {path}: every image needs id, file_name, width and height; "
                              f"got {str(img)[:120]}") from None
        if entry.id in images:
            raise MaelabError(f"annotation file {path}: image id {entry.id} appears twice")
        images[entry.id] = entry
    if not images:
        raise MaelabError(f"annotation file {path} lists no images")
    annotations = []  # as read here: ids and crowd flags written as strings ("7", "0") become numbers
    for ann in data["annotations"]:
        where = f"annotation file {path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r}"
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            crowd = int(ann.get("iscrowd") or 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MaelabError(f"{where} needs an image_id and a category_id (and an iscrowd of 0 or 1, if any)") from None
        ann = {**ann, "image_id": image_id, "category_id": cat, "iscrowd": crowd}
        annotations.append(ann)
        if cat not in cat_names:
            raise MaelabError(f"{where} has category_id {cat}, which is not among the declared categories "
                              f"({len(cat_names)} ids, e.g. {sorted(cat_names)[:5]})")
        if image_id not in images:
            raise MaelabError(f"{where} refers to image_id {image_id}, which the file does not list")
        if not _box_ok(ann.get("bbox")):
            raise MaelabError(f"{where} has bbox {ann.get('bbox')!r}; COCO boxes are [x, y, width, height] with "
                              f"finite numbers and width, height >= 0")
        images[image_id].anns.append(ann)
    if check_files:
        missing = [im.path for im in images.values() if not os.path.isfile(im.path)]
        if missing:
            raise MaelabError(f"{len(missing)} of the {len(images)} images listed in {path} are missing from "
                              f"{root}, e.g. {missing[0]}")
        check_sizes(list(images.values()), path)
    cat_ids = sorted(cat_names)
    data = {**data, "annotations": annotations, "images": [{**im, "id": int(im["id"])} for im in data["images"]],
            "categories": [{**c, "id": int(c["id"])} for c in cats]}
    return CocoData(str(path), sorted(images.values(), key=lambda im: im.id), cat_ids,
                    [cat_names[c] for c in cat_ids], data)


def check_sizes(images: list[CocoImage], ann_file: Path) -> None:
    """Every image's size, from its header (no decoding, EXIF orientation applied), against the annotation
    file's: masks are decoded at the file's size, and a box outside a wrongly declared size would be
    dropped without a word. Unreadable headers are named too, before any training."""
    sizes = image_sizes([im.path for im in images])
    bad = [im for im, hw in zip(images, sizes) if hw is None]
    if bad:
        raise MaelabError(f"{len(bad)} of the {len(images)} images listed in {ann_file} cannot be read, e.g. "
                          + (unreadable([bad[0].path]) or [bad[0].path])[0])
    wrong = [(im, hw) for im, hw in zip(images, sizes) if hw != (im.height, im.width)]
    if wrong:
        im, (h, w) = wrong[0]
        raise MaelabError(f"{len(wrong)} of the {len(images)} images listed in {ann_file} have another size than the "
                          f"file says, e.g. {im.path} is {w}x{h} but the file says {im.width}x{im.height}: the boxes "
                          f"and masks would not line up")


def usable_segmentation(seg: Any) -> list | dict | None:
    """The part of a COCO segmentation a mask comes from: an RLE, or the polygons of at least 3 points;
    None when there is none (the box is the mask then, in training and in scoring alike)."""
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return seg
    polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6] if isinstance(seg, list) else []
    return polygons or None


def box_inside(bbox: Any, height: int, width: int) -> tuple[float, float, float, float] | None:
    """A COCO box ``[x, y, w, h]`` clipped to its image as ``(x1, y1, x2, y2)``, or None when no area of it
    is inside: what training takes from it."""
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, width), min(y + bh, height)
    return (x1, y1, x2, y2) if x2 - x1 > 0 and y2 - y1 > 0 else None


def decode_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray | None:
    """(height, width) uint8 mask of a COCO segmentation (polygons, RLE with string or list counts), or
    None when there is none."""
    seg = usable_segmentation(seg)
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif seg is not None:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise MaelabError(f"{where}: its RLE mask is {seg['size'][1]}x{seg['size'][0]} but the image is "
                              f"{width}x{height}")
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
    else:
        return None
    return np.ascontiguousarray(mask_utils.decode(rle))


def instance_targets(image: CocoImage, data: CocoData) -> dict[str, torch.Tensor]:
    """Training targets of one image at its own size: ``boxes`` (N, 4) xyxy clipped to the image,
    ``labels`` (N,) contiguous labels, ``masks`` (N, H, W) uint8; crowds and boxes with no area inside
    the image are left out."""
    h, w = image.height, image.width
    boxes, cats, masks = [], [], []
    for ann in image.anns:
        if ann.get("iscrowd", 0):
            continue
        box = box_inside(ann["bbox"], h, w)
        if box is None:
            continue
        x1, y1, x2, y2 = box
        where = f"{data.ann_file}: annotation {ann.get('id', '?')} of image {image.id}"
        m = decode_mask(ann.get("segmentation"), h, w, where)
        if m is None:
            m = np.zeros((h, w), np.uint8)
            m[int(y1):math.ceil(y2), int(x1):math.ceil(x2)] = 1
        boxes.append([x1, y1, x2, y2])
        cats.append(data.label(int(ann["category_id"])))
        masks.append(m)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(cats, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


BEYOND_PX = 1.0  # a box past its image by less (float rounding) still matches its clipped self at IoU > 0.9


def boxes_beyond(data: CocoData) -> tuple[int, int]:
    """(boxes that reach more than :data:`BEYOND_PX` past their image, boxes with no area inside it) among
    the non-crowd annotations: training clips the first and leaves out the second, while COCO scoring
    takes the file as written."""
    clipped = dropped = 0
    for image in data.images:
        for ann in image.anns:
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if box_inside(ann["bbox"], image.height, image.width) is None:
                dropped += 1
            elif min(x, y) < -BEYOND_PX or x + bw > image.width + BEYOND_PX or y + bh > image.height + BEYOND_PX:
                clipped += 1
    return clipped, dropped


def has_targets(image: CocoImage) -> bool:
    """Whether an image has an annotation a training target comes from (not a crowd, a box with area)."""
    return any(not a.get("iscrowd", 0) and box_inside(a["bbox"], image.height, image.width) is not None
               for a in image.anns)


def training_images(data: CocoData, empty: str) -> tuple[CocoData, int]:
    """(the images training reads, how many were skipped): ``empty="skip"`` leaves out images without a
    usable annotation, ``"keep"`` trains on them as negatives."""
    if empty not in EMPTY_POLICIES:
        raise MaelabError(f"--empty-images must be one of {', '.join(EMPTY_POLICIES)}, got {empty!r}")
    if empty == "keep":
        return data, 0
    keep = [i for i, im in enumerate(data.images) if has_targets(im)]
    if not keep:
        raise MaelabError(f"no image in {data.ann_file} has a usable annotation (a non-crowd box with area inside "
                          f"the image): nothing to train on")
    return data.subset(keep), len(data) - len(keep)


def pixels_of(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB image."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image(image: CocoImage) -> torch.Tensor:
    """(3, H, W) uint8 pixels through maelab's one decoder, checked against the size the annotation file
    records (masks are decoded at that size)."""
    img = open_rgb(image.path)
    if img.size != (image.width, image.height):
        raise MaelabError(f"image {image.path} is {img.size[0]}x{img.size[1]} but its annotation file says "
                          f"{image.width}x{image.height}: the masks would not line up")
    return pixels_of(img)


def find_split(folder: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a coco128-style folder: ``instances_<split>.json`` (or
    ``annotations/instances_<split>*.json``) and ``images/`` (or ``<split>*/`` beside it)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SameOnEveryRank(f"--data {root} is not a folder (expected instances_train.json, instances_val.json, "
                          f"images/)")
    candidates = [root / f"instances_{split}.json", *sorted((root / "annotations").glob(f"instances_{split}*.json"))]
    ann = next((c for c in candidates if c.is_file()), None)
    if ann is None:
        raise MaelabError(f"--data {root} has no instances_{split}.json (or annotations/instances_{split}*.json); "
                          f"give the annotation file with --{'val-' if split == 'val' else ''}ann")
    dirs = [root / "images", *sorted(p for p in root.glob(f"{split}*") if p.is_dir())]
    images = next((d for d in dirs if d.is_dir()), root / "images")
    return ann, images
