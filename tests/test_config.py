"""Typed config: defaults < YAML preset < flags; every field is a flag; bad values are clear errors."""

from __future__ import annotations

import argparse

import pytest

from maelab import MaelabError
from maelab.config import PretrainConfig, add_config_args, build_config, config_from_args, resolve_preset


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


def test_shipped_presets_load():
    for name in ("pretrain_cifar10_tiny", "pretrain_vit_base"):
        cfg = build_config(PretrainConfig, yaml_path=name)
        assert cfg.model.model.startswith("mae_vit")
