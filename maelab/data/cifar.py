"""Fetch CIFAR-10 with torchvision and write it as an ImageFolder (``<dest>/{train,test}/<class>/``),
the same layout as a user's own data, for machines without a local copy.

    python -m maelab.data.cifar data/cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchvision.datasets import CIFAR10

from maelab.errors import MaelabError


def export_cifar10(dest: str | Path) -> Path:
    dest = Path(dest)
    for split, train in (("train", True), ("test", False)):
        done = dest / split / ".complete"
        if done.is_file():
            continue
        try:
            ds = CIFAR10(root=str(dest / "_download"), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - network or archive problems: one clear line
            raise MaelabError(f"could not download CIFAR-10 with torchvision: {e}".splitlines()[0]) from None
        counts: dict[int, int] = {}
        for img, label in ds:
            cls = ds.classes[label]
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            i = counts.get(label, 0)
            img.save(dest / split / cls / f"{i:04d}.png")
            counts[label] = i + 1
        done.write_text("ok\n")
    return dest


if __name__ == "__main__":
    try:
        print(export_cifar10(sys.argv[1] if len(sys.argv) > 1 else "data/cifar10"))
    except MaelabError as e:
        print(f"maelab: error: {e}", file=sys.stderr)
        sys.exit(2)
