"""Train to a wall-clock budget: how many optimizer steps fit, from a measured step time.

``--budget 30m`` (also ``90s``, ``2h``, ``1h30m``) measures this machine's step time for this model and
data path (:meth:`maelab.train.loop.Trainer.time_steps`, undone afterwards; the timed steps stop at
about 2 % of the budget), subtracts what the run has already spent (start-up, data scan) and what it
will spend outside the steps (per-epoch evaluation, timed on its first batches by :func:`timed_pass`
or, image by image, on a few images by :func:`timed_sample`; the final pictures) plus a 5 % margin,
and sets the number of steps. The cosine runs over those steps and the warm-up is at most 10 % of them. The plan is written into the run's config
(``max_steps``, ``epochs``, ``warmup_epochs``), so a resumed run follows it exactly.

A shared machine's step time drifts by +-20 % within a run, more than a margin can absorb, so the
run re-plans as it goes (:class:`Deadline`): every tenth of the first plan's steps it re-sizes the
total from the step time it has had since the last re-plan and the time left. The
cosine is not restarted: the rest of the first plan's schedule is stretched or squeezed over the new
remaining steps (:func:`schedule_position`), so the learning rate stays continuous (unless the first plan was
over by its first check: then the added steps get a schedule of their own). Every re-plan is
appended to ``plan_history`` in the run's config, and the schedule is a function of that record, so a
run resumed after a re-plan takes exactly the steps the uninterrupted one took.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from maelab.errors import MaelabError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
MARGIN = 0.05  # of the budget, for what the estimate misses (a slower step, a busier machine)
MAX_WARMUP = 0.1  # of the planned steps
REPLAN_EVERY = 0.1  # of the first plan's steps
WARM_STEPS = 2  # optimizer steps before the re-plan clock starts (allocator, kernel selection)
CALIBRATION_SHARE = 0.02  # of the budget: the timed calibration steps stop about there (at least one)
SAMPLE_BATCHES = 4  # an evaluation pass is timed on its first few batches, not run whole
SAMPLE_ITEMS = 8  # an image-by-image evaluation (segmentation, detection) is timed on this many images


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


def timed_pass(run: Callable[[Iterable], Any], batches: Iterable, total: int, sample: int = SAMPLE_BATCHES) -> float:
    """Seconds ``run(batches)`` would take over all ``total`` batches, from running it on the first ``sample``:
    what is not a steady batch (start-up, the first batch with its workers and allocations, the result)
    counted once, and the median of the other batches for each remaining one. Timing the whole validation
    pass instead cost a 5-minute fine-tune on a 2-core fp32 CPU nearly a third of its budget (10 000 images, over 90 s)."""
    times: list[float] = []

    def first() -> Iterator:
        t = time.perf_counter()
        for batch in batches:
            yield batch  # the consumer's work on it runs before the generator resumes
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if len(times) == sample:
                return

    seconds = timed(run, first())
    if len(times) < sample or total <= sample:
        return seconds  # the whole pass ran
    steady = times[1:]
    return seconds - sum(steady) + (total - 1) * statistics.median(steady)


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``n`` items (the same ones every time)."""
    k = min(n, k)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k else []


def latest_by(times: list[float], limit: float) -> int | None:
    """Index of the latest of ``times`` at or before ``limit`` (None when every one is later): how one run's
    snapshots are paired with another's at equal or less wall-clock, so neither is credited with time it
    did not have."""
    before = [i for i, t in enumerate(times) if t <= limit]
    return max(before, key=times.__getitem__) if before else None


def timed_sample(run: Callable[[list[int]], Any], total: int, sample: int = SAMPLE_ITEMS) -> float:
    """Seconds ``run`` would take over all ``total`` items, from running it on ``sample`` items spread over
    them (``run`` takes their indices) and scaling by ``total / sample``. For evaluations that go image by
    image over item lists (segmentation mIoU, detection AP), where :func:`timed_pass` has no batch stream to
    cut. The fixed part (switching modes, the final reduction and scoring) is scaled too, so the estimate
    errs long: the budget's safe side. Up to ``2 * sample`` items the whole pass runs."""
    if total <= 2 * sample:
        return timed(run, list(range(total)))
    return timed(run, spread(total, sample)) * total / sample


