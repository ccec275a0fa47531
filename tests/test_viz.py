"""maelab.viz: reconstruction grids, image loading, training curves (tiny models, CPU, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.errors import MaelabError
from maelab.models.mae import MaskedAutoencoder
from maelab.viz import (
    NORM_PIX_CAPTION,
    denormalize,
    load_images_for_model,
    plot_curves,
    plot_loss_overlay,
    reconstruct,
    reconstruction_grid,
    save_reconstruction_grid,
)

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
KEYS = ("original", "masked", "reconstruction", "reconstruction_visible")


def tiny_model(img_size=(32, 48), norm_pix_loss=False) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(img_size=img_size, norm_pix_loss=norm_pix_loss, **TINY)


def batch(model, n=2, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *model.img_size, generator=g)


def figure_texts(fig) -> list[str]:
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_ylabel()]
    return texts


# --- reconstruct ----------------------------------------------------------------------------------
def test_reconstruct_shapes_range_and_mode_restored():
    model = tiny_model()
    model.train()
    imgs = batch(model, n=3)
    out = reconstruct(model, imgs, 0.75, seed=0)
    assert model.training  # previous mode restored
    for k in KEYS:
        assert out[k].shape == (3, 3, 32, 48)
        assert out[k].dtype == torch.float32
        assert 0.0 <= out[k].min() and out[k].max() <= 1.0
    assert out["mask"].shape == (3, 1, 32, 48)
    # 4 x 6 = 24 patches: int(24 * 0.25) = 6 visible, 18 removed, per image
    assert torch.allclose(out["mask"].mean(dim=(1, 2, 3)), torch.full((3,), 18 / 24))
    assert torch.equal(out["original"], denormalize(imgs))
    model.eval()
    reconstruct(model, imgs, 0.5, seed=0)
    assert not model.training


def test_reconstruct_deterministic_per_seed():
    model = tiny_model()
    imgs = batch(model, n=2)
    a = reconstruct(model, imgs, 0.5, seed=3)
    b = reconstruct(model, imgs, 0.5, seed=3)
    for k in (*KEYS, "mask"):
        assert torch.equal(a[k], b[k]), k
    c = reconstruct(model, imgs, 0.5, seed=4)
    assert not torch.equal(a["mask"], c["mask"])
    assert not torch.equal(a["reconstruction"], c["reconstruction"])


def test_visible_patches_pasted_exactly_and_masked_is_grey():
    model = tiny_model()
    imgs = batch(model, n=2)
    out = reconstruct(model, imgs, 0.5, seed=0)
    visible = (out["mask"] == 0).expand(-1, 3, -1, -1)
    removed = ~visible
    assert visible.any() and removed.any()
    assert torch.equal(out["reconstruction_visible"][visible], out["original"][visible])
    assert torch.equal(out["reconstruction_visible"][removed], out["reconstruction"][removed])
    assert torch.equal(out["masked"][visible], out["original"][visible])
    assert torch.all(out["masked"][removed] == 0.5)


def test_mask_matches_model_forward_mask():
    model = tiny_model()
    imgs = batch(model, n=2)
    out = reconstruct(model, imgs, 0.75, seed=7)
    noise = torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, _, mask = model(imgs, mask_ratio=0.75, noise=noise)
    p = model.patch_size
    mask_px = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3))[:, :1]
    assert torch.equal(out["mask"], mask_px)


def test_norm_pix_denormalised_with_true_patch_stats():
    model = tiny_model(norm_pix_loss=True)
    imgs = batch(model, n=2)
    out = reconstruct(model, imgs, 0.75, seed=0)
    noise = torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, pred, _ = model(imgs, mask_ratio=0.75, noise=noise)
    target = model.patchify(imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    expected = denormalize(model.unpatchify(pred * (var + 1e-6) ** 0.5 + mean))
    assert torch.allclose(out["reconstruction"], expected, atol=1e-6)


def test_reconstruct_rejects_wrong_size_and_bad_ratio():
    model = tiny_model()
    with pytest.raises(MaelabError):
        reconstruct(model, torch.randn(1, 3, 32, 32), 0.75)
    with pytest.raises(MaelabError):
        reconstruct(model, batch(model), 1.0)


# --- figures --------------------------------------------------------------------------------------
def test_grid_png_written_non_square(tmp_path):
    model = tiny_model((32, 48))
    imgs = batch(model, n=2)
    path = save_reconstruction_grid(model, imgs, [0.5, 0.75], tmp_path / "sub" / "grid.png", seed=0, titles=["a", "b"])
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
    # 7 panels wide, 2 rows high, wide images: clearly wider than tall, not tiny, not huge
    assert 800 < w < 4000 and 200 < h < 1500 and w > 2.5 * h


def test_grid_layout_titles_and_no_caption_for_raw_pixels():
    model = tiny_model((32, 48))
    fig = reconstruction_grid(model, batch(model, n=2), [0.75, 0.9], seed=0, titles=["first", "second"])
    assert len(fig.axes) == 2 * (1 + 3 * 2)
    texts = figure_texts(fig)
    # 24 patches: 0.9 keeps int(2.4) = 2, so 91.7 % are hidden, and the title says what the picture shows
    for t in ("original", "masked 75%", "masked 91.7% (90% asked)", "reconstruction", "reconstruction + visible",
              "first", "second"):
        assert t in texts, t
    assert not any("norm-pix" in t for t in texts)


def test_grid_norm_pix_caption(tmp_path):
    model = tiny_model((32, 32), norm_pix_loss=True)
    fig = reconstruction_grid(model, batch(model, n=1), [0.75])
    assert NORM_PIX_CAPTION in [t.get_text() for t in fig.texts]
    assert "leaks" in NORM_PIX_CAPTION and "true patch mean/std" in NORM_PIX_CAPTION
    save_reconstruction_grid(model, batch(model, n=1), [0.75], tmp_path / "np.png")
    assert (tmp_path / "np.png").stat().st_size > 1000


def test_grid_bad_titles():
    model = tiny_model()
    with pytest.raises(MaelabError):
        reconstruction_grid(model, batch(model, n=2), [0.75], titles=["only one"])


def test_grid_from_paths(tmp_path):
    model = tiny_model((32, 48))
    p = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(p)
    fig = reconstruction_grid(model, [p], [0.75])
    # folder (the class of an ImageFolder) / file, broken into lines that fit beside the row
    assert f"{tmp_path.name}/pic.png" in [t.replace("\n", "") for t in figure_texts(fig)]


# --- image loading --------------------------------------------------------------------------------
def _rgb_array(h=40, w=60):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1", "I;16", "RGB"])
def test_load_images_modes(tmp_path, mode):
    im = Image.fromarray(_rgb_array())
    if mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257))
    else:
        im = im.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"img_{mode.replace(';', '')}.{ext}"
    im.save(path)
    x = load_images_for_model([path], (32, 48))
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    px = denormalize(x)
    assert torch.isfinite(x).all()
    assert px.std() > 0.01  # not a blank image
    if mode in ("L", "LA", "I;16", "1"):  # grayscale becomes three equal channels
        assert torch.allclose(px[:, 0], px[:, 1], atol=1e-5) and torch.allclose(px[:, 1], px[:, 2], atol=1e-5)


def test_load_images_rgba_transparent_is_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(path)
    px = denormalize(load_images_for_model([path], 16))
    assert torch.allclose(px, torch.ones_like(px), atol=1e-5)


def test_load_images_resize_and_center_crop(tmp_path):
    # 40x120 image: left third red, middle green, right third blue -> square crop keeps the middle
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:80, 1] = 255
    arr[:, 80:, 2] = 255
    path = tmp_path / "bands.png"
    Image.fromarray(arr).save(path)
    px = denormalize(load_images_for_model(str(path), 16))
    assert px.shape == (1, 3, 16, 16)
    assert px[0, 1].mean() > 0.95 and px[0, 0].mean() < 0.05 and px[0, 2].mean() < 0.05
    # same file, two sizes in one call order-preserving batch
    two = load_images_for_model([path, path], (8, 24))
    assert two.shape == (2, 3, 8, 24) and torch.equal(two[0], two[1])


def test_load_images_errors(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(MaelabError, match="corrupt.png"):
        load_images_for_model([bad], 32)
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(_rgb_array(64, 64)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(MaelabError, match="truncated.jpg"):
        load_images_for_model([truncated], 32)
    with pytest.raises(MaelabError, match="missing.png"):
        load_images_for_model([tmp_path / "missing.png"], 32)
    with pytest.raises(MaelabError):
        load_images_for_model([], 32)
    with pytest.raises(MaelabError) as info:
        load_images_for_model([bad], 32)
    assert "\n" not in str(info.value)


# --- curves ---------------------------------------------------------------------------------------
def _write_metrics(path, truncated=True, eval_lines=True):
    lines = []
    for step in range(0, 200, 10):
        lines.append(json.dumps({"step": step, "epoch": step // 50, "loss": 1.0 / (1 + step / 50), "lr": 1e-4 * step / 200}))
        if eval_lines and step % 50 == 40:
            lines.append(json.dumps({"epoch": step // 50, "knn_top1": 10.0 + step / 10, "val_top1": 5.0 + step / 8}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 200, "epoch": 4, "lo'
    path.write_text(text)


def test_curves_truncated_last_line(tmp_path):
    src = tmp_path / "metrics.jsonl"
    _write_metrics(src, truncated=True)
    out = plot_curves(src, tmp_path / "curves.png")
    assert out.exists() and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300


def test_curves_loss_only_and_garbage_lines(tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text('{"step": 1, "loss": 0.9}\nnot json\n[1, 2]\n\n{"step": 2, "loss": 0.8}\n{"step": 3, "loss": true}\n')
    plot_curves(src, tmp_path / "c.png")
    assert (tmp_path / "c.png").exists()


def test_curves_errors(tmp_path):
    src = tmp_path / "eval_only.jsonl"
    src.write_text('{"epoch": 0, "knn_top1": 12.0}\n{"step": 3, "lo')
    with pytest.raises(MaelabError, match="loss"):
        plot_curves(src, tmp_path / "c.png")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MaelabError):
        plot_curves(tmp_path / "empty.jsonl", tmp_path / "c.png")
    with pytest.raises(MaelabError, match="nope.jsonl"):
        plot_curves(tmp_path / "nope.jsonl", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_loss_overlay_draws_every_run_and_skips_missing_ones(tmp_path):
    for name, start in (("a", 1.0), ("b", 0.8)):
        (tmp_path / f"{name}.jsonl").write_text("".join(f'{{"step": {s}, "loss": {start / s}}}\n' for s in range(1, 6)))
    (tmp_path / "eval.jsonl").write_text('{"epoch": 0, "knn_top1": 12.0}\n')
    out = plot_loss_overlay({"pre-training": {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"},
                             "fine-tune": {"a": tmp_path / "missing.jsonl", "b": tmp_path / "eval.jsonl"}},
                            tmp_path / "o.png", title="sweep")
    with Image.open(out) as im:  # the fine-tune panel had no training line: one panel, not two
        assert im.format == "PNG" and 300 < im.size[0] < 700
    with pytest.raises(MaelabError, match="no training lines"):
        plot_loss_overlay({"x": {"a": tmp_path / "missing.jsonl"}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_16_bit_pgm_is_scaled_by_bit_depth_like_the_training_path(tmp_path):
    from maelab.data.folders import open_rgb
    from maelab.data.folders import to_rgb as _to_rgb

    path = tmp_path / "dim.pgm"
    path.write_bytes(b"P5\n8 8\n65535\n" + np.full((8, 8), 150, dtype=">u2").tobytes())  # 150 of 65535: near black
    with Image.open(path) as im:
        shown = np.asarray(_to_rgb(im))
    assert shown.max() <= 1 and np.array_equal(shown, np.asarray(open_rgb(str(path))))


def test_visualize_on_a_recipe_or_sweep_folder_names_the_runs_inside(tmp_path, capsys):
    """`visualize --checkpoint runs/recipe` said only "holds no checkpoint"; its pre-training is one level down."""
    from maelab.cli import main

    for run in ("recipe/pretrain", "recipe/finetune_mae", "sweep/mask-ratio=0.75/pretrain"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.yaml").write_text("run: {}\n")
    for folder, named in (("recipe", "recipe/finetune_mae"), ("sweep", "sweep/mask-ratio=0.75/pretrain")):
        assert main(["visualize", "--checkpoint", str(tmp_path / folder), "--images", "a.png"]) == 2
        assert f"it holds runs, e.g. {tmp_path / named}" in capsys.readouterr().err


def test_long_row_labels_stay_beside_their_own_row():
    """A long `class/file` label, drawn up the side of its row, ran into the rows above and below: it is
    broken into lines (after the `/` first) that fit the panel's height, and shortened around "…" when even
    three lines would not hold it; the figure widens its left margin for the lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from maelab.viz.reconstruct import fit_label

    model = tiny_model(img_size=(32, 32))
    long = "a_very_long_class_name_of_birds/IMG_20240101_123456_very_long_camera_file_name_001.jpg"
    titles = ["airplane/0001.jpg", long, "x/" + "y" * 200 + ".png"]
    fig = reconstruction_grid(model, batch(model, n=3), 0.75, titles=titles)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    labelled = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in labelled] == [fit_label(t, 1.6) for t in titles]
    assert labelled[0].get_ylabel() == "airplane/0001.jpg"  # a short label is left whole
    assert labelled[1].get_ylabel().endswith("_001.jpg") and "…" in labelled[1].get_ylabel()  # the file name ends it
    assert labelled[2].get_ylabel().endswith("yyy.png")  # the file's suffix survives the shortening
    boxes = [ax.yaxis.label.get_window_extent(renderer) for ax in labelled]
    rows = [ax.get_window_extent(renderer) for ax in labelled]
    for box, row in zip(boxes, rows):
        assert row.y0 - 1 <= box.y0 and box.y1 <= row.y1 + 1  # within its own row's height
        assert box.x0 >= 0  # and inside the figure


