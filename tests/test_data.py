"""Data: folders, RGB conversion, bad files, augmentation, step sharding."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from maelab import MaelabError
from maelab.data.folders import open_rgb, scan_images
from maelab.data.folders import prepare_images
from maelab.data.loader import Feeder, StepPlan
from maelab.data.memory import augment_batch, crop_flip_resize
from maelab.data.transforms import PretrainTransform, normalize, sample_crop_boxes


def _save(path, mode, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (200, 30, 60))
    if mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def test_imagefolder_tree_gives_sorted_classes_and_labels(tmp_path):
    for cls in ("dog", "cat"):
        for i in range(3):
            _save(tmp_path / cls / f"{i}.png", "RGB")
    found = scan_images(tmp_path)
    assert found.classes == ["cat", "dog"] and len(found) == 6
    assert found.labels == [0, 0, 0, 1, 1, 1]


def test_flat_folder_is_read_without_classes(tmp_path):
    for i in range(4):
        _save(tmp_path / f"{i}.jpg", "RGB")
    (tmp_path / "notes.txt").write_text("not an image")
    found = scan_images(tmp_path)
    assert len(found) == 4 and found.classes == [] and set(found.labels) == {-1}


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"),
                                      ("I;16", "png"), ("1", "png"), ("LA", "png")])
def test_every_image_mode_becomes_rgb(tmp_path, mode, ext):
    p = _save(tmp_path / f"x.{ext}", mode)
    img = open_rgb(str(p))
    assert img.mode == "RGB" and img.size == (20, 16)


def test_images_named_on_the_command_line_are_each_read_once(tmp_path):
    from maelab.data.folders import image_files

    for name in ("b.png", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert image_files([str(tmp_path / "b.png"), str(tmp_path)]) == [str(tmp_path / "b.png"), str(tmp_path / "a.png")]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(MaelabError, match="does not exist"):
        scan_images(tmp_path / "nope")
    with pytest.raises(MaelabError, match="no images found"):
        scan_images(tmp_path)


def test_a_folder_that_cannot_be_listed_is_said_not_passed_over(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list without a word: a class folder without read permission
    was dropped and the run trained on the rest, the classes after it renumbered (or "needs at least 2
    classes" with two folders there): refused, as an unreadable --data (a traceback inside the error's own
    handler); a folder deeper down is left out with a warning. A volume's root-only `lost+found` stays
    silent: refusing it broke `--data /mnt/disk` (review). (Run as root, the tests stand the error in.)"""
    import os

    from maelab.cli import _os_error_line

    _save(tmp_path / "a" / "x.png", "RGB")
    _save(tmp_path / "b" / "deep" / "y.png", "RGB")
    scandir = os.scandir
    (tmp_path / "lost+found").mkdir()
    refused = ["deep", "lost+found"]

    def refusing(path="."):
        if os.path.basename(os.fspath(path)) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = scan_images(tmp_path)
    assert [str(w.message) for w in caught] == [f"1 folder(s) under {tmp_path} could not be listed, so their images "
                                                f"are left out: {tmp_path / 'b' / 'deep'} (Permission denied)"]
    assert len(found) == 1
    for folder, named in (("b", tmp_path / "b"), (tmp_path.name, tmp_path)):  # a class folder, --data itself
        refused.append(folder)
        with pytest.raises(MaelabError, match=f"cannot list {named}: Permission denied"):
            scan_images(tmp_path)
    monkeypatch.undo()

    def no_looking(self, *a, **k):  # Python 3.11's Path.exists raises for a folder it may not look into
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "exists", no_looking)
    for err in (PermissionError(13, "Permission denied", "d/index.json"), NotADirectoryError(20, "Not a directory", "d/x")):
        assert _os_error_line(err, None).startswith("cannot use d/")


