"""Under ``--bad-files skip`` nothing stops a run over a file that passes the quick probe but fails to
decode (a JPEG truncated inside its image data): pictures, the kNN monitor and evaluation splits
name it and leave it out."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.data.folders import check_readable, open_rgb, scan_images, spread_sample
from maelab.errors import MaelabError
from maelab.evaluate.features import EvalSplit

REPO = Path(__file__).resolve().parents[1]


def truncated_jpeg(path: Path, seed: int = 0, keep: float = 0.85) -> None:
    """A 32x32 JPEG cut inside its entropy-coded data: the header is whole, the pixels are not."""
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * keep)])


def folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:03d}.png")
    truncated_jpeg(root / "c0" / "000.jpg")  # sorts first: the image the pictures pick for class c0
    return root


def test_a_truncated_jpeg_passes_the_probe_but_not_the_decoder(tmp_path):
    bad = tmp_path / "bad.jpg"
    truncated_jpeg(bad)
    assert check_readable([str(bad)]) == [0]  # the case this file is about
    with pytest.raises(MaelabError, match="bad.jpg"):
        open_rgb(bad)


def test_pictures_leave_out_an_image_that_does_not_decode(tmp_path):
    images = scan_images(folder(tmp_path / "data"))
    bad = str(tmp_path / "data" / "c0" / "000.jpg")
    assert bad in spread_sample(images, 4)  # with the error policy the file is kept (and named when it fails)
    with pytest.warns(UserWarning, match="000.jpg"):
        chosen = spread_sample(images, 4, "skip")
    assert bad not in chosen and len(chosen) == 4


@pytest.mark.parametrize("in_memory", [True, False])
def test_evaluation_splits_leave_out_an_image_that_does_not_decode(tmp_path, in_memory):
    images = scan_images(folder(tmp_path / "data"))
    with pytest.raises(Exception, match="000.jpg|unreadable"):
        split = EvalSplit(images, (32, 32), 8, in_memory, bad_files="error")
        list(split.batches(torch.device("cpu")))
    with pytest.warns(UserWarning, match="000.jpg|unreadable"):
        split = EvalSplit(images, (32, 32), 8, in_memory, bad_files="skip")
        rows = list(split.batches(torch.device("cpu")))
    index = torch.cat([i for _, _, i in rows])
    assert len(index) == len(images) - 1 and 0 not in index.tolist()
    assert sum(x.shape[0] for x, _, _ in rows) == len(images) - 1
    assert torch.equal(torch.cat([y for _, y, _ in rows]), torch.tensor(images.labels)[index])


def test_pretrain_with_skip_finishes_despite_a_file_that_fails_at_decode(tmp_path):
    data = folder(tmp_path / "ds" / "train")
    folder(tmp_path / "ds" / "val")  # held-out images for the kNN monitor, with its own bad file
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "maelab.cli", "pretrain", "--data", str(data), "--model", "mae_vit_tiny_patch4",
           "--decoder-depth", "1", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
           "--bad-files", "skip", "--knn-every", "1", "--out", str(tmp_path / "run"), "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "reconstruction.png").is_file()
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001").is_dir()
    assert "000.jpg" in out.stderr  # named, not silently dropped
