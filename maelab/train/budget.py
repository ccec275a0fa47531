"""Train to a wall-clock budget: how many optimizer steps fit, from a measured step time.

``--budget 30m`` (also ``90s``, ``2h``, ``1h30m``) measures this machine's step time for this model and
data path (:meth:`maelab.train.loop.Trainer.time_steps`, undone afterwards), subtracts what the run
has already spent (start-up, data scan) and what it will spend outside the steps (per-epoch
evaluation, the final pictures) plus a 5 % margin, and sets the number of steps. The cosine runs over
those steps and the warm-up is at most 10 % of them. The plan is written into the run's config
(``max_steps``, ``epochs``, ``warmup_epochs``), so a resumed run follows it exactly.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

from maelab.errors import MaelabError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
MARGIN = 0.05  # of the budget, for what the estimate misses (a slower step, a busier machine)
MAX_WARMUP = 0.1  # of the planned steps


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere 0), so a budget covers start-up too."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as up:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            uptime = float(up.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def timed(fn, *args) -> float:
    """Seconds ``fn(*args)`` takes."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1.5h"`` -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    parts = _PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise MaelabError(f"--budget {text!r} is not a duration: use a number with a unit, e.g. 90s, 30m, 2h, 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise MaelabError(f"--budget must be longer than zero, got {text!r}")
    return seconds


@dataclass
class BudgetPlan:
    steps: int
    epochs: int
    warmup_epochs: float
    seconds_per_step: float
    seconds_available: float

    def describe(self) -> str:
        return (f"{self.steps} steps ({self.epochs} epoch{'s' if self.epochs > 1 else ''}) at "
                f"{self.seconds_per_step:.3g} s/step fit the {self.seconds_available:.0f} s left of the budget; "
                f"warm-up {self.warmup_epochs:.3g} epochs")


def plan_steps(budget_s: float, spent_s: float, step_s: float, steps_per_epoch: int, warmup_epochs: float,
               per_epoch_s: float = 0.0, final_s: float = 0.0) -> BudgetPlan:
    """The most steps ``n`` with ``n * step_s + epochs(n) * per_epoch_s <= available``, where
    ``available = budget * (1 - MARGIN) - spent - final``."""
    if not math.isfinite(step_s) or step_s <= 0:
        raise MaelabError(f"could not measure the step time for --budget (got {step_s}); the data may hold fewer "
                          f"steps than the measurement needs")
    available = budget_s * (1 - MARGIN) - spent_s - final_s

    def cost(n: int) -> float:
        return n * step_s + math.ceil(n / steps_per_epoch) * per_epoch_s

    n, high = 0, max(0, int(available // step_s))  # cost grows with n: the largest n that fits
    while n < high:
        mid = (n + high + 1) // 2
        n, high = (mid, high) if cost(mid) <= available else (n, mid - 1)
    if n < 1:
        need = spent_s + final_s + cost(1)
        raise MaelabError(f"--budget {budget_s:.0f} s leaves no time for a single step: start-up and the step-time "
                          f"measurement took {spent_s:.0f} s, one step takes {step_s:.2g} s and the pictures / evaluation {final_s + per_epoch_s:.0f} s; "
                          f"give at least {math.ceil(need / (1 - MARGIN))} s")
    epochs = math.ceil(n / steps_per_epoch)
    warmup = min(warmup_epochs, MAX_WARMUP * n / steps_per_epoch)
    return BudgetPlan(n, epochs, warmup, step_s, available)
