"""Official MAE checkpoint layout <-> maelab (synthetic checkpoints, offline)."""

from __future__ import annotations

import pytest
import torch

from maelab.errors import MaelabError
from maelab.interop import (
    classify_official,
    export_official,
    infer_mae_architecture,
    load_into_mae,
    load_official_state_dict,
    mae_from_official,
)
from maelab.models.mae import MaskedAutoencoder
from maelab.models.pos_embed import sincos_2d

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def official_layout(
    embed_dim=64, depth=2, patch=8, grid=(4, 4), dec_dim=32, dec_depth=1, decoder=True, chans=3,
    device=None, generator=None,
) -> dict[str, torch.Tensor]:
    """Key names and shapes written out from the reference's description of the official release
    (deliberately not derived from maelab's own state dict); the position tables are the fixed sin-cos
    tables, as in the release."""
    length = grid[0] * grid[1]

    def table(d):
        return t(1, 1 + length, d) if device == "meta" else sincos_2d(d, grid).unsqueeze(0)

    def t(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=generator)

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": t(d), f"{prefix}.norm1.bias": t(d),
            f"{prefix}.attn.qkv.weight": t(3 * d, d), f"{prefix}.attn.qkv.bias": t(3 * d),
            f"{prefix}.attn.proj.weight": t(d, d), f"{prefix}.attn.proj.bias": t(d),
            f"{prefix}.norm2.weight": t(d), f"{prefix}.norm2.bias": t(d),
            f"{prefix}.mlp.fc1.weight": t(4 * d, d), f"{prefix}.mlp.fc1.bias": t(4 * d),
            f"{prefix}.mlp.fc2.weight": t(d, 4 * d), f"{prefix}.mlp.fc2.bias": t(d),
        }

    sd = {
        "cls_token": t(1, 1, embed_dim),
        "pos_embed": table(embed_dim),
        "patch_embed.proj.weight": t(embed_dim, chans, patch, patch),
        "patch_embed.proj.bias": t(embed_dim),
    }
    for i in range(depth):
        sd.update(block(f"blocks.{i}", embed_dim))
    sd.update({"norm.weight": t(embed_dim), "norm.bias": t(embed_dim)})
    if decoder:
        sd.update({
            "mask_token": t(1, 1, dec_dim),
            "decoder_embed.weight": t(dec_dim, embed_dim), "decoder_embed.bias": t(dec_dim),
            "decoder_pos_embed": table(dec_dim),
        })
        for i in range(dec_depth):
            sd.update(block(f"decoder_blocks.{i}", dec_dim))
        sd.update({
            "decoder_norm.weight": t(dec_dim), "decoder_norm.bias": t(dec_dim),
            "decoder_pred.weight": t(patch * patch * chans, dec_dim), "decoder_pred.bias": t(patch * patch * chans),
        })
    return sd


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_full_official_layout_loads_strict_and_every_tensor_arrives():
    sd = official_layout(generator=_gen())
    assert classify_official(sd) == "full"
    model = MaskedAutoencoder(**TINY)
    assert set(sd) == set(model.state_dict())  # the official names are exactly maelab's names
    report = load_into_mae(model, sd)
    assert report == {"kind": "full", "missing": [], "ignored": []}
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_encoder_only_official_layout_loads_into_encoder_and_leaves_decoder():
    sd = official_layout(decoder=False, generator=_gen(1))
    assert classify_official(sd) == "encoder"
    model = MaskedAutoencoder(**TINY)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k not in sd}
    report = load_into_mae(model, sd)
    assert report["kind"] == "encoder" and report["missing"] == []
    after = model.state_dict()
    assert set(sd) == set(model.encoder_state_dict())
    for k, v in sd.items():
        assert torch.equal(after[k], v), k
    for k, v in decoder_before.items():
        assert torch.equal(after[k], v), k


