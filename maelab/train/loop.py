"""ONE training loop for every task (pre-training, fine-tuning, linear probing).

It owns what is the same everywhere: micro-steps with gradient accumulation (DDP ``no_sync``),
precision (autocast fp32/bf16/fp16 + GradScaler), clipping, the per-iteration schedule, the non-finite
guard, logging, checkpoints, resume and clean interruption. A ``Task`` says what differs: how a batch
becomes a loss, what to save, what to do after an epoch.

Host syncs happen only at log intervals and epoch ends; the non-finite guard keeps the first bad step
on the device and checks it there, and nothing non-finite is ever written to a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml

from maelab.data.loader import Batch, Feeder
from maelab.data.splits import nfc
from maelab.errors import MaelabError, RunInterrupted, same_on_every_rank
from maelab.io import atomic_write_bytes, remove_stale_temps
from maelab.models.attention import fused_attention_wanted, set_attention_kernel
from maelab.models.state_dicts import check_state_dict
from maelab.train import checkpoint as ckpt
from maelab.train.budget import WARM_STEPS, Deadline, fit_steps, schedule_position
from maelab.train.distributed import (DistInfo, barrier, full_state, full_value, is_sharded, load_full_state,
                                      no_sync, peak_memory, reduce_values, wrap_ddp)
from maelab.train.logs import RunLogger
from maelab.train.optim import SCHEDULES, set_lr
from maelab.train.precision import autocast, resolve_precision
from maelab.train.run_config import check_fresh_start, check_resume, recorded
from maelab.train.run_lock import RunLock


class NonFiniteLoss(MaelabError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


class Task(Protocol):
    model: torch.nn.Module

    def forward(self, runner: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def param_groups(self) -> list[dict]: ...

    def meta(self) -> dict[str, Any]: ...

    def on_epoch_end(self, epoch: int, last: bool) -> dict[str, float]: ...


@dataclass
class LoopResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    history: list[dict] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def _stop_signals():
    """SIGINT/SIGTERM/SIGUSR1 ask for a clean stop at the next step boundary; a second SIGINT aborts.
    SIGUSR1 is what Slurm's ``--signal=USR1@SECONDS`` sends ahead of a time limit."""
    flag = {"stop": False, "signum": signal.SIGINT}
    old = {}

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not flag["stop"] and os.environ.get("RANK", "0") == "0":  # a long step (a big input) must not look hung
            sys.stderr.write(f"maelab: {signal.Signals(signum).name}: stopping with a checkpoint after the current "
                             f"step" + (" (Ctrl-C again aborts at once)\n" if signum == signal.SIGINT else "\n"))
            sys.stderr.flush()
        flag["stop"], flag["signum"] = True, signum

    try:
        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        old = {}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class Trainer:
    """Runs ``task`` over ``feeder`` for ``optim.epochs`` epochs, resuming if a checkpoint exists."""

    def __init__(self, task: Task, feeder: Feeder, optim: Any, run: Any, run_dir: Path,
                 info: DistInfo, device: torch.device, optimizer_factory, logger: RunLogger | None = None):
        """``optim``: a schedule config section (``epochs``, ``warmup_epochs``, ``min_lr``, ``accum_iter``,
        ``clip_grad``); ``run``: a run section (``precision``, ``compile``, ``log_every``, ``save_every``,
        ``keep``). ``precision="auto"`` is resolved here for ``device``."""
        self.task, self.feeder, self.optim_cfg, self.run_cfg = task, feeder, optim, run
        self.run_dir, self.info, self.device = Path(run_dir), info, device
        self.log = logger or RunLogger(None, enabled=False)
        self.precision = resolve_precision(run.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.attention = set_attention_kernel(task.model, fused_attention_wanted(device.type, self.precision == "bf16"))
        # FSDP replaces the parameters with sharded ones, so the optimizer is built after the wrapping
        runner = wrap_ddp(task.model, info, device, getattr(run, "fsdp", False),
                          getattr(run, "activation_checkpointing", False))
        self.optimizer = optimizer_factory(task.param_groups())
        self._optimizer_factory = optimizer_factory
        self.runner = torch.compile(runner) if run.compile else runner
        self.ddp = runner
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.epoch_partial = (0.0, 0)  # (loss sum, optimizer steps) of the epoch so far, for mid-epoch saves
        self.peak: list[float] | None = None  # memory per process at the end of the first epoch trained
        self.steps_per_epoch = feeder.steps_per_epoch
        self.global_batch = feeder.plan.global_size
        self.deadline: Deadline | None = None  # set by a --budget plan: re-size the run as it goes
        self._config: Any = None  # the run's whole config, re-recorded when a re-plan changes it
        self._clock: tuple[float, int, float] | None = None  # (time, global step, epoch-end seconds) at the last re-plan
        self._next_replan = math.inf
        self._epoch_ends: list[float] = []  # seconds of each epoch end (evaluation, checkpoints): not step time

    # --- schedule ----------------------------------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        return self.optimizer.defaults["lr"]

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``epochs`` x steps per epoch, or ``max_steps`` when the
        schedule sets it (a wall-clock budget ends inside an epoch)."""
        total = self.optim_cfg.epochs * self.steps_per_epoch
        max_steps = getattr(self.optim_cfg, "max_steps", None)
        return min(total, max_steps) if max_steps else total

    def lr_at(self, epoch: int, step: int) -> float:
        it = epoch * self.steps_per_epoch + step
        warmup = self.optim_cfg.warmup_epochs * self.steps_per_epoch
        schedule = SCHEDULES[getattr(self.optim_cfg, "schedule", "cosine")]  # a section may choose (segment: poly)
        position, first_total = schedule_position(it, getattr(self.optim_cfg, "plan_history", None))
        return schedule(position, first_total or self.total_steps, warmup, self.peak_lr, self.optim_cfg.min_lr)

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps epoch ``epoch`` will take: all of them, or fewer where the run ends inside it."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def _replan(self, loss: torch.Tensor) -> None:
        """With a budget: start the clock after the warm-up steps, then at each check re-size the run from
        the step time since the last one (:mod:`maelab.train.budget`), recording the new plan."""
        d, o = self.deadline, self.optim_cfg
        if self._clock is None:
            if self.global_step >= WARM_STEPS:
                float(loss)  # wait for the device
                self._clock = (time.perf_counter(), self.global_step, sum(self._epoch_ends))
                self._next_replan = d.first_check(self.total_steps, o.warmup_epochs * self.steps_per_epoch)
            return
        if self.global_step < self._next_replan:
            return
        float(loss)
        now = time.perf_counter()
        t0, s0, ends0 = self._clock
        step_s = (now - t0 - (sum(self._epoch_ends) - ends0)) / (self.global_step - s0)
        per_epoch = float(np.mean(self._epoch_ends)) if self._epoch_ends else d.per_epoch_s
        # when not one more step fits, the run ends here (a step added then ran at a fresh warm-up's lr 0, past
        # the budget)
        total = fit_steps(d.ends_at - now, step_s, self.steps_per_epoch, per_epoch, self.global_step, self.epoch)
        total = int(reduce_values([total], self.info, self.device, dist.ReduceOp.MIN)[0])  # the slowest one's plan
        old = self.total_steps
        self._clock = (now, self.global_step, sum(self._epoch_ends))
        self._next_replan = d.next_check(self.global_step, total)
        if total == old:
            return
        o.plan_history = [*(o.plan_history or [old]), self.global_step, total]
        o.max_steps, o.epochs = total, math.ceil(total / self.steps_per_epoch)
        if self.info.is_main:
            self._write_config()
        self.log.set_epoch_steps(self.epoch_steps(self.epoch), o.epochs)
        self.log.info(f"--budget: re-planned at step {self.global_step} from {step_s:.3g} s/step since step {s0} "
                      f"and {max(0.0, d.ends_at - now):.0f} s left: {total} steps (was {old})"
                      + ("; that plan was over, so the added steps get a warm-up and cosine of their own"
                         if self.global_step >= old else ""))

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_steps(self, steps: int = 5, warmup: int = 2, max_seconds: float = math.inf) -> float:
        """Seconds per optimizer step of this run (its task, data path, precision and processes), measured
        on the first batches of epoch 0 and then undone: weights, optimizer, scaler and RNG states are
        restored, so the run that follows is exactly the one that would have run without the measurement.
        The median step after ``warmup`` ones: the first steps (allocator, kernel selection) and a step that
        another process interrupts are slower than the run's typical one (a plan from the mean of three
        steps once left 28 % of a 30-minute budget unused). Fewer than ``steps`` are timed (at least one)
        when the warm-up says they would take more than ``max_seconds``: seven 7.5-s steps were a sixth of
        a 5-minute budget. Every process times the same number (from the slowest warm-up), as DDP needs."""
        model, accum = self.task.model, self.feeder.plan.accum
        saved = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                 copy.deepcopy(self.optimizer.state_dict()), self.scaler.state_dict() if self.scaler else None,
                 rng_state(), [dict(g) for g in self.optimizer.param_groups])
        warmup = min(warmup, self.steps_per_epoch - 1)  # a tiny epoch: fewer warm-up steps, at least one timed
        started = time.perf_counter()
        done, t0, times = 0, (started if warmup < 1 else None), []
        try:
            for batch in self.feeder.epoch(0, 0):
                with no_sync(self.ddp, batch.micro != accum - 1), autocast(self.device, self.precision):
                    loss, _ = self.task.forward(self.runner, batch)
                (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
                if batch.micro != accum - 1:
                    continue
                self._optimizer_step()
                float(loss.detach())  # wait for the device
                done += 1
                now = time.perf_counter()
                if t0 is not None:
                    times.append(now - t0)
                t0 = now if done >= warmup else None
                if done == warmup and math.isfinite(max_seconds):
                    warm_s = reduce_values([(now - started) / warmup], self.info, self.device)[0]
                    steps = max(1, min(steps, int(max_seconds // warm_s)))
                if done == warmup + steps or done == self.steps_per_epoch:
                    break
            per_step = float(np.median(times)) if times else float("nan")
        finally:
            model.load_state_dict(saved[0])
            self.optimizer.load_state_dict(saved[1])
            for group, before in zip(self.optimizer.param_groups, saved[4]):
                group["lr"] = before["lr"]
            if self.scaler:
                self.scaler.load_state_dict(saved[2])
            set_rng_state(saved[3])
            self.optimizer.zero_grad(set_to_none=True)
        return per_step

    # --- checkpoints -------------------------------------------------------------------------------
    def _train_state(self, optimizer_state: dict | None = None) -> dict[str, Any]:
        return {
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
            "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch, "world": self.info.world,
            "images": self._images(),
            "rng": rng_state(), "epoch_loss_sum": self.epoch_partial[0], "epoch_steps": self.epoch_partial[1],
        }

    def save(self, name: str, extra_meta: dict[str, Any] | None = None) -> Path | None:
        path = None
        sharded = is_sharded(self.task.model)
        # under FSDP every rank takes part in gathering the single-process weights and optimizer state
        weights, optimizer_state = full_state(self.task.model, self.optimizer) if sharded else (None, None)
        if self.info.is_main:
            weights = weights if sharded else self.task.model.state_dict()
            if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
                raise NonFiniteLoss(f"weights became non-finite by step {self.global_step}; nothing saved "
                                    f"(the last good checkpoint is kept)")
            meta = {"name": name, "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                    "model": self.task.meta(), **getattr(self.feeder, "record", {}), **(extra_meta or {})}
            path = ckpt.save_checkpoint(self.run_dir, name, weights, self._train_state(optimizer_state), meta)
        barrier(self.info)
        self._saved_at = time.monotonic()
        return path

    def _stop_or_save(self, signalled: bool, log_now: bool) -> tuple[bool, bool]:
        """(stop now, write a timed checkpoint now): a signal arrived, or ``--save-every-minutes`` have passed
        since the last save. Under DDP every process must take the same branch, so both are agreed at log
        steps in one collective (any process's signal or clock counts)."""
        every = 60 * getattr(self.run_cfg, "save_every_minutes", 0.0)
        due = every > 0 and time.monotonic() - self._saved_at >= every
        if not self.info.enabled:
            return signalled, due
        if not log_now:
            return False, False
        stop_now, save_now = reduce_values([float(signalled), float(due)], self.info, self.device)
        return stop_now > 0, save_now > 0

    def _save_inside_epoch(self, epoch_sum: torch.Tensor, n_epoch: int) -> None:
        """A timed checkpoint inside an epoch, so a run killed without warning (``kill -9``, the OOM killer, a
        lost node) loses minutes, not an epoch: it holds the epoch's loss so far, like an interrupted run's,
        and replaces the previous timed one; the epoch's own checkpoint removes it. With ``--budget`` its
        time counts as step time, so the plan leaves room for the saves still to come."""
        self.epoch_partial = (self._mean(epoch_sum, 1), n_epoch)
        name = f"step_{self.global_step:08d}"
        self.save(name)
        self.epoch_partial = (0.0, 0)
        if self.info.is_main:
            ckpt.prune(self.run_dir, {d.name for d in ckpt.list_checkpoints(self.run_dir)
                                      if not d.name.startswith("step_")} | {name})

    def open_run(self, config: Any, resume: Path | None, lock: RunLock | None = None) -> RunLogger:
        """Resume (which checks the checkpoint fits), read the first batch's images, and only then write
        the run folder: logs and ``config.yaml``. Nothing is written for a run that cannot start. A new
        folder is locked (``lock``) as soon as it exists, before anything is written in it."""
        self._config = config
        settings = dataclasses.asdict(config)
        changes: list[str] = []
        if resume is not None:
            with same_on_every_rank():  # every process compares the same two configs: said once
                changes = check_resume(Path(resume).parent.parent / "config.yaml", settings)
            self.resume_from(resume)
        elif not (lock is not None and lock.deferred):  # (a deferred lock: the folder was not there at start)
            check_fresh_start(self.run_dir / "config.yaml", settings)
        if self.epoch < self.optim_cfg.epochs:
            self.feeder.check_start(self.epoch, self.step)
        if lock is not None and self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock.take()
            if lock.deferred and resume is None and (self.run_dir / "config.yaml").exists():
                # another process made and ran it since (the same command started twice): starting over here
                # would overwrite its run
                raise MaelabError(f"{self.run_dir} was started by another maelab process while this one was "
                                  f"starting; nothing was written. Run this command again to continue that run "
                                  f"(or choose another --out)")
        self.log = RunLogger(self.run_dir, enabled=self.info.is_main, start_step=self.global_step)
        if self.info.is_main:
            self._write_config()
            stale = remove_stale_temps(self.run_dir / "checkpoints")
            if stale:
                self.log.info(f"removed {len(stale)} temp file(s) a killed run left in {self.run_dir / 'checkpoints'}")
        if changes:
            self.log.info("resumed with changed settings: " + ", ".join(changes))
        return self.log

    def _write_config(self) -> None:
        atomic_write_bytes(self.run_dir / "config.yaml",
                           yaml.safe_dump(recorded(dataclasses.asdict(self._config)), sort_keys=False).encode())

    def resume_from(self, folder: Path) -> None:
        weights, state = ckpt.read_checkpoint(folder)
        with same_on_every_rank():  # every process compares the same checkpoint: a torchrun job says it once
            check_state_dict(self.task.model, weights, f"checkpoint {folder}")
            self._check_same_run(folder, state)
            if state["global_batch"] != self.global_batch:
                raise MaelabError(
                    f"checkpoint {folder} was trained with a global batch of {state['global_batch']}, this run "
                    f"has {self.global_batch} (batch size x accumulation x processes must stay the same to resume)")
            if state["steps_per_epoch"] != self.steps_per_epoch:
                raise MaelabError(self._epoch_length_changed(folder, state))
        self._warn_changed_images(folder, state)
        if is_sharded(self.task.model):  # the single-process format, whichever way it was saved
            load_full_state(self.task.model, self.optimizer, weights, state["optimizer"])
        else:
            self.task.model.load_state_dict(weights)
            self._match_saved_groups(folder, state["optimizer"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        if self.step:  # a mid-epoch checkpoint: the epoch's loss so far, so the epoch mean stays whole
            self.epoch_partial = (float(state.get("epoch_loss_sum", 0.0)), int(state.get("epoch_steps", 0)))
        set_rng_state(state["rng"])

    def _epoch_length_changed(self, folder: Path, state: dict[str, Any]) -> str:
        """Why an epoch's length changed. Shards go to the processes whole, so with an uneven last shard each
        number of processes gives its own epoch length (the smallest share sets it): "is it the same
        dataset?" sent a job requeued on fewer nodes looking for corrupt data."""
        was, now = state["steps_per_epoch"], self.steps_per_epoch
        saved_world = state.get("world")  # recorded since 2026-12-07
        if not hasattr(getattr(self.feeder, "plan", None), "rank_shards"):  # folder data: world-independent
            return f"checkpoint {folder} had {was} steps per epoch, this data gives {now}: is it the same dataset?"
        trained = f"{saved_world} process(es)" if saved_world else "the number of processes it was trained with"
        if saved_world is not None and saved_world == self.info.world:
            return (f"checkpoint {folder} had {was} steps per epoch, these shards give {now} with the same "
                    f"{saved_world} process(es): are they the same shards?")
        return (f"checkpoint {folder} had {was} steps per epoch; these shards give {now} with {self.info.world} "
                f"process(es) (each process reads whole shards and the smallest share sets an epoch's length, so "
                f"shards of uneven sizes give each number of processes its own): resume with {trained}, or write "
                f"the shards so that every process gets as many samples (maelab shards make --shard-size)")

    def _match_saved_groups(self, folder: Path, saved: dict[str, Any]) -> None:
        """Resume the optimizer with the parameter groups its checkpoint was saved with: a task whose grouping
        changed in a newer maelab offers the old one (``legacy_groups``), which a run begun with it keeps; any
        other mismatch is one line (torch said "loaded state dict contains a parameter group that doesn't
        match the size of optimizer's group")."""
        def sizes(groups) -> list[int]:
            return [len(g["params"]) for g in groups]

        if sizes(saved["param_groups"]) == sizes(self.optimizer.param_groups):
            return
        legacy = getattr(self.task, "legacy_groups", None)
        if legacy is not None and sizes(legacy[0]) == sizes(saved["param_groups"]):
            self.optimizer = self._optimizer_factory(legacy[0])
            warnings.warn(f"checkpoint {folder} was saved by an earlier maelab: {legacy[1]}")
            return
        raise MaelabError(f"checkpoint {folder}'s optimizer has {len(saved['param_groups'])} parameter groups of "
                          f"other sizes than this run's {len(self.optimizer.param_groups)} (saved by another maelab "
                          f"version?): it cannot be resumed here; start over with another --out")

    def _check_same_run(self, folder: Path, state: dict[str, Any]) -> None:
        """What a resumed run learns must keep its meaning: the classes its head was trained on (a renamed or
        re-ordered class folder swapped what its outputs mean, without a word) and the frozen encoder a probe's
        head sits on (``--init`` of a run still training reads a newer checkpoint at every start). A changed
        number of images is said: the run goes on, no longer the one an uninterrupted run would have made."""
        was, now = ckpt.read_meta(folder).get("model") or {}, self.task.meta()

        if was.get("categories") is not None and now.get("categories") is not None \
                and was["categories"] != json.loads(json.dumps(now["categories"])):  # detection: COCO ids and names
            raise MaelabError(f"checkpoint {folder} was trained on other categories than the annotations now give "
                              f"(ids and names; e.g. {was['categories'][:3]} against {now['categories'][:3]}): each "
                              f"class output of the heads would change its meaning. Resume with the annotation files "
                              f"the run began with, or start over with another --out")
        if was.get("classes") is not None and now.get("classes") is not None and [nfc(c) for c in was["classes"]] != [nfc(c) for c in now["classes"]]:
            gone = [c for c in was["classes"] if c not in now["classes"]]
            new = [c for c in now["classes"] if c not in was["classes"]]
            change = "; ".join(part for part in (f"gone: {', '.join(map(str, gone[:5]))}" if gone else "",
                                                 f"new: {', '.join(map(str, new[:5]))}" if new else "") if part)
            raise MaelabError(f"checkpoint {folder} was trained on {len(was['classes'])} classes and the data now has "
                              f"{len(now['classes'])} that differ ({change or 'another order'}): each output of the "
                              f"head would change its meaning. Resume with the class folders the run began with, "
                              f"or start over with another --out")
        if was.get("encoder_weights") and now.get("encoder_weights"):
            moved = was["encoder_weights"] != now["encoder_weights"]
            rewritten = bool(was.get("encoder_digest") and now.get("encoder_digest")) \
                and was["encoder_digest"] != now["encoder_digest"]
            if moved or rewritten:
                why = (f"and --init now gives {now['encoder_weights']} (a run that trained on in the meantime?)"
                       if moved else "which now holds other weights (written again since)")
                hint = (f", with --init {Path(was['encoder_weights']).parent} to probe the encoder this run began with"
                        if moved else "")
                raise MaelabError(f"checkpoint {folder}'s head was trained on the features of {was['encoder_weights']}, "
                                  f"{why}: the head cannot go on with other features. Start over with another "
                                  f"--out{hint}")

    def _images(self) -> int | None:
        """The number of images an epoch plans (None for a feeder without a plan)."""
        return getattr(getattr(self.feeder, "plan", None), "n", None)

    def _warn_changed_images(self, folder: Path, state: dict[str, Any]) -> None:
        """Said once the resume's refusals have passed (a count that also changed the steps per epoch is refused)."""
        images = self._images()
        if state.get("images") and images and state["images"] != images:
            warnings.warn(f"checkpoint {folder} was trained on {state['images']} images and the data now has {images}: "
                          f"the run goes on with them, but it is no longer the run one uninterrupted command would "
                          f"have made")

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> LoopResult:
        """Train to ``optim.epochs``; the feeder's worker processes are stopped however it ends."""
        try:
            return self._fit()
        finally:
            self.feeder.close()

    def _fit(self) -> LoopResult:
        cfg, run = self.optim_cfg, self.run_cfg
        accum = self.feeder.plan.accum
        history: list[dict] = []
        params = [p for p in self.task.model.parameters() if p.requires_grad]
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._saved_at = time.monotonic()
        with _stop_signals() as stop:
            while self.epoch < cfg.epochs and self.global_step < self.total_steps:  # --max-steps may end it early
                epoch = self.epoch
                self.log.start_epoch(epoch, cfg.epochs, self.step, self.epoch_steps(epoch))
                loss_sum = torch.zeros((), device=self.device)
                epoch_sum = torch.full((), self.epoch_partial[0], device=self.device)
                n_log, n_epoch, t_log = 0, self.epoch_partial[1], time.perf_counter()
                self.epoch_partial = (0.0, 0)
                grad_norm = None
                for batch in self.feeder.epoch(epoch, self.step):
                    if batch.micro == 0:
                        lr = self.lr_at(epoch, batch.step)
                        set_lr(self.optimizer, lr)
                    last_micro = batch.micro == accum - 1
                    with no_sync(self.ddp, not last_micro), autocast(self.device, self.precision):
                        loss, _ = self.task.forward(self.runner, batch)
                    scaled = loss / accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    loss = loss.detach().float()
                    loss_sum += loss / accum
                    epoch_sum += loss / accum
                    if not last_micro:
                        continue
                    bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step, self.global_step)
                    if self.scaler:
                        self.scaler.unscale_(self.optimizer)
                    self.step, self.global_step = batch.step + 1, self.global_step + 1
                    if self.deadline is not None:
                        self._replan(loss)
                    ends = self.step == self.steps_per_epoch or self.global_step >= self.total_steps
                    log_now = self.step % run.log_every == 0 or ends
                    if cfg.clip_grad:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    elif log_now:
                        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    self._optimizer_step()
                    n_log += 1
                    n_epoch += 1
                    metrics = None
                    if log_now:
                        metrics = self._sync_metrics(loss_sum, n_log, lr, grad_norm, t_log, bad_step)
                        history.append(metrics)
                        self.log.scalars(metrics, self.global_step)
                        loss_sum.zero_()
                        n_log, t_log = 0, time.perf_counter()
                    self.log.step(self.step, metrics)
                    stop_now, save_now = self._stop_or_save(stop["stop"], log_now)
                    if ends:
                        break  # the end of the epoch, or of a budget that ends inside it
                    if save_now and not stop_now:
                        self._check_finite(bad_step)
                        self._save_inside_epoch(epoch_sum, n_epoch)
                    if stop_now:
                        self.log.end_epoch()
                        self.epoch_partial = (self._mean(epoch_sum, 1), n_epoch)
                        path = self.save(f"step_{self.global_step:08d}")
                        raise RunInterrupted(f"interrupted at epoch {epoch + 1} step {self.step}; checkpoint saved "
                                             f"to {path or self.run_dir}; run the same command again to resume", stop["signum"])
                t_end = time.perf_counter()
                self.log.end_epoch()
                self._check_finite(bad_step)
                self.epoch, self.step = epoch + 1, 0
                epoch_loss = self._mean(epoch_sum, max(n_epoch, 1))
                last = self.epoch == cfg.epochs or self.global_step >= self.total_steps
                name = f"epoch_{self.epoch:04d}"
                extra = self._epoch_end_task(epoch, last, name, epoch_loss)
                summary = {"epoch": self.epoch, "epoch_loss": epoch_loss, **extra}
                self.log.scalars(summary, self.global_step, prefix="epoch")
                self.log.info(f"epoch {self.epoch}/{cfg.epochs}  loss {epoch_loss:.4f}"
                              + "".join(f"  {k} {v:.4g}" for k, v in extra.items() if isinstance(v, float)))
                history.append(summary)
                if self.peak is None:  # before the first save, which gathers the full state on rank 0 under FSDP
                    self.peak = peak_memory(self.info, self.device)
                self.save(name, {"epoch_loss": epoch_loss})
                if self.info.is_main:
                    self._prune(name)
                self._epoch_ends.append(time.perf_counter() - t_end)
                if stop["stop"] and not last:
                    raise RunInterrupted(f"interrupted after epoch {self.epoch}; run the same command again to resume",
                                         stop["signum"])
        if self.peak is not None:
            self.log.info(f"peak memory per process during the training steps "
                          f"({'CUDA allocated' if self.device.type == 'cuda' else 'max RSS'}): "
                          + ", ".join(f"{g:.2f}" for g in self.peak) + " GiB")
        return LoopResult(self.run_dir, self.epoch, self.global_step, history)

    def _epoch_end_task(self, epoch: int, last: bool, name: str, epoch_loss: float) -> dict[str, float]:
        """The task's epoch end (evaluation). Should it fail (a bad validation label or image), the epoch's
        training is saved first, in one process where that needs no other process, so fixing the input and
        rerunning goes on from there."""
        try:
            return self.task.on_epoch_end(epoch, last)
        except RunInterrupted:
            raise
        except MaelabError as e:
            if self.info.world > 1:
                raise
            path = self.save(name, {"epoch_loss": epoch_loss})
            raise MaelabError(f"{e} (after epoch {self.epoch}'s training, which is saved to {path or self.run_dir}: "
                              f"run the same command again to go on from there)") from None

    def _prune(self, newest: str) -> None:
        """Keep the newest checkpoint and the last ``keep`` periodic ones (every ``save_every``
        epochs and the final epoch); delete the rest."""
        every, epochs = max(self.run_cfg.save_every, 1), self.optim_cfg.epochs
        periodic = [d.name for d in ckpt.list_checkpoints(self.run_dir)
                    if d.name.startswith("epoch_") and d.name[6:].isdigit()
                    and (int(d.name[6:]) % every == 0 or int(d.name[6:]) == epochs)]
        if self.run_cfg.keep > 0:
            periodic = periodic[-self.run_cfg.keep:]
        ckpt.prune(self.run_dir, set(periodic) | {newest})

    def _mean(self, total: torch.Tensor, count: int) -> float:
        value = total / count
        if self.info.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.info.world
        return float(value.item())

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        bad = bad_step.clone()
        if self.info.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad.item()) >= 0:
            latest = ckpt.latest_checkpoint(self.run_dir)
            where = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"
            raise NonFiniteLoss(
                f"loss became non-finite at step {int(bad.item()) + 1} (epoch {self.epoch + 1}); {where}. "
                f"Try --precision bf16 instead of fp16, a lower --base-lr, or --clip-grad 1.0")

    def _sync_metrics(self, loss_sum, n, lr, grad_norm, t0, bad_step) -> dict[str, float]:
        self._check_finite(bad_step)
        elapsed = time.perf_counter() - t0
        images = n * self.global_batch
        metrics = {"epoch": self.epoch, "loss": self._mean(loss_sum, n), "lr": lr,
                   "img_per_s": images / max(elapsed, 1e-9)}
        if grad_norm is not None:
            metrics["grad_norm"] = float(full_value(grad_norm).float().item())
        return metrics
