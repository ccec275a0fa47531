"""Training curves from a JSONL metrics log.

Each line of the log is one JSON object. Training lines carry a numeric ``"loss"`` (and usually
``"step"``, ``"epoch"``, ``"lr"``); evaluation lines carry other numbers such as ``"knn_top1"`` or
``"val_top1"`` together with ``"epoch"``. Lines that do not parse (a run killed mid-write leaves a
truncated last line) are skipped.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas), never through pyplot, so
no display is needed and the global backend is left alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from maelab.errors import MaelabError
from maelab.io import atomic_path

# Keys that are bookkeeping, not metrics, on evaluation lines.
_NOT_METRICS = {"step", "epoch", "loss", "lr", "time", "timestamp", "wall_time", "elapsed", "iter"}


def png_out(out: str | os.PathLike, what: str, alternative: str = "") -> Path:
    """``--out`` of a command that draws (``what``): a ``.png`` name, as the picture is always a PNG (a
    ``.jpg`` name held PNG bytes that viewers and tools picking a reader by the suffix failed on)."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise MaelabError(f"--out {out}: {what} writes a PNG; name the file {path.stem}.png{alternative}")
    return path


def save_figure_atomic(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (readers never see a half-written file)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    except OSError as e:
        raise MaelabError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _number(v) -> float | None:
    """A JSON value as a float, or None for anything that is not a real number (bools excluded)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file, skipping blank, malformed and non-object lines."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MaelabError(f"metrics file not found: {path}") from None
    except OSError as e:
        raise MaelabError(f"cannot read metrics file {path}: {e.strerror or e}") from None
    records = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # truncated / corrupt line
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _train_series(records: list[dict]):
    """(x, loss, lr_x, lr, xlabel) from the lines with a numeric loss. When every such line has a
    step, x is the step and a repeated step (a resumed run) keeps its last value; otherwise x is the
    line's position among training lines."""
    train = [r for r in records if _number(r.get("loss")) is not None]
    if all(_number(r.get("step")) is not None for r in train):
        by_step: dict[float, dict] = {}
        for r in train:
            by_step[_number(r["step"])] = r  # last write wins after a resume
        steps = sorted(by_step)
        rows = [(s, by_step[s]) for s in steps]
        xlabel = "step"
    else:
        rows = [(float(i), r) for i, r in enumerate(train)]
        xlabel = "training log line"
    x = [s for s, _ in rows]
    loss = [_number(r["loss"]) for _, r in rows]
    lr_pts = [(s, _number(r.get("lr"))) for s, r in rows if _number(r.get("lr")) is not None]
    return x, loss, [s for s, _ in lr_pts], [v for _, v in lr_pts], xlabel


def _epoch_metrics(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per metric key, (epochs, values) from non-training lines that carry an epoch."""
    series: dict[str, dict[float, float]] = {}
    for r in records:
        if _number(r.get("loss")) is not None:
            continue
        epoch = _number(r.get("epoch"))
        if epoch is None:
            continue
        for k, v in r.items():
            val = _number(v)
            if k in _NOT_METRICS or val is None or not math.isfinite(val):
                continue
            series.setdefault(k, {})[epoch] = val  # last write wins
    return {k: (sorted(d), [d[e] for e in sorted(d)]) for k, d in sorted(series.items())}


def plot_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Plot training loss (and learning rate on a twin axis) against step, plus any evaluation
    metrics against epoch in a second panel, and write the PNG atomically. Returns the PNG path.

    Raises :class:`MaelabError` if the file is missing or holds no line with a numeric ``"loss"``.
    """
    path = Path(metrics_jsonl_path)
    records = read_metrics(path)
    x, loss, lr_x, lr, xlabel = _train_series(records)
    if not x:
        raise MaelabError(f"{path}: no training lines (JSON objects with a numeric \"loss\") to plot")
    metrics = _epoch_metrics(records)

    panels = 2 if metrics else 1
    fig = Figure(figsize=(7.5, 3.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]

    ax = axes[0]
    (h_loss,) = ax.plot(x, loss, color="tab:blue", linewidth=1.2, label="loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    ax.grid(True, alpha=0.3)
    handles = [h_loss]
    if lr:
        ax2 = ax.twinx()
        (h_lr,) = ax2.plot(lr_x, lr, color="tab:orange", linewidth=1.0, alpha=0.8, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", labelcolor="tab:orange")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(h_lr)
    finite = [v for v in loss if math.isfinite(v)]
    title = f"training loss ({len(x)} points"
    if finite:
        title += f", last {loss[-1]:.4g}, min {min(finite):.4g}"
    ax.set_title(title + ")")
    ax.legend(handles=handles, loc="upper right")

    if metrics:
        mx = axes[1]
        for k, (epochs, values) in metrics.items():
            mx.plot(epochs, values, marker="o", markersize=3, linewidth=1.2, label=f"{k} (last {values[-1]:.4g})")
        mx.set_xlabel("epoch")
        mx.set_ylabel("metric")
        mx.set_title("evaluation metrics")
        mx.grid(True, alpha=0.3)
        mx.legend(loc="best", fontsize="small")

    fig.suptitle(path.name)
    return save_figure_atomic(fig, out_png, dpi=dpi)


def plot_loss_overlay(panels: dict[str, dict[str, str | os.PathLike]], out_png: str | os.PathLike,
                      title: str = "", dpi: int = 100) -> Path:
    """Training loss against step of several runs on shared axes, one panel per kind of run
    (``{"pre-training": {"0.75": "runs/x/metrics.jsonl", ...}, "fine-tune": {...}}``), so a sweep's runs
    are compared at a glance. Missing or empty logs are left out; a panel with no run is dropped.

    Raises :class:`MaelabError` when no run at all has a training line.
    """
    series: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for panel, runs in panels.items():
        for label, path in runs.items():
            if not Path(path).is_file():
                continue
            x, loss, _, _, _ = _train_series(read_metrics(path))
            if x:
                series.setdefault(panel, []).append((label, x, loss))
    if not series:
        raise MaelabError(f"no training lines to plot in {', '.join(str(p) for r in panels.values() for p in r.values())}")
    fig = Figure(figsize=(5.0 * len(series), 3.6), layout="constrained")
    for ax, (panel, lines) in zip(fig.subplots(1, len(series), squeeze=False)[0], series.items()):
        for label, x, loss in lines:
            ax.plot(x, loss, linewidth=1.0, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure_atomic(fig, out_png, dpi=dpi)