def test_official_pth_file_loads_wrapped_and_bare_with_weights_only(tmp_path):
    sd = official_layout(generator=_gen(2))
    wrapped, bare = tmp_path / "mae_visualize_vit_tiny.pth", tmp_path / "bare.pth"
    torch.save({"model": sd, "epoch": 3}, wrapped)
    torch.save(sd, bare)
    for path in (wrapped, bare):
        loaded = load_official_state_dict(path)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_export_official_round_trips_full_and_encoder_only(tmp_path):
    model = MaskedAutoencoder(**TINY)
    full = export_official(model, tmp_path / "full.pth")
    enc = export_official(model, tmp_path / "enc.pth", include_decoder=False)
    raw = torch.load(full, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "maelab_size"} and raw["maelab_size"]["img_size"] == list(model.img_size)
    assert classify_official(load_official_state_dict(full)) == "full"
    enc_sd = load_official_state_dict(enc)
    assert classify_official(enc_sd) == "encoder" and set(enc_sd) == set(model.encoder_state_dict())
    clone = mae_from_official(full, num_heads=2, decoder_num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(clone(x, noise=noise)[1], model(x, noise=noise)[1])


def test_the_objective_survives_the_official_layout(tmp_path):
    """The loss target (per-patch normalised pixels) and the mask ratio are not in the weights: a round trip
    through the official layout trained with another loss. maelab records them, and reads the `args` the
    official training script saves in its own checkpoints."""
    import argparse

    from maelab.interop.mae_weights import load_mae

    model = MaskedAutoencoder(**TINY, norm_pix_loss=True, mask_ratio=0.6)
    path = export_official(model, tmp_path / "full.pth")
    assert (load_mae(path)[0].norm_pix_loss, load_mae(path)[0].mask_ratio) == (True, 0.6)
    clone = mae_from_official(path, num_heads=2, decoder_num_heads=2)  # heads are not in the shapes either
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(clone(x, noise=noise)[0], model(x, noise=noise)[0])  # the same loss
    sd = official_layout(generator=_gen(3))
    torch.save({"model": sd, "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.8, lr=None)},
               tmp_path / "checkpoint-799.pth")
    official, _ = load_mae(tmp_path / "checkpoint-799.pth")
    assert (official.norm_pix_loss, official.mask_ratio) == (True, 0.8)
    torch.save({"model": sd}, tmp_path / "release.pth")  # the released files say nothing: the defaults
    released, _ = load_mae(tmp_path / "release.pth")
    assert (released.norm_pix_loss, released.mask_ratio) == (False, 0.75)


def test_head_counts_survive_the_official_and_timm_layouts(tmp_path):
    """Head counts are not in the shapes: a round trip took the paper's table (decoder 8 heads -> 1 for width
    32; a Hugging Face model of width 96 with 4 heads -> 1) and gave another model without a word."""
    from maelab.interop.encoders import read_encoder
    from maelab.interop.mae_weights import load_mae
    from maelab.interop.timm_export import save_timm_checkpoint

    model = MaskedAutoencoder(**dict(TINY, num_heads=4, decoder_num_heads=8))
    path = export_official(model, tmp_path / "full.pth")
    back, _ = load_mae(path)
    assert (back.init_kwargs["num_heads"], back.init_kwargs["decoder_num_heads"]) == (4, 8)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(back(x, noise=noise)[1], model(x, noise=noise)[1])
    enc = read_encoder(path)
    assert enc.arch["num_heads"] == 4 and not any("heads assumed" in n for n in enc.notes)
    assert read_encoder(save_timm_checkpoint(model, tmp_path / "timm.safetensors")).arch["num_heads"] == 4
    with pytest.raises(MaelabError, match="records 4 attention heads"):
        read_encoder(path, num_heads=2)
    with pytest.raises(MaelabError, match="records 8 decoder attention heads"):
        mae_from_official(path, decoder_num_heads=2)
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pth")  # a file of the official code: it cannot say
    _, meta = load_mae(tmp_path / "bare.pth")
    assert "attention heads: 1 encoder, 1 decoder (the paper's table for these widths" in " ".join(meta["notes"])


def test_convert_num_heads_gives_the_heads_of_a_file_that_does_not_record_them(tmp_path, capsys):
    """`convert --num-heads 4` of an official .pth wrote the paper's table's count (1 for width 64) without a word,
    though the docs say convert takes it; a count contradicting a file's own record is refused."""
    from maelab.cli import main
    from maelab.interop.mae_weights import load_mae, save_mae

    model = MaskedAutoencoder(**dict(TINY, num_heads=4, decoder_num_heads=8))
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pth")  # the official code's: no head counts
    assert main(["convert", str(tmp_path / "bare.pth"), str(tmp_path / "m.safetensors"), "--to", "maelab",
                 "--num-heads", "4"]) == 0
    back, _ = load_mae(tmp_path / "m.safetensors")
    assert back.init_kwargs["num_heads"] == 4
    out = capsys.readouterr().out
    assert "1 decoder (the paper's table" in out and "4 encoder" not in out  # given, not assumed
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():  # the decoder's heads are assumed (1 of 8): only the encoder is compared
        assert torch.equal(back.forward_encoder(x, 0.75, noise=noise)[0], model.forward_encoder(x, 0.75, noise=noise)[0])
    save_mae(model, tmp_path / "own.safetensors")
    for src in ("own.safetensors", "m.safetensors"):
        assert main(["convert", str(tmp_path / src), str(tmp_path / "x.pth"), "--to", "official", "--num-heads", "2"]) == 2
        assert "records 4 attention heads (its num_heads), not 2: leave the head count out" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "bare.pth"), str(tmp_path / "y.pth"), "--to", "official",
                 "--num-heads", "3"]) == 2
    assert "not divisible" in capsys.readouterr().err  # width 64, 3 heads: one line, not timm's assertion


