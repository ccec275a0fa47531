"""Sizes travel with the weights and are never guessed: non-square models through official / timm files,
files that do not record their size, damaged tensors, resizes that are logged, official fine-tuned
classifiers, and the messages for files maelab will not read."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from maelab.cli import main
from maelab.errors import MaelabError
from maelab.interop import export_official, load_mae, load_official_state_dict, read_encoder, save_timm_checkpoint
from maelab.interop.official import infer_mae_architecture, patch_grid
from maelab.models.mae import MaskedAutoencoder
from maelab.models.pos_embed import sincos_2d
from maelab.models.vit import encode, features_model

QUIET = ["--num-workers", "0"]


def wide_mae(img_size=(16, 64), seed=0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 64, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def features(path, x, pool="token", img_size=None):
    enc = read_encoder(path, num_heads=2, img_size=img_size)
    with torch.no_grad():
        return encode(features_model(enc, enc.arch, img_size), x, pool), enc


def strip_record(path):
    """The same weights as a file written elsewhere would hold them: no maelab size record."""
    sd = load_official_state_dict(path)
    torch.save({"model": sd}, path)


@pytest.mark.parametrize("img_size", [(16, 64), (32, 64)])
@pytest.mark.parametrize("fmt", ["official", "timm"])
def test_non_square_models_come_back_at_their_own_size(tmp_path, img_size, fmt):
    mae = wide_mae(img_size)
    path = (export_official(mae, tmp_path / "m.pth") if fmt == "official"
            else save_timm_checkpoint(mae, tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, *img_size)
    got, enc = features(path, x)
    assert tuple(enc.arch["img_size"]) == img_size
    with torch.no_grad():
        torch.testing.assert_close(got, mae.forward_features(x)[:, 0], rtol=0, atol=1e-5)


def test_a_file_without_a_record_shows_its_grid_by_its_sin_cos_table(tmp_path):
    """16x64 px with patch 4 is 4x16 = 64 patches, which happens to be a square count: never 8x8."""
    mae = wide_mae()
    path = export_official(mae, tmp_path / "m.pth")
    strip_record(path)
    x = torch.randn(2, 3, 16, 64)
    got, enc = features(path, x)
    assert tuple(enc.arch["img_size"]) == (16, 64)
    assert any("4x16 read from the file's sin-cos position table" in n for n in enc.notes)
    with torch.no_grad():
        torch.testing.assert_close(got, mae.forward_features(x)[:, 0], rtol=0, atol=1e-5)
        assert load_mae(path)[0].img_size == (16, 64)


def test_a_learned_table_without_a_record_needs_a_size_that_factors(tmp_path):
    mae = wide_mae()
    with torch.no_grad():
        mae.pos_embed.normal_(0, 0.02)  # no sin-cos, no 2-D structure: the file cannot show its grid
    sd = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "learned.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(MaelabError, match="does not record its image size.*pass --img-size"):
        read_encoder(path, num_heads=2)
    with pytest.raises(MaelabError, match="--img-size 24 24 gives 36"):
        read_encoder(path, num_heads=2, img_size=(24, 24))
    assert tuple(read_encoder(path, num_heads=2, img_size=(16, 64)).arch["img_size"]) == (16, 64)


def test_convert_takes_the_img_size_its_error_asks_for(tmp_path, capsys):
    """`convert` said "pass --img-size HEIGHT WIDTH" for a file whose learned table does not show its grid,
    and then refused the flag ("unrecognized arguments"): such a file could be used with --init, never
    converted. A full MAE and a classifier head both convert now; a classifier is not resized."""
    mae = wide_mae()
    with torch.no_grad():
        mae.pos_embed.normal_(0, 0.02)
        mae.decoder_pos_embed.normal_(0, 0.02)
    path = tmp_path / "learned.pth"
    torch.save({"model": mae.state_dict()}, path)
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(path), str(out), "--to", "maelab"]) == 2
    assert "pass --img-size HEIGHT WIDTH" in capsys.readouterr().err
    assert main(["convert", str(path), str(out), "--to", "maelab", "--img-size", "16", "64"]) == 0
    back = load_mae(out)[0]
    assert back.img_size == (16, 64)  # the tables as they were, read on the 4x16 grid the flag names
    assert torch.equal(back.pos_embed, mae.pos_embed) and torch.equal(back.decoder_pos_embed, mae.decoder_pos_embed)
    vit = VisionTransformer(img_size=(16, 64), patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    classifier = tmp_path / "cls.pth"
    torch.save({"model": vit.state_dict()}, classifier)  # timm's learned table: random, no grid in it
    assert main(["convert", str(classifier), str(tmp_path / "c.safetensors"), "--to", "timm", "--img-size", "16", "64",
                 "--num-heads", "2"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "c2.safetensors"), "--to", "timm",
                 "--img-size", "32", "32"]) == 2  # the export records 16x64: a classifier is not resized
    assert "is a classifier for 16x64 px; convert does not resize a classifier" in capsys.readouterr().err
    assert main(["convert", str(classifier), str(tmp_path / "c3.safetensors"), "--to", "timm", "--img-size", "0"]) == 2
    assert "--img-size takes one side or height and width, positive" in capsys.readouterr().err


def test_truncated_position_tables_are_refused_with_or_without_a_record(tmp_path):
    mae = wide_mae((32, 32))  # 8x8 = 64 patches; 49 of them look like a 7x7 (28 px) model
    path = export_official(mae, tmp_path / "m.pth")
    raw = torch.load(path, weights_only=True)
    raw["model"]["pos_embed"] = raw["model"]["pos_embed"][:, :50]
    torch.save(raw, path)
    with pytest.raises(MaelabError, match="pos_embed has 49 patch rows, but the file records a 32x32 model"):
        read_encoder(path, num_heads=2)
    strip_record(path)
    with pytest.raises(MaelabError, match="pos_embed is damaged: it is the sin-cos table of a 7x8 grid"):
        read_encoder(path, num_heads=2)


@pytest.mark.parametrize("key", ["blocks.0.mlp.fc1.weight", "patch_embed.proj.weight", "blocks.1.norm1.weight"])
def test_a_truncated_tensor_is_named_not_the_tensors_around_it(tmp_path, key):
    sd = wide_mae().state_dict()
    sd[key] = sd[key][:5]
    with pytest.raises(MaelabError) as err:
        infer_mae_architecture(sd)
    assert key in str(err.value) and "damaged" in str(err.value)
    assert "blocks.1.mlp.fc1.weight" not in str(err.value).replace(key, "")


def test_patch_grid_prefers_the_record_then_a_size_that_factors():
    sd = {"pos_embed": torch.zeros(1, 1 + 64, 32)}
    record = {"img_size": [16, 64], "patch_size": 4, "norm_eps": 1e-6}
    assert patch_grid(sd, 4, record=record) == (16, 64)
    assert patch_grid(sd, 4, img_size=(64, 16)) == (64, 16)  # the user says so, and it factors
    with pytest.raises(MaelabError, match="records patch 8"):
        patch_grid(sd, 4, record=dict(record, patch_size=8))


def test_img_size_different_from_the_checkpoint_is_logged(tmp_path, capsys, wide_images):
    path = export_official(wide_mae(), tmp_path / "m.pth")
    assert main(["features", "--init", str(path), "--num-heads", "2", "--data", str(wide_images), "--img-size", "32",
                 "128", "--out", str(tmp_path / "f.npy"), *QUIET]) == 0
    assert "pos_embed resized 4x16 -> 8x32 (bicubic)" in capsys.readouterr().out


def test_mae_level_resize_keeps_weights_and_takes_the_new_grids_sin_cos_tables(tmp_path, capsys, wide_images):
    mae = wide_mae((32, 32))
    path = export_official(mae, tmp_path / "m.pth")
    big, meta = load_mae(path, img_size=48)
    assert big.img_size == (48, 48) and any("resized from 32x32 to 48x48" in n for n in meta["notes"])
    assert torch.equal(big.pos_embed[0], sincos_2d(32, (12, 12)))
    assert torch.equal(big.blocks[1].mlp.fc1.weight, mae.blocks[1].mlp.fc1.weight)
    out = tmp_path / "big.png"
    images = [str(p) for p in sorted(wide_images.rglob("*.png"))[:2]]
    assert main(["visualize", "--checkpoint", str(path), "--images", *images, "--img-size", "48", "--out",
                 str(out)]) == 0
    assert Image.open(out).size[0] > 0 and "resized from 32x32 to 48x48" in capsys.readouterr().out


# --- official fine-tuned classifiers (models_vit with global pool: fc_norm + head, no norm) -------------
def official_classifier(path, seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5,
                            global_pool="avg", qkv_bias=True).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
        vit.pos_embed.copy_(sincos_2d(64, (4, 4)).unsqueeze(0) + 0.01 * torch.randn_like(vit.pos_embed))
    assert "norm.weight" not in vit.state_dict() and "fc_norm.weight" in vit.state_dict()
    torch.save({"model": vit.state_dict()}, path)
    return vit


def test_official_finetuned_average_features_are_its_pre_logits(tmp_path):
    vit = official_classifier(tmp_path / "ft.pth")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)  # fc_norm(mean(patch tokens))
    got, _ = features(tmp_path / "ft.pth", x, pool="avg")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_official_finetuned_converts_to_timm_and_maelab(tmp_path, capsys):
    vit = official_classifier(tmp_path / "ft.pth")
    x = torch.randn(2, 3, 32, 32)
    assert main(["convert", str(tmp_path / "ft.pth"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    assert "ignored" not in capsys.readouterr().out  # the classifier keeps its head: nothing was left out
    back = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5,
                             global_pool="avg").eval()
    from safetensors.torch import load_file
    back.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), vit(x), rtol=0, atol=1e-5)
    assert main(["convert", str(tmp_path / "ft.pth"), str(tmp_path / "m.safetensors"), "--to", "maelab",
                 "--num-heads", "2"]) == 0
    got, enc = features(tmp_path / "m.safetensors", x, pool="avg")
    assert enc.source == "maelab-finetune"
    with torch.no_grad():
        torch.testing.assert_close(got, vit.forward_head(vit.forward_features(x), pre_logits=True), rtol=0, atol=1e-5)


def test_official_finetuned_to_hf_is_refused_with_what_to_do(tmp_path, capsys):
    official_classifier(tmp_path / "ft.pth")
    assert main(["convert", str(tmp_path / "ft.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "fine-tuned classifier" in err and "--to timm" in err and "missing 2" not in err


# --- messages ---------------------------------------------------------------------------------------
class _Payload:
    pass


def test_a_pickle_that_needs_code_is_refused_by_maelab_without_torch_text(tmp_path, capsys, wide_images):
    path = tmp_path / "evil.pth"
    torch.save({"model": wide_mae().state_dict(), "extra": _Payload()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch UserWarning lines before maelab's own
        assert main(["features", "--init", str(path), "--data", str(wide_images), "--out", str(tmp_path / "f.npy")]) == 2
    err = capsys.readouterr().err
    assert f"refusing {path}: it is a pickle that needs test_interop_sizes._Payload" in err
    assert "weights_only" not in err and "Warning" not in err


def test_official_training_checkpoints_with_their_args_namespace_load(tmp_path):
    import argparse

    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": wide_mae().state_dict(), "epoch": 799, "args": argparse.Namespace(lr=1e-3)}, path)
    assert set(load_official_state_dict(path)) == set(wide_mae().state_dict())


def test_a_folder_given_as_an_official_checkpoint_says_so(tmp_path):
    with pytest.raises(MaelabError, match="is a folder; expected a checkpoint file"):
        load_official_state_dict(tmp_path)
