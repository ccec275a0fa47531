"""Labelled splits for classification (fine-tuning, linear probing, kNN): ImageFolder trees whose
first-level folders are the classes. The training and validation splits must have the same classes."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from maelab.data.folders import ImageList, subsample
from maelab.data.shards import is_shard_source, prepare_any
from maelab.errors import SameOnEveryRank, warn_for_job  # the splits are the same on every process: said once

VAL_NAMES = ("val", "validation", "valid", "test")  # in this order: a test folder is the last resort
LEGACY_VAL_NAMES = ("val", "validation", "test")
TRAIN_NAMES = ("train", "training")  # before `valid` (runs that did not record the folder)


def default_val_dir(train: str | Path, names: tuple[str, ...] = VAL_NAMES) -> Path | None:
    """A sibling ``val`` / ``validation`` / ``valid`` / ``test`` folder when the training folder is called
    ``train`` (``valid``: the train / valid / test layout of Roboflow and Kaggle exports)."""
    p = Path(train).expanduser()
    if p.name.lower() not in TRAIN_NAMES:
        return None
    for name in names:
        if (p.parent / name).is_dir():
            return p.parent / name
    return None


def split_folders(images: ImageList) -> list[str]:
    """The first-level folders of ``images`` that are named like a dataset's splits (``train`` beside
    ``val`` / ``validation`` / ``valid`` / ``test``): ``--data`` names the dataset's root, not its training split."""
    names = {c.lower(): c for c in images.classes}
    train = [names[t] for t in TRAIN_NAMES if t in names]
    held_out = [names[n] for n in VAL_NAMES if n in names]
    return train + held_out if train and held_out else []


def warn_if_split_root(images: ImageList, flag: str = "--data") -> None:
    """Pre-training reads every image under ``--data``: a dataset root would train on its held-out split."""
    found = split_folders(images)
    if found:
        warn_for_job(f"{flag} {images.root} holds the split folders {', '.join(found)}: pre-training reads all of "
                     f"them, the held-out images included; pass {flag} {Path(images.root) / found[0]} to train on the "
                     f"training split alone")


def labelled_split(root: str | Path, bad_files: str = "error", what: str = "training split",
                   min_classes: int = 2) -> ImageList:
    """The images of an ImageFolder tree (or of local tar shards); every image must sit inside a class folder.
    A split checked against another (validation) takes ``min_classes=1``: the class check then names the
    classes it lacks."""
    if not str(root):
        raise SameOnEveryRank(f"no {what} given")
    images = prepare_any(str(root), bad_files)
    outside = [p for p, y in zip(images.paths, images.labels) if y < 0]
    if outside and is_shard_source(str(root)):
        raise SameOnEveryRank(f"the {what} {root} needs a class label for every sample, but {len(outside)} sample(s) "
                              f"of its shards have no .cls, e.g. {outside[0]}")
    if outside:
        raise SameOnEveryRank(f"the {what} {root} must be an ImageFolder tree (<class>/<image>), but "
                              f"{len(outside)} image(s) are outside a class folder, e.g. {outside[0]}")
    if len(images.classes) < min_classes:
        raise SameOnEveryRank(f"the {what} {root} has {len(images.classes)} class folder(s); classification needs "
                              f"at least {min_classes}")
    return images


def nfc(name: str) -> str:
    """A class name with composed accents: macOS writes names decomposed, Linux usually composed."""
    return unicodedata.normalize("NFC", str(name))


def check_same_classes(train: ImageList, val: ImageList, train_name: str = "training split",
                       val_name: str = "validation split") -> None:
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))

    def named(names: list[str], other: ImageList, other_name: str, other_only: list[str]) -> str:
        """A class folder that the other split has, but without images, or that it spells with other Unicode
        characters (the two print alike), is named as such."""
        def why(n: str) -> str:
            if nfc(n) in {nfc(o) for o in other_only}:
                return f" (the {other_name} writes it with other Unicode characters)"
            if nfc(n).casefold() in {nfc(o).casefold() for o in other_only}:  # class names are case-sensitive
                return f" (the {other_name} writes it in other letter case)"
            empty = (Path(other.root).expanduser() / n).is_dir()
            return f" (its folder in the {other_name} holds no images)" if empty else ""
        return ", ".join(n + why(n) for n in names[:5])

    if {nfc(c) for c in only_train} == {nfc(c) for c in only_val}:
        raise SameOnEveryRank(  # the names look identical in any message: say how they differ
            f"the class folders of the {train_name} and the {val_name} have the same names written with different "
            f"Unicode characters (composed and decomposed accents, as Linux and macOS write them: "
            f"{', '.join(only_train[:5])}); rename the folders of one split, e.g. with `convmv -r -f utf8 -t utf8 "
            f"--nfc --notest <folder>`")
    detail = []
    if only_train:
        detail.append(f"only in the {train_name}: {named(only_train, val, val_name, only_val)}")
    if only_val:
        detail.append(f"only in the {val_name}: {named(only_val, train, train_name, only_train)}")
    def count(n: int) -> str:
        return f"{n} class{'es' if n != 1 else ''}"

    raise SameOnEveryRank(f"the {train_name} ({count(len(train.classes))}) and the {val_name} "
                          f"({count(len(val.classes))}) must have the same class folders ({'; '.join(detail)})")


