"""Typed config: defaults < YAML preset < flags; every field is a flag; bad values are clear errors."""

from __future__ import annotations

import argparse

import pytest

from maelab import MaelabError
from maelab.commands.options.pretrain import PretrainConfig
from maelab.config import CONFIG_DIR, add_config_args, build_config, config_from_args, resolve_preset


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, PretrainConfig)
    return config_from_args(PretrainConfig, p.parse_args(argv))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\noptim:\n  base_lr: 0.001\nmodel:\n  mask_ratio: 0.8\n")
    cfg = _parse(["--config", str(y), "--epochs", "3", "--no-norm-pix-loss", "--img-size", "32", "64"])
    assert cfg.optim.epochs == 3 and cfg.optim.base_lr == 0.001 and cfg.model.mask_ratio == 0.8
    assert cfg.model.norm_pix_loss is False and cfg.model.img_size == [32, 64]
    assert cfg.data.batch_size == PretrainConfig().data.batch_size


def test_every_field_is_a_documented_flag():
    p = argparse.ArgumentParser()
    add_config_args(p, PretrainConfig)
    text = p.format_help()
    cfg = PretrainConfig()
    for section in (cfg.model, cfg.data, cfg.optim, cfg.run):
        for name in vars(section):
            assert "--" + name.replace("_", "-") in text, name


def test_unknown_field_and_bad_type_are_clear_errors(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("epoch: 3\n")
    with pytest.raises(MaelabError, match="unknown config field 'epoch'"):
        build_config(PretrainConfig, yaml_path=str(y))
    with pytest.raises(MaelabError, match="epochs"):
        build_config(PretrainConfig, {"epochs": "ten"})
    with pytest.raises(MaelabError, match="not found"):
        resolve_preset("no_such_preset")


@pytest.mark.parametrize("text,message", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "cannot read config .*: the key 'lr' is given twice"),  # YAML keeps the last
    ("lr: 0.1\noptim:\n  lr: 0.2\n", "config field 'lr' is given twice in .*: keep one"),
    ("optim:\n  epochs: 2\noptim:\n  base_lr: 0.1\n", "the key 'optim' is given twice"),
    ("? [a, b]\n: 1\n", "cannot read config .*: line 1, column 3: found unhashable key"),
    ("model: {model: mae\n  bad: [\n", "cannot read config .*: line 2, column 6: expected ',' or '}', but got ':'; "
                                        "while parsing a flow mapping"),  # where, and what (its first line said neither)  # the check meets no unhashable key
])
def test_a_setting_given_twice_is_refused_not_left_to_the_last_line(tmp_path, text, message):
    y = tmp_path / "twice.yaml"
    y.write_text(text)
    with pytest.raises(MaelabError, match=message):
        build_config(PretrainConfig, yaml_path=str(y))


@pytest.mark.parametrize("text,message", [
    ("data:\n  batch_size: true\n", "batch_size: cannot read True as int"),  # Python's bool is an int: batch 1
    ("optim:\n  base_lr: false\n", "base_lr: cannot read False as float"),
    ("run:\n  out: [a, b]\n", "out: cannot read ['a', 'b'] as str"),
    ("model:\n  img_size: [32, yes]\n", "img_size: cannot read [32, True] as a list of int"),
    ("epochs: 1.5\n", "epochs: cannot read 1.5 as int"),
    ("optim:\n  base_lr: .nan\n", "base_lr must be a number, got nan"),  # it passed range checks written "x <= 0"
])
def test_yaml_values_of_another_kind_are_refused_not_converted(tmp_path, text, message):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(MaelabError) as refused:
        build_config(PretrainConfig, yaml_path=str(y))
    assert message in str(refused.value)


def test_a_bad_preset_value_is_refused_even_where_a_flag_overrides_it(tmp_path):
    """`batch_size: ten` in a preset went unnoticed as long as --batch-size was given: the preset stayed broken
    for its next use. The error names the file."""
    y = tmp_path / "p.yaml"
    y.write_text("data:\n  batch_size: ten\n")
    with pytest.raises(MaelabError, match=f"batch_size: cannot read 'ten' as int \\(in {y}\\)"):
        build_config(PretrainConfig, {"batch_size": 2}, str(y))