def test_infer_architecture_reads_paper_sizes_from_shapes():
    # ViT-L/16 + reference decoder, shapes only (meta tensors: nothing allocated, so the position table
    # cannot show its grid: the size to try is given, and taken because its grid has the table's rows).
    sd = official_layout(embed_dim=1024, depth=24, patch=16, grid=(14, 14), dec_dim=512, dec_depth=8, device="meta")
    kw = infer_mae_architecture(sd, img_size=224)
    assert kw == dict(patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                      img_size=(224, 224), decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    enc = official_layout(embed_dim=1280, depth=32, patch=14, grid=(16, 16), decoder=False, device="meta")
    kw = infer_mae_architecture(enc, img_size=224)
    assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"], kw["img_size"]) == (1280, 32, 16, 14, (224, 224))
    assert "decoder_embed_dim" not in kw


def test_infer_architecture_builds_a_model_that_loads_strict_incl_non_square():
    sd = official_layout(generator=_gen(3))
    model = MaskedAutoencoder(**infer_mae_architecture(sd, num_heads=2, decoder_num_heads=2))
    assert load_into_mae(model, sd)["kind"] == "full"
    rect = official_layout(grid=(2, 4), generator=_gen(4))
    assert infer_mae_architecture(rect)["img_size"] == (16, 32)  # the sin-cos table shows its grid
    model = MaskedAutoencoder(**infer_mae_architecture(rect, img_size=(16, 32), num_heads=2, decoder_num_heads=2))
    load_into_mae(model, rect)
    assert model.grid == (2, 4)


def test_finetuned_checkpoint_drops_head_and_strictness_governs_missing_norm():
    sd = official_layout(decoder=False, generator=_gen(5))
    sd.update({"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10),
               "fc_norm.weight": torch.randn(64), "fc_norm.bias": torch.randn(64)})
    assert classify_official(sd) == "finetuned"
    model = MaskedAutoencoder(**TINY)
    report = load_into_mae(model, sd)
    assert report["kind"] == "finetuned"
    assert report["ignored"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    # Global-pool fine-tunes delete `norm`: strict refuses and names it, non-strict reports it.
    del sd["norm.weight"], sd["norm.bias"]
    with pytest.raises(MaelabError, match=r"missing 2: norm\.bias, norm\.weight"):
        load_into_mae(MaskedAutoencoder(**TINY), sd)
    report = load_into_mae(MaskedAutoencoder(**TINY), sd, strict_encoder_only=False)
    assert report["missing"] == ["norm.bias", "norm.weight"]


def test_wrong_architecture_checkpoint_raises_maelab_error_naming_keys_and_shapes():
    model = MaskedAutoencoder(**TINY)
    deeper = official_layout(depth=3, generator=_gen(6))
    with pytest.raises(MaelabError, match=r"unexpected 12: blocks\.2\.") as err:
        load_into_mae(model, deeper)
    assert "\n" not in str(err.value)
    shallower = official_layout(depth=1, generator=_gen(7))
    with pytest.raises(MaelabError, match=r"missing 12: blocks\.1\."):
        load_into_mae(model, shallower)
    wider = official_layout(embed_dim=96, generator=_gen(8))
    with pytest.raises(MaelabError, match=r"shape mismatch .*blocks\.0\.attn\.proj\.bias \(96,\) vs model \(64,\)"):
        load_into_mae(model, wider)
    enc_extra = official_layout(decoder=False, generator=_gen(9))
    enc_extra["blocks.0.attn.q_norm.weight"] = torch.ones(32)
    with pytest.raises(MaelabError, match=r"encoder checkpoint .*unexpected 1: blocks\.0\.attn\.q_norm\.weight"):
        load_into_mae(model, enc_extra)
    stray = official_layout(generator=_gen(11))
    stray["blocks.2.norm1.weight"] = torch.ones(64)  # one tensor of a third block: not depth 3 with 11 missing
    with pytest.raises(MaelabError, match=r"blocks\.2 holds 1 of the 12 tensors of blocks\.0 \(norm1\.weight\): a "
                                          r"stray tensor or a block cut off, which would read as a model of depth 3"):
        infer_mae_architecture(stray)
    no_decoder = official_layout(decoder=False, generator=_gen(12))
    no_decoder["decoder_embed.weight"] = torch.ones(32, 64)
    with pytest.raises(MaelabError, match=r"decoder_embed\.weight but no decoder_blocks"):
        infer_mae_architecture(no_decoder)
    enc_wrong = official_layout(decoder=False, patch=4, grid=(8, 8), generator=_gen(10))
    with pytest.raises(MaelabError, match=r"pos_embed \(1, 65, 64\) vs model \(1, 17, 64\)"):
        load_into_mae(model, enc_wrong)


def test_unreadable_or_foreign_files_raise_maelab_error(tmp_path):
    with pytest.raises(MaelabError, match="not found"):
        load_official_state_dict(tmp_path / "nope.pth")
    evil = tmp_path / "code.pth"
    torch.save({"model": official_layout(decoder=False), "obj": _Custom()}, evil)
    with pytest.raises(MaelabError, match=r"refusing .*code.pth: it is a pickle that needs test_interop_official._Custom"):
        load_official_state_dict(evil)
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 1}, junk)
    with pytest.raises(MaelabError, match="no state dict"):
        load_official_state_dict(junk)
    with pytest.raises(MaelabError, match="not an MAE/ViT checkpoint"):
        classify_official({"fc.weight": torch.zeros(2, 2)})