def test_gif_and_jfif_are_images_and_other_files_are_counted_aloud(tmp_path):
    """Pillow reads both (a GIF gives its first frame); they were left out without a word. Files of other
    extensions (.heic from a phone, notes) are still left out, but the count is said."""
    _save(tmp_path / "a" / "x.gif", "P")
    _save(tmp_path / "a" / "y.jfif", "RGB")
    _save(tmp_path / "b" / "z.png", "RGB")
    (tmp_path / "b" / "photo.heic").write_bytes(b"not for Pillow")
    (tmp_path / "b" / "notes.txt").write_text("labels")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"hidden")
    found = scan_images(tmp_path)
    assert len(found) == 3 and found.left_out == {".heic": 1, ".txt": 1}
    with pytest.warns(UserWarning, match=r"2 file\(s\) under .* are not images by their extension and were left "
                                         r"out \(.heic: 1, .txt: 1\)"):
        assert len(prepare_images(str(tmp_path), "error")) == 3
    assert open_rgb(found.paths[0]).size == (20, 16)


def test_a_folder_of_tar_shards_without_their_manifest_says_so(tmp_path):
    (tmp_path / "train-0000.tar").write_bytes(b"")
    with pytest.raises(MaelabError, match=r"no images found .*; it holds 1 .tar file\(s\) but no index.json: if "
                                          r"`maelab shards make` wrote them, it did not finish"):
        scan_images(tmp_path)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    for i in range(3):
        _save(tmp_path / "a" / f"{i}.png", "RGB")
    bad = tmp_path / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(MaelabError, match="bad.jpg"):
        open_rgb(str(bad))
    with pytest.warns(UserWarning, match="bad.jpg"):
        kept = prepare_images(str(tmp_path), "skip")
    assert len(kept) == 3 and all("bad" not in p for p in kept.paths)


def test_truncated_image_is_an_error_not_grey_pixels(tmp_path):
    p = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaelabError, match="t.jpg"):
        open_rgb(str(p))


def test_crop_boxes_follow_the_scale_and_ratio_rule():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(5000, 32, 48, (0.2, 1.0), generator=g)
    top, left, h, w = boxes.T
    assert torch.all(top >= 0) and torch.all(left >= 0)
    assert torch.all(top + h <= 32) and torch.all(left + w <= 48) and torch.all(h > 0) and torch.all(w > 0)
    area = (h * w).float() / (32 * 48)
    assert area.min() > 0.15 and area.max() <= 1.0
    ratio = w.float() / h.float()
    assert ratio.min() > 0.6 and ratio.max() < 1.6


def test_full_box_without_flip_reproduces_the_image():
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32]] * 3)
    out = crop_flip_resize(imgs, boxes, torch.zeros(3, dtype=torch.bool), (32, 32))
    torch.testing.assert_close(out, imgs.float() / 255, atol=1e-5, rtol=0)
    flipped = crop_flip_resize(imgs, boxes, torch.ones(3, dtype=torch.bool), (32, 32))
    torch.testing.assert_close(flipped, imgs.float().flip(-1) / 255, atol=1e-5, rtol=0)


def test_batch_crop_matches_a_direct_crop_and_resize():
    imgs = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    box = torch.tensor([[8, 4, 16, 16]])  # an exact 2x upsampling of a 16x16 window
    out = crop_flip_resize(imgs, box, torch.zeros(1, dtype=torch.bool), (32, 32))
    window = imgs[:, :, 8:24, 4:20].float() / 255
    ref = torch.nn.functional.interpolate(window, size=(32, 32), mode="bicubic", align_corners=False)
    # grid_sample at the window border reads real neighbouring pixels, interpolate replicates the
    # edge: compare away from the border
    torch.testing.assert_close(out[..., 4:-4, 4:-4], ref.clamp(0, 1)[..., 4:-4, 4:-4], atol=2e-3, rtol=0)


def test_global_batch_augmentation_is_split_identically_across_processes():
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    whole = augment_batch(imgs, (32, 32), torch.Generator().manual_seed(5))
    part = augment_batch(imgs[4:], (32, 32), torch.Generator().manual_seed(5), global_n=8, offset=4)
    assert torch.equal(whole[4:], part)


