"""Semantic segmentation: data and labels, joint augmentation, metrics, the UPerNet model, inference,
pictures, and a tiny `maelab segment train -> eval -> predict` run with resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.cli import main
from maelab.commands.options.segment import TrainConfig
from maelab.commands.segment import validate_train
from maelab.config import build_config
from maelab.data.segmentation import (IGNORE, SPECS, SegAugment, SegTrainTransform, label_spec, load_pair, read_label,
                                      scan_segmentation)
from maelab.errors import MaelabError
from maelab.evaluate.segmentation import confusion_matrix, segmentation_metrics
from maelab.interop.mae_weights import save_mae
from maelab.io import read_weights
from maelab.models.mae import MaskedAutoencoder
from maelab.train.checkpoint import resolve_weights_path
from maelab.transfer.backbone import ViTBackbone
from maelab.transfer.segment import UPerNetSegmenter, pixel_loss, predict_logits
from maelab.viz.segmentation import palette, save_segmentation_figure

from conftest import REPO, TINY_MAE, count_calls, record_plans

CAMVID = Path(os.environ.get("MAELAB_CAMVID", REPO.parent / "shared" / "datasets" / "camvid"))
ARCH = dict(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, label: np.ndarray, layout: str = "camvid"):
    img_dir, lab_dir = ((root / split / "images", root / split / "labels") if layout == "camvid"
                        else (root / "images" / split, root / "annotations" / split))
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_dir / f"{stem}.jpg", quality=95)
    Image.fromarray(label).save(lab_dir / f"{stem}.png")


def synthetic(root: Path, n_train: int = 4, n_val: int = 2, size=(48, 64), layout: str = "camvid") -> Path:
    """Images whose label is readable from the colour: left half class a, right half class b."""
    rng = np.random.default_rng(0)
    splits = ("train", "val") if layout == "camvid" else ("training", "validation")
    for split, n in zip(splits, (n_train, n_val)):
        for i in range(n):
            h, w = size
            label = np.zeros((h, w), np.uint8)
            label[:, w // 2:] = 3
            label[: h // 4] = 11 if layout == "camvid" else 0  # void / "other" band
            if layout != "camvid":
                label[label == 3] = 4
                label[h // 4:, : w // 2] = 1
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = np.where(label == label[-1, 0], 220, 30)
            img[..., 2] = np.where(label == label[-1, -1], 220, 30)
            img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
            write_pair(root, split, f"img{i:03d}", img, label, layout)
    return root


@pytest.fixture
def camvid_tiny(tmp_path) -> Path:
    """4 train / 2 val CamVid images (symlinks into ../shared), synthetic when CamVid is absent."""
    root = tmp_path / "camvid"
    if not (CAMVID / "train" / "images").is_dir():
        return synthetic(root)
    for split, n in (("train", 4), ("val", 2)):
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True)
        for name in sorted(os.listdir(CAMVID / split / "images"))[:n]:
            stem = Path(name).stem
            (root / split / "images" / name).symlink_to(CAMVID / split / "images" / name)
            (root / split / "labels" / f"{stem}.png").symlink_to(CAMVID / split / "labels" / f"{stem}.png")
    return root


# --- data ------------------------------------------------------------------------------------------
def test_camvid_and_ade20k_layouts_and_label_meanings(tmp_path):
    cam = scan_segmentation(synthetic(tmp_path / "c"), "train", SPECS["camvid"])
    _, target = load_pair(cam, 0)
    assert set(torch.unique(target).tolist()) == {0, 3, IGNORE}  # 11 = void -> ignored
    ade = scan_segmentation(synthetic(tmp_path / "a", layout="ade20k"), "training", SPECS["ade20k"])
    _, target = load_pair(ade, 0)
    assert set(torch.unique(target).tolist()) == {0, 3, IGNORE}  # 0 -> ignored, 1 -> 0, 4 -> 3
    assert SPECS["ade20k"].num_classes == 150 and SPECS["camvid"].num_classes == 11


def test_16_bit_labels_of_many_classes_keep_class_255(tmp_path):
    """With more than 255 classes, raw value 255 is a class: the ignore value must never be one."""
    raw = np.zeros((4, 6), np.uint16)
    raw[:2] = 255
    raw[3, 5] = 299
    Image.fromarray(raw).save(tmp_path / "l.png")
    target = read_label(str(tmp_path / "l.png"), label_spec("custom", 300))
    assert (target[:2] == 255).all() and target[3, 5] == 299 and (target != IGNORE).all()
    conf = confusion_matrix(torch.from_numpy(target), torch.from_numpy(target), 300, IGNORE)
    assert int(conf[255, 255]) == 12 and int(conf.sum()) == 24
    ignored = read_label(str(tmp_path / "l.png"), label_spec("custom", 256, 299))
    assert ignored[3, 5] == IGNORE and (ignored[:2] == 255).all()


def test_two_images_of_one_stem_are_refused(tmp_path):
    data = synthetic(tmp_path / "seg")
    first = sorted((data / "train" / "images").iterdir())[0]
    Image.open(first).save(first.with_suffix(".jpg" if first.suffix != ".jpg" else ".png"))
    with pytest.raises(MaelabError, match=rf"holds .* and .*: images and labels are paired by file name"):
        scan_segmentation(data, "train", SPECS["camvid"])


def test_2_and_4_bit_grayscale_labels_keep_their_values(tmp_path):
    """Pillow reads a 2- / 4-bit grayscale PNG scaled to 8 bits (x85 / x17): class 1 came out as 85,
    refused as outside the classes, or taken as class 85 / 17 by a spec with that many."""
    import struct
    import zlib

    def gray_png(path, arr, bits):
        rows = []
        for row in arr:
            packed = "".join(format(int(v), f"0{bits}b") for v in row)
            packed += "0" * (-len(packed) % 8)
            rows.append(b"\x00" + int(packed, 2).to_bytes(len(packed) // 8, "big"))
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        h, w = arr.shape
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 0, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))

    for bits in (2, 4):
        arr = np.arange(8 * 16).reshape(8, 16) % (2**bits)
        gray_png(tmp_path / f"l{bits}.png", arr, bits)
        assert read_label(str(tmp_path / f"l{bits}.png"), label_spec("custom", 300)).tolist() == arr.tolist()


def test_bad_labels_give_clear_errors(tmp_path):
    root = synthetic(tmp_path / "d", n_train=2, n_val=1)
    items = scan_segmentation(root, "train", SPECS["camvid"])
    bad = np.full((48, 64), 12, np.uint8)  # CamVid takes 0..11
    Image.fromarray(bad).save(items.labels[0])
    with pytest.raises(MaelabError, match="value.*12.*camvid labels take 0..10"):
        load_pair(items, 0)
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(items.labels[1])
    with pytest.raises(MaelabError, match="labels must have the size of their image"):
        scan_segmentation(root, "train", SPECS["camvid"])
    with pytest.raises(MaelabError, match="is 64x40 but its image is 64x48"):
        read_label(items.labels[1], SPECS["camvid"], (48, 64))
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(items.labels[1])
    with pytest.raises(MaelabError, match="single-channel"):
        read_label(items.labels[1], SPECS["camvid"])
    binary = np.zeros((48, 64), bool)
    binary[10:20, 5:9] = True
    Image.fromarray(binary).convert("1").save(items.labels[1])  # a 1-bit mask is single-channel: classes 0, 1
    assert read_label(items.labels[1], SPECS["camvid"]).tolist() == binary.astype(np.int64).tolist()
    os.remove(items.labels[1])
    with pytest.raises(MaelabError, match="1 image.*have no label PNG.*img001"):
        scan_segmentation(root, "train", SPECS["camvid"])
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(Path(items.labels[1]).with_suffix(".jpg"))
    with pytest.raises(MaelabError, match=r"holds img001\.jpg: labels are read from PNG files only, as a JPEG's"):
        scan_segmentation(root, "train", SPECS["camvid"])
    Path(items.labels[1]).with_suffix(".jpg").rename(Path(items.labels[1]).with_suffix(".tif"))
    with pytest.raises(MaelabError, match=r"holds img001\.tif: labels are read from PNG files only\)?$"):
        scan_segmentation(root, "train", SPECS["camvid"])
    with pytest.raises(MaelabError, match="has no split 'test'"):
        scan_segmentation(root, "test", SPECS["camvid"])
    with pytest.raises(MaelabError, match="--num-classes"):
        label_spec("custom")
    # with a named dataset they were recorded and did nothing (CamVid's 11 classes trained)
    with pytest.raises(MaelabError, match=r"--num-classes 0: camvid's classes are fixed \(11\)"):
        label_spec("camvid", 0)
    with pytest.raises(MaelabError, match="--ignore-value 300: ade20k's classes are fixed"):
        label_spec("ade20k", None, 300)


def test_joint_augmentation_keeps_image_and_mask_aligned(tmp_path):
    items = scan_segmentation(synthetic(tmp_path / "j", n_train=1, n_val=1, size=(60, 80)), "train", SPECS["camvid"])
    img, target = load_pair(items, 0)
    t = SegTrainTransform(SegAugment((32, 48), base_size=40, ratio_range=(0.5, 2.0), photometric=False))
    for seed in range(6):
        g = torch.Generator()
        g.manual_seed(seed)
        x, y = t(img, target, g)
        assert x.shape == (3, 32, 48) and y.shape == (32, 48) and y.dtype == torch.long
        red = x[0] > x[2] + 1.0  # red pixels are class 0, blue pixels class 3
        blue = x[2] > x[0] + 1.0
        assert (y[red & (y != IGNORE)] == 0).float().mean() > 0.95
        assert (y[blue & (y != IGNORE)] == 3).float().mean() > 0.95
    g1, g2 = torch.Generator(), torch.Generator()
    g1.manual_seed(3)
    g2.manual_seed(3)
    a, b = SegTrainTransform(SegAugment((32, 48), 40))(img, target, g1), SegTrainTransform(SegAugment((32, 48), 40))(img, target, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a pure function of the seed (exact resume)


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_against_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 4, IGNORE)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    # IoU: a 1/(2+2-1)=1/3, b 2/(3+3-2)=1/2, c 1/(2+2-1)=1/3, d absent (left out of the mean)
    assert m["val_mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["val_mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m["val_aAcc"] == pytest.approx(100 * 4 / 7)
    assert m["val_per_class"]["d"] == {"iou": None, "acc": None}
    assert m["val_per_class"]["b"]["iou"] == pytest.approx(50.0)
    # a class predicted but never present has IoU 0 and counts in the mean; its accuracy is undefined
    m2 = segmentation_metrics(torch.tensor([[3, 1], [0, 0]]))
    assert m2["val_mIoU"] == pytest.approx(100 * (3 / 4 + 0) / 2) and m2["val_mAcc"] == pytest.approx(75.0)
    perfect = segmentation_metrics(confusion_matrix(target.clamp(max=2), target.clamp(max=2), 3, IGNORE))
    assert perfect["val_mIoU"] == 100.0 and perfect["val_aAcc"] == 100.0


# --- model and inference ---------------------------------------------------------------------------
def tiny_segmenter(num_classes: int = 4, **kw) -> UPerNetSegmenter:
    torch.manual_seed(0)
    return UPerNetSegmenter(ViTBackbone(None, ARCH, 32, **kw), num_classes, channels=16)


def test_loss_decreases_on_a_fixed_batch():
    model = tiny_segmenter()
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 4, (4, 4, 4), generator=g)  # one class per 8x8 block, coded in its colour
    y = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]])
    x = colours[y].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 3, 32, 32, generator=g)
    y[:, :4] = IGNORE
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        logits, aux = model(x, aux=True)
        assert logits.shape == aux.shape == (4, 4, 32, 32)
        loss = pixel_loss(logits, y) + 0.4 * pixel_loss(aux, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert float(pixel_loss(logits.detach(), torch.full_like(y, IGNORE))) == 0.0  # all ignored: 0, not NaN


def test_whole_and_sliding_window_inference():
    model = tiny_segmenter().eval()
    x = torch.randn(1, 3, 40, 56)  # not a multiple of the patch: padded, then cropped back
    whole = predict_logits(model, x, "whole")
    assert whole.shape == (1, 4, 40, 56)
    slide = predict_logits(model, x, "slide", crop=(32, 32), stride=(16, 16))
    assert slide.shape == (1, 4, 40, 56) and torch.isfinite(slide).all()
    one = predict_logits(model, x[..., :32, :32], "slide", crop=(32, 32), stride=(16, 16))
    assert torch.allclose(one, predict_logits(model, x[..., :32, :32], "whole"), atol=1e-5)  # one window = whole
    with pytest.raises(MaelabError, match="inference mode"):
        predict_logits(model, x, "tiles")
    strip = predict_logits(model, torch.randn(1, 3, 1, 128), "whole")  # thinner than the stride-32 level: padded
    assert strip.shape == (1, 4, 1, 128) and torch.isfinite(strip).all()


def test_drawing_writes_a_png_with_fixed_colours(tmp_path):
    img = np.zeros((24, 32, 3), np.uint8)
    pred = np.zeros((24, 32), np.int64)
    pred[:, 16:] = 2
    target = pred.copy()
    target[:4] = IGNORE
    path = save_segmentation_figure(tmp_path / "s.png", [img], [pred], [target], ["a", "b", "c"], ["x.jpg"])
    assert path.is_file() and Image.open(path).size[0] > 100
    assert (palette(150).sum(1) > 0).all() and len({tuple(c) for c in palette(150)}) == 150
    assert np.array_equal(palette(11), palette(11))


# --- the command -----------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_train_eval_predict_with_resume(capsys, tmp_path, camvid_tiny):
    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    run_dir = tmp_path / "run"
    common = ["segment", "train", "--data", str(camvid_tiny), "--init", str(mae), "--img-size", "32", "64",
              "--batch-size", "2", "--decoder-channels", "16", "--num-workers", "0", "--out", str(run_dir),
              "--pictures", "1", "--warmup-epochs", "0"]
    code, out, err = run_cli(capsys, *common, "--epochs", "2", "--save-every", "1", "--keep", "0")
    assert code == 0, err
    assert "mIoU" in out
    straight, _ = read_weights(resolve_weights_path(run_dir))
    shutil.rmtree(run_dir / "checkpoints" / "epoch_0002")  # as if the run had stopped after epoch 1
    code, out, err = run_cli(capsys, *common, "--epochs", "2", "--save-every", "1", "--keep", "0")
    assert code == 0, err
    assert "resumed from" in out + err and "continuing at epoch 2" in out + err
    resumed, _ = read_weights(resolve_weights_path(run_dir))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # resume is exact
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2 and results["steps"] == 4 and len(results["epoch_mIoU"]) == 2  # both processes'
    code, out, err = run_cli(capsys, *common, "--epochs", "2", "--save-every", "1", "--keep", "0")  # finished: again
    assert code == 0 and json.loads((run_dir / "results.json").read_text())["epoch_mIoU"] == results["epoch_mIoU"]
    assert results["source"] == "maelab" and (run_dir / "segmentation.png").is_file()
    assert set(results["val_per_class"]) == set(SPECS["camvid"].classes)
    code, out, err = run_cli(capsys, "segment", "eval", "--checkpoint", str(run_dir), "--data", str(camvid_tiny),
                             "--out", str(tmp_path / "eval.json"))
    assert code == 0, err
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["val_mIoU"] == pytest.approx(results["val_mIoU"])  # the same model, split and inference
    code, out, err = run_cli(capsys, "segment", "eval", "--checkpoint", str(run_dir), "--data", str(camvid_tiny),
                             "--eval-mode", "slide", "--eval-stride", "16")
    assert code == 0, err
    images = camvid_tiny / "val" / "images"
    code, out, err = run_cli(capsys, "segment", "predict", "--checkpoint", str(run_dir), "--images", str(images),
                             "--labels", str(camvid_tiny / "val" / "labels"), "--out", str(tmp_path / "pred.png"))
    assert code == 0, err
    assert (tmp_path / "pred.png").is_file()
    masks = sorted((tmp_path / "pred_masks").iterdir())
    assert len(masks) == 2 and np.asarray(Image.open(masks[0])).max() < 11
    # images that share a name (x.jpg in two folders, y.jpg beside y.png) each keep their own mask
    first = sorted(images.iterdir())[0]
    for name in ("a/x.jpg", "b/x.jpg", "a/y.jpg", "a/y.png", "a/z.jpg"):
        (tmp_path / "same" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(first).save(tmp_path / "same" / name)
    code, out, err = run_cli(capsys, "segment", "predict", "--checkpoint", str(run_dir), "--images",
                             str(tmp_path / "same" / "a"), str(tmp_path / "same" / "b"), "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "s_masks").iterdir()) == \
        ["a_x.jpg.png", "a_y.jpg.png", "a_y.png.png", "b_x.jpg.png", "z.png"]
    assert "images that share a name have masks named <folder>_<file>.png" in out
    # --limit leaves images out with a word; masks of an earlier predict into the same --out are named, kept
    code, out, err = run_cli(capsys, "segment", "predict", "--checkpoint", str(run_dir), "--images",
                             str(tmp_path / "same" / "a"), "--limit", "2", "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert "maelab: warning: --images holds 4 images: only the first 2 are taken (files in the order given, a folder's images sorted; --limit 2" in err, err
    assert "s_masks also holds 5 mask(s) not of these images (a_x.jpg.png, a_y.jpg.png, a_y.png.png, ...)" in err, err
    assert sorted(p.name for p in (tmp_path / "s_masks").iterdir()) == \
        ["a_x.jpg.png", "a_y.jpg.png", "a_y.png.png", "b_x.jpg.png", "x.png", "y.png", "z.png"]
    # the picture is a PNG: a .jpg name held PNG bytes
    code, out, err = run_cli(capsys, "segment", "predict", "--checkpoint", str(run_dir), "--images", str(first),
                             "--out", str(tmp_path / "s.jpg"))
    assert code == 2 and "s.jpg: segment predict writes a PNG; name the file s.png" in err and not (tmp_path / "s.jpg").exists()


def test_a_bad_validation_label_after_training_an_epoch_keeps_that_epoch(capsys, tmp_path):
    """The validation labels are read at the first epoch's end: a bad one stops the run there, but the
    epoch's training is saved first, so the rerun after the fix goes on from it."""
    data = synthetic(tmp_path / "seg")
    bad = sorted((data / "val" / "labels").iterdir())[-1]
    good = bad.read_bytes()
    label = np.asarray(Image.open(bad)).copy()
    label[5, 5] = 40
    Image.fromarray(label).save(bad)
    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    cmd = ["segment", "train", "--data", str(data), "--init", str(mae), "--img-size", "32", "64", "--batch-size", "2",
           "--decoder-channels", "16", "--num-workers", "0", "--pictures", "0", "--epochs", "2",
           "--out", str(tmp_path / "run")]
    code, out, err = run_cli(capsys, *cmd)
    assert code == 2 and f"label {bad} holds value(s) [40]" in err, err
    assert "after epoch 1's training, which is saved to" in err and "run the same command again" in err
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001").is_dir()
    bad.write_bytes(good)
    code, out, err = run_cli(capsys, *cmd)
    assert code == 0 and "continuing at epoch 2" in out + err, err


