"""The augmentation ablation's settings (paper Table 1e): no crop, fixed-size crop, random-size crop,
colour jitter -- the same rules in the in-memory batch path and the per-sample DataLoader path, drawn from
the seeded generator (so resume and multi-process runs see the same pixels)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from maelab.data.memory import augment_batch
from maelab.data.transforms import PretrainTransform, crop_range, from_uint8, sample_crop_boxes


def images(n=4, h=24, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_no_crop_is_the_whole_image():
    x = images()
    out = augment_batch(x, (24, 32), gen(), hflip=False, crop="none")
    torch.testing.assert_close(out, from_uint8(x), rtol=0, atol=1e-4)


def test_fixed_size_crops_keep_area_and_aspect_random_size_crops_do_not():
    scale, ratio = crop_range("fixed-size", 0.2, 240, 320)
    boxes = sample_crop_boxes(200, 240, 320, scale, ratio, generator=gen())
    areas = (boxes[:, 2] * boxes[:, 3]).float() / (240 * 320)
    assert torch.allclose(areas, torch.full_like(areas, 0.6), atol=0.01)
    assert torch.allclose(boxes[:, 3].float() / boxes[:, 2], torch.full((200,), 320 / 240), atol=0.02)
    assert len(set(boxes[:, 0].tolist())) > 10  # random position
    rand = sample_crop_boxes(200, 240, 320, *crop_range("random-size", 0.2, 240, 320), generator=gen())
    assert ((rand[:, 2] * rand[:, 3]).float() / (240 * 320)).std() > 0.1
    with pytest.raises(ValueError, match="crop must be one of"):
        crop_range("big", 0.2, 10, 10)


def test_colour_jitter_is_per_sample_seeded_and_splits_across_processes():
    x = images()
    plain = augment_batch(x, (16, 16), gen(), color_jitter=0.0)
    jit = augment_batch(x, (16, 16), gen(), color_jitter=0.4)
    assert not torch.allclose(plain, jit)
    torch.testing.assert_close(jit, augment_batch(x, (16, 16), gen(), color_jitter=0.4), rtol=0, atol=0)
    half = augment_batch(x[2:], (16, 16), gen(), color_jitter=0.4, global_n=4, offset=2)
    torch.testing.assert_close(half, jit[2:], rtol=0, atol=1e-6)
    # crops and flips are the same draws with and without jitter (jitter factors are drawn last)
    nojit = augment_batch(x, (16, 16), gen(), crop="none", hflip=False)
    dim = augment_batch(x, (16, 16), gen(), crop="none", hflip=False, color_jitter=1e-9)
    torch.testing.assert_close(nojit, dim, rtol=0, atol=1e-5)


def test_the_per_sample_path_follows_the_same_rules():
    arr = images(1)[0]
    img = Image.fromarray(arr.permute(1, 2, 0).numpy())
    none = PretrainTransform((24, 32), hflip=False, crop="none")(img, gen())
    torch.testing.assert_close(none, from_uint8(arr[None])[0], rtol=0, atol=1e-4)
    a = PretrainTransform((16, 16), color_jitter=0.4)(img, gen())
    b = PretrainTransform((16, 16))(img, gen())
    assert a.shape == b.shape == (3, 16, 16) and not torch.allclose(a, b)


@pytest.mark.parametrize("flags,message", [(["--crop", "huge"], "invalid choice"),
                                           (["--color-jitter", "1.5"], "--color-jitter must be in")])
def test_bad_augmentation_flags_are_refused(tmp_path, capsys, flags, message):
    from maelab.cli import main

    try:
        code = main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *flags])
    except SystemExit as e:  # argparse's own choice check
        code = e.code
    assert code == 2 and not (tmp_path / "r").exists()
    assert message in capsys.readouterr().err