def test_per_sample_transform_is_a_function_of_its_seed(tmp_path):
    img = Image.new("RGB", (40, 30), (1, 2, 3))
    img.putpixel((5, 5), (255, 255, 255))
    t = PretrainTransform((32, 32))
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_step_plan_partitions_each_global_batch_over_ranks_and_micro_steps():
    plans = [StepPlan(103, 4, 2, 3, r, seed=0) for r in range(3)]
    assert plans[0].global_size == 24 and plans[0].steps_per_epoch == 4
    order = plans[0].order(1)
    for step in range(4):
        got = torch.cat([p.indices(order, step, m) for m in range(2) for p in plans])
        assert torch.equal(got.sort().values, order[step * 24:(step + 1) * 24].sort().values)
    assert not torch.equal(plans[0].order(0), plans[0].order(1))


def test_too_small_dataset_for_one_global_batch_is_a_clear_error():
    with pytest.raises(MaelabError, match="fewer than one global batch"):
        StepPlan(10, 8, 1, 2, 0, seed=0)


@pytest.mark.parametrize("in_memory", [True, False])
def test_both_feeding_paths_give_normalised_batches_of_the_model_size(cifar_tiny, in_memory):
    images = prepare_images(str(cifar_tiny), "error")
    plan = StepPlan(len(images), 8, 1, 1, 0, seed=0)
    from maelab.data.transforms import PretrainTransform

    feeder = Feeder(images, plan, torch.device("cpu"), (32, 32), in_memory,
                    transform=PretrainTransform((32, 32)), num_workers=0)
    batches = list(feeder.epoch(0, start_step=5))
    assert len(batches) == plan.steps_per_epoch - 5
    x = batches[0].images
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert -2.2 < x.min() < 0 < x.max() < 2.7  # ImageNet-normalised range
    again = list(feeder.epoch(0, start_step=5))[0].images
    assert torch.equal(x, again)  # a resumed epoch sees the same pixels


def test_normalize_uses_imagenet_statistics():
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(normalize(x), torch.zeros(1, 3, 2, 2), atol=1e-6)


def test_symlink_cycles_do_not_hang_the_scan(tmp_path):
    _save(tmp_path / "a" / "0.png", "RGB")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    assert len(scan_images(tmp_path)) == 1
    _save(tmp_path / "b" / "1.png", "RGB")  # two folders linking to each other: each walked once from each side
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "b" / "to_a").symlink_to(tmp_path / "a", target_is_directory=True)
    assert len(scan_images(tmp_path)) == 4  # a/0, a/to_b/1, b/1, b/to_a/0


def test_two_class_folders_linking_to_one_folder_are_two_classes_as_torchvision_reads_them(tmp_path):
    """The second link to an already walked folder was dropped without a word: a class went missing."""
    from torchvision.datasets import ImageFolder

    _save(tmp_path / "shared" / "0.png", "RGB")
    _save(tmp_path / "data" / "a" / "0.png", "RGB")
    for name in ("b_copy", "z_copy"):
        (tmp_path / "data" / name).symlink_to(tmp_path / "shared", target_is_directory=True)
    images, reference = scan_images(tmp_path / "data"), ImageFolder(str(tmp_path / "data"))
    assert images.classes == reference.classes == ["a", "b_copy", "z_copy"]
    assert images.labels == [y for _, y in reference.samples]


def test_images_of_mixed_sizes_stream_at_the_model_size(tmp_path):
    for i, size in enumerate([(50, 40), (33, 97), (300, 200), (32, 32)]):
        _save(tmp_path / "c" / f"{i}.png", "RGB", size=size)
    images = prepare_images(str(tmp_path), "error")
    plan = StepPlan(len(images), 2, 1, 1, 0, seed=0)
    feeder = Feeder(images, plan, torch.device("cpu"), (32, 48), in_memory=False,
                    transform=PretrainTransform((32, 48)), num_workers=0)
    shapes = {tuple(b.images.shape) for b in feeder.epoch(0)}
    assert shapes == {(2, 3, 32, 48)}