def test_a_budget_run_times_the_evaluation_on_a_few_images(capsys, tmp_path, monkeypatch):
    """The plan's per-epoch evaluation time comes from 8 of the 20 validation images, spread over them; the
    epoch's evaluation still scores all 20."""
    from maelab.commands import segment

    data = synthetic(tmp_path / "seg", n_train=4, n_val=20)
    seen, planned = count_calls(monkeypatch, segment, "evaluate_segmenter"), record_plans(monkeypatch)
    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    code, out, err = run_cli(capsys, "segment", "train", "--data", str(data), "--init", str(mae), "--img-size", "32",
                             "64", "--batch-size", "2", "--decoder-channels", "16", "--num-workers", "0",
                             "--pictures", "0", "--budget", "10m", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert len(planned) == 1 and planned[0][0] > 0
    assert seen == [8, 20]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["val_images"] == 20


def test_segment_errors_are_one_line(capsys, tmp_path, camvid_tiny):
    code, _, err = run_cli(capsys, "segment", "train", "--data", str(camvid_tiny), "--init", "none", "--model",
                           "mae_vit_tiny_patch16", "--batch-size", "1", "--out", str(tmp_path / "r"))
    assert code == 2 and "--batch-size must be at least 2" in err
    code, _, err = run_cli(capsys, "segment", "eval", "--checkpoint", str(tmp_path / "nothing"), "--data",
                           str(camvid_tiny))
    assert code == 2 and "does not exist" in err
    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    code, _, err = run_cli(capsys, "segment", "eval", "--checkpoint", str(mae), "--data", str(camvid_tiny))
    assert code == 2 and "not a segmentation model" in err
    code, _, err = run_cli(capsys, "segment", "train", "--data", str(camvid_tiny), "--init", str(mae), "--img-size",
                           "16", "--batch-size", "2", "--out", str(tmp_path / "r"))  # the stride-32 level: 0 px
    assert code == 2 and "--img-size 16x16 is too small for the UPerNet pyramid: its stride-32 level needs" in err, err
    assert not (tmp_path / "r").exists()


def test_validating_on_the_training_split_is_warned_about(capsys, tmp_path, camvid_tiny):
    """`--val-split train` scored the images the model trained on without a word (as `--val-data` = `--data`
    of the classification commands is warned about)."""
    mae = save_mae(MaskedAutoencoder(**TINY_MAE), tmp_path / "mae.safetensors")
    code, _, err = run_cli(capsys, "segment", "train", "--data", str(camvid_tiny), "--init", str(mae), "--img-size",
                           "32", "64", "--batch-size", "2", "--decoder-channels", "16", "--num-workers", "0",
                           "--val-split", "train", "--epochs", "1", "--warmup-epochs", "0", "--pictures", "0",
                           "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "maelab: warning: the validation split" in err and "its mIoU says how well the training images" in err
    assert "(--train-split train, --val-split train)" in err


def test_the_ade20k_preset_is_the_full_recipe():
    cfg = build_config(TrainConfig, {"data": "/data/ade"}, "segment_ade20k_vit_base")
    assert cfg.optim.max_steps == 160000 and cfg.model.img_size == [512, 512] and cfg.data.dataset == "ade20k"
    assert cfg.data.batch_size * 8 == 16 and cfg.optim.base_lr * 16 / 256 == pytest.approx(1e-4)
    assert cfg.eval.eval_mode == "slide" and cfg.eval.eval_stride == [341, 341] and cfg.optim.layer_decay == 0.65
    validate_train(cfg)


def test_an_evaluation_view_caps_the_long_side_of_a_thin_strip():
    """The short side goes to the base size, the long side to at most 4 base sizes (mmseg's keep-ratio
    resize): a 1 x 500 strip at base 32 used to become 32 x 16 000 pixels and run for minutes."""
    from PIL import Image

    from maelab.data.segmentation import eval_image

    x, size = eval_image(Image.new("RGB", (500, 1)), 32)
    assert x.shape == (1, 3, 1, 128) and size == (1, 500)
    x, size = eval_image(Image.new("RGB", (960, 720)), 512)  # CamVid's shape: the short-side rule alone
    assert x.shape == (1, 3, 512, 683) and size == (720, 960)
    assert eval_image(Image.new("RGB", (40, 30)), None)[0].shape == (1, 3, 30, 40)


def test_a_bad_dataset_under_torchrun_is_said_once(tmp_path):
    """Every process scans the same files, and each printed the same error: once per process."""
    import subprocess
    import sys

    root = synthetic(tmp_path / "d", n_train=2, n_val=1)
    (root / "train" / "labels" / "img001.png").write_bytes(b"not a png")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29549"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, "-m", "maelab.cli", "segment", "train", "--data", str(root), "--init", "none",
                           "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--num-workers",
                           "0", "--out", str(tmp_path / "r")], env=env, capture_output=True, text=True, timeout=180)
    text = done.stdout + done.stderr
    lines = [x for x in text.splitlines() if x.startswith("maelab: error: ")]
    assert len(lines) == 1 and "cannot read label file" in lines[0], text
