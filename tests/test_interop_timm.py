"""maelab encoder -> timm VisionTransformer (offline: local files only)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from maelab import create_model
from maelab.errors import MaelabError
from maelab.interop import create_timm_encoder, save_timm_checkpoint, to_timm_state_dict
from maelab.models.mae import MaskedAutoencoder


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (LayerNorms and biases too) except the fixed sin-cos tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def vit_tiny_mae():
    torch.manual_seed(0)
    # ViT-Tiny/16 encoder (the timm architecture); a 1-block decoder keeps the fixture cheap.
    return _randomize(create_model("mae_vit_tiny_patch16", decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2))


@pytest.fixture(scope="module")
def timm_file(vit_tiny_mae, tmp_path_factory):
    return save_timm_checkpoint(vit_tiny_mae, tmp_path_factory.mktemp("timm") / "mae_vit_tiny.safetensors")


def _assert_same_weights(timm_model, exported):
    sd = timm_model.state_dict()
    assert set(sd) == set(exported)  # nothing silently skipped (pretrained loading is non-strict)
    for k, v in exported.items():
        assert torch.equal(sd[k], v), k


def test_timm_pretrained_file_overlay_gives_equal_forward_features(vit_tiny_mae, timm_file):
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_file)), num_classes=0
    ).eval()
    _assert_same_weights(vit, to_timm_state_dict(vit_tiny_mae))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (vit.forward_features(x) - vit_tiny_mae.forward_features(x)).abs().max().item()
    assert delta < 1e-5


def test_timm_checkpoint_path_gives_equal_forward_features(vit_tiny_mae, timm_file):
    vit = timm.create_model("vit_tiny_patch16_224", checkpoint_path=str(timm_file), num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = (vit.forward_features(x) - vit_tiny_mae.forward_features(x)).abs().max().item()
    assert delta < 1e-5


def test_create_timm_encoder_matches_on_non_square_images():
    mae = _randomize(MaskedAutoencoder(img_size=(32, 64), patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), seed=3)
    vit = create_timm_encoder(mae)
    assert tuple(vit.patch_embed.grid_size) == (4, 8)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        assert (vit.forward_features(x) - mae.forward_features(x)).abs().max().item() < 1e-5
        # token pooling = the cls token after the final norm
        assert (vit(x) - mae.forward_features(x)[:, 0]).abs().max().item() < 1e-5


def test_avg_pool_export_moves_final_norm_to_fc_norm_after_pooling():
    mae = _randomize(MaskedAutoencoder(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), seed=4)
    sd = to_timm_state_dict(mae, global_pool="avg")
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    vit = create_timm_encoder(mae, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = mae.patch_embed(x) + mae.pos_embed[:, 1:]
        tokens = torch.cat([(mae.cls_token + mae.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
        for blk in mae.blocks:
            tokens = blk(tokens)
        expected = F.layer_norm(tokens[:, 1:].mean(1), (64,), mae.norm.weight, mae.norm.bias, eps=1e-6)
        assert (vit(x) - expected).abs().max().item() < 1e-5


def test_timm_export_holds_encoder_only_and_rejects_unknown_pool():
    mae = MaskedAutoencoder(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    sd = to_timm_state_dict(mae.state_dict())
    assert set(sd) == set(mae.encoder_state_dict())
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    with pytest.raises(MaelabError, match="global.pool must be one of"):
        to_timm_state_dict(mae, global_pool="map")


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_fine_tuned_classifier_exports_to_timm_with_its_head(tmp_path, pool):
    from timm.models import load_checkpoint
    from timm.models.vision_transformer import VisionTransformer

    from maelab.commands.convert import convert
    from maelab.interop.timm_export import save_timm_classifier
    from maelab.models.vit import build_vit, vit_arch, vit_meta
    from maelab.train.checkpoint import save_checkpoint

    arch = vit_arch(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2))
    torch.manual_seed(0)
    vit = _randomize(build_vit(arch, 7, pool))
    meta = vit_meta(arch, (32, 32), num_classes=7, global_pool=pool, classes=list("abcdefg"), init="x")
    save_checkpoint(tmp_path / "ft", "epoch_0001", vit.state_dict(), {}, {"model": meta, "global_step": 1})
    path = convert(tmp_path / "ft", tmp_path / "ft_timm", "timm")
    assert path == tmp_path / "ft_timm.safetensors"
    timm_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=7,
                                 global_pool=pool)
    load_checkpoint(timm_vit, str(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_vit.eval()(x), vit(x))
    # docs/interop.md's recipe: a registered name, the classifier's own settings, checkpoint_path=
    documented = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                   num_heads=2, num_classes=7, global_pool=pool, checkpoint_path=str(path))
    torch.testing.assert_close(documented.eval()(x), vit(x))
    with pytest.raises(MaelabError, match="fine-tuned with global pool"):
        save_timm_classifier(vit.state_dict(), meta, tmp_path / "x.safetensors",
                             global_pool="token" if pool == "avg" else "avg")


def test_exported_files_are_whole_and_get_the_umask_permissions(tmp_path):
    import os

    from maelab.interop import save_hf_pretrained

    model = create_model("mae_vit_tiny_patch4")
    old = os.umask(0o022)
    try:
        timm_file = save_timm_checkpoint(model, tmp_path / "enc.safetensors")
        hf_dir = save_hf_pretrained(model, tmp_path / "hf")
    finally:
        os.umask(old)
    for f in (tmp_path / "enc.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not [p for p in tmp_path.rglob("*.tmp")] and timm_file and hf_dir