def test_a_ratio_that_would_hide_every_patch_is_titled_with_the_ratio_that_ran():
    """4 patches at 0.9 keep one visible (75 % masked): the picture was titled "masked 90%"."""
    import warnings

    model = tiny_model(img_size=(16, 16))  # patch 8: 4 patches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model says it too; the title is what is checked here
        fig = reconstruction_grid(model, batch(model, n=1), [0.5, 0.9])
    titles = [t for t in figure_texts(fig) if t.startswith("masked")]
    assert titles == ["masked 50%", "masked 75% (90% asked)"]
    model = tiny_model(img_size=(16, 40))  # 2 x 5 = 10 patches: 0.75 keeps 2 (80 %), 0.9 keeps 1 (90 %)
    fig = reconstruction_grid(model, batch(model, n=1), [0.75, 0.9])
    assert [t for t in figure_texts(fig) if t.startswith("masked")] == ["masked 80% (75% asked)", "masked 90%"]


def test_visualize_of_a_one_channel_mae_says_why_it_cannot_draw(tmp_path, capsys):
    """An MAE made in Python with in_chans=1 ended in the model's own "takes images of shape (N, 1, 28, 28),
    got (1, 3, 28, 28)": a tensor the user never made."""
    from maelab.cli import main
    from maelab.interop import save_mae

    torch.manual_seed(0)
    save_mae(MaskedAutoencoder(img_size=(16, 16), in_chans=1, **TINY), tmp_path / "gray.safetensors")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["visualize", "--checkpoint", str(tmp_path / "gray.safetensors"), "--images", str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "r.png")]) == 2
    assert "takes 1-channel images; maelab reads every image as 3-channel RGB" in capsys.readouterr().err