def test_a_config_folder_is_said_to_be_a_folder(tmp_path, monkeypatch):
    with pytest.raises(MaelabError, match="is a folder: give a YAML file"):  # it said "not found"
        build_config(PretrainConfig, yaml_path=str(tmp_path))
    (tmp_path / "pretrain_cifar10_tiny").mkdir()  # a run folder named like a preset (--out pretrain_cifar10_tiny)
    monkeypatch.chdir(tmp_path)
    assert build_config(PretrainConfig, yaml_path="pretrain_cifar10_tiny").model.model == "mae_vit_tiny_patch4"
    with pytest.raises(MaelabError, match="--mask-ratio must be a number, got nan"):  # a flag's NaN alike, named as typed
        build_config(PretrainConfig, {"mask_ratio": "nan"})


def test_a_config_that_is_not_text_is_a_clear_error(tmp_path):
    y = tmp_path / "binary.yaml"
    y.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(MaelabError, match=f"cannot read config {y}: 'utf-8' codec can't decode"):
        build_config(PretrainConfig, yaml_path=str(y))


def test_shipped_presets_load():
    for name in ("pretrain_cifar10_tiny", "pretrain_vit_base"):
        cfg = build_config(PretrainConfig, yaml_path=name)
        assert cfg.model.model.startswith("mae_vit")


def _command_configs() -> dict[str, type]:
    from maelab.commands.options.detect import DetectTrainConfig
    from maelab.commands.options.finetune import FinetuneConfig
    from maelab.commands.options.linprobe import LinprobeConfig
    from maelab.commands.options.recipe import RecipeConfig
    from maelab.commands.options.segment import TrainConfig as SegmentTrainConfig
    return {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig,
            "recipe": RecipeConfig, "detect": DetectTrainConfig, "segment": SegmentTrainConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_builds_against_its_command(path):
    """A typo in a preset that only a GPU session runs (recipe_full) must fail here, not after the
    machine is lent; a recipe's step presets must exist and build against their own commands."""
    commands = _command_configs()
    cfg = build_config(commands[path.stem.split("_")[0]], yaml_path=path.stem)
    if path.stem.startswith("recipe_"):
        for step in ("pretrain", "probe", "finetune"):
            preset = getattr(cfg.steps, f"{step}_preset")
            command = "linprobe" if step == "probe" else step
            assert preset.startswith(command + "_")
            build_config(commands[command], yaml_path=preset)


# --- check_schedule / check_augment: the optimizer and augmentation numbers every command shares -------
from maelab.commands.finetune import check_augment  # noqa: E402
from maelab.commands.options.features import FeaturesConfig  # noqa: E402
from maelab.commands.options.finetune import AugmentConfig, FinetuneOptimConfig  # noqa: E402
from maelab.commands.options.linprobe import ProbeOptimConfig  # noqa: E402
from maelab.commands.options.sections import OptimConfig, check_schedule  # noqa: E402


@pytest.mark.parametrize("section", [OptimConfig, FinetuneOptimConfig, ProbeOptimConfig])
def test_default_optimizer_sections_pass_the_schedule_check(section):
    check_schedule(section())
    check_schedule(section(), batch_size=128)


@pytest.mark.parametrize("section,kw,message", [
    (OptimConfig, dict(clip_grad=-1.0), "--clip-grad must be positive, got -1.0"),
    (OptimConfig, dict(clip_grad=0.0), "--clip-grad must be positive"),
    (OptimConfig, dict(weight_decay=-1.0), "--weight-decay must be >= 0, got -1.0"),
    (OptimConfig, dict(warmup_epochs=-1.0), "--warmup-epochs must be >= 0, got -1.0"),
    (OptimConfig, dict(lr=-1.0), "--lr must be positive, got -1.0"),
    (OptimConfig, dict(lr=0.0), "--lr must be positive"),
    (OptimConfig, dict(base_lr=0.0), "--base-lr must be positive, got 0.0"),
    (OptimConfig, dict(base_lr=-1e-3), "--base-lr must be positive"),
    (OptimConfig, dict(min_lr=-1e-6), "--min-lr must be >= 0"),
    (OptimConfig, dict(lr=1e-4, min_lr=1e-3), "--min-lr 0.001 is larger than the learning rate 0.0001"),
    (OptimConfig, dict(betas=[0.9, 1.0]), "--betas must both be in [0, 1), got [0.9, 1.0]"),
    (OptimConfig, dict(betas=[-0.1, 0.9]), "--betas must both be in [0, 1)"),
    (OptimConfig, dict(betas=[0.9]), "--betas takes two numbers"),
    (OptimConfig, dict(epochs=0), "--epochs must be at least 1, got 0"),
    (OptimConfig, dict(accum_iter=0), "--accum-iter must be at least 1, got 0"),
    (OptimConfig, dict(lr=float("nan")), "--lr must be a finite number"),
    (FinetuneOptimConfig, dict(betas=[0.9, 1.5]), "--betas must both be in [0, 1)"),
    (ProbeOptimConfig, dict(momentum=1.0), "--momentum must be in [0, 1), got 1.0"),
    (ProbeOptimConfig, dict(weight_decay=-0.1), "--weight-decay must be >= 0"),
])
def test_bad_optimizer_settings_name_their_flag(section, kw, message):
    with pytest.raises(MaelabError) as e:
        check_schedule(section(**kw))
    assert message in str(e.value)


def test_min_lr_is_checked_against_the_scaled_base_lr_when_the_batch_is_known(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = OptimConfig(base_lr=1e-3, min_lr=1e-3, accum_iter=2)
    check_schedule(cfg)  # the learning rate is not known without the batch
    check_schedule(cfg, batch_size=128)  # lr = 1e-3 x 256 / 256 = min_lr: a constant schedule is fine
    with pytest.raises(MaelabError, match=r"--min-lr 0.001 is larger than the learning rate 0.0005 \(--base-lr "
                                          r"0.001 x 128 images per step / 256\)"):
        check_schedule(cfg, batch_size=64)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: every process adds its batch
    check_schedule(cfg, batch_size=64)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n2", "augmix-m5-w4-d2", "original",
                                    "v0r", "original-mstd0.5", "none", "None", None, ""])
