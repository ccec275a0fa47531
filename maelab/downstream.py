"""Wiring shared by the downstream commands (`finetune`, `linprobe`, `knn`, `features`): checks of the
numbers a user typed, labelled splits, the encoder to start from, and the results file.

The headline of a training run is the **final-epoch** validation accuracy. The best epoch is also
reported, labelled as selected on the validation split: picking the maximum over epochs on the split
you report overstates the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from maelab.data.folders import ImageList
from maelab.errors import MaelabError

BEST_NOTE = "best epoch selected on the validation split itself (optimistic); the headline is the final epoch"


def img_size_arg(img_size: list[int] | None) -> tuple[int, int] | None:
    if not img_size:
        return None
    if len(img_size) not in (1, 2) or min(img_size) < 1:
        raise MaelabError(f"--img-size takes one or two positive numbers, got {img_size}")
    return (img_size[0], img_size[0]) if len(img_size) == 1 else (img_size[0], img_size[1])


def resolve_encoder(model_cfg):
    """(encoder weights or None, architecture, input size) for an ``EncoderConfig``: what every
    downstream command starts from."""
    from maelab.models.vit import arch_for, encoder_for

    enc = encoder_for(model_cfg.init, model_cfg.model, model_cfg.num_heads)
    arch = arch_for(enc, model_cfg.model, model_cfg.num_heads)
    return enc, arch, img_size_arg(model_cfg.img_size) or tuple(arch["img_size"])


def at_least(**values: Any) -> None:
    """``name=(value, minimum)`` pairs: each value must be >= its minimum."""
    for name, (value, low) in values.items():
        if value is not None and value < low:
            raise MaelabError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def check_data_numbers(data) -> None:
    at_least(batch_size=(data.batch_size, 1))
    if not 0 < data.crop_pct <= 1:
        raise MaelabError(f"--crop-pct must be in (0, 1], got {data.crop_pct}")
    if getattr(data, "limit_images", 0) < 0:
        raise MaelabError(f"--limit-images must be 0 (all) or positive, got {data.limit_images}")
    if getattr(data, "num_classes", None) is not None:
        at_least(num_classes=(data.num_classes, 2))


def load_splits(data, seed: int) -> tuple[ImageList, ImageList]:
    """Checked training / validation splits of a ``ClassDataConfig``, subsampled by ``limit_images``."""
    from maelab.data.splits import classification_splits
    from maelab.evaluate.knn import subsample

    train, val = classification_splits(data.data, data.val_data, data.bad_files, data.num_classes)
    return subsample(train, data.limit_images, seed), subsample(val, data.limit_images, seed + 1)


def epoch_results(run_dir: Path, history: list[dict] | None = None, key: str = "val_top1") -> list[dict]:
    """Per-epoch summaries holding ``key``, from the run's metrics.jsonl (all epochs, also those of an
    earlier, resumed process) or from ``history``."""
    rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    source = history or []
    if path.is_file():
        source = []
        for line in path.read_text().splitlines():
            try:
                source.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    for row in source:
        if key in row and "epoch" in row:
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]


def summarize(run_dir: Path, command: str, history: list[dict] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Final-epoch accuracy (the headline) and the best epoch (labelled as selected on the split)."""
    epochs = epoch_results(run_dir, history)
    if not epochs:
        return {"command": command, **extra}
    final, best = epochs[-1], max(epochs, key=lambda r: r["val_top1"])
    return {
        "command": command,
        "final_epoch": int(final["epoch"]),
        "val_top1": final["val_top1"],
        "val_top5": final.get("val_top5"),
        "val_loss": final.get("val_loss"),
        "best_epoch": int(best["epoch"]),
        "best_epoch_val_top1": best["val_top1"],
        "best_epoch_note": BEST_NOTE,
        "per_epoch_val_top1": [r["val_top1"] for r in epochs],
        **extra,
    }


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output file path that cannot be written *before* the work that fills it."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MaelabError(f"{flag} {p} is a folder; give a file name")
    from maelab.train.checkpoint import check_writable_folder

    check_writable_folder(p.parent, flag, p)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from maelab.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(data, indent=1) + "\n").encode())


def report(results: dict[str, Any]) -> None:
    """One line on stdout with the headline numbers."""
    if "val_top1" not in results:
        return
    print(f"{results['command']}: final epoch {results['final_epoch']}: val top-1 {results['val_top1']:.2f}  "
          + (f"top-5 {results['val_top5']:.2f}  " if results.get("val_top5") is not None else "")
          + f"(best epoch {results['best_epoch']}: top-1 "
          f"{results['best_epoch_val_top1']:.2f}, selected on the validation split)", file=sys.stdout, flush=True)


def run_header(cfg_init: str, enc, arch: dict[str, Any], size: tuple[int, int]) -> str:
    from maelab.models.vit import describe

    src = "random init (--init none)" if enc is None else f"{enc.source} weights {enc.path}"
    return f"{describe(dict(arch, img_size=size))} from {src}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
