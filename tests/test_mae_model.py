"""Properties of the MAE itself: patch layout, masking, encoder, decoder, loss, position embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from maelab import MaelabError, MaskedAutoencoder, create_model, patchify, random_masking, unpatchify
from maelab.models.checks import num_visible
from maelab.models.pos_embed import sincos_2d
from maelab.models.presets import PRESETS

from conftest import TINY_MAE


def tiny(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(**{**TINY_MAE, **kw})


@pytest.mark.parametrize("h,w,p", [(32, 32, 4), (32, 48, 8), (224, 160, 16), (28, 14, 14)])
def test_patchify_unpatchify_round_trip_square_and_non_square(h, w, p):
    x = torch.randn(2, 3, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * 3)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p)), x)


def test_patch_layout_is_row_major_with_channel_fastest():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(x, 2)
    n, row, col, pr, pc, ch = 1, 1, 2, 1, 0, 2  # patch (1, 2) of a 2x3 grid, pixel (1, 0), channel 2
    assert patches[n, row * 3 + col, (pr * 2 + pc) * 3 + ch] == x[n, ch, row * 2 + pr, col * 2 + pc]


def test_patchify_rejects_indivisible_size():
    with pytest.raises(MaelabError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 4)


@pytest.mark.parametrize("length,ratio", [(64, 0.75), (49, 0.75), (196, 0.9), (10, 0.5), (7, 0.0)])
def test_masking_keeps_the_same_count_for_every_sample(length, ratio):
    x = torch.randn(5, length, 8)
    visible, mask, ids_restore, _ = random_masking(x, ratio, generator=torch.Generator().manual_seed(1))
    keep = int(length * (1 - ratio))
    assert visible.shape == (5, keep, 8)
    assert torch.equal(mask.sum(1), torch.full((5,), float(length - keep)))


def test_masking_is_reproducible_from_a_generator_and_from_noise():
    x = torch.randn(4, 64, 8)
    a = random_masking(x, 0.75, generator=torch.Generator().manual_seed(7))
    b = random_masking(x, 0.75, generator=torch.Generator().manual_seed(7))
    c = random_masking(x, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    noise = torch.rand(4, 64)
    assert torch.equal(random_masking(x, 0.75, noise=noise)[1], random_masking(x, 0.75, noise=noise)[1])


def test_masking_is_uniform_over_positions():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    trials = 4000
    for _ in range(trials // 200):
        _, mask, _, _ = random_masking(torch.zeros(200, 16, 1), 0.75, generator=g)
        counts += mask.sum(0)
    expected = trials * 12 / 16  # 12 of 16 removed
    # binomial std per position ~ sqrt(n p (1-p)) = sqrt(4000*.75*.25) ~ 27; allow 5 sigma
    assert (counts - expected).abs().max() < 5 * math.sqrt(trials * 0.75 * 0.25)


def test_ids_restore_inverts_the_shuffle_and_visible_tokens_are_the_kept_ones():
    x = torch.randn(3, 20, 4)
    visible, mask, ids_restore, ids_shuffle = random_masking(x, 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(20).expand(3, 20))
    keep = visible.shape[1]
    for n in range(3):
        kept = ids_shuffle[n, :keep]
        assert torch.equal(visible[n], x[n, kept])
        assert torch.all(mask[n, kept] == 0) and mask[n].sum() == 20 - keep


def test_mask_ratio_out_of_range_is_a_clear_error():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(MaelabError, match="mask ratio"):
            num_visible(64, bad)
        with pytest.raises(MaelabError):
            tiny(mask_ratio=bad)


def test_encoder_never_sees_a_masked_patch():
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    latent, mask, _, _ = model.forward_encoder(imgs, 0.75, noise)
    # overwrite every masked patch with garbage: the encoder output must not change
    patches = model.patchify(imgs)
    garbage = patches + 100 * mask.unsqueeze(-1) * torch.randn_like(patches)
    latent2, mask2, _, _ = model.forward_encoder(model.unpatchify(garbage), 0.75, noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2, rtol=0, atol=1e-5)
    assert latent.shape[1] == 1 + int(model.num_patches * 0.25)  # cls + visible only, no mask tokens


def test_loss_ignores_visible_patches():
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    loss, pred, mask = model(imgs, noise=noise)
    pred2 = pred + 50.0 * (1 - mask).unsqueeze(-1)  # change predictions on visible patches only
    assert torch.allclose(model.forward_loss(imgs, pred2, mask), loss)
    pred3 = pred + 1.0 * mask.unsqueeze(-1)
    assert not torch.allclose(model.forward_loss(imgs, pred3, mask), loss)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_is_mse_over_masked_patches(norm_pix):
    model = tiny(norm_pix_loss=norm_pix).eval()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, noise=torch.rand(2, model.num_patches))
    target = patchify(imgs, 8)
    if norm_pix:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=True)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_norm_pix_targets_have_zero_mean_unit_unbiased_variance_per_patch():
    model = tiny(norm_pix_loss=True)
    t = model.target(torch.randn(3, 3, 32, 32) * 5 + 2)
    torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(t.shape[:2]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_training_fast_path_gives_the_same_loss_and_gradients_as_the_plain_path(norm_pix):
    model = tiny(norm_pix_loss=norm_pix)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, model.num_patches)
    loss_a, _, mask_a = model(imgs, noise=noise, return_pred=True)
    grads_a = torch.autograd.grad(loss_a, [p for p in model.parameters() if p.requires_grad])
    loss_b, pred_b, mask_b = model(imgs, noise=noise, return_pred=False)
    grads_b = torch.autograd.grad(loss_b, [p for p in model.parameters() if p.requires_grad])
    assert pred_b is None and torch.equal(mask_a, mask_b)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def _independent_sincos(dim: int, rows: int, cols: int) -> torch.Tensor:
    """The reference formula written out element by element, in float64."""
    table = torch.zeros(1 + rows * cols, dim, dtype=torch.float64)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                row = table[1 + r * cols + c]
                row[i], row[quarter + i] = math.sin(c * w), math.cos(c * w)  # first half: column
                row[2 * quarter + i], row[3 * quarter + i] = math.sin(r * w), math.cos(r * w)  # then row
    return table.float()


@pytest.mark.parametrize("dim,rows,cols", [(16, 3, 3), (32, 2, 5), (64, 4, 4)])
def test_sincos_matches_the_independent_formula_with_column_first(dim, rows, cols):
    torch.testing.assert_close(sincos_2d(dim, (rows, cols)), _independent_sincos(dim, rows, cols), rtol=0, atol=1e-6)


def test_position_embeddings_are_fixed_sincos_and_not_trained():
    model = tiny()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(64, (4, 4)))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d(32, (4, 4)))
    assert torch.all(model.pos_embed[0, 0] == 0)


def test_reference_initialisation():
    model = create_model("mae_vit_tiny_patch4")
    w = model.patch_embed.proj.weight
    fan_in, fan_out = w[0].numel(), w.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform on the flattened (D, 3p^2) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.decoder_pred.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert 0.01 < model.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03
    assert model.blocks[0].norm1.eps == 1e-6
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.act.approximate == "none"


def test_parameter_names_follow_timm_and_the_official_release():
    keys = set(create_model("mae_vit_tiny_patch4").state_dict())
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight",
                 "blocks.0.attn.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "mask_token",
                 "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.3.attn.qkv.weight",
                 "decoder_norm.bias", "decoder_pred.weight"]:
        assert name in keys, name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_the_documented_shapes(name):
    kw = PRESETS[name]
    if kw["embed_dim"] >= 768:  # build big ones on the meta device: shapes only
        with torch.device("meta"):
            model = create_model(name)
    else:
        model = create_model(name)
    assert model.pos_embed.shape == (1, 1 + (kw["img_size"] // kw["patch_size"]) ** 2, kw["embed_dim"])
    assert len(model.blocks) == kw["depth"] and len(model.decoder_blocks) == kw["decoder_depth"]
    assert model.decoder_pred.out_features == kw["patch_size"] ** 2 * 3


def test_vit_base_encoder_has_the_paper_parameter_count():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
    enc = sum(v.numel() for k, v in model.encoder_state_dict().items() if k not in ("pos_embed",))
    assert 85e6 < enc < 87e6


def test_non_square_images_work_end_to_end():
    model = tiny(img_size=(32, 64))
    assert model.grid == (4, 8) and model.pos_embed.shape[1] == 33
    loss, pred, mask = model(torch.randn(2, 3, 32, 64))
    loss.backward()
    assert pred.shape == (2, 32, 192) and mask.shape == (2, 32)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(64, (4, 8)))


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(MaelabError, match="not divisible by the patch size"):
        tiny(img_size=30)
    with pytest.raises(MaelabError, match="takes images of shape"):
        tiny()(torch.randn(1, 3, 40, 40))
    # pixels as uint8, or float64 to a float32 model: torch said "Input type (unsigned char) and bias type ..."
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(MaelabError, match=r"takes ImageNet-normalised float images, got torch.uint8: .*normalize"):
        tiny()(x.to(torch.uint8))
    with pytest.raises(MaelabError, match=r"weights are torch.float32 and the images torch.float64: x.to\(torch.float32\)"):
        tiny().forward_features(x.double())
    with pytest.raises(MaelabError, match=r"weights are torch.float64 and the images torch.float32: x.to\(torch.float64\)"):
        tiny().double()(x)
    assert tiny().double()(x.double())[0].dtype == torch.float64  # a float64 model takes float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the model: any float input
        assert torch.isfinite(tiny()(x.bfloat16())[0])


def test_features_never_mask():
    model = tiny(mask_ratio=0.9).eval()
    imgs = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(imgs)
    assert feats.shape == (2, 1 + model.num_patches, 64)
    # with an identity ordering and ratio 0, the MAE encoder sees every patch: same tokens
    noise = torch.arange(model.num_patches, dtype=torch.float32).expand(2, -1)
    latent, _, _, _ = model.forward_encoder(imgs, 0.0, noise)
    torch.testing.assert_close(feats, latent)
    torch.testing.assert_close(model.forward_features(imgs), feats)  # deterministic, no random mask


def test_image_smaller_than_a_patch_is_a_clear_error():
    with pytest.raises(MaelabError, match="at least the patch size"):
        tiny(img_size=0)


def test_math_and_fused_attention_give_the_same_features():
    from maelab.models.attention import fused_attention_wanted, set_attention_kernel
    from maelab.models.vit import build_vit, vit_arch

    assert fused_attention_wanted("cpu", False) and fused_attention_wanted("cuda", True)
    assert not fused_attention_wanted("cpu", True)  # the fused CPU kernel is slow under bf16
    vit = build_vit(vit_arch(tiny().init_kwargs), num_classes=0, global_pool="token").eval()
    imgs = torch.randn(2, 3, 32, 32)
    assert set_attention_kernel(vit, True) == "sdpa"
    fused = vit.forward_features(imgs)
    assert set_attention_kernel(vit, False) == "math"
    assert all(not b.attn.fused_attn for b in vit.blocks)
    torch.testing.assert_close(vit.forward_features(imgs), fused, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_switches_to_the_math_attention_path_and_back():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs)
    assert all(not b.attn.fused_attn for b in (*model.blocks, *model.decoder_blocks))
    model(imgs)
    assert all(b.attn.fused_attn for b in (*model.blocks, *model.decoder_blocks))


@pytest.mark.parametrize("fused", [True, False])
def test_block_for_queries_equals_the_full_block_on_those_tokens(fused):
    from maelab.models.fast_path import block_for_queries

    blk = tiny().decoder_blocks[-1]
    blk.attn.fused_attn = fused
    x = torch.randn(2, 17, blk.attn.attn_dim)
    torch.testing.assert_close(block_for_queries(blk, x, 5), blk(x)[:, 5:], rtol=1e-5, atol=1e-5)


def test_fast_path_matches_plain_path_under_cpu_bf16_autocast():
    model = tiny(norm_pix_loss=True)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, model.num_patches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, _, _ = model(imgs, noise=noise, return_pred=True)
        loss_b, _, _ = model(imgs, noise=noise, return_pred=False)
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-2, atol=0)


def test_a_mask_ratio_that_masks_nothing_is_refused():
    model = tiny()
    with pytest.raises(MaelabError, match="masks none"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=0.0)


def test_a_model_without_decoder_blocks_is_refused():
    with pytest.raises(MaelabError, match="at least one block"):
        MaskedAutoencoder(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                          decoder_embed_dim=16, decoder_depth=0, decoder_num_heads=2)


@pytest.mark.parametrize("kw,message", [
    (dict(decoder_num_heads=5), "decoder_embed_dim=32 is not divisible by decoder_num_heads=5"),
    (dict(decoder_embed_dim=130, decoder_num_heads=4), "decoder_embed_dim=130 is not divisible by decoder_num_heads=4"),
    (dict(decoder_embed_dim=6, decoder_num_heads=2), "decoder_embed_dim=6 must be a multiple of 4"),
    (dict(decoder_embed_dim=0), "decoder_embed_dim must be a positive whole number, got 0"),
    (dict(decoder_num_heads=0), "decoder_num_heads must be a positive whole number, got 0"),
    (dict(embed_dim=66, num_heads=3), "embed_dim=66 must be a multiple of 4"),
    (dict(embed_dim=64, num_heads=3), "embed_dim=64 is not divisible by num_heads=3"),
    (dict(embed_dim=-8), "embed_dim must be a positive whole number"),
    (dict(num_heads=0), "num_heads must be a positive whole number"),
])
def test_widths_and_head_counts_are_checked_before_timm_sees_them(kw, message):
    with pytest.raises(MaelabError) as e:
        tiny(**kw)
    assert message in str(e.value)


def test_the_default_mask_ratio_must_mask_something_at_construction():
    with pytest.raises(MaelabError, match="mask ratio 0.0 masks none of the 16 patches"):
        tiny(mask_ratio=0.0)
    tiny(mask_ratio=0.01)  # 16 patches: int(16 * 0.99) = 15 visible, one masked
    with pytest.raises(MaelabError, match="single patch"):
        MaskedAutoencoder(**{**TINY_MAE, "img_size": 8})


def test_finetuning_vit_checks_its_widths_and_heads():
    from maelab.interop.encoders import arch_for
    from maelab.models.vit import build_vit, vit_arch

    arch = vit_arch(TINY_MAE)
    build_vit(arch, num_classes=3)
    with pytest.raises(MaelabError, match="embed_dim=64 is not divisible by num_heads=3"):
        build_vit({**arch, "num_heads": 3})
    with pytest.raises(MaelabError, match="embed_dim=66 must be a multiple of 4"):
        build_vit({**arch, "embed_dim": 66, "num_heads": 2})
    with pytest.raises(MaelabError, match="--num-heads must be at least 1, got -3"):
        arch_for(None, "mae_vit_tiny_patch4", num_heads=-3)


def test_mask_tokens_in_the_encoder_variant_sees_every_position_and_learns():
    """Paper Table 1c's ablation: the encoder takes all L positions (masked ones as a shared token), the
    decoder gets them back in order; the loss stays on masked patches; features never mask."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
              decoder_depth=1, decoder_num_heads=2)
    sym = MaskedAutoencoder(**kw, encoder_mask_tokens=True)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    latent, mask, _, _ = sym.forward_encoder(x, 0.75, noise)
    assert latent.shape == (3, 17, 32) and int(mask.sum()) == 3 * 12
    loss, pred, mask2 = sym(x, noise=noise)
    assert pred.shape == (3, 16, 8 * 8 * 3) and torch.equal(mask, mask2)
    fast, none, _ = sym(x, noise=noise, return_pred=False)  # no fast path for this variant: the same loss
    assert none is None and torch.allclose(fast, loss)
    # changing a masked patch's pixels changes nothing; changing a visible one does
    masked_idx = int(mask[0].nonzero()[0])
    row, col = divmod(masked_idx, 4)
    y = x.clone()
    y[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 5.0
    assert torch.allclose(sym.forward_encoder(y, 0.75, noise)[0][0], latent[0], atol=1e-6)
    loss.backward()
    assert sym.encoder_mask_token.grad is not None and sym.encoder_mask_token.grad.abs().sum() > 0
    assert "encoder_mask_token" not in sym.encoder_state_dict()
    assert MaskedAutoencoder(**sym.init_kwargs).encoder_mask_tokens  # recorded, so a checkpoint rebuilds it
    plain = MaskedAutoencoder(**kw)
    assert plain.forward_encoder(x, 0.75, noise)[0].shape == (3, 5, 32)