def check_num_classes(expected: int | None, images: ImageList, where: str) -> int:
    found = len(images.classes)
    if expected is not None and expected != found:
        raise SameOnEveryRank(f"--num-classes {expected} does not match the {found} class folders of {where}")
    return found


def classification_splits(data: str, val_data: str, bad_files: str = "error",
                          num_classes: int | None = None) -> tuple[ImageList, ImageList]:
    """(training split, validation split), checked: labelled, same classes, expected class count."""
    if not data:
        raise SameOnEveryRank("--data is required: the training split, an ImageFolder tree (<class>/<image>)")
    val = val_data or default_val_dir(data)
    if not val and not is_shard_source(str(data)) and not Path(data).expanduser().exists():
        raise SameOnEveryRank(f"data folder {data} does not exist")  # a mistyped --data, not a missing split
    if not val:
        root = Path(data).expanduser()
        inside = [n for n in TRAIN_NAMES if (root / n).is_dir()]
        hint = f"; {data} looks like the dataset's root: --data {root / inside[0]}" if inside else ""
        raise SameOnEveryRank(f"no validation split: pass --val-data (no sibling {'/'.join(VAL_NAMES)} folder "
                              f"next to {data}){hint}")
    train_images = labelled_split(data, bad_files, "training split")
    val_images = labelled_split(val, bad_files, "validation split", min_classes=1)
    warn_if_training_split(data, val, "accuracy", "classified (kNN: each image finds itself)")
    check_same_classes(train_images, val_images)
    check_num_classes(num_classes, train_images, str(data))
    return train_images, val_images


def warn_if_training_split(train: str | Path, val: str | Path, score: str, unseen: str) -> None:
    """Warn when the split that scores a run is the one it trains on (by any path to it): a perfect score
    that says nothing about unseen images, given without a word before. Shards too: the same manifest,
    tar or URL."""
    if str(train) == str(val) or Path(train).expanduser().resolve() == Path(val).expanduser().resolve():
        warn_for_job(f"the validation split {val} is the training split: its {score} says how well the training "
                     f"images are remembered, not how well unseen ones are {unseen}", stacklevel=3)


def subset_seed(data, seed: int) -> int:
    """The seed that draws a data section's ``--limit-images`` subsets: its ``subset_seed`` when set, else
    the run's ``seed``. Fixing it lets runs with different seeds be scored on the same images, so their
    spread is the training's alone."""
    fixed = getattr(data, "subset_seed", None)
    return seed if fixed is None else fixed


def load_splits(data, seed: int, say: bool = False) -> tuple[ImageList, ImageList]:
    """Checked training / validation splits of a class-data config section (``data``, ``val_data``,
    ``bad_files``, ``num_classes``, ``limit_images``, ``subset_seed``), each subsampled to
    ``limit_images`` (drawn with :func:`subset_seed`). A validation folder found beside ``data`` is
    written into ``data.val_data`` (and said when ``say``): the run's config records the folder it scored
    on, and a resume that would find another one is refused as a changed setting."""
    if not data.val_data and data.data and (found := default_val_dir(data.data)) is not None:
        data.val_data = str(found)
        if say:
            print(f"maelab: validation split {found} (the folder beside --data; --val-data chooses another)",
                  flush=True)
    train, val = classification_splits(data.data, data.val_data, data.bad_files, data.num_classes)
    seed = subset_seed(data, seed)
    return subsample(train, data.limit_images, seed), subsample(val, data.limit_images, seed + 1)