class _Custom:
    pass


def test_files_are_recognised_by_content_not_by_name(tmp_path):
    from safetensors.torch import save_file

    from maelab.interop.formats import weights_format

    text = tmp_path / "weights.pth"
    text.write_text("epochs: 3\n")
    with pytest.raises(MaelabError, match="it is a text file, not a PyTorch .* or safetensors checkpoint"):
        load_official_state_dict(text)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(MaelabError, match="it is an empty file"):
        load_official_state_dict(tmp_path / "empty.pth")
    sd = official_layout(decoder=False)
    st = tmp_path / "mae_pretrain.pth"  # safetensors content under a .pth name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    assert weights_format(st) == "safetensors"
    loaded = load_official_state_dict(st)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    pth = tmp_path / "official.safetensors"  # torch.save content under a .safetensors name
    torch.save({"model": sd}, pth)
    assert weights_format(pth) == "torch" and set(load_official_state_dict(pth)) == set(sd)


@pytest.mark.parametrize("header_len", [19_280, 1_000])  # 19 280 = b"PK\x00..." little-endian, like a zip's "PK"
def test_a_truncated_safetensors_file_is_called_so_whatever_its_header_length(tmp_path, header_len):
    """Cut short by a failed copy, a safetensors file must say it is damaged: one whose header length
    starts with the bytes "PK" was taken for a torch zip, and torch's error advised weights_only=False."""
    from maelab.interop.formats import weights_format

    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(header_len)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(header_len.to_bytes(8, "little") + header[:500])
    assert weights_format(cut) == "safetensors"
    with pytest.raises(MaelabError) as refused:
        load_official_state_dict(cut)
    assert "a truncated or damaged safetensors file" in str(refused.value)
    assert "weights_only" not in str(refused.value)


def test_a_file_read_as_safetensors_that_is_none_says_what_it_is(tmp_path):
    from maelab.io import read_weights

    junk = tmp_path / "random.bin"
    junk.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(MaelabError, match=r"it is not a safetensors file but a file of an unknown format"):
        read_weights(junk)
    pth = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(1)}, pth)
    with pytest.raises(MaelabError, match=r"it is not a safetensors file but a PyTorch checkpoint"):
        read_weights(pth)