def test_reconstruct_of_a_one_channel_mae_is_refused_not_tinted():
    """reconstruct() undid ImageNet's three channel statistics on a grey model's output: its pictures came out
    tinted (a grey 0 became (0.49, 0.46, 0.41)), without a word."""
    model = MaskedAutoencoder(img_size=(16, 16), in_chans=1, **TINY)
    with pytest.raises(MaelabError, match="takes 1-channel images; reconstruction pictures are drawn in RGB"):
        reconstruct(model, torch.zeros(1, 1, 16, 16), 0.75)


def test_reconstruct_of_uint8_pixels_is_refused_as_the_model_refuses_them():
    """reconstruct() cast to float before the model's own check: uint8 pixels (0-255) were drawn as a white
    picture and reconstructed from garbage, without a word; the model itself refuses them, saying how to fix it."""
    model = MaskedAutoencoder(img_size=(16, 16), **TINY)
    with pytest.raises(MaelabError, match="takes ImageNet-normalised float images, got torch.uint8"):
        reconstruct(model, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 0.75)
    with pytest.raises(MaelabError, match="an empty batch"):  # the loss of no patches was NaN
        model(torch.zeros(0, 3, 16, 16))


def test_pictures_of_a_block_or_grid_run_show_its_own_masks():
    """Pictures always drew random masks: a run trained on blocks showed scattered patches, titled as if
    they were its masks."""
    from maelab.viz import reconstruct

    model = tiny_model(img_size=(32, 32))  # patch 8: a 4 x 4 grid
    x = batch(model, n=2)
    grid = reconstruct(model, x, 0.75, seed=1, mask_type="grid")["mask"][:, 0, ::8, ::8]  # one pixel per patch
    for m in grid:
        kept = (m == 0).nonzero()
        assert len(kept) == 4 and len({int(r) % 2 for r, _ in kept}) == 1 and len({int(c) % 2 for _, c in kept}) == 1
    assert not torch.equal(reconstruct(model, x, 0.75, seed=1, mask_type="block")["mask"],
                           reconstruct(model, x, 0.75, seed=1)["mask"])
    fig = reconstruction_grid(model, x, [0.75, 0.9], mask_type="grid")  # no lattice at 0.9: random there
    assert [t for t in figure_texts(fig) if t.startswith("masked")] == ["masked 75%, grid", "masked 93.8% (90% asked)"]
