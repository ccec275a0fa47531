"""Detection: COCO loading, large-scale jitter, the ViTDet pyramid, Mask R-CNN, COCOeval AP, pictures,
bad inputs, and `maelab detect train -> eval -> predict` with an exact resume (tiny images, tiny ViTs)."""

from __future__ import annotations

import json
import shutil
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maelab.cli import main
from maelab.data.coco import boxes_beyond, instance_targets, load_coco, read_image, training_images
from maelab.data.lsj import large_scale_jitter, masks_to_boxes
from maelab.errors import MaelabError
from maelab.evaluate.detection import coco_ap, coco_results, ground_truth
from maelab.io import read_weights
from maelab.train import checkpoint as ckpt
from maelab.train.loop import RunInterrupted
from maelab.transfer.backbone import ViTBackbone
from maelab.transfer.detection import DetectTask, build_detector, detector_groups, detector_spec
from maelab.transfer.pyramid import SimpleFeaturePyramid
from maelab.viz.detection import save_detection_grid

from conftest import count_calls, record_plans

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("MAELAB_COCO128", REPO.parent / "shared" / "datasets" / "coco128"))
TINY_VIT = dict(img_size=(64, 64), patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
SMALL_HEADS = dict(head_width=16, fc_width=32, roi_batch=32, proposals=64)
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]


def polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def synthetic_coco(root: Path, n: int = 4, size: int = 64) -> Path:
    """``n`` images of coloured shapes with polygon, compressed-RLE and list-RLE masks; category ids 3, 7."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        arr = np.full((size, size, 3), 30, np.uint8)
        x, y, w = (int(v) for v in rng.integers(4, size // 2, 3))
        arr[y:y + w, x:x + w] = (220, 40, 40)
        bx, by = int(rng.integers(0, size // 2)), int(rng.integers(size // 2, size - 8))
        arr[by:by + 6, bx:bx + size // 2] = (40, 220, 40)
        Image.fromarray(arr).save(root / "images" / f"{i:03d}.png")
        images.append({"id": 10 + i, "file_name": f"{i:03d}.png", "width": size, "height": size})
        anns.append({"id": 2 * i + 1, "image_id": 10 + i, "category_id": 3, "bbox": [x, y, w, w], "area": w * w,
                     "iscrowd": 0, "segmentation": polygon(x, y, w, w)})
        bar = np.zeros((size, size), np.uint8)
        bar[by:by + 6, bx:bx + size // 2] = 1
        rle = mask_utils.encode(np.asfortranarray(bar))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": 2 * i + 2, "image_id": 10 + i, "category_id": 7, "bbox": [bx, by, size // 2, 6],
                     "area": 6 * size // 2, "iscrowd": 0, "segmentation": rle})
    write_json(root / "instances_train.json", images, anns)
    write_json(root / "instances_val.json", images[:2], [a for a in anns if a["image_id"] in (10, 11)])
    return root


def write_json(path: Path, images, anns, categories=CATEGORIES) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def coco128_subset(root: Path, train: int = 4, val: int = 2) -> Path:
    """A few coco128 images (annotation JSON subsets, images linked), or the synthetic set without it."""
    if not (COCO128 / "instances_train.json").is_file():
        return synthetic_coco(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").symlink_to(COCO128 / "images")
    for split, k in (("train", train), ("val", val)):
        d = json.loads((COCO128 / f"instances_{split}.json").read_text())
        keep = {im["id"] for im in d["images"][:k]}
        d["images"] = [im for im in d["images"] if im["id"] in keep]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
        (root / f"instances_{split}.json").write_text(json.dumps(d))
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return synthetic_coco(tmp_path_factory.mktemp("coco"))


def tiny_model(num_classes: int = 2, window_size=None, global_blocks=()):
    cats = [{"id": i + 1, "name": f"c{i}"} for i in range(num_classes)]
    spec = detector_spec(TINY_VIT, 64, cats, window_size, list(global_blocks), 16, [8, 16, 32, 64, 128], SMALL_HEADS)
    return build_detector(spec), spec


# --- the pyramid -----------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, size", [(8, (64, 64)), (16, (64, 96)), (4, (32, 64))])
def test_the_pyramid_gives_strides_4_to_64_at_out_channels_for_any_patch_and_non_square_input(patch, size):
    arch = dict(TINY_VIT, patch_size=patch)
    fpn = SimpleFeaturePyramid(ViTBackbone(None, arch, size, out_indices=(1,)), out_channels=24)
    out = fpn(torch.rand(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3", "pool"] and fpn.out_channels == 24
    for key, stride in zip(out, (4, 8, 16, 32, 64)):
        assert out[key].shape == (2, 24, -(-size[0] // stride), -(-size[1] // stride)), key  # pool: ceil


def test_the_pyramid_refuses_a_patch_size_that_is_no_power_of_two_of_the_strides():
    with pytest.raises(MaelabError, match="power of two"):
        SimpleFeaturePyramid(ViTBackbone(None, dict(TINY_VIT, patch_size=6), (48, 48), out_indices=(1,)))


def test_windowed_attention_with_global_blocks_reaches_the_pyramid():
    model, _ = tiny_model(window_size=4, global_blocks=(1,))
    vit = model.backbone.vit
    assert vit.window_size == 4 and vit.global_blocks == (1,) and vit.windowed(0) and not vit.windowed(1)
    assert model.backbone(torch.rand(1, 3, 64, 64))["0"].shape == (1, 16, 16, 16)


def test_validating_on_the_training_annotations_is_warned_about(coco):
    """`detect train --val-ann` naming the training file scored the training images without a word."""
    from maelab.commands.detect import load_train_val
    from maelab.commands.options.detect import CocoDataConfig

    with pytest.warns(UserWarning, match=r"its AP says how well the training images are remembered"):
        load_train_val(CocoDataConfig(data=str(coco), val_ann=str(coco / "." / "instances_train.json")), 0)


def test_a_thin_strip_is_detected_at_its_own_size():
    """torchvision resizes the long side to the detector's max size: a 1 x 500 strip at 64 px became 0 x 64
    and failed inside torchvision. It is padded just enough, and the outputs cut back to the strip."""
    from maelab.transfer.detection import detect

    model, _ = tiny_model()
    strips = [torch.randint(0, 256, (3, 1, 500), dtype=torch.uint8), torch.randint(0, 256, (3, 900, 2), dtype=torch.uint8)]
    for strip, out in zip(strips, detect(model, strips, torch.device("cpu"), "fp32")):
        h, w = strip.shape[-2:]
        assert out["masks"].shape[-2:] == (h, w)
        assert (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()


def test_layer_decay_covers_every_parameter_once_and_scales_the_blocks():
    model, _ = tiny_model()
    groups = detector_groups(model, 1e-3, 0.05, 0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    scales = {round(g["lr_scale"], 6) for g in groups}
    assert scales == {0.125, 0.25, 0.5, 1.0}  # embeddings 0.5^3, block 0 0.5^2, block 1 0.5, pyramid and heads 1
    head = next(g for g in groups if any(p is model.roi_heads.box_predictor.cls_score.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05


# --- the model -------------------------------------------------------------------------------------
def fixed_batch():
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 30:60, 5:20] = 1
    images = torch.full((2, 3, 64, 64), 0.2)
    images[0, :, 10:30, 10:40] = 0.9
    images[1, :, 30:60, 5:20] = 0.7
    targets = [{"boxes": masks_to_boxes(masks[i:i + 1]), "labels": torch.tensor([i + 1]), "masks": masks[i:i + 1]}
               for i in range(2)]
    return images, targets


def test_mask_rcnn_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model, spec = tiny_model()
    task = DetectTask(model, spec, detector_groups(model, 2e-3, 0.0, 1.0), lambda e, last: {})
    opt = torch.optim.AdamW(task.param_groups(), lr=2e-3)
    images, targets = fixed_batch()
    batch = type("B", (), {"images": images, "targets": targets})()
    losses = []
    for _ in range(8):
        loss, parts = task.forward(model, batch)
        assert set(parts) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses


# --- COCO data -------------------------------------------------------------------------------------
def test_coco_loading_maps_gapped_category_ids_to_labels_and_decodes_polygons_and_rle(coco, tmp_path):
    data = load_coco(coco / "instances_train.json", coco / "images")
    assert data.cat_ids == [3, 7] and data.names == ["square", "bar"]
    assert [data.label(3), data.label(7)] == [1, 2] and [data.cat_id(1), data.cat_id(2)] == [3, 7]
    image = data.images[0]
    t = instance_targets(image, data)
    assert t["labels"].tolist() == [1, 2] and t["masks"].shape == (2, 64, 64)
    x, y, w, _ = image.anns[0]["bbox"]
    assert abs(int(t["masks"][0].sum()) - w * w) <= 2 * w + 1  # polygon rasterised to its square
    assert int(t["masks"][1].sum()) == 6 * 32  # compressed RLE decoded exactly
    # uncompressed RLE (list counts) gives the same mask
    d = json.loads((coco / "instances_train.json").read_text())
    rle = d["annotations"][1]["segmentation"]
    listed = {"size": rle["size"], "counts": rle_counts_list(mask_utils.decode(rle))}
    d["annotations"][1]["segmentation"] = listed
    alt = load_coco(write_json(tmp_path / "a.json", d["images"], d["annotations"]), coco / "images")
    assert torch.equal(instance_targets(alt.images[0], alt)["masks"][1], t["masks"][1])


def rle_counts_list(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_large_scale_jitter_keeps_boxes_inside_and_tight_around_their_masks(coco):
    data = load_coco(coco / "instances_train.json", coco / "images")
    image = data.images[1]
    pixels, target = read_image(image), instance_targets(image, data)
    seen_scales = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out, t = large_scale_jitter(pixels, target, 48, (0.1, 2.0), True, g)
        assert out.shape == (3, 48, 48) and out.dtype == torch.uint8
        b = t["boxes"]
        assert t["masks"].shape[0] == len(b) == len(t["labels"])
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 48).all() and (b[:, 3] <= 48).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()  # no empty box survives
        assert torch.equal(b, masks_to_boxes(t["masks"]))
        seen_scales.add(int((out != out[:, -1:, -1:]).any(0).sum()))
        # the red square's mask covers red pixels in the jittered image
        for m, label in zip(t["masks"].bool(), t["labels"]):
            if label == 1 and m.sum() > 20:
                assert out[0][m].float().mean() > 150
    assert len(seen_scales) > 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = (large_scale_jitter(pixels, target, 48, (0.1, 2.0), True, g) for g in (g1, g2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])


# --- AP --------------------------------------------------------------------------------------------
def test_ap_is_100_for_perfect_detections_and_0_for_none_or_the_wrong_class(coco):
    data = load_coco(coco / "instances_val.json", coco / "images")
    gt = ground_truth(data.dataset)
    perfect, wrong = [], []
    for image in data.images:
        t = instance_targets(image, data)
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
               "masks": t["masks"][:, None].float()}
        perfect += coco_results(image.id, out, data.cat_id)
        wrong += coco_results(image.id, dict(out, labels=3 - t["labels"]), data.cat_id)
    assert {r["category_id"] for r in perfect} == {3, 7}  # original ids, not labels
    assert all(v == pytest.approx(100.0) for v in coco_ap(gt, perfect).values())
    assert all(v == 0.0 for v in coco_ap(gt, []).values())
    assert all(v == 0.0 for v in coco_ap(gt, wrong).values())
    # annotation ids numbered from 0, all the same, or missing: the file's ids do not count
    anns = data.dataset["annotations"]
    for ids in ([i for i in range(len(anns))], [7] * len(anns), [None, None, 1] + list(range(2, len(anns) - 1))):
        renumbered = dict(data.dataset, annotations=[{k: v for k, v in dict(a, id=i).items() if v is not None}
                                                     for a, i in zip(anns, ids)])
        assert all(v == pytest.approx(100.0) for v in coco_ap(ground_truth(renumbered), perfect).values()), ids


def test_ids_written_as_strings_and_box_only_annotations_are_scored_as_they_are_trained(coco, tmp_path):
    """A file with ``"id": "7"`` trained (the loader reads numbers) and then scored AP 0 (pycocotools
    compared "7" with the detections' 7); one whose annotations have no (or an empty) segmentation trained
    on the box as mask and then failed in pycocotools at the end of the first epoch (KeyError /
    IndexError), losing the epoch. Both score a perfect detector 100 now."""
    data = load_coco(coco / "instances_val.json", coco / "images")
    perfect = []
    for image in data.images:
        t = instance_targets(image, data)
        box_masks = torch.zeros_like(t["masks"])
        for m, (x1, y1, x2, y2) in zip(box_masks, t["boxes"].round().int().tolist()):
            m[y1:y2, x1:x2] = 1
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
               "masks": box_masks[:, None].float()}
        perfect += coco_results(image.id, out, data.cat_id)
    d = data.dataset
    as_strings = {"images": [dict(im, id=str(im["id"])) for im in d["images"]],
                  "categories": [dict(c, id=str(c["id"])) for c in d["categories"]],
                  "annotations": [dict(a, image_id=str(a["image_id"]), category_id=str(a["category_id"]))
                                  for a in d["annotations"]]}
    for i, seg in enumerate((None, [], [[1.0, 2.0]], "no")):  # missing, empty, a polygon of one point, junk
        anns = [{k: v for k, v in a.items() if k != "segmentation"} | ({} if seg is None else {"segmentation": seg})
                for a in as_strings["annotations"]]
        path = tmp_path / f"boxes{i}.json"
        path.write_text(json.dumps(dict(as_strings, annotations=anns)))
        loaded = load_coco(path, coco / "images")  # what training reads
        assert [im.id for im in loaded.images] == [im.id for im in data.images]
        assert all(v == pytest.approx(100.0) for v in coco_ap(ground_truth(loaded.dataset), perfect).values()), seg


def test_boxes_that_reach_past_their_image_are_counted_for_each_split(coco, tmp_path):
    """Training clips boxes to the image and leaves out those with nothing inside, while the COCO protocol
    scores the file as written: a perfect detector scored 87 AP on a file of boxes hanging past the edge,
    without a word on either side."""
    from maelab.commands.detect import load_train_val
    from maelab.commands.options.detect import CocoDataConfig

    d = json.loads((coco / "instances_train.json").read_text())
    anns = d["annotations"]
    anns[0]["bbox"] = [-10.0, 2.0, 20.0, 5.0]  # 10 px past the left edge: clipped
    anns[1]["bbox"] = [1000.0, 2.0, 5.0, 5.0]  # wholly outside: left out
    anns[2]["bbox"] = [3.0, 3.0, 0.0, 4.0]  # no area: left out
    anns[3]["iscrowd"] = 1
    anns[3]["bbox"] = [-5.0, 0.0, 10.0, 10.0]  # a crowd region is not trained on: not counted
    (tmp_path / "train.json").write_text(json.dumps(d))
    assert boxes_beyond(load_coco(tmp_path / "train.json", coco / "images")) == (1, 2)
    cfg = CocoDataConfig(ann=str(tmp_path / "train.json"), images=str(coco / "images"), val_ann=str(tmp_path / "train.json"))
    with pytest.warns(UserWarning) as said:
        load_train_val(cfg, 0)
    messages = [str(w.message) for w in said]
    assert any("of the training boxes, 1 reaches more than a pixel past its image and 2 have no area inside its "
               "image; training clips" in m for m in messages), messages
    assert any("of the validation boxes, 1 reaches" in m and "they are scored as written (the COCO protocol)" in m
               for m in messages), messages
    anns[0]["bbox"] = [-0.5, 2.0, 20.0, 5.0]  # float rounding past the edge: matches its clipped self, not counted
    (tmp_path / "train.json").write_text(json.dumps(d))
    assert boxes_beyond(load_coco(tmp_path / "train.json", coco / "images")) == (0, 2)


# --- pictures --------------------------------------------------------------------------------------
def test_drawing_writes_a_png_of_prediction_beside_ground_truth(coco, tmp_path):
    data = load_coco(coco / "instances_val.json", coco / "images")
    image = data.images[0]
    t = instance_targets(image, data)
    pred = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.tensor([0.9, 0.3]),
            "masks": t["masks"][:, None].float()}
    path = save_detection_grid(tmp_path / "d.png", [{"image": read_image(image), "pred": pred, "gt": t}],
                               data.names, 0.5)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height  # two panels side by side


# --- bad inputs ------------------------------------------------------------------------------------
def test_bad_annotation_files_are_refused_with_what_is_wrong(coco, tmp_path):
    d = json.loads((coco / "instances_train.json").read_text())
    imgs = coco / "images"
    with pytest.raises(MaelabError, match="does not exist"):
        load_coco(tmp_path / "nope.json", imgs)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MaelabError, match="cannot read"):
        load_coco(tmp_path / "bad.json", imgs)
    with pytest.raises(MaelabError, match="no categories"):
        load_coco(write_json(tmp_path / "e.json", d["images"], d["annotations"], []), imgs)
    anns = [dict(d["annotations"][0], category_id=99)]
    with pytest.raises(MaelabError, match="category_id 99"):
        load_coco(write_json(tmp_path / "c.json", d["images"], anns), imgs)
    with pytest.raises(MaelabError, match="image_id 5"):
        load_coco(write_json(tmp_path / "i.json", d["images"], [dict(d["annotations"][0], image_id=5)]), imgs)
    with pytest.raises(MaelabError, match="bbox"):
        load_coco(write_json(tmp_path / "b.json", d["images"], [dict(d["annotations"][0], bbox=[1, 2, 3])]), imgs)
    missing = d["images"] + [{"id": 99, "file_name": "gone.png", "width": 64, "height": 64}]
    with pytest.raises(MaelabError, match="missing.*gone.png"):
        load_coco(write_json(tmp_path / "m.json", missing, d["annotations"]), imgs)
    with pytest.raises(MaelabError, match="other category ids"):
        load_coco(write_json(tmp_path / "v.json", d["images"], [], CATEGORIES[:1]), imgs, categories=CATEGORIES)
    wrong_size = [dict(im, width=50) if im["id"] == 10 else im for im in d["images"]]
    with pytest.raises(MaelabError, match=r"1 of the \d+ images .* have another size than the file says, e.g. "
                                          r".* is 64x64 but the file says 50x64"):
        load_coco(write_json(tmp_path / "s.json", wrong_size, []), imgs)  # up front, before any training
    data = load_coco(tmp_path / "s.json", imgs, check_files=False)
    with pytest.raises(MaelabError, match="64x64 but its annotation file says 50x64"):
        read_image(data.images[0])
    broken = tmp_path / "broken"
    shutil.copytree(imgs, broken)
    last = sorted(broken.iterdir())[-1]
    last.write_bytes(b"not an image at all")
    with pytest.raises(MaelabError, match=rf"1 of the \d+ images .* cannot be read, e.g. .*{last.name}"):
        load_coco(coco / "instances_train.json", broken)
    rle = dict(d["annotations"][1], segmentation=dict(d["annotations"][1]["segmentation"], size=[32, 32]))
    data = load_coco(write_json(tmp_path / "r.json", d["images"], [rle]), imgs)
    with pytest.raises(MaelabError, match="RLE mask is 32x32"):
        instance_targets(data.images[0], data)


def test_images_without_annotations_are_skipped_or_kept_and_outside_boxes_clipped_or_dropped(coco, tmp_path):
    d = json.loads((coco / "instances_train.json").read_text())
    anns = [a for a in d["annotations"] if a["image_id"] != 11]  # image 11: no annotation at all
    outside = {"id": 100, "image_id": 12, "category_id": 3, "bbox": [70, 70, 5, 5], "iscrowd": 0, "segmentation": []}
    crossing = {"id": 101, "image_id": 12, "category_id": 7, "bbox": [50, 50, 30, 30], "iscrowd": 0}
    data = load_coco(write_json(tmp_path / "t.json", d["images"], anns + [outside, crossing]), coco / "images")
    skipped, n = training_images(data, "skip")
    assert n == 1 and 11 not in [im.id for im in skipped.images]
    kept, n = training_images(data, "keep")
    assert n == 0 and len(kept) == len(data)
    t = instance_targets(next(im for im in data.images if im.id == 12), data)
    assert t["boxes"][-1].tolist() == [50, 50, 64, 64]  # clipped; the box outside the image is dropped
    assert int(t["masks"][-1].sum()) == 14 * 14  # no segmentation: the (clipped) box as mask
    assert len(t["labels"]) == 3
    only_empty = load_coco(write_json(tmp_path / "z.json", d["images"][:1], []), coco / "images")
    with pytest.raises(MaelabError, match="nothing to train on"):
        training_images(only_empty, "skip")


# --- the command -----------------------------------------------------------------------------------
def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["detect", "train", "--data", str(data), "--init", "none", "--model", "mae_vit_tiny_patch16",
            "--img-size", "64", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--num-workers", "0",
            "--head-width", "16", "--fc-width", "32", "--roi-batch", "32", "--proposals", "64",
            "--anchor-sizes", "8", "16", "32", "64", "128", "--out-channels", "16", "--vis-images", "1",
            "--out", str(out), *extra]


def test_detect_train_eval_predict_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    data = coco128_subset(tmp_path / "data")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(train_args(data, ref)) == 0
    results = json.loads((ref / "results.json").read_text())
    assert {"box_AP", "mask_AP", "box_AP50", "mask_AP75"} <= set(results) and results["epochs"] == 2
    assert (ref / "detections.png").is_file() and (ref / "config.yaml").is_file() and list((ref / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert any("box_AP" in x for x in lines) and any("loss" in x for x in lines)

    original = DetectTask.forward

    def forward(self, runner, batch):
        if batch.epoch == 1 and batch.step == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, runner, batch)

    monkeypatch.setattr(DetectTask, "forward", forward)
    with pytest.raises(RunInterrupted):
        from maelab.cli import build_parser, dispatch
        dispatch(build_parser().parse_args(train_args(data, run)))
    monkeypatch.setattr(DetectTask, "forward", original)
    assert ckpt.latest_checkpoint(run).name.startswith("step_")
    assert main(train_args(data, run)) == 0  # the same command resumes
    a, _ = read_weights(ckpt.latest_checkpoint(ref) / ckpt.WEIGHTS)
    b, meta = read_weights(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c["id"] for c in meta["categories"]] == sorted(c["id"] for c in meta["categories"])
    capsys.readouterr()

    out = tmp_path / "eval.json"
    assert main(["detect", "eval", "--checkpoint", str(run), "--data", str(data), "--num-workers", "0",
                 "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["box_AP"] == pytest.approx(results["box_AP"]) and scored["mask_AP"] == pytest.approx(results["mask_AP"])
    assert "box AP" in capsys.readouterr().out
    assert main(["detect", "eval", "--checkpoint", str(run), "--data", str(data), "--num-workers", "0",
                 "--min-score", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["detections"] >= scored["detections"]  # the 0.05 floor removed

    picture = tmp_path / "pred.png"
    assert main(["detect", "predict", "--checkpoint", str(run), "--images", str(data / "images"), "--max-images",
                 "2", "--score-threshold", "0", "--out", str(picture)]) == 0
    assert picture.is_file() and len(json.loads(picture.with_suffix(".json").read_text())["images"]) == 2


def test_a_budget_run_times_the_scoring_on_a_few_images(tmp_path, monkeypatch):
    """The plan's evaluation time comes from 8 of the 20 validation images; the final scoring sees all 20."""
    from maelab.commands import detect

    data = synthetic_coco(tmp_path / "data", n=20)
    full = json.loads((data / "instances_train.json").read_text())
    (data / "instances_val.json").write_text(json.dumps(full))
    seen, planned = count_calls(monkeypatch, detect, "evaluate_detector"), record_plans(monkeypatch)
    assert main(train_args(data, tmp_path / "run", "--budget", "10m")) == 0
    assert len(planned) == 1 and planned[0][1] > 0  # the final scoring
    assert seen == [8, 20]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 2


def test_a_small_patch_at_the_default_size_is_warned_of_its_token_count():
    """A patch-4 CIFAR encoder at detect's default 1024 px: 65 536 tokens in global attention, a step of hours on
    a CPU that looked like a hang (SIGTERM waits for the step)."""
    import warnings

    from maelab.commands.detect import warn_token_count

    with pytest.warns(UserWarning, match=r"--img-size 1024 with patch 4 gives 65536 tokens .* --img-size 256 gives 4096"):
        warn_token_count(1024, 4, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_token_count(1024, 16, None)  # ViTDet itself
        warn_token_count(1024, 4, 14)  # windowed attention


def test_detect_errors_are_one_line_and_leave_no_run_folder(coco, tmp_path, capsys):
    assert main(["detect", "train", "--ann", str(tmp_path / "none.json"), "--images", str(coco / "images"),
                 "--init", "none", "--model", "mae_vit_tiny_patch16", "--out", str(tmp_path / "r")]) == 2
    assert "annotation file" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["detect", "train", "--data", str(coco), "--init", "none", "--model", "mae_vit_tiny_patch16",
                 "--img-size", "64", "72", "--out", str(tmp_path / "r")]) == 2
    assert "--img-size" in capsys.readouterr().err
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "nothing"), "--data", str(coco)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["detect_vitdet_base", "detect_coco128_tiny"])
def test_shipped_detection_presets_load_and_pass_the_checks(preset):
    from maelab.commands.options.detect import DetectTrainConfig
    from maelab.commands.detect import validate
    from maelab.config import build_config

    cfg = build_config(DetectTrainConfig, yaml_path=preset)
    assert validate(cfg) == cfg.model.img_size[0]