def test_downstream_commands_refuse_an_encoder_of_other_channels_and_name_a_fitting_preset(tmp_path):
    """A 1-channel encoder (HF num_channels=1) met RGB batches in a convolution: a traceback after the run
    folder was written. A preset that does not fit the checkpoint names one that does (the preset may come
    from a --config file, which the user cannot leave out)."""
    from types import SimpleNamespace

    from maelab.interop.encoders import encoder_for, resolve_encoder
    from maelab.interop.mae_weights import save_mae
    from maelab.models.presets import preset_kwargs

    torch.save({"model": official_layout(chans=1, generator=_gen(4))}, tmp_path / "gray.pth")
    cfg = SimpleNamespace(init=str(tmp_path / "gray.pth"), model=None, num_heads=None, img_size=None)
    with pytest.raises(MaelabError, match="takes 1-channel images; maelab reads every image as 3-channel RGB"):
        resolve_encoder(cfg)
    tiny = save_mae(MaskedAutoencoder(**preset_kwargs("mae_vit_tiny_patch4", img_size=32)), tmp_path / "t.safetensors")
    with pytest.raises(MaelabError, match=r"--model mae_vit_tiny_patch16 is .*leave --model out to use the "
                                          r"checkpoint's; over a --config preset's model, --model mae_vit_tiny_patch4 "
                                          r"fits it\)"):
        encoder_for(str(tiny), "mae_vit_tiny_patch16")


def test_the_writers_take_a_compiled_or_wrapped_model_and_refuse_what_they_cannot_write(tmp_path):
    """A torch.compile'd model saved without a word under `_orig_mod.` keys, then loaded as no MAE; a wrapper
    or another module ended in AttributeError; safetensors bytes were written under `.pth` (timm and torch.load
    failed on them later); a folder as the target was an IsADirectoryError naming a temp path."""
    from maelab.interop.huggingface import save_hf_pretrained
    from maelab.interop.mae_weights import load_mae, save_mae
    from maelab.interop.timm_export import save_timm_checkpoint

    model = MaskedAutoencoder(**TINY)
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model)):  # compile is lazy: nothing compiles here
        back, _ = load_mae(save_mae(wrapped, tmp_path / "m.safetensors"))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
        assert load_mae(export_official(wrapped, tmp_path / "m.pth"))[0].init_kwargs == model.init_kwargs
        save_timm_checkpoint(wrapped, tmp_path / "t.safetensors")
    save_hf_pretrained(torch.compile(model), tmp_path / "hf")
    assert load_mae(tmp_path / "hf")[0].init_kwargs["embed_dim"] == TINY["embed_dim"]
    with pytest.raises(MaelabError, match="save_mae takes a maelab MaskedAutoencoder, got Linear"):
        save_mae(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    for write, name, said in ((save_mae, "m2.pth", "name it m2.safetensors"),
                              (save_timm_checkpoint, "e.bin", "name it e.safetensors"),
                              (export_official, "o.safetensors", "name it o.pth")):
        with pytest.raises(MaelabError, match=said):
            write(model, tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "folder").mkdir()
    with pytest.raises(MaelabError, match="folder is a folder: give the name of the file"):
        save_mae(model, tmp_path / "folder")
    (tmp_path / "f.txt").write_text("notes")
    with pytest.raises(MaelabError, match="f.txt is a file, not a folder"):
        save_hf_pretrained(model, tmp_path / "f.txt")
    # loading builds a model whose random init is overwritten: a seeded notebook's next draws stay its own
    for load in (lambda: load_mae(tmp_path / "m.safetensors"), lambda: load_mae(tmp_path / "m.safetensors", img_size=48),
                 lambda: mae_from_official(tmp_path / "m.pth"), lambda: load_mae(tmp_path / "hf")):
        torch.manual_seed(1)
        load()
        drawn = torch.rand(3)
        torch.manual_seed(1)
        assert torch.equal(drawn, torch.rand(3))
    from maelab.interop.timm_export import save_timm_classifier, to_timm_state_dict
    from maelab.models.vit import build_vit, vit_arch

    arch = vit_arch(dict(img_size=[32, 32], patch_size=8, embed_dim=64, depth=2, num_heads=2))
    with pytest.raises(MaelabError, match="name it c.safetensors"):  # a classifier's writer alike
        save_timm_classifier(build_vit(arch, 10, "token").state_dict(), {"vit": arch, "num_classes": 10}, tmp_path / "c.pth")
    assert "blocks.0.attn.qkv.weight" in to_timm_state_dict(build_vit(arch, 0, "token"))  # a module of encoder names
