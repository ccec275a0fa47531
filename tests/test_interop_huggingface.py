"""transformers ViTMAE <-> maelab: the HF model (layer_norm_eps=1e-6, exact GELU) is the oracle for the
official MAE, so equal loss / predictions / mask here means maelab matches the official release."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding  # noqa: E402

from maelab.cli import main  # noqa: E402
from maelab.errors import MaelabError  # noqa: E402
from maelab.interop import (  # noqa: E402
    detect_hf_naming,
    hf_config_from_mae,
    hf_model_from_mae,
    hf_to_mae_state_dict,
    load_hf_pretrained_dir,
    load_into_mae,
    load_mae,
    mae_kwargs_from_hf_config,
    mae_to_hf_state_dict,
    save_hf_pretrained,
)
from maelab.models.mae import MaskedAutoencoder  # noqa: E402
from maelab.models.pos_embed import sincos_2d  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
GRID = (4, 4)
L = GRID[0] * GRID[1]


def hf_config(norm_pix_loss: bool, mask_ratio: float = 0.75) -> ViTMAEConfig:
    return ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=128,
        layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio,
    )


def hf_table(dim: int) -> torch.Tensor:
    """HF's own sin-cos table, with the h/w swap it applies for the official layout."""
    pe = build_2d_sinusoidal_position_embedding(*GRID, embed_dim=dim, cls_token=True)
    return torch.cat([pe[..., dim // 2:], pe[..., : dim // 2]], dim=-1).unsqueeze(0)


def randomize(model: torch.nn.Module, seed: int, hf_tables: bool = False) -> torch.nn.Module:
    """Random weights everywhere (LayerNorms, biases, mask token too). Position tables: HF's own
    sin-cos table for HF models (transformers 5.x leaves them at zero at init), kept for maelab."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" in name or "pos_embed" in name:
                if hf_tables:
                    p.copy_(hf_table(p.shape[-1]))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, L, generator=g)


def assert_same_outputs(hf_out, mae_out):
    loss, pred, mask = mae_out
    assert abs(hf_out.loss.item() - loss.item()) < 1e-5
    assert (hf_out.logits - pred).abs().max().item() < 1e-5
    assert torch.equal(hf_out.mask, mask)


def test_hf_sincos_table_equals_maelab_pos_embed():
    for dim in (64, 32):
        assert torch.allclose(hf_table(dim)[0], sincos_2d(dim, GRID), atol=1e-7)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_pretraining_weights_in_maelab_give_same_loss_pred_and_mask(norm_pix_loss):
    cfg = hf_config(norm_pix_loss)
    hf = randomize(ViTMAEForPreTraining(cfg), seed=1, hf_tables=True)
    mae = MaskedAutoencoder(**mae_kwargs_from_hf_config(cfg)).eval()
    assert mae.norm_pix_loss is norm_pix_loss
    report = load_into_mae(mae, hf_to_mae_state_dict(hf.state_dict()))
    assert report["kind"] == "full"
    # maelab's own fixed tables equal what came from HF, so nothing hinges on copying them
    assert torch.allclose(mae.pos_embed, MaskedAutoencoder(**TINY).pos_embed, atol=1e-7)
    x, noise = inputs(2)
    with torch.no_grad():
        assert_same_outputs(hf(pixel_values=x, noise=noise), mae(x, noise=noise))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_maelab_weights_in_hf_give_same_loss_pred_and_mask(norm_pix_loss):
    mae = randomize(MaskedAutoencoder(**TINY, norm_pix_loss=norm_pix_loss), seed=3)
    cfg = hf_config_from_mae(mae)
    assert (cfg.layer_norm_eps, cfg.hidden_act, cfg.norm_pix_loss) == (1e-6, "gelu", norm_pix_loss)
    hf = ViTMAEForPreTraining(cfg).eval()
    hf.load_state_dict(mae_to_hf_state_dict(mae.state_dict(), naming=detect_hf_naming(hf.state_dict())), strict=True)
    x, noise = inputs(4)
    with torch.no_grad():
        assert_same_outputs(hf(pixel_values=x, noise=noise), mae(x, noise=noise))
        assert_same_outputs(hf_model_from_mae(mae)(pixel_values=x, noise=noise), mae(x, noise=noise))


def test_v5_names_are_exactly_the_installed_transformers_keys():
    mae = MaskedAutoencoder(**TINY)
    hf = ViTMAEForPreTraining(hf_config_from_mae(mae))
    hf_sd = hf.state_dict()
    mapped = mae_to_hf_state_dict(mae, naming="v5")
    assert set(mapped) == set(hf_sd)
    assert all(mapped[k].shape == hf_sd[k].shape for k in hf_sd)
    enc = ViTMAEModel(hf_config_from_mae(mae)).state_dict()
    assert set(mae_to_hf_state_dict(mae, naming="v5", target="encoder")) == set(enc)


def test_v5_and_v4_naming_round_trip_to_identical_maelab_weights():
    mae = randomize(MaskedAutoencoder(**TINY), seed=5)
    sd = mae.state_dict()
    v4 = mae_to_hf_state_dict(sd, naming="v4")
    v5 = mae_to_hf_state_dict(sd, naming="v5")
    assert detect_hf_naming(v4) == "v4" and detect_hf_naming(v5) == "v5"
    for name in (  # the 4.x hub names, written out
        "vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight", "vit.layernorm.bias",
        "vit.encoder.layer.1.attention.attention.query.weight", "vit.encoder.layer.1.attention.attention.key.bias",
        "vit.encoder.layer.1.attention.attention.value.weight", "vit.encoder.layer.1.attention.output.dense.weight",
        "vit.encoder.layer.1.intermediate.dense.weight", "vit.encoder.layer.1.output.dense.bias",
        "vit.encoder.layer.1.layernorm_before.weight", "vit.encoder.layer.1.layernorm_after.bias",
        "decoder.mask_token", "decoder.decoder_pos_embed", "decoder.decoder_embed.weight",
        "decoder.decoder_layers.0.attention.attention.query.bias", "decoder.decoder_layers.0.output.dense.weight",
        "decoder.decoder_norm.weight", "decoder.decoder_pred.bias",
    ):
        assert name in v4, name
    assert len(v4) == len(v5) == len(sd) + 2 * 2 * (TINY["depth"] + TINY["decoder_depth"])  # qkv -> q, k, v
    q, k, v = (v5[f"vit.layers.0.attention.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["blocks.0.attn.qkv.weight"])
    for hf_sd in (v4, v5):
        back = hf_to_mae_state_dict(hf_sd)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # v4 <-> v5 through maelab is lossless too
    assert set(mae_to_hf_state_dict(hf_to_mae_state_dict(v4), naming="v5")) == set(v5)


def test_save_hf_pretrained_folder_loads_with_from_pretrained_in_both_namings(tmp_path):
    mae = randomize(MaskedAutoencoder(**TINY, norm_pix_loss=True), seed=6)
    x, noise = inputs(7)
    with torch.no_grad():
        expected = mae(x, noise=noise)
    for naming in ("v5", "v4"):  # transformers 5.x renames the 4.x hub names on load
        folder = save_hf_pretrained(mae, tmp_path / naming, naming=naming)
        hf, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert hf.config.norm_pix_loss and hf.config.layer_norm_eps == 1e-6
        with torch.no_grad():
            assert_same_outputs(hf.eval()(pixel_values=x, noise=noise), expected)
        back = load_hf_pretrained_dir(folder)
        with torch.no_grad():
            assert torch.equal(back(x, noise=noise)[1], expected[1])


def test_hf_from_pretrained_uses_the_position_tables_in_the_file_verbatim(tmp_path):
    """HF does not recompute its fixed tables on load, so save_hf_pretrained must write them (it does);
    the maelab loader falls back to its own sin-cos tables when a file lacks them."""
    mae = MaskedAutoencoder(**TINY)
    with torch.no_grad():
        mae.pos_embed.add_(1.0)
        mae.decoder_pos_embed.add_(2.0)
    hf = ViTMAEForPreTraining.from_pretrained(save_hf_pretrained(mae, tmp_path / "m"))
    assert torch.equal(hf.vit.embeddings.position_embeddings, mae.pos_embed)
    assert torch.equal(hf.decoder.decoder_pos_embed, mae.decoder_pos_embed)
    sd = mae_to_hf_state_dict(mae, naming="v4")
    del sd["vit.embeddings.position_embeddings"], sd["decoder.decoder_pos_embed"]
    (tmp_path / "config.json").write_text(hf_config_from_mae(mae).to_json_string())
    torch.save(sd, tmp_path / "pytorch_model.bin")
    back = load_hf_pretrained_dir(tmp_path)
    assert torch.equal(back.pos_embed, sincos_2d(64, GRID).unsqueeze(0))
    assert torch.equal(back.decoder_pos_embed, sincos_2d(32, GRID).unsqueeze(0))


def test_load_hf_dir_reads_hub_style_v4_pytorch_bin(tmp_path):
    """Hub folders: 4.x names, pytorch_model.bin, layer_norm_eps=1e-12 (honoured: HF runs them so)."""
    mae = randomize(MaskedAutoencoder(**TINY), seed=8)
    cfg = hf_config_from_mae(mae).to_dict()
    cfg["layer_norm_eps"] = 1e-12
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(mae_to_hf_state_dict(mae, naming="v4"), tmp_path / "pytorch_model.bin")
    back = load_hf_pretrained_dir(tmp_path)
    assert back.norm.eps == 1e-12 and back.decoder_blocks[0].norm2.eps == 1e-12
    for k, v in mae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_vitmae_model_encoder_matches_forward_features_both_directions():
    mae = randomize(MaskedAutoencoder(**TINY), seed=9)
    hf = hf_model_from_mae(mae, encoder_only=True, mask_ratio=0.0)  # HF masks nothing; maelab's default must
    x, _ = inputs(10, n=2)
    ordered = torch.arange(L, dtype=torch.float32).expand(2, L)  # identity shuffle: HF keeps order
    with torch.no_grad():
        hf_tokens = hf(pixel_values=x, noise=ordered).last_hidden_state
        assert (hf_tokens - mae.forward_features(x)).abs().max().item() < 1e-5
    enc_sd = hf_to_mae_state_dict(hf.state_dict())  # ViTMAEModel keys: no "vit." prefix, no decoder
    assert set(enc_sd) == set(mae.encoder_state_dict())
    fresh = MaskedAutoencoder(**TINY)
    assert load_into_mae(fresh, enc_sd)["kind"] == "encoder"
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), mae.forward_features(x))


def test_hf_interpolate_pos_encoding_at_native_size_changes_nothing():
    mae = randomize(MaskedAutoencoder(**TINY), seed=11)
    hf = hf_model_from_mae(mae)
    x, noise = inputs(12)
    with torch.no_grad():
        assert_same_outputs(hf(pixel_values=x, noise=noise, interpolate_pos_encoding=True), mae(x, noise=noise))


def test_foreign_or_unmappable_keys_raise_maelab_error():
    mae = MaskedAutoencoder(**TINY)
    with pytest.raises(MaelabError, match="no Hugging Face ViTMAE equivalent: head.weight"):
        mae_to_hf_state_dict({**mae.state_dict(), "head.weight": torch.zeros(10, 64)})
    v5 = mae_to_hf_state_dict(mae)
    with pytest.raises(MaelabError, match=r"unknown Hugging Face ViTMAE keys \(v5 names\): vit.pooler.dense.weight"):
        hf_to_mae_state_dict({**v5, "vit.pooler.dense.weight": torch.zeros(64, 64)})
    del v5["vit.layers.0.attention.k_proj.bias"]
    with pytest.raises(MaelabError, match=r"blocks.0.attn.qkv.bias: the k part"):
        hf_to_mae_state_dict(v5)
    with pytest.raises(MaelabError, match="not a Hugging Face ViTMAE state dict"):
        hf_to_mae_state_dict(mae.state_dict())
    with pytest.raises(MaelabError, match="square images only"):
        hf_config_from_mae(MaskedAutoencoder(**{**TINY, "img_size": (32, 64)}))
    with pytest.raises(MaelabError, match="hidden_act"):
        mae_kwargs_from_hf_config({**hf_config(False).to_dict(), "hidden_act": "relu"})


def test_hf_config_with_mask_ratio_zero_loads_with_the_papers_ratio(tmp_path):
    mae = randomize(MaskedAutoencoder(**TINY), seed=12)
    save_hf_pretrained(mae, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mask_ratio": 0.0}))  # a features-only HF config
    with pytest.warns(UserWarning, match="mask_ratio=0.0"):
        back = load_hf_pretrained_dir(tmp_path)
    assert back.mask_ratio == 0.75


@pytest.mark.parametrize("text,message", [
    (b"{not json", "cannot read .*config.json: Expecting property name"),
    (b"\xff\xfe", "cannot read .*config.json: 'utf-8' codec can't decode"),
    (b"[1, 2]", "config.json is not a Hugging Face config"),
    (b'{"model_type": "vit_mae", "hidden_size": "wide"}', "config.json holds a setting maelab cannot read"),
])
def test_a_broken_hf_config_is_one_clear_error(tmp_path, text, message):
    save_hf_pretrained(randomize(MaskedAutoencoder(**TINY), seed=12), tmp_path)
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(MaelabError, match=message):
        load_hf_pretrained_dir(tmp_path)


def test_a_config_edited_apart_from_its_weights_names_the_width(tmp_path):
    save_hf_pretrained(randomize(MaskedAutoencoder(**TINY), seed=12), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    width = cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2 * width}))
    with pytest.raises(MaelabError, match=f"says hidden_size {2 * width}, but the weights beside it are {width} wide"):
        load_hf_pretrained_dir(tmp_path)


@pytest.mark.parametrize("key,message", [
    ("image_size", r"shape mismatch.*\(config.json does not set image_size: Hugging Face's defaults 224 were taken"),
    ("intermediate_size", r"MLP ratio .* \(config.json does not set intermediate_size: Hugging Face's defaults 3072"),
])
def test_a_config_without_a_shape_setting_names_the_default_that_was_taken(tmp_path, key, message):
    save_hf_pretrained(randomize(MaskedAutoencoder(**TINY), seed=12), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MaelabError, match=message):
        load_hf_pretrained_dir(tmp_path)


# --- folders transformers itself writes ---------------------------------------------------------------
def hf_saved(tmp_path, model, name: str, **save_kwargs):
    """``model`` written by transformers' own ``save_pretrained`` (5.x writes 4.x names for the encoder
    and ``decoder.decoder_encoder.layer.N`` for the decoder)."""
    folder = tmp_path / name
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "100KB"}], ids=["single", "sharded"])
def test_folders_written_by_transformers_save_pretrained_load_with_equal_outputs(tmp_path, save_kwargs):
    hf = randomize(ViTMAEForPreTraining(hf_config(norm_pix_loss=True)), seed=21, hf_tables=True)
    x, noise = inputs(22)
    with torch.no_grad():
        expected = hf(pixel_values=x, noise=noise)
    fresh = hf_saved(tmp_path, hf, "fresh", **save_kwargs)
    # a 4.x hub-layout folder, loaded by transformers and saved again
    mae = MaskedAutoencoder(**mae_kwargs_from_hf_config(hf.config))
    load_into_mae(mae, hf_to_mae_state_dict(hf.state_dict()))
    hub = save_hf_pretrained(mae, tmp_path / "hub", naming="v4")
    resaved = hf_saved(tmp_path, ViTMAEForPreTraining.from_pretrained(hub), "resaved", **save_kwargs)
    for folder in (fresh, hub, resaved):
        mae = load_hf_pretrained_dir(folder)
        with torch.no_grad():
            assert_same_outputs(expected, mae(x, noise=noise))


def test_vitmae_model_folder_written_by_transformers_loads_into_the_encoder(tmp_path):
    hf = randomize(ViTMAEModel(hf_config(norm_pix_loss=False)), seed=23, hf_tables=True)
    x, noise = inputs(24)
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        latent, mask, _, _ = load_hf_pretrained_dir(hf_saved(tmp_path, hf, "enc")).forward_encoder(x, 0.75, noise)
    assert torch.equal(out.mask, mask)
    assert (out.last_hidden_state - latent).abs().max().item() < 1e-5


def test_a_vitmae_model_folder_is_encoder_only_for_what_needs_a_decoder(tmp_path, capsys):
    """A ViTMAEModel folder converted to --to hf / official (and drawn) with a fresh random decoder, which
    the written file then passed off as a trained one."""
    folder = hf_saved(tmp_path, randomize(ViTMAEModel(hf_config(norm_pix_loss=False)), seed=24, hf_tables=True), "enc")
    assert load_mae(folder)[1]["kind"] == "encoder"
    for to in ("hf", "official", "maelab"):
        assert main(["convert", str(folder), str(tmp_path / f"out_{to}"), "--to", to]) == 2
        assert "is an encoder-only checkpoint" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "enc.pth"), "--to", "official", "--encoder-only"]) in (0, None)
    assert main(["convert", str(folder), str(tmp_path / "t"), "--to", "timm"]) in (0, None)
    full = hf_saved(tmp_path, randomize(ViTMAEForPreTraining(hf_config(norm_pix_loss=False)), seed=25, hf_tables=True),
                    "full")
    assert load_mae(full)[1]["kind"] == "full"


def test_vit_variants_maelab_cannot_read_are_named_not_sent_to_the_grid_advice(tmp_path, capsys):
    """A HF ViTModel was told about ViTMAE's decoder defaults; timm ViTs without a cls token or with register
    / distillation tokens were told to pass an --img-size whose grid has 195 (or a prime 197) patches."""
    import timm
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    cases = {"vit": ("not a ViTMAE config (model_type='vit'): maelab reads Hugging Face ViTMAE folders", "decoder")}
    for name, kwargs, said in (("nocls", dict(class_token=False, global_pool="avg"), "no cls_token"),
                               ("reg", dict(reg_tokens=4, no_embed_class=True), "holds reg_token"),
                               ("deit", None, "holds dist_token")):
        model = (timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8) if kwargs is None
                 else timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, **kwargs))
        torch.save(model.state_dict(), tmp_path / f"{name}.pth")
        cases[f"{name}.pth"] = (said, "--img-size")
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    for name, (said, not_said) in cases.items():
        assert main(["features", "--init", str(tmp_path / name), "--data", str(tmp_path / "images"), "--out",
                     str(tmp_path / "f.npy")]) == 2
        err = capsys.readouterr().err
        assert said in err and not_said not in err, err


def test_the_same_weight_under_two_hf_names_is_refused():
    v5 = mae_to_hf_state_dict(MaskedAutoencoder(**TINY), naming="v5")
    v5["vit.encoder.layer.0.layernorm_before.weight"] = v5["vit.layers.0.layernorm_before.weight"]
    with pytest.raises(MaelabError, match="same weight under two names: vit.layers.0.layernorm_before.weight / vit.encoder.layer.0"):
        hf_to_mae_state_dict(v5)


def test_convert_cli_reads_a_folder_transformers_wrote(tmp_path):
    hf = randomize(ViTMAEForPreTraining(hf_config(norm_pix_loss=False)), seed=25, hf_tables=True)
    assert main(["convert", str(hf_saved(tmp_path, hf, "hf")), str(tmp_path / "m"), "--to", "maelab"]) in (0, None)
    assert (tmp_path / "m.safetensors").is_file()


@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_hf_layer_norm_eps_is_honoured_both_ways(tmp_path, eps):
    """HF's default eps is 1e-12 (the hub configs too), the official model's 1e-6: a fresh HF model's
    LayerNorms see tiny variances, where the two differ by ~5e-3 in pred. The import must keep HF's eps."""
    config = hf_config(norm_pix_loss=False)
    config.layer_norm_eps = eps
    hf = ViTMAEForPreTraining(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "position_embeddings" in name:
                p.copy_(hf_table(p.shape[-1]))
    hf.eval()
    x, noise = inputs(31)
    with torch.no_grad():
        expected = hf(pixel_values=x, noise=noise)
        mae = load_hf_pretrained_dir(hf_saved(tmp_path, hf, "fresh"))
        assert mae.norm_eps == eps and mae.blocks[0].norm1.eps == eps and mae.decoder_norm.eps == eps
        assert_same_outputs(expected, mae(x, noise=noise))
        assert hf_config_from_mae(mae).layer_norm_eps == eps
        assert_same_outputs(hf_model_from_mae(mae)(pixel_values=x, noise=noise), mae(x, noise=noise))
    # through a maelab file, the eps travels in the header
    assert main(["convert", str(tmp_path / "fresh"), str(tmp_path / "m.safetensors"), "--to", "maelab"]) in (0, None)

    with torch.no_grad():
        assert_same_outputs(expected, load_mae(tmp_path / "m.safetensors")[0](x, noise=noise))


def test_a_folder_written_again_and_stopped_keeps_its_old_config_and_weights(tmp_path, monkeypatch):
    """config.json was written first, straight into the folder: a stop while the weights were written left
    the new config beside the old weights (a model that never existed, loaded without a word)."""
    from maelab.interop import huggingface

    old = MaskedAutoencoder(**TINY, mask_ratio=0.75)
    folder = tmp_path / "hf"
    save_hf_pretrained(old, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # a Ctrl-C / SIGTERM while the weights are written

    monkeypatch.setattr(huggingface, "save_file", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_hf_pretrained(MaskedAutoencoder(**TINY, mask_ratio=0.6), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # all old, no temp file left