@pytest.mark.parametrize("in_memory", [True, False])
def test_skip_policy_replaces_a_file_that_only_fails_at_decode_time(tmp_path, in_memory, monkeypatch):
    import maelab.data.folders as folders

    monkeypatch.setattr(folders, "_probe", lambda path: None)  # a file the quick probe lets through
    for i in range(4):
        _save(tmp_path / "c" / f"{i}.jpg", "RGB", size=(32, 32))
    p = tmp_path / "c" / "1.jpg"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    images = prepare_images(str(tmp_path), "skip")
    assert len(images) == 4
    plan = StepPlan(len(images), 4, 1, 1, 0, seed=0, shuffle=False)
    with pytest.warns(UserWarning, match="1.jpg"):
        feeder = Feeder(images, plan, torch.device("cpu"), (32, 32), in_memory,
                        transform=PretrainTransform((32, 32)), num_workers=0, bad_files="skip")
        batch = next(iter(feeder.epoch(0)))
    assert torch.isfinite(batch.images).all() and batch.images.shape == (4, 3, 32, 32)


def _save_pixels(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_auto_in_memory_needs_every_image_at_the_training_size(tmp_path):
    import numpy as np

    from maelab.data.loader import choose_in_memory
    from maelab.evaluate.features import EvalSplit

    rng = np.random.default_rng(0)
    _save_pixels(tmp_path / "c" / "0.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # sorts first
    for i, (h, w) in enumerate([(40, 70), (90, 50), (64, 48)], 1):
        _save_pixels(tmp_path / "c" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mixed = scan_images(tmp_path)
    assert not choose_in_memory("auto", mixed, (32, 32))
    auto = EvalSplit(mixed, (32, 32), 4, choose_in_memory("auto", mixed, (32, 32)))
    streamed = EvalSplit(mixed, (32, 32), 4, in_memory=False)
    assert torch.equal(next(auto.batches(torch.device("cpu")))[0], next(streamed.batches(torch.device("cpu")))[0])
    with pytest.raises(MaelabError, match="3 of 4 are not"):  # "yes" never silently distorts
        EvalSplit(mixed, (32, 32), 4, in_memory=True)
    plan = StepPlan(len(mixed), 2, 1, 1, 0, seed=0)
    with pytest.raises(MaelabError, match="--in-memory auto or no"):
        Feeder(mixed, plan, torch.device("cpu"), (32, 32), in_memory=True)

    uniform = mixed.subset([0, 0, 0])
    assert choose_in_memory("auto", uniform, (32, 32))
    ram = next(EvalSplit(uniform, (32, 32), 3, in_memory=True).batches(torch.device("cpu")))[0]
    stream = next(EvalSplit(uniform, (32, 32), 3, in_memory=False).batches(torch.device("cpu")))[0]
    torch.testing.assert_close(ram, stream, rtol=0, atol=1e-6)


def test_image_sizes_read_headers_in_parallel_for_long_lists(tmp_path):
    from maelab.data.folders import image_sizes

    paths = [str(_save(tmp_path / "a.png", "RGB", size=(20, 16))), str(_save(tmp_path / "b.jpg", "RGB", size=(7, 9)))]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.png"))
    assert image_sizes(paths * 2000) == [(16, 20), (9, 7), None] * 2000  # 6000 paths: the forked pool


def test_16_bit_images_are_scaled_by_bit_depth_not_by_their_values(tmp_path):
    import numpy as np

    flat = np.full((8, 8), 200, dtype=np.uint16)
    spike = flat.copy()
    spike[0, 0] = 300  # crossing 255 used to switch the whole image to the 16-bit scale
    for ext in ("png", "tif"):
        a = np.asarray(open_rgb(str(_save_pixels(tmp_path / f"flat.{ext}", flat))), dtype=int)
        b = np.asarray(open_rgb(str(_save_pixels(tmp_path / f"spike.{ext}", spike))), dtype=int)
        assert np.abs(a - b).max() <= 1 and a[1, 1, 0] == round(200 / 257)
    full = np.array([[0, 65535]], dtype=np.uint16)
    assert np.asarray(open_rgb(str(_save_pixels(tmp_path / "full.png", full))))[0, :, 0].tolist() == [0, 255]
    # 16-bit PGM opens as mode "I" in Pillow: still the 16-bit scale
    for name, arr in (("flat", flat), ("spike", spike)):
        (tmp_path / f"{name}.pgm").write_bytes(b"P5\n8 8\n65535\n" + arr.astype(">u2").tobytes())
    assert Image.open(tmp_path / "flat.pgm").mode in ("I", "I;16", "I;16B")
    a = np.asarray(open_rgb(str(tmp_path / "flat.pgm")), dtype=int)
    b = np.asarray(open_rgb(str(tmp_path / "spike.pgm")), dtype=int)
    assert np.abs(a - b).max() <= 1 and a.max() <= 1


def test_streamed_feeder_with_workers_keeps_the_global_rng_and_resumes_exactly(cifar_tiny):
    from maelab.data.transforms import finetune_transform

    images = prepare_images(str(cifar_tiny), "error")
    plan = StepPlan(len(images), 8, 1, 1, 0, seed=0)

    def feeder(workers):
        return Feeder(images, plan, torch.device("cpu"), (32, 32), in_memory=False,
                      transform=finetune_transform((32, 32)), num_workers=workers)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    whole = feeder(2)
    run = [b.images for e in (0, 1) for b in whole.epoch(e)]
    assert torch.equal(torch.get_rng_state(), state)  # drop path / mixup see the same global stream
    resumed = [b.images for b in feeder(2).epoch(1, start_step=3)]  # its workers start at epoch 1
    assert len(resumed) == plan.steps_per_epoch - 3
    assert all(torch.equal(x, y) for x, y in zip(run[plan.steps_per_epoch + 3:], resumed, strict=True))
    serial = [b.images for b in feeder(0).epoch(1, start_step=3)]  # worker identity never matters
    assert all(torch.equal(x, y) for x, y in zip(serial, resumed, strict=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_worker_count_far_beyond_the_cores_is_capped_with_a_warning(monkeypatch):
    """--num-workers 1000 on 2 cores forked ~1 700 processes (22 GB) and was still starting after 9 minutes."""
    from maelab.data import workers

    monkeypatch.setattr(workers, "cpu_cores", lambda: 2)
    monkeypatch.setattr(workers, "_CAPPED", set())
    assert workers.default_workers(8) == 8 and workers.default_workers(0) == 0 and workers.default_workers(-1) == 2
    with pytest.warns(UserWarning, match="--num-workers 1000 is more than 4 per CPU core \\(2 cores\\): using 8"):
        assert workers.default_workers(1000) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert workers.default_workers(1000) == 8  # said once per run, not once per loader
    monkeypatch.setattr(workers, "cpu_cores", lambda: 64)
    assert workers.default_workers(100) == 100  # a big machine keeps what it asks for


def test_a_dataset_root_as_pretraining_data_is_warned_about_and_named_for_classification(tmp_path, capsys):
    """`--data tvt` (train/valid/test inside) pre-trained on the test images too without a word, and the
    classification commands said only "pass --val-data"."""
    from maelab.cli import main

    for split in ("train", "valid", "test"):
        for c in ("a", "b"):
            _save(tmp_path / "tvt" / split / c / "0.png", "RGB")
    assert main(["pretrain", "--data", str(tmp_path / "tvt"), "--model", "mae_vit_tiny_patch4", "--epochs", "1",
                 "--batch-size", "2", "--vis-every", "0", "--num-workers", "0", "--out", str(tmp_path / "r")]) == 0
    assert (f"maelab: warning: --data {tmp_path / 'tvt'} holds the split folders train, valid, test: pre-training "
            f"reads all of them") in capsys.readouterr().err
    assert main(["knn", "--init", "none", "--model", "mae_vit_tiny_patch4", "--data", str(tmp_path / "tvt")]) == 2
    assert f"looks like the dataset's root: --data {tmp_path / 'tvt' / 'train'}" in capsys.readouterr().err
