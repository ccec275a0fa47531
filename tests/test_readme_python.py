"""The README's Python block runs as written: it is the first code a library user copies, and nothing
else would notice a renamed function or a changed return value in it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_the_readmes_python_block_runs_as_written_in_a_folder_holding_what_it_names(cifar_tiny, tmp_path,
                                                                                    monkeypatch):
    from maelab.cli import main

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python block; test any new one here too"
    run = tmp_path / "runs" / "quickstart"  # a real (tiny) run folder, as the block's comment says
    assert main(["pretrain", "--data", str(cifar_tiny), "--out", str(run), "--model", "mae_vit_tiny_patch4",
                 "--decoder-depth", "1", "--epochs", "1", "--batch-size", "16", "--vis-every", "0",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    pictures = sorted(p for p in cifar_tiny.rglob("*") if p.is_file())
    shutil.copy(pictures[0], tmp_path / "a.jpg")
    shutil.copy(pictures[1], tmp_path / "b.png")  # a JPEG named .png: the decoder goes by content
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), names)
    assert names["loss"].ndim == 0 and names["pred"].shape == (8, 64, 48) and names["mask"].shape == (8, 64)
    assert len(names["model"].decoder_blocks) == 1  # the run's decoder (the preset has 4): the run was loaded
    assert names["tokens"].shape == (2, 65, 192) and torch.isfinite(names["tokens"]).all()
    assert names["pictures"]["reconstruction"].shape == (2, 3, 32, 32)
    assert (tmp_path / "vit_tiny.safetensors").stat().st_size > 1_000_000
