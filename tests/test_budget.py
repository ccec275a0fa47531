"""Training to a wall-clock budget: durations, the step planner, a calibration that leaves the run
untouched, a budget run that ends inside an epoch, and a resumed budget run that follows its plan."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from maelab.commands import session
from maelab.commands.pretrain import PretrainConfig
from maelab.commands.pretrain import run as run_pretrain
from maelab.config import build_config
from maelab.errors import MaelabError
from maelab.io import read_weights
from maelab.train import checkpoint as ckpt
from maelab.train.budget import MARGIN, BudgetPlan, parse_duration, plan_steps
from maelab.train.loop import RunInterrupted
from maelab.train.tasks import PretrainTask

SMALL = dict(model="mae_vit_tiny_patch4", decoder_depth=1, warmup_epochs=1, base_lr=1.5e-3, vis_every=0, log_every=1,
             device="cpu", num_workers=0, seed=3, batch_size=16)  # 64 images: 4 steps per epoch


def cfg_for(data, out, **kw) -> PretrainConfig:
    return build_config(PretrainConfig, {**SMALL, "data": str(data), "out": str(out), **kw})


def weights(run_dir):
    return read_weights(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS)[0]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                          (" 2M ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "m30", "3x", "0s", "-5m", "1h 30"])
def test_bad_durations_are_refused_with_examples(text):
    with pytest.raises(MaelabError, match="budget"):
        parse_duration(text)


def test_the_planner_fits_steps_and_epoch_work_into_what_is_left():
    plan = plan_steps(budget_s=100, spent_s=10, step_s=0.5, steps_per_epoch=20, warmup_epochs=5,
                      per_epoch_s=2.0, final_s=5.0)
    available = 100 * (1 - MARGIN) - 10 - 5
    cost = lambda n: n * 0.5 + -(-n // 20) * 2.0  # noqa: E731
    assert cost(plan.steps) <= available < cost(plan.steps + 1)
    assert plan.epochs == -(-plan.steps // 20)
    assert plan.warmup_epochs == pytest.approx(0.1 * plan.steps / 20)  # at most 10 % of the steps


def test_a_budget_too_small_for_one_step_says_how_much_is_needed():
    with pytest.raises(MaelabError, match="at least 13 s"):
        plan_steps(budget_s=5, spent_s=4, step_s=2.0, steps_per_epoch=10, warmup_epochs=1, final_s=6)


def fixed_plan(steps: int):
    def plan(budget_s, spent_s, step_s, steps_per_epoch, warmup_epochs, per_epoch_s=0.0, final_s=0.0):
        assert step_s > 0 and spent_s > 0  # it was measured
        return BudgetPlan(steps, -(-steps // steps_per_epoch), 0.25, step_s, 1.0)
    return plan


def test_a_budget_run_measures_undoes_the_measurement_and_ends_inside_an_epoch(cifar_tiny, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_pretrain(cfg_for(cifar_tiny, reference, epochs=2, max_steps=6, warmup_epochs=0.25))
    monkeypatch.setattr(session, "plan_steps", fixed_plan(6))
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path / "budget", budget="10m"))
    assert result.global_step == 6 and result.epochs_done == 2
    assert same(weights(tmp_path / "budget"), weights(reference))  # the calibration steps left no trace
    recorded = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())["optim"]
    assert (recorded["max_steps"], recorded["epochs"], recorded["warmup_epochs"]) == (6, 2, 0.25)


def test_max_steps_inside_the_epochs_ends_the_run_there(cifar_tiny, tmp_path):
    """No extra step (at lr 0) in each epoch left after --max-steps, and the last epoch run is the last."""
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path / "r", epochs=5, max_steps=6, warmup_epochs=0.25))
    assert result.global_step == 6 and result.epochs_done == 2
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("epoch", 0) for r in rows) == 2


def test_a_resumed_budget_run_follows_the_recorded_plan(cifar_tiny, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_pretrain(cfg_for(cifar_tiny, reference, epochs=2, max_steps=6, warmup_epochs=0.25))
    original = PretrainTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, runner, batch)

    monkeypatch.setattr(session, "plan_steps", fixed_plan(6))
    monkeypatch.setattr(PretrainTask, "forward", forward)
    with pytest.raises(RunInterrupted):
        run_pretrain(cfg_for(cifar_tiny, tmp_path / "budget", budget="10m"))
    monkeypatch.undo()
    # another machine, another budget: the run still follows the plan it started with
    result = run_pretrain(cfg_for(cifar_tiny, tmp_path / "budget", budget="1m"))
    assert result.global_step == 6
    assert same(weights(tmp_path / "budget"), weights(reference))
