"""The Python blocks of the README and docs run as written: they are the first code a library user
copies, and nothing else would notice a renamed function or a changed return value in them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(REPO).as_posix(), i, code) for page in PAGES
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


@pytest.fixture(scope="module")
def workspace(cifar_tiny, tmp_path_factory) -> Path:
    """A checkout-like folder holding what the blocks name: a trained run (`runs/quickstart`,
    `runs/cifar10_tiny`), two pictures, an official-layout MAE file, and `../shared/datasets/cifar10/test`."""
    from maelab.cli import main
    from maelab.interop import export_official, load_mae

    root = tmp_path_factory.mktemp("workspace")
    here = root / "main"
    run = here / "runs" / "quickstart"
    assert main(["pretrain", "--data", str(cifar_tiny), "--out", str(run), "--model", "mae_vit_tiny_patch4",
                 "--decoder-depth", "1", "--epochs", "1", "--batch-size", "16", "--vis-every", "0",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    shutil.copytree(run, here / "runs" / "cifar10_tiny")
    pictures = sorted(p for p in cifar_tiny.rglob("*") if p.is_file())
    shutil.copy(pictures[0], here / "a.jpg")
    shutil.copy(pictures[1], here / "b.png")  # a JPEG named .png: the decoder goes by content
    # a small model under the release's file name: the architecture is read from the shapes either way
    export_official(load_mae(run)[0], here / "mae_visualize_vit_large.pth")
    (root / "shared" / "datasets" / "cifar10").mkdir(parents=True)
    (root / "shared" / "datasets" / "cifar10" / "test").symlink_to(cifar_tiny)
    return here


def test_the_readme_and_the_docs_have_python_blocks():
    assert {page for page, _, _ in BLOCKS} >= {"README.md", "docs/evaluation.md", "docs/interop.md"}


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{p}:{i}" for p, i, _ in BLOCKS])
def test_a_python_block_runs_as_written(workspace, monkeypatch, page, index, code):
    monkeypatch.chdir(workspace)
    names: dict = {}
    exec(compile(code, page, "exec"), names)
    if page == "README.md":
        assert names["loss"].ndim == 0 and names["pred"].shape == (8, 64, 48) and names["mask"].shape == (8, 64)
        assert len(names["model"].decoder_blocks) == 1  # the run's decoder (the preset has 4): the run was loaded
        assert names["tokens"].shape == (2, 65, 192) and torch.isfinite(names["tokens"]).all()
        assert names["pictures"]["reconstruction"].shape == (2, 3, 32, 32)
        assert (workspace / "vit_tiny.safetensors").stat().st_size > 1_000_000
    elif page == "docs/evaluation.md":
        assert names["feats"].shape == (64, 192) and len(names["labels"]) == 64
    elif page == "docs/interop.md":
        assert (workspace / "vit_l.safetensors").is_file() and (workspace / "hf_dir" / "config.json").is_file()