def test_timm_augmentation_policies_pass(policy):
    check_augment(AugmentConfig(auto_augment=policy))


@pytest.mark.parametrize("policy", ["bogus", "random", "rand-x9", "rand-m9x", "augmix-q3", "original-q1"])
def test_unknown_augmentation_policy_is_a_clear_error_with_examples(policy):
    with pytest.raises(MaelabError) as e:
        check_augment(AugmentConfig(auto_augment=policy))
    msg = str(e.value)
    assert f"--auto-augment {policy!r} is not a timm augmentation policy" in msg and "rand-m9-mstd0.5-inc1" in msg


def _help(cls) -> str:
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return " ".join(p.format_help().split())


def test_help_texts_say_what_is_accepted():
    text = _help(PretrainConfig)
    assert "fraction of patches removed, in (0, 1)" in text  # --mask-ratio 0 masks nothing: refused
    assert "--limit-images" not in _help(FeaturesConfig)  # features has no subsets to seed


def test_every_choice_a_flag_offers_has_its_implementation():
    """A flag's choices live in maelab.choices (no torch, so --help is instant); the code that runs them is
    elsewhere and must take every one of them, and only those."""
    from maelab.choices import CROPS, LR_SCHEDULES, POOLS
    from maelab.data.transforms import crop_range
    from maelab.models.vit import check_pool
    from maelab.train.optim import SCHEDULES

    assert tuple(SCHEDULES) == LR_SCHEDULES
    for crop in CROPS:
        crop_range(crop, 0.2, 32, 32)
    for pool in POOLS:
        check_pool(pool)
    with pytest.raises(ValueError):
        crop_range("center", 0.2, 32, 32)
    with pytest.raises(MaelabError):
        check_pool("max")


@pytest.mark.parametrize("args", [["pretrain", "--data", "d", "--seed", str(2**64)],
                                  ["pretrain", "--data", "d", "--seed", "-1"],
                                  ["knn", "--data", "d", "--subset-seed", str(2**63)],
                                  ["ablate", "--data", "d", "--setting", "mask-ratio", "--values", "0.5",
                                   "--seeds", "0", str(2**64)],
                                  ["visualize", "--checkpoint", "c", "--images", "i.png", "--seed", "-5"],
                                  ["shards", "make", "--data", "d", "--out", "o", "--seed", str(2**64)]])
def test_a_seed_out_of_torchs_range_is_refused_naming_the_flag(args, capsys, tmp_path, monkeypatch):
    """2**64 ended in torch's bare OverflowError (ablate: after the earlier seeds had spent their budgets), and
    -1 silently gave the run of 2**64 - 1."""
    from maelab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    flag = next(a for a in args if "seed" in a)
    assert f"maelab: error: {flag} must be a whole number from 0 to 2**63 - 1" in err and "Traceback" not in err, err
