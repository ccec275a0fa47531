"""The settings a run folder records, and which of them a resumed run may change.

Resuming must continue *the same experiment*: a changed learning rate, mask ratio, seed, init or
dataset would silently mix two runs under one name (and ``config.yaml`` would no longer say how the
weights were made). Operational settings -- where it runs, how often it logs or saves, how many epochs
in total -- may change, and so may how the global batch is split (``--batch-size`` per process,
``--accum-iter``, the number of processes): the training loop then checks that batch size x accumulation
x processes is unchanged. The data order, masks and augmentations stay exactly the same; the weights
agree within float tolerance, not bit for bit (gradients are summed in another order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from maelab.data.splits import LEGACY_VAL_NAMES, default_val_dir
from maelab.errors import MaelabError

MAY_CHANGE = frozenset({
    "run.out", "run.resume", "run.device", "run.precision", "run.log_every", "run.save_every", "run.keep",
    "run.save_every_minutes",
    "run.compile", "run.vis_every", "data.num_workers", "data.in_memory", "data.bad_files", "optim.epochs",
    "data.batch_size", "optim.accum_iter",  # how the global batch is split; the loop checks the global batch
    "optim.budget",  # a resumed budget run follows the plan recorded when it started
    "run.fsdp", "run.activation_checkpointing",  # how the model is held: same weights, same checkpoint files
    "monitor.knn_every", "monitor.knn_data", "monitor.knn_max",
    "run.eval_every", "run.vis_images", "run.score_threshold",  # detect: when to score and what to draw
})
PATH_KEYS = frozenset({"data.data", "data.val_data", "monitor.knn_data", "model.init", "run.out"})
PATH_KEYS |= {"data.ann", "data.images", "data.val_ann", "data.val_images"}  # detect


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recorded(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as ``config.yaml`` stores it: plain YAML types, existing paths made absolute (so the
    file still means the same data when read from another working directory)."""
    out = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))
    for section, values in out.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if f"{section}.{key}" in PATH_KEYS and isinstance(value, str) and value:
                p = Path(value).expanduser()
                if key == "out" or p.exists():
                    values[key] = str(p.resolve())
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    """Whether two recorded values mean the same. Image sizes: one number is a square, and a size left
    to its default (``None``, as runs recorded it before the resolved size was written) is the size the
    command resolves now; the checkpoint's shapes are checked when it loads."""
    if key.endswith(".img_size"):
        if old is None or new is None:
            return True
        old, new = (list(v) * 2 if len(v) == 1 else list(v) for v in (old, new))
    return old == new


def check_fresh_start(saved_file: Path, config: dict[str, Any]) -> None:
    """A run folder without a checkpoint starts over (its run was stopped before the first one), but only
    when its ``config.yaml`` is one this command wrote: such a file records every setting of the command
    (a newer maelab may add a few). Another command's run stopped that early, or a file of the user's (a
    preset, notes), was overwritten without a word, and the ``metrics.jsonl`` beside it cut back."""
    if not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    now = _flat(recorded(config))
    flat = _flat(saved) if isinstance(saved, dict) else {}
    extra, missing = set(flat) - set(now), set(now) - set(flat)
    if len(extra) >= 2 or len(missing) > max(3, len(now) // 10):
        raise MaelabError(f"--out {saved_file.parent} holds a config.yaml that this command did not write (a run's "
                          f"config.yaml records every setting of its command): another command's run, or a file "
                          f"of yours (a preset kept there? keep it under another name). Starting here would "
                          f"overwrite it and the metrics.jsonl beside it; choose another --out")


def check_resume(saved_file: Path, config: dict[str, Any]) -> list[str]:
    """Compare this run's settings with the ones recorded beside the checkpoint it resumes.

    Returns the allowed changes (``"optim.epochs: 4 -> 8"``) for the log; raises on any other change."""
    if not saved_file.is_file():
        return []
    try:
        saved = _flat(recorded(yaml.safe_load(saved_file.read_text()) or {}))
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise MaelabError(f"cannot read {saved_file} to check the resumed run's settings: {e}") from None
    now = _flat(recorded(config))
    if saved.get("data.val_data") == "" and now.get("data.val_data") and saved.get("data.data"):
        # recorded before the folder found beside --data was written down: the one the rule of then found
        found = default_val_dir(saved["data.data"], LEGACY_VAL_NAMES)
        saved["data.val_data"] = str(found.resolve()) if found is not None else now["data.val_data"]
    if len(extra := sorted(set(saved) - set(now))) >= 2:  # settings this command does not have: another command's
        # run, found in --out or named by --resume
        raise MaelabError(f"{saved_file.parent} holds a run of another command (its config.yaml has settings this "
                          f"command does not: {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); a run "
                          f"resumes only with the command that started it: choose another --out, or a --resume "
                          f"of this command's runs")
    changed = [(k, saved[k], now[k]) for k in now if k in saved and not _same(k, saved[k], now[k])]
    refused = [c for c in changed if c[0] not in MAY_CHANGE]
    if refused:
        listed = "; ".join(f"--{k.split('.', 1)[1].replace('_', '-')} {new!r} (the run has {old!r})"
                           for k, old, new in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise MaelabError(
            f"cannot resume {saved_file.parent} with changed settings: {listed}{more}. Resume with the run's "
            f"own settings (see {saved_file}), or start a new run with another --out")
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changed]
