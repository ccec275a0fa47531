"""The installed package works on its own: a wheel built from the repository, installed into an empty
folder, lists its models and finds its presets (shipped inside the package, not read from configs/)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--disable-pip-version-check", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("maelab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "maelab/configs/pretrain_cifar10_tiny.yaml" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return target


def run_installed(target: Path, cwd: Path, *code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_wheel_is_used_not_the_source_tree(installed, tmp_path):
    out = run_installed(installed, tmp_path, "-c", "import maelab; print(maelab.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(installed)


def test_installed_console_script_lists_models_and_pretrain_help(installed, tmp_path):
    script = installed / "bin" / "maelab"  # the console script the wheel installs
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    for argv, expect in ((["models"], "mae_vit_tiny_patch4"),
                         (["pretrain", "--config", "pretrain_cifar10_tiny", "--help"], "--mask-ratio")):
        out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=300)
        assert out.returncode == 0 and expect in out.stdout, out.stderr


def test_installed_presets_ship_inside_the_package(installed, tmp_path):
    code = ("from maelab.commands.pretrain import PretrainConfig; from maelab.config import build_config, resolve_preset; "
            "print(resolve_preset('pretrain_cifar10_tiny')); "
            "print(build_config(PretrainConfig, yaml_path='pretrain_cifar10_tiny').model.model)")
    out = run_installed(installed, tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr
    preset, model = out.stdout.split()
    assert Path(preset).is_relative_to(installed) and model.startswith("mae_vit_tiny")
