"""Progress bar, TensorBoard scalars and JSONL metrics (rank 0 only).

The bar (tqdm) shows loss, lr, img/s and ETA on a terminal; when output is not a terminal (CI, a log
file, nohup) it becomes one plain line per log interval instead of carriage-return noise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from maelab.io import atomic_write_bytes


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop ``metrics.jsonl`` lines past ``last_step``: a run that restarts from an older checkpoint
    (or from scratch after dying before its first one) would otherwise log those steps twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line torn by a kill
    atomic_write_bytes(path, "".join(x + "\n" for x in kept).encode())


class RunLogger:
    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.tb = None
        self._jsonl = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            trim_metrics(run_dir / "metrics.jsonl", start_step)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
                except ImportError:  # tensorboard is a dependency; tolerate a broken install
                    self.tb = None

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, start_step: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._t0, self._done0 = time.perf_counter(), start_step
        if self.enabled and self.tty:
            self.bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", dynamic_ncols=True, leave=False, file=sys.stderr)

    def set_epoch_steps(self, steps: int, epochs: int) -> None:
        """A re-planned budget run: this epoch's length and the epoch count changed."""
        self._steps, self._epochs = steps, epochs
        if self.bar is not None:
            self.bar.total = steps
            self.bar.set_description(f"epoch {self._epoch + 1}/{epochs}")

    def step(self, done: int, metrics: dict[str, float] | None) -> None:
        """``done`` steps finished this epoch; ``metrics`` only at log intervals (already synced)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                     img_s=f"{metrics.get('img_per_s', 0):.0f}", refresh=False)
            self.bar.refresh()
        elif metrics:
            elapsed = time.perf_counter() - self._t0
            rate = (done - self._done0) / max(elapsed, 1e-9)
            eta = (self._steps - done) / max(rate, 1e-9)
            extra = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("loss", "lr", "img_per_s", "step", "epoch"))
            print(f"epoch {self._epoch + 1}/{self._epochs} step {done}/{self._steps}  loss {metrics['loss']:.4f}  "
                  f"lr {metrics['lr']:.2e}  img/s {metrics.get('img_per_s', 0):.0f}  eta {_hms(eta)}  {extra}".rstrip(),
                  file=sys.stderr, flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self.end_epoch()
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