def parse_duration(text: str, flag: str = "--budget") -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1.5h"`` -> seconds; ``flag`` names it in an error."""
    s = str(text).strip().lower().replace(" ", "")
    if s.startswith("-") and len(s) > 1:  # "-5m" is a duration, a negative one
        raise MaelabError(f"{flag} must be longer than zero, got {text!r}")
    parts = _PART.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise MaelabError(f"{flag} {text!r} is not a duration: use a number with a unit, e.g. 90s, 30m, 2h, 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise MaelabError(f"{flag} must be longer than zero, got {text!r}")
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


def fit_steps(available_s: float, step_s: float, steps_per_epoch: int, per_epoch_s: float = 0.0,
              done_steps: int = 0, done_epochs: int = 0) -> int:
    """The largest total ``n >= done_steps`` whose remaining steps and epoch ends fit ``available_s``:
    ``(n - done_steps) * step_s + (ceil(n / steps_per_epoch) - done_epochs) * per_epoch_s <= available_s``
    (``done_steps`` itself when not even one more fits)."""
    def cost(n: int) -> float:
        return (n - done_steps) * step_s + max(0, math.ceil(n / steps_per_epoch) - done_epochs) * per_epoch_s

    n, high = done_steps, done_steps + max(0, int(available_s // step_s))  # cost grows with n
    while n < high:
        mid = (n + high + 1) // 2
        n, high = (mid, high) if cost(mid) <= available_s else (n, mid - 1)
    return n


def schedule_position(it: float, history: list[int] | None) -> tuple[float, float]:
    """(iteration, total) to evaluate the schedule at for optimizer step ``it`` of a run re-planned as
    ``history`` says: ``[first total, step, new total, step, new total, ...]``. Between re-plans the
    position on the first plan's schedule advances linearly, reaching its end exactly at the last total;
    without re-plans it is ``(it, None)``: the caller's own total.

    A re-plan at the very end of the schedule so far (a first plan of a few steps, from a calibration on a
    busy machine, whose first check comes when it is over) has nothing left to stretch: the added steps
    would all run at the final learning rate. They get the whole schedule again instead (warm-up and
    cosine over the new steps)."""
    if not history or len(history) < 3:
        return it, None
    first = float(history[0])
    s, v, t = 0, 0.0, history[0]
    for k in range(1, len(history) - 1, 2):
        step, total = history[k], history[k + 1]
        if it < step:
            break
        v += (step - s) * (first - v) / (t - s)
        if step >= t:  # the schedule was over: start it again
            v = 0.0
        s, t = step, total
    return v + (it - s) * (first - v) / (t - s), first


def check_history(history: list[int] | None) -> None:
    """``--plan-history`` as a budget run records it: a first total, then (step, new total) pairs with
    steps increasing and every new total past its step."""
    if not history:
        return
    if len(history) % 2 != 1 or history[0] < 1:
        raise MaelabError(f"--plan-history {history}: expected the first plan's total steps, then step / new total "
                          f"pairs (it is written by --budget; leave it out)")
    last = 0
    for k in range(1, len(history), 2):
        step, total = history[k], history[k + 1]
        if step <= last or total <= step:
            raise MaelabError(f"--plan-history {history}: re-plan at step {step} to {total} steps is out of order")
        last = step


@dataclass
class Deadline:
    """When this process's training steps must be over (``time.perf_counter()`` seconds: the budget's end
    less the margin and the final evaluation / pictures) and what each epoch end is expected to cost,
    so the trainer can re-size the run from the step time it actually gets (see the module docstring)."""

    ends_at: float
    per_epoch_s: float = 0.0
    interval: int = 2  # steps between re-plans, set by the first check

    def first_check(self, total: int, warmup_steps: float) -> int:
        """The step of the first re-plan: a tenth of the plan, after the warm-up, with a few steps timed."""
        self.interval = max(2, math.ceil(REPLAN_EVERY * total))
        return max(self.interval, math.ceil(warmup_steps) + 1, WARM_STEPS + 2)

    def next_check(self, step: int, total: int) -> float:
        """After a re-plan at ``step``: ``interval`` steps on, unless the run ends before."""
        return step + self.interval if total - step > self.interval else math.inf


def plan_steps(budget_s: float, spent_s: float, step_s: float, steps_per_epoch: int, warmup_epochs: float,
               per_epoch_s: float = 0.0, final_s: float = 0.0) -> BudgetPlan:
    """The most steps ``n`` with ``n * step_s + epochs(n) * per_epoch_s <= available``, where
    ``available = budget * (1 - MARGIN) - spent - final``."""
    if not math.isfinite(step_s) or step_s <= 0:
        raise MaelabError(f"could not measure the step time for --budget (got {step_s}); the data may hold fewer "
                          f"steps than the measurement needs")
    available = budget_s * (1 - MARGIN) - spent_s - final_s
    n = fit_steps(available, step_s, steps_per_epoch, per_epoch_s)
    if n < 1:
        need = spent_s + final_s + step_s + per_epoch_s
        raise MaelabError(f"--budget {budget_s:.0f} s leaves no time for a single step: start-up and the step-time "
                          f"measurement took {spent_s:.0f} s, one step takes {step_s:.2g} s and the pictures / evaluation {final_s + per_epoch_s:.0f} s; "
                          f"give at least {math.ceil(need / (1 - MARGIN))} s")
    epochs = math.ceil(n / steps_per_epoch)
    warmup = min(warmup_epochs, MAX_WARMUP * n / steps_per_epoch)
    return BudgetPlan(n, epochs, warmup, step_s, available)
