"""What every command does around its own work, written once.

A :class:`Session` joins torchrun's process group (or runs alone), picks the device, resolves the
precision, finds the run folder and the checkpoint it resumes from, builds evaluation splits, runs
the training loop with its log, writes the results, and always tears the process group down::

    with Session(cfg.run.device, cfg.run.precision) as s:
        run_dir, resume = s.run_folder(cfg.run)
        ...
        result = s.fit(trainer, cfg, resume, header)

The headline of a training run is the **final-epoch** validation accuracy. The best epoch is also
reported, labelled as selected on the validation split: picking the maximum over epochs on the split
you report overstates the result.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from maelab.commands.steps import CHAIN_STEP
from maelab.data.folders import ImageList
from maelab.data.loader import choose_in_memory
from maelab.data.workers import default_workers
from maelab.config import load_yaml
from maelab.errors import MaelabError, SameOnEveryRank, warn_for_job
from maelab.evaluate.features import EvalSplit
from maelab.io import check_writable_folder, refuse_out_inside, write_json
from maelab.interop.encoders import resolve_encoder
from maelab.models.vit import EncoderWeights, describe, features_model
from maelab.train import checkpoint as ckpt
from maelab.train.budget import (CALIBRATION_SHARE, MARGIN, Deadline, check_history, parse_duration, plan_steps,
                                 process_age)
from maelab.train.distributed import cleanup, init_distributed, peer_error, reduce_values, tell_peers
from maelab.train.loop import LoopResult, Trainer
from maelab.train.precision import resolve_precision
from maelab.train.run_lock import RunLock

BEST_NOTE = "best epoch selected on the validation split itself (optimistic); the headline is the final epoch"


def warn_endless_warmup(trainer: Trainer) -> None:
    """A warm-up as long as the run (``--epochs 3`` under linprobe's 10 warm-up epochs) never reaches the
    learning rate the header prints, and the decay never starts: said, not changed (a budget run sizes
    its warm-up itself)."""
    o = trainer.optim_cfg
    warmup = getattr(o, "warmup_epochs", 0) * trainer.steps_per_epoch
    if 0 < trainer.total_steps <= warmup:
        fix = ("the step's preset sets the warm-up: more epochs for this step, or a budget (which sizes the warm-up), "
               "avoid it" if os.environ.get(CHAIN_STEP) else "a shorter --warmup-epochs (or more --epochs) avoids it: "
               "stop this run and start that one in another --out (this folder now keeps this run's settings)")
        warnings.warn(f"--warmup-epochs {o.warmup_epochs:g} is not shorter than the run ({o.epochs} epoch(s), "
                      f"{trainer.total_steps} steps): the learning rate climbs the whole run, reaching "
                      f"{trainer.lr_at(0, trainer.total_steps - 1):.3g} of {trainer.peak_lr:.3g} at the end, and never "
                      f"decays; {fix}", stacklevel=2)


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint a run in ``run_dir`` continues from (``--resume auto | never | PATH``), checking
    that ``--out`` can hold a run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MaelabError(f"--out {run_dir} exists and is not a folder; choose a folder for the run")
    if run_dir.is_symlink() and not run_dir.exists():  # it said "cannot write ...: File exists"
        raise MaelabError(f"--out {run_dir} is a link to {os.readlink(run_dir)}, which does not exist: create that "
                          f"folder, or choose another --out")
    check_writable_folder(run_dir, "--out", run_dir)
    existing = ckpt.latest_checkpoint(run_dir)
    if resume == "never":
        if existing:
            raise MaelabError(f"{run_dir} already holds checkpoints; choose another --out or use --resume auto")
        return None
    if resume == "auto":
        return existing
    p = Path(resume).expanduser()
    if not p.exists():
        raise MaelabError(f"--resume {p} does not exist")
    if (p / ckpt.META).is_file():
        return p
    found = ckpt.latest_checkpoint(p)
    if found is None:
        raise MaelabError(f"--resume {p} holds no complete checkpoint")
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def encoder_header(enc: EncoderWeights | None, arch: dict[str, Any], size: tuple[int, int],
                   notes: list[str] = ()) -> str:
    """"ViT width ..., from <source> weights <path>; <what loading did>" for a command's first log line."""
    src = "random init (--init none)" if enc is None else f"{enc.source} weights {enc.path}"
    return f"{describe(dict(arch, img_size=size))} from {src}" + "".join(f"; {n}" for n in notes)


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


def report(results: dict[str, Any]) -> None:
    """One line on stdout with the headline numbers."""
    if "val_top1" not in results:
        return
    print(f"{results['command']}: final epoch {results['final_epoch']}: val top-1 {results['val_top1']:.2f}  "
          + (f"top-5 {results['val_top5']:.2f}  " if results.get("val_top5") is not None else "")
          + f"(best epoch {results['best_epoch']}: top-1 "
          f"{results['best_epoch_val_top1']:.2f}, selected on the validation split)", file=sys.stdout, flush=True)


class Session:
    """One command's process-level set-up and tear-down (see the module docstring)."""

    def __init__(self, device: str, precision: str, seed: int | None = None):
        """``seed`` seeds torch's global generator (random initialisation) once the process has started."""
        self.started = time.perf_counter() - process_age()  # a --budget counts from the process start
        self.budget_note: str | None = None
        self.lock: RunLock | None = None
        self.info, self.device = init_distributed(device)
        self.precision = resolve_precision(precision, self.device)
        if seed is not None:
            torch.manual_seed(seed)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, error, tb) -> None:
        """Under torchrun, an error this process alone met (an image it alone decodes) is left for the
        others before the group goes, and a process that finds the group broken by it says that error: it
        said "another process stopped ... run the same command again to resume", false advice for an
        unreadable image."""
        told = None
        if isinstance(error, MaelabError) and not isinstance(error, SameOnEveryRank):
            tell_peers(str(error).strip().split("\n")[0])
        elif isinstance(error, RuntimeError) and self.info.enabled:  # a broken collective, maybe
            told = peer_error()
        if self.lock is not None:
            self.lock.release()
        cleanup(self.info)
        if told is not None:
            raise MaelabError(f"process {self.info.rank}: stopped with process {told[0]}, which met an error: "
                              f"{told[1]}") from error

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def where(self) -> str:
        """"cpu x2 (fp32)" for the first log line."""
        return f"{self.device} x{self.info.world} ({self.precision})"

    def frozen_encoder(self, model_cfg) -> tuple[nn.Module, EncoderWeights | None, dict[str, Any], tuple[int, int],
                                                 list[str]]:
        """(frozen encoder on the device, its weights, architecture, input size, what loading did: a
        position-table resize for ``--img-size``, a layout, assumed heads -- for the log) for an
        ``EncoderConfig``."""
        enc, arch, size = resolve_encoder(model_cfg)
        notes: list[str] = []
        encoder = features_model(enc, arch, size, notes).to(self.device)
        return encoder, enc, arch, size, notes

    def run_folder(self, run_cfg, *inputs: str | None) -> tuple[Path, Path | None]:
        """(run folder, checkpoint to resume from or None) for a run section (``out``, ``resume``), which
        may not lie inside one of the folders the run reads (``inputs``). An existing folder is locked for
        this process (:mod:`maelab.train.run_lock`), so a second process in it stops here, before it reads
        a checkpoint."""
        refuse_out_inside(run_cfg.out, *inputs)
        run_dir = Path(run_cfg.out).expanduser()
        resume = find_resume(run_cfg.resume, run_dir)
        self.lock = RunLock(run_dir, self.is_main)
        self.lock.take()
        return run_dir, resume

    def eval_split(self, images: ImageList, size: tuple[int, int], data) -> EvalSplit:
        """This process's shard of ``images`` in the evaluation view, read as an images section says
        (``batch_size``, ``in_memory``, ``num_workers``, ``crop_pct``, ``bad_files``)."""
        return EvalSplit(images, size, data.batch_size, choose_in_memory(data.in_memory, images, size),
                         num_workers=default_workers(data.num_workers), crop_pct=data.crop_pct,
                         bad_files=data.bad_files, rank=self.info.rank, world=self.info.world,
                         progress=self.is_main)

    def plan_budget(self, trainer: Trainer, cfg: Any, resume: Path | None,
                    measure: Callable[[], tuple[float, float]] | None = None) -> None:
        """With ``--budget``: set ``cfg.optim``'s ``max_steps``, ``epochs`` and ``warmup_epochs`` so the whole
        run ends within it (:mod:`maelab.train.budget`); a resumed run takes the plan its config recorded.
        ``measure()`` gives the seconds of the work after each epoch and at the end (evaluation, pictures);
        it is called only when a plan is made. The plan is logged by :meth:`fit`."""
        o = cfg.optim
        if not o.budget:
            return
        typed = getattr(cfg, "typed_flags", {})  # set by the CLI (config_from_args)
        if given := [f"--{k.replace('_', '-')} {typed[k]}" for k in ("epochs", "max_steps") if k in typed]:
            warn_for_job(f"{' and '.join(given)} given with --budget {o.budget}: the budget sets the run's length "
                         f"(the steps that fit in it), so {'they are' if len(given) > 1 else 'it is'} not used; leave "
                         f"--budget out to train for a fixed length")  # the help said so; the line typed was dropped
        if resume is not None:
            config = Path(resume).parent.parent / "config.yaml"
            recorded = (load_yaml(config).get("optim") or {})
            for key in ("max_steps", "epochs", "warmup_epochs", "plan_history"):
                if key in recorded:
                    setattr(o, key, recorded[key])
            try:
                check_history(o.plan_history)
            except MaelabError as e:
                raise MaelabError(f"{config}: {e}") from None
            started = recorded.get("budget")
            self.budget_note = (f"--budget: following the plan recorded when the run started ({o.max_steps} steps"
                                + (f" for --budget {started}; --budget {o.budget} would need a new --out, the "
                                   f"schedule being sized to the budget" if started and started != o.budget else "")
                                + ")")
            return
        budget_s = parse_duration(o.budget)
        per_epoch_s, final_s = measure() if measure else (0.0, 0.0)
        step_s = trainer.time_steps(max_seconds=CALIBRATION_SHARE * budget_s)
        # every process plans with the slowest one's numbers
        step_s, per_epoch_s, final_s, spent = reduce_values(
            [step_s, per_epoch_s, final_s, time.perf_counter() - self.started], self.info, self.device)
        plan = plan_steps(budget_s, spent, step_s, trainer.steps_per_epoch, o.warmup_epochs, per_epoch_s, final_s)
        o.max_steps, o.epochs, o.warmup_epochs, o.plan_history = plan.steps, plan.epochs, plan.warmup_epochs, None
        # the steps must be over by then; the trainer re-sizes the run from the step time it actually gets
        trainer.deadline = Deadline(self.started + budget_s * (1 - MARGIN) - final_s, per_epoch_s)
        self.budget_note = f"--budget {o.budget}: {plan.describe()}"

    def fit(self, trainer: Trainer, cfg: Any, resume: Path | None, header: str) -> LoopResult:
        """Resume (refusing changed settings), write the run folder, log ``header``, train, close the log."""
        logger = trainer.open_run(cfg, resume, self.lock)  # checks a resumed checkpoint before writing
        if self.is_main:
            if resume is None:  # a resumed run's schedule was said when it started
                warn_endless_warmup(trainer)
            logger.info(header)
            if self.budget_note:
                logger.info(self.budget_note)
            if resume is not None:
                done = trainer.epoch >= trainer.optim_cfg.epochs or trainer.global_step >= trainer.total_steps
                logger.info(f"resumed from {resume}: " + ("all epochs already done" if done else
                            f"continuing at epoch {trainer.epoch + 1}, step {trainer.step}"))
        try:
            return trainer.fit()
        finally:
            logger.close()

    def finish(self, run_dir: Path, command: str, result: LoopResult, extra: dict[str, Any]) -> dict[str, Any]:
        """The results of a classification run: ``results.json`` in the run folder and the headline line."""
        extra = {**extra, "processes": self.info.world, "device": device_name(self.device),
                 "precision": self.precision, "checkpoint": str(run_dir / "checkpoints")}
        results = summarize(run_dir, command, None if self.is_main else result.history, extra)
        if self.is_main:
            write_json(run_dir / "results.json", results)
            report(results)
        return results
