"""Downstream evaluation: features, kNN, linear probe, fine-tuning (tiny models, synthetic images, CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from maelab.cli import main
from maelab.errors import MaelabError
from maelab.interop.mae_weights import model_meta
from maelab.models.mae import MaskedAutoencoder
from maelab.io import save_weights

from conftest import record_plans

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
QUIET = ["--num-workers", "0", "--log-every", "100"]


def tiny_mae(seed: int = 0, **overrides) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(**{**TINY, **overrides})


def save_mae(model: MaskedAutoencoder, path: Path) -> Path:
    kwargs = {**TINY, "img_size": list(model.img_size)}
    save_weights(path, model.state_dict(), model_meta(None, kwargs))
    return path


def make_folder(root: Path, classes: int, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder whose classes differ in one colour channel (easy to separate)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            arr[..., c % 3] = 200 + 15 * (c // 3)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    make_folder(root / "train", 3, 8, seed=0)
    make_folder(root / "test", 3, 4, seed=1)
    return root


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory) -> Path:
    return save_mae(tiny_mae(), tmp_path_factory.mktemp("ckpt") / "mae.safetensors")


# --- features -------------------------------------------------------------------------------------
def test_features_never_mask_and_equal_mae_forward_features(mae_ckpt):
    from maelab.evaluate.features import encode
    from maelab.interop.encoders import read_encoder
    from maelab.models.vit import features_model

    mae = tiny_mae()
    enc = read_encoder(mae_ckpt)
    vit = features_model(enc, enc.arch)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = mae.forward_features(x)
        assert tokens.shape == (3, 1 + 16, 32)  # every patch, nothing removed
        torch.testing.assert_close(encode(vit, x, "token"), tokens[:, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(encode(vit, x, "avg"), tokens[:, 1:].mean(1), rtol=0, atol=1e-5)
        torch.testing.assert_close(encode(mae, x, "token"), tokens[:, 0])
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


def test_extract_features_restores_mode_and_keeps_dataset_order(dataset):
    from maelab.data.folders import scan_images
    from maelab.evaluate.features import EvalSplit, extract_features

    mae = tiny_mae().train()
    images = scan_images(dataset / "test")
    streamed = EvalSplit(images, (16, 16), 5, in_memory=False)
    in_ram = EvalSplit(images, (16, 16), 7, in_memory=True)
    f1, y1, i1 = extract_features(mae, streamed, torch.device("cpu"))
    f2, y2, i2 = extract_features(mae, in_ram, torch.device("cpu"))
    assert mae.training
    # no autograd graph is kept, although the model's weights are trainable (the pre-training kNN monitor)
    assert any(p.requires_grad for p in mae.parameters()) and not f1.requires_grad and not f2.requires_grad
    assert torch.equal(i1, torch.arange(len(images))) and torch.equal(i1, i2)
    assert y1.tolist() == images.labels == y2.tolist()
    torch.testing.assert_close(f1, f2, rtol=0, atol=1e-5)


# --- kNN ------------------------------------------------------------------------------------------
def test_weighted_knn_on_separable_toy_problem_is_perfect():
    from maelab.evaluate.knn import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    train_y = torch.arange(4).repeat_interleave(30)
    test_y = torch.arange(4).repeat_interleave(10)
    train = centres[train_y] + torch.randn(120, 16, generator=g)
    test = centres[test_y] + torch.randn(40, 16, generator=g)
    acc = knn_accuracy(train, train_y, test, test_y, num_classes=4, k=20, temperature=0.07, chunk=7)
    assert acc["knn_top1"] == 100.0 and acc["knn_top5"] is None  # 4 classes: top-5 would always be 100


def test_top5_is_reported_only_with_more_than_five_classes():
    from maelab.evaluate.knn import knn_accuracy
    from maelab.evaluate.metrics import evaluate_classifier

    g = torch.Generator().manual_seed(0)
    for classes, top5 in ((5, None), (6, 50.0)):
        logits = torch.zeros(4, classes)
        logits[:, 0] = 3.0  # class 0 first; the rest tie
        logits[:, 1:5] = torch.arange(4, 0, -1, dtype=torch.float)  # classes 1..4 ranked 2nd..5th
        labels = torch.tensor([0, 4, 5, 5]) % classes  # with 6 classes: top-1 25 %, top-5 50 %
        res = evaluate_classifier(lambda x: x, [(logits, labels)], torch.device("cpu"))
        assert res["val_top5"] == top5
        feats = torch.randn(12, 8, generator=g)
        acc = knn_accuracy(feats, torch.arange(12) % classes, feats[:3], torch.arange(3), classes, k=3)
        assert (acc["knn_top5"] is None) == (top5 is None)


def test_knn_top5_counts_only_classes_that_got_a_vote():
    from maelab.evaluate.knn import knn_accuracy

    # the bank holds classes 0 and 1 only; one query of each of the 10 classes, every one nearest to class 0
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.05]]).repeat(10, 1)
    acc = knn_accuracy(bank, torch.tensor([0, 0, 1]), queries, torch.arange(10), num_classes=10, k=3)
    # top-5 hits are the queries of classes 0 and 1; zero-vote classes (2..9) tie and used to fill the top-5
    assert acc == {"knn_top1": 10.0, "knn_top5": 20.0}
    acc = knn_accuracy(bank, torch.tensor([0, 0, 1]), queries, torch.arange(10), num_classes=10, k=1)
    assert acc["knn_top5"] == acc["knn_top1"] == 10.0  # one neighbour: one guess
    # at a small T a far neighbour's vote underflows to 0 in float32, but it still voted for its class
    bank, angle = torch.tensor([[1.0, 0.0], [-0.2, 0.98]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    for t in (0.07, 0.005):
        acc = knn_accuracy(bank, torch.tensor([0, 1]), angle, torch.tensor([0, 1]), num_classes=10, k=2, temperature=t)
        assert acc == {"knn_top1": 50.0, "knn_top5": 100.0}, t


def test_knn_vote_weighting_matches_hand_computation():
    from maelab.evaluate.knn import knn_scores

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 1.0]])  # unnormalised on purpose
    t = 0.5
    scores = knn_scores(bank, labels, query, num_classes=2, k=3, temperature=t)
    q = query[0] / query[0].norm()
    sims = [float(q @ (b / b.norm())) for b in bank]  # 0.894, 0.447, 0.949, -0.894
    nearest = sorted(range(4), key=lambda j: -sims[j])[:3]  # 2, 0, 1 -- the last one does not vote
    expected = [0.0, 0.0]
    for j in nearest:
        expected[int(labels[j])] += float(np.exp((sims[j] - sims[nearest[0]]) / t))  # over the nearest one's vote
    torch.testing.assert_close(scores[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_a_tiny_temperature_gives_the_nearest_neighbours_class_not_an_overflow():
    """exp(cos / T) overflowed to inf for T < 0.0113: every vote inf, the tie to class 0, a plausible-looking
    accuracy. As T -> 0 weighted kNN becomes 1-NN."""
    from maelab.evaluate.knn import knn_accuracy, knn_scores

    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    labels, truth = torch.randint(0, 5, (50,), generator=g), torch.randint(0, 5, (40,), generator=g)
    one_nn = knn_accuracy(bank, labels, query, truth, 5, k=1)["knn_top1"]
    for t in (0.005, 1e-9):
        assert torch.isfinite(knn_scores(bank, labels, query, 5, k=20, temperature=t)).all()
        assert knn_accuracy(bank, labels, query, truth, 5, k=20, temperature=t)["knn_top1"] == one_nn


def test_knn_chunking_does_not_change_scores():
    from maelab.evaluate.knn import knn_scores

    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    a = knn_scores(bank, labels, queries, 5, chunk=4)
    b = knn_scores(bank, labels, queries, 5, chunk=1000)
    torch.testing.assert_close(a, b)


# --- linear probe ---------------------------------------------------------------------------------
def test_knn_refuses_inputs_it_would_score_wrongly_or_fail_on_deep_inside(dataset, mae_ckpt, tmp_path, capsys):
    """NaN features (a diverged encoder) scored at chance, 10 %, and were reported; labels out of range, of
    another length or float ended in torch's "index 5 is out of bounds for dimension 1" and the like."""
    from maelab.evaluate.knn import knn_accuracy
    from maelab.interop import save_mae

    f, y = torch.randn(8, 4), torch.arange(8) % 2
    for args, said in (((f, y, f, y, 2), None),
                       ((f, y, torch.full_like(f, float("nan")), y, 2), "query features are not finite"),
                       ((f, y + 3, f, y, 2), r"bank labels must lie in 0..1 \(num_classes=2\), got 3..4"),
                       ((f, y[:5], f, y, 2), "bank labels must be one integer tensor of 8 class indices"),
                       ((f, y, f, y.float(), 2), "query labels must be one integer tensor"),
                       ((f, y, f[:, :3], y, 2), "one width, got .8, 4. and .8, 3.")):
        if said is None:
            assert 0 <= knn_accuracy(*args, k=3)["knn_top1"] <= 100
            continue
        with pytest.raises(MaelabError, match=said):
            knn_accuracy(*args, k=3)
    diverged = tiny_mae()
    with torch.no_grad():
        diverged.norm.weight.fill_(float("nan"))
    save_mae(diverged, tmp_path / "nan.safetensors")
    assert main(["knn", "--init", str(tmp_path / "nan.safetensors"), "--data", str(dataset / "train"), *QUIET[:2]]) == 2
    assert "the encoder gives non-finite features (NaN / inf)" in capsys.readouterr().err


def test_a_batch_whose_every_image_is_skipped_gives_no_rows_not_an_error(tmp_path):
    """Under bad_files="skip" a batch of only unreadable images reached the model empty, which refuses an empty
    batch (its loss of no patches was NaN): extract_features passes over it (review)."""
    import warnings

    from maelab.data.folders import scan_images
    from maelab.evaluate.features import EvalSplit, extract_features

    make_folder(tmp_path / "d", 1, 3, seed=0)
    for name in ("y0.jpg", "y1.jpg"):
        (tmp_path / "d" / "class0" / name).write_text("junk")
    split = EvalSplit(scan_images(tmp_path / "d"), (16, 16), 2, False, 0, bad_files="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each skipped file is named
        feats, labels, index = extract_features(tiny_mae(), split, "cpu")
    assert feats.shape == (3, 32) and len(labels) == len(index) == 3


def test_linear_probe_head_is_batchnorm_without_affine_then_linear():
    from maelab.models.heads import LinearProbeHead

    torch.manual_seed(0)
    head = LinearProbeHead(384, 10)
    assert isinstance(head.bn, torch.nn.BatchNorm1d) and not head.bn.affine
    assert isinstance(head.linear, torch.nn.Linear) and head.linear.weight.shape == (10, 384)
    assert [n for n, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]
    assert abs(float(head.linear.weight.detach().std()) - 0.01) < 0.001  # trunc_normal(std=0.01), as official
    assert torch.equal(head.linear.bias, torch.zeros(10))


def test_linprobe_encoder_stays_frozen_in_eval_mode_after_a_step(mae_ckpt):
    from maelab.data.loader import Batch
    from maelab.models.heads import LinearProbeHead
    from maelab.interop.encoders import read_encoder
    from maelab.models.vit import features_model
    from maelab.train.optim import lars, lars_param_groups
    from maelab.train.tasks import LinprobeTask

    enc = read_encoder(mae_ckpt)
    encoder = features_model(enc, enc.arch)
    encoder.blocks[0].drop_path = torch.nn.Dropout(0.5)  # a stochastic layer: only harmless in eval mode
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head = LinearProbeHead(32, 3)
    head_before = head.linear.weight.detach().clone()
    task = LinprobeTask(head, encoder, "token", {}, lars_param_groups(head, 0.0), lambda: {})
    opt = lars(task.param_groups(), lr=1.0)
    batch = Batch(0, 0, 0, torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2]), 0, 6)
    loss, _ = task.forward(task.model, batch)
    loss.backward()
    opt.step()
    assert not encoder.training and head.training
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not torch.equal(head.linear.weight, head_before)
    with torch.no_grad():  # deterministic features: eval mode really is on
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(encoder.forward_features(x), encoder.forward_features(x))


def test_lars_adapts_matrices_and_skips_1d_params():
    from maelab.train.optim import lars, lars_param_groups

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = lars(lars_param_groups(layer, weight_decay=0.0), lr=0.5, momentum=0.9)
    layer(torch.randn(4, 5)).pow(2).sum().backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    opt.step()
    trust = 0.001 * w0.norm() / gw.norm()
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.5 * trust * gw)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.5 * gb)  # plain SGD: no trust ratio
    groups = {len(g["params"][0].shape): g for g in opt.param_groups}
    assert groups[2]["always_adapt"] and not groups[1]["always_adapt"] and groups[1]["weight_decay"] == 0.0
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["trust_coeff"] == 0.001


def test_cached_feature_probe_equals_running_the_encoder(dataset, mae_ckpt, tmp_path):
    from maelab.io import read_weights
    from maelab.train.checkpoint import latest_checkpoint

    common = ["linprobe", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--epochs", "2",
              "--warmup-epochs", "1", "--batch-size", "6", "--base-lr", "20", "--no-augment", *QUIET]
    assert main([*common, "--out", str(tmp_path / "cached")]) == 0
    assert main([*common, "--no-cache-features", "--out", str(tmp_path / "encoder")]) == 0
    a, _ = read_weights(latest_checkpoint(tmp_path / "cached") / "model.safetensors")
    b, _ = read_weights(latest_checkpoint(tmp_path / "encoder") / "model.safetensors")
    assert set(a) == set(b) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
                                "linear.weight", "linear.bias"}
    assert not torch.equal(a["linear.weight"], torch.zeros_like(a["linear.weight"]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ra = json.loads((tmp_path / "cached" / "results.json").read_text())
    rb = json.loads((tmp_path / "encoder" / "results.json").read_text())
    assert ra["cached_features"] and not rb["cached_features"]
    assert ra["per_epoch_val_top1"] == rb["per_epoch_val_top1"]


# --- fine-tuning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_scales_follow_the_official_rule(pool):
    from maelab.models.vit import build_vit, vit_arch
    from maelab.train.optim import layer_decay_groups

    model = build_vit(vit_arch(TINY), num_classes=5, global_pool=pool)
    scale, decay = {}, {}
    for g in layer_decay_groups(model, 0.05, 0.5):
        for p in g["params"]:
            scale[p], decay[p] = g["lr_scale"], g["weight_decay"]
    named = dict(model.named_parameters())
    depth = TINY["depth"]
    assert scale[named["patch_embed.proj.weight"]] == scale[named["cls_token"]] == 0.5 ** (depth + 1)
    assert scale[named["pos_embed"]] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale[named[f"blocks.{i}.attn.qkv.weight"]] == 0.5 ** (depth - i)
    # the head and the norm before it (fc_norm after the mean pool, the final norm of the cls token) at 1, as
    # in the official param_groups_lrd: timm's grouping put the final norm in the last block's layer
    final_norm = "fc_norm" if pool == "avg" else "norm"
    assert scale[named["head.weight"]] == scale[named[f"{final_norm}.weight"]] == scale[named[f"{final_norm}.bias"]] == 1.0
    assert set(scale.values()) == {0.5 ** k for k in range(depth + 2)}
    assert decay[named["head.weight"]] == 0.05 and decay[named["blocks.0.mlp.fc1.weight"]] == 0.05
    for name in ("head.bias", f"{final_norm}.weight", "blocks.1.norm1.bias", "cls_token", "pos_embed"):
        assert decay[named[name]] == 0.0, name


def test_a_token_pool_fine_tune_begun_before_the_final_norm_regrouping_resumes(dataset, mae_ckpt, tmp_path, capsys,
                                                                               monkeypatch):
    """Runs begun with timm's grouping (the final norm in the last block's layer) stopped with torch's "loaded
    state dict contains a parameter group that doesn't match" once the norm moved beside the head."""
    from maelab.commands import finetune
    from maelab.train.optim import layer_decay_groups

    args = ["finetune", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--batch-size", "6",
            "--global-pool", "token", "--warmup-epochs", "0", "--out", str(tmp_path / "ft"), *QUIET]
    with monkeypatch.context() as m:  # the grouping of the code that began the run
        m.setattr(finetune, "layer_decay_groups", lambda model, wd, ld, final_norm_on_top=True:
                  layer_decay_groups(model, wd, ld, False))
        assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 0
    assert "was saved by an earlier maelab: its final norm keeps the last block's lr scale" in capsys.readouterr().err
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["final_epoch"] == 2


def _finetune_cfg(init: str, **kw):
    from maelab.commands.finetune import FinetuneConfig
    from maelab.config import build_config

    return build_config(FinetuneConfig, {"init": init, **kw})


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_finetune_from_a_maelab_checkpoint_loads_the_encoder_weights(mae_ckpt, pool):
    from maelab.commands.finetune import build_model

    mae = tiny_mae()
    model, *_ = build_model(_finetune_cfg(str(mae_ckpt), global_pool=pool), num_classes=4)
    own = model.state_dict()
    for k, v in mae.encoder_state_dict().items():
        if k.startswith("norm."):
            if pool == "token":
                assert torch.equal(own[k], v)
            continue
        assert torch.equal(own[k], v), k
    if pool == "avg":  # official recipe: the encoder's norm is dropped, fc_norm starts fresh
        assert isinstance(model.norm, torch.nn.Identity)
        assert torch.equal(own["fc_norm.weight"], torch.ones(32)) and torch.equal(own["fc_norm.bias"], torch.zeros(32))
    assert model.head.weight.shape == (4, 32) and float(model.head.weight.detach().abs().max()) < 1e-4


def test_position_embeddings_are_resized_when_the_finetune_size_differs(mae_ckpt):
    from maelab.commands.finetune import build_model
    from maelab.models.pos_embed import resize_pos_embed

    mae = tiny_mae()
    model, _, size, _, notes = build_model(_finetune_cfg(str(mae_ckpt), img_size=[32]), num_classes=3)
    assert size == (32, 32) and model.pos_embed.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(model.pos_embed.detach(), resize_pos_embed(mae.pos_embed.detach(), (4, 4), (8, 8)))
    assert any("resized 4x4 -> 8x8" in n for n in notes)
    assert torch.equal(model.pos_embed.detach()[0, 0], mae.pos_embed.detach()[0, 0])  # the cls slot is kept
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_official_timm_and_hugging_face_files_give_the_same_encoder(tmp_path, mae_ckpt):
    from maelab.interop.huggingface import save_hf_pretrained
    from maelab.interop.official import export_official
    from maelab.evaluate.features import encode
    from maelab.interop.timm_export import save_timm_checkpoint
    from maelab.interop.encoders import read_encoder
    from maelab.models.vit import features_model

    mae = tiny_mae()
    want = mae.encoder_state_dict()
    sources = {
        "maelab": mae_ckpt,
        "official": export_official(mae, tmp_path / "official.pth", include_decoder=True),
        "timm": save_timm_checkpoint(mae, tmp_path / "timm.safetensors", global_pool="token"),
        "timm-avg": save_timm_checkpoint(mae, tmp_path / "timm_avg.safetensors", global_pool="avg"),
        "huggingface": save_hf_pretrained(mae, tmp_path / "hf"),
    }
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = mae.forward_features(x)[:, 0]
    for name, path in sources.items():
        enc = read_encoder(path, num_heads=2)  # agrees with what the files record
        assert enc.arch["embed_dim"] == 32 and enc.arch["depth"] == 2 and tuple(enc.arch["img_size"]) == (16, 16)
        for k, v in want.items():  # the avg export keeps the final norm as timm's fc_norm (global-pool layout)
            key = "fc_norm." + k[len("norm."):] if name == "timm-avg" and k.startswith("norm.") else k
            assert torch.equal(enc.state_dict[key], v), (name, k)
        with torch.no_grad():  # LayerNorm is per token: fc_norm(cls) == norm(tokens)[:, 0]
            torch.testing.assert_close(encode(features_model(enc, enc.arch), x), expected, rtol=0, atol=1e-5)
    assert read_encoder(sources["official"]).arch["num_heads"] == 2  # maelab's exports record it
    torch.save({"model": mae.state_dict()}, tmp_path / "elsewhere.pth")  # a file that cannot say: the table's
    assert read_encoder(tmp_path / "elsewhere.pth").arch["num_heads"] == 1  # (width 32 is not in the table)
    with pytest.raises(MaelabError, match="records 2 attention heads"):
        read_encoder(mae_ckpt, num_heads=4)


@pytest.mark.parametrize("name,kind", [("finetune_vit_base", "FinetuneConfig"), ("finetune_cifar_tiny", "FinetuneConfig"),
                                       ("linprobe_cifar_tiny", "LinprobeConfig"), ("linprobe_vit_base", "LinprobeConfig")])
def test_downstream_presets_load(name, kind):
    import maelab.commands.finetune as finetune
    import maelab.commands.linprobe as linprobe
    from maelab.config import build_config

    cfg = build_config(getattr(finetune if kind == "FinetuneConfig" else linprobe, kind), yaml_path=name)
    if kind == "FinetuneConfig":
        assert cfg.optim.betas == [0.9, 0.999] and cfg.augment.mixup == 0.8 and cfg.model.global_pool == "avg"
    else:
        assert cfg.optim.base_lr == 0.1 and cfg.optim.weight_decay == 0.0 and cfg.model.global_pool == "token"


def test_init_none_is_a_random_vit_with_sincos_position_embeddings():
    from maelab.commands.finetune import build_model
    from maelab.models.pos_embed import sincos_2d

    model, arch, size, enc, _ = build_model(_finetune_cfg("none", model="mae_vit_tiny_patch4"), num_classes=10)
    assert enc is None and size == (32, 32) and arch["embed_dim"] == 192
    torch.testing.assert_close(model.pos_embed.detach()[0], sincos_2d(192, (8, 8)))
    assert model.pos_embed.requires_grad


def test_seeded_transform_depends_only_on_the_seed_and_leaves_global_rngs_alone():
    from maelab.data.transforms import finetune_transform

    t = finetune_transform((16, 16))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(5)
    random.seed(5)
    expect_torch, expect_py = torch.rand(1), random.random()
    torch.manual_seed(5)
    random.seed(5)
    a = t(img, torch.Generator().manual_seed(1))
    assert torch.rand(1) == expect_torch and random.random() == expect_py
    b = t(img, torch.Generator().manual_seed(1))
    c = t(img, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_randaugment_posterize_to_zero_bits_gives_black_instead_of_failing():
    from maelab.data.transforms import finetune_transform

    ops = [op for step in finetune_transform((16, 16)).transform.transforms for op in getattr(step, "ops", [])]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    for op in posterize:
        assert np.asarray(op.aug_fn(img, 0)).max() == 0
        assert np.asarray(op.aug_fn(img, 4))[0, 0].tolist() == [192, 96, 48]


# --- errors: one clear line, exit status 2 ---------------------------------------------------------
def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("maelab: error:")]
    assert len(lines) == 1
    return lines[0]


def test_class_count_mismatch_is_one_clear_error(capsys, dataset, mae_ckpt, tmp_path):
    msg = _error(capsys, ["finetune", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--num-classes",
                          "10", "--out", str(tmp_path / "r"), *QUIET])
    assert "--num-classes 10" in msg and "3 class folders" in msg
    assert not (tmp_path / "r").exists()


def test_train_and_val_class_folders_must_match(capsys, dataset, mae_ckpt, tmp_path):
    make_folder(tmp_path / "val", 4, 2)
    msg = _error(capsys, ["knn", "--init", str(mae_ckpt), "--data", str(dataset / "train"),
                          "--val-data", str(tmp_path / "val"), *QUIET[:2]])
    assert "same class folders" in msg and "class3" in msg
    for c in (dataset / "train").iterdir():
        (tmp_path / "train" / c.name).mkdir(parents=True)
        for f in c.iterdir():
            (tmp_path / "train" / c.name / f.name).symlink_to(f)
    (tmp_path / "train" / "class3").mkdir()  # an empty class folder is not a class: say why it is missing
    msg = _error(capsys, ["knn", "--init", str(mae_ckpt), "--data", str(tmp_path / "train"),
                          "--val-data", str(tmp_path / "val"), *QUIET[:2]])
    assert "only in the validation split: class3 (its folder in the training split holds no images)" in msg, msg
    # a validation split with one class of the training split's three names the ones it lacks (it said only
    # "has 1 class folder(s); classification needs at least 2"); a name in other letter case is said as such
    make_folder(tmp_path / "one", 1, 2)
    msg = _error(capsys, ["knn", "--init", str(mae_ckpt), "--data", str(dataset / "train"),
                          "--val-data", str(tmp_path / "one"), *QUIET[:2]])
    assert "only in the training split: class1, class2" in msg, msg
    from maelab.data.folders import ImageList
    from maelab.data.splits import check_same_classes

    with pytest.raises(MaelabError, match=r"only in the training split: Street \(the validation split writes it in "
                                          r"other letter case\)"):
        check_same_classes(ImageList("t", [], [], ["Street", "coco"]), ImageList("v", [], [], ["coco", "street"]))


def test_the_training_split_as_validation_split_is_warned_about(dataset, mae_ckpt, capsys):
    """`--val-data` = `--data` scored 100 % kNN (each image finds itself) without a word."""
    assert main(["knn", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--val-data",
                 str(dataset / "." / "train") + "/", *QUIET[:2]]) == 0
    assert "maelab: warning: the validation split" in capsys.readouterr().err


def test_class_names_that_differ_only_in_their_unicode_form_are_named_as_such():
    """`café` written on macOS (decomposed) and on Linux (composed) gave "only in the training split: café;
    only in the validation split: café": two names that print alike."""
    from maelab.data.folders import ImageList
    from maelab.data.splits import check_same_classes

    nfd, nfc = "cafe\u0301", "caf\u00e9"
    train, val = ImageList("t", [], [], [nfd, "tea"]), ImageList("v", [], [], [nfc, "tea"])
    with pytest.raises(MaelabError, match="same names written with different Unicode characters") as e:
        check_same_classes(train, val)
    assert "convmv" in str(e.value)
    with pytest.raises(MaelabError) as e:  # beside a real difference, each name says how it differs
        check_same_classes(ImageList("t", [], [], [nfd, "dog"]), ImageList("v", [], [], [nfc, "tea"]))
    assert (f"only in the training split: {nfd} (the validation split writes it with other Unicode characters), dog; "
            f"only in the validation split: {nfc} (the training split writes it") in str(e.value)


def test_empty_split_is_one_clear_error(capsys, dataset, mae_ckpt, tmp_path):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    msg = _error(capsys, ["linprobe", "--init", str(mae_ckpt), "--data", str(dataset / "train"),
                          "--val-data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *QUIET])
    assert "no images found" in msg


def test_checkpoint_of_another_size_is_one_clear_error(capsys, dataset, mae_ckpt, tmp_path):
    msg = _error(capsys, ["finetune", "--init", str(mae_ckpt), "--model", "mae_vit_base_patch16",
                          "--data", str(dataset / "train"), "--out", str(tmp_path / "r"), *QUIET])
    assert "width 32" in msg and "width 768" in msg
    # resuming a run with a checkpoint of another size
    args = ["linprobe", "--data", str(dataset / "train"), "--epochs", "1", "--batch-size", "6", "--no-augment",
            "--out", str(tmp_path / "p"), *QUIET]
    assert main([*args, "--init", str(mae_ckpt)]) == 0
    big = save_mae(tiny_mae(embed_dim=64), tmp_path / "big.safetensors")
    msg = _error(capsys, [*args, "--init", str(big), "--epochs", "2"])
    assert "does not fit" in msg


def test_missing_init_and_unlabelled_data_are_clear_errors(capsys, dataset, mae_ckpt, tmp_path):
    assert "--init is required" in _error(capsys, ["knn", "--data", str(dataset / "train"), *QUIET[:2]])
    assert "--init none needs --model" in _error(capsys, ["knn", "--init", "none", "--data", str(dataset / "train")])
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    (tmp_path / "flat" / "test").mkdir()
    assert "ImageFolder tree" in _error(capsys, ["knn", "--init", str(mae_ckpt), "--data", str(flat)])
    assert "cannot read weights" in _error(capsys, ["features", "--init", str(dataset / "train" / "class0" / "000.png"),
                                                    "--data", str(dataset / "test"), "--out", str(tmp_path / "f.npy")])


# --- end to end through the CLI -------------------------------------------------------------------
def test_finetune_end_to_end_writes_results_and_resumes(dataset, mae_ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--batch-size", "6",
            "--warmup-epochs", "1", "--out", str(out), *QUIET]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2"]) == 0  # resumes the same run folder for one more epoch
    res = json.loads((out / "results.json").read_text())
    assert res["final_epoch"] == 2 and len(res["per_epoch_val_top1"]) == 2
    assert 0 <= res["val_top1"] <= 100 and res["val_top5"] is None  # 3 classes: top-5 would always be 100
    assert "selected on the validation split" in res["best_epoch_note"]
    assert "final epoch 2: val top-1" in capsys.readouterr().out
    # the fine-tuned run is itself an encoder source
    assert main(["knn", "--init", str(out), "--data", str(dataset / "train"), "--out", str(tmp_path / "k.json"),
                 *QUIET[:2]]) == 0


def test_a_train_valid_test_layout_scores_on_valid_and_a_run_keeps_the_folder_it_scored_on(mae_ckpt, tmp_path,
                                                                                             capsys):
    """Roboflow / Kaggle exports are train/valid/test: `valid` was not looked for, the 2-image `test` was
    scored instead, and a resume after a `val` folder appeared scored epoch 2 on other images than epoch 1."""
    root = tmp_path / "export"
    make_folder(root / "train", 3, 4, seed=0)
    make_folder(root / "valid", 3, 3, seed=1)
    make_folder(root / "test", 3, 1, seed=2)
    assert main(["knn", "--init", str(mae_ckpt), "--data", str(root / "train"), "--out", str(tmp_path / "k.json"),
                 *QUIET[:2]]) == 0
    assert json.loads((tmp_path / "k.json").read_text())["val_images"] == 9
    assert f"validation split {root / 'valid'} (the folder beside --data" in capsys.readouterr().out
    out = tmp_path / "ft"
    args = ["finetune", "--init", str(mae_ckpt), "--data", str(root / "train"), "--batch-size", "6", "--out", str(out),
            *QUIET]
    assert main([*args, "--epochs", "1"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["val_data"] == str(root / "valid")
    (root / "valid").rename(root / "val")  # the folder the run scored on is now found under another name
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--val-data '{root / 'val'}' (the run has '{root / 'valid'}')" in err, err
    assert main([*args, "--epochs", "2", "--val-data", str(root / "val")]) == 2  # the folder it recorded is gone
    (root / "val").rename(root / "valid")
    config = out / "config.yaml"
    recorded = config.read_text()
    config.write_text(recorded.replace(f"val_data: {root / 'valid'}", "val_data: ''"))  # a run from before
    assert main([*args, "--epochs", "2"]) == 2  # it scored on `test` (valid was not looked for): not mixed
    assert f"(the run has '{root / 'test'}')" in capsys.readouterr().err
    config.write_text(recorded)
    assert main([*args, "--epochs", "2"]) == 0


def test_finetune_from_scratch_end_to_end(dataset, tmp_path):
    assert main(["finetune", "--init", "none", "--model", "mae_vit_tiny_patch4", "--img-size", "16",
                 "--data", str(dataset / "train"), "--val-data", str(dataset / "test"), "--epochs", "1",
                 "--batch-size", "12", "--out", str(tmp_path / "scratch"), *QUIET]) == 0
    assert json.loads((tmp_path / "scratch" / "results.json").read_text())["source"] == "none"


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_a_budget_run_times_the_validation_pass_on_its_first_batches(dataset, mae_ckpt, tmp_path, monkeypatch,
                                                                      command):
    """The plan's per-epoch evaluation time comes from the first 4 of the fine-tune's 6 validation batches
    (the probe's cached features are one chunk: timed whole); the epoch's evaluation still sees them all."""
    import importlib

    module = importlib.import_module(f"maelab.commands.{command}")
    original, seen = module.evaluate_classifier, []

    def counting(forward, batches, *args, **kw):
        batches = list(batches)
        seen.append(sum(len(y) for _, y in batches))
        return original(forward, iter(batches), *args, **kw)

    monkeypatch.setattr(module, "evaluate_classifier", counting)
    planned = record_plans(monkeypatch)
    assert main([command, "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--val-data",
                 str(dataset / "test"), "--batch-size", "2", "--budget", "10m", "--out", str(tmp_path / "r"),
                 *QUIET]) == 0
    assert len(planned) == 1 and planned[0][0] > 0
    assert seen == ([8, 12] if command == "finetune" else [12, 12])  # 12 validation images, 2 per batch
    assert json.loads((tmp_path / "r" / "results.json").read_text())["final_epoch"] == 1


def test_a_warmup_as_long_as_the_run_is_warned_about(dataset, mae_ckpt, tmp_path, capsys, monkeypatch):
    """linprobe --epochs 3 under its 10 warm-up epochs ended at 28 % of the learning rate its header printed."""
    args = ["linprobe", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--batch-size", "6", *QUIET]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "maelab: warning: --warmup-epochs 10 is not shorter than the run (2 epoch(s), 8 steps)" in err, err
    assert main([*args, "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert "--warmup-epochs" not in capsys.readouterr().err
    monkeypatch.setenv("MAELAB_CHAIN_STEP", "1")  # a step of recipe / ablate: the user did not pass its flags
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "c")]) == 0
    assert "the step's preset sets the warm-up: more epochs for this step, or a budget" in capsys.readouterr().err


def test_a_resume_that_would_change_what_the_head_means_is_refused(dataset, mae_ckpt, tmp_path, capsys):
    """A fine-tune resumed after a class folder was renamed went on with output 1 meaning another class; a
    probe resumed with --init a run that had trained on in the meantime finished its head on other features."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    ft = ["finetune", "--init", str(mae_ckpt), "--data", str(data / "train"), "--batch-size", "6",
          "--warmup-epochs", "0", "--out", str(tmp_path / "ft"), *QUIET]
    assert main([*ft, "--epochs", "1"]) == 0
    for split in ("train", "test"):
        (data / split / "class1").rename(data / split / "zebra")
    assert "was trained on 3 classes and the data now has 3 that differ (gone: class1; new: zebra)" in _error(
        capsys, [*ft, "--epochs", "2"])
    for split in ("train", "test"):
        (data / split / "zebra").rename(data / split / "class1")
    assert main([*ft, "--epochs", "2"]) == 0

    run = tmp_path / "pretraining"  # `--init` a run that saves a newer checkpoint before the probe resumes

    def checkpoint(name):
        (run / "checkpoints" / name).mkdir(parents=True)
        shutil.copy(mae_ckpt, run / "checkpoints" / name / "model.safetensors")
        for file in ("meta.json", "state.pt"):
            (run / "checkpoints" / name / file).write_text("{}")
        (run / "checkpoints" / "latest").write_text(name)
        return (run / "checkpoints" / name / "model.safetensors").resolve()

    first = checkpoint("epoch_0001")
    lp = ["linprobe", "--init", str(run), "--data", str(data / "train"), "--batch-size", "6",
          "--warmup-epochs", "0", "--out", str(tmp_path / "lp"), *QUIET]
    assert main([*lp, "--epochs", "1"]) == 0
    newer = checkpoint("epoch_0003")
    msg = _error(capsys, [*lp, "--epochs", "2"])
    assert f"trained on the features of {first}, and --init now gives {newer}" in msg, msg
    assert f"Start over with another --out, with --init {first.parent} to probe the encoder" in msg
    (run / "checkpoints" / "latest").write_text("epoch_0001")
    assert main([*lp, "--epochs", "2"]) == 0  # the same encoder again: resumes
    other = tiny_mae()  # other weights written to the very file the probe began on
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_mae(other, first)
    assert "which now holds other weights (written again since)" in _error(capsys, [*lp, "--epochs", "3"])


def test_linprobe_with_augmentation_end_to_end(dataset, mae_ckpt, tmp_path):
    out = tmp_path / "lp"
    assert main(["linprobe", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--epochs", "1",
                 "--batch-size", "6", "--out", str(out), *QUIET]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["augment"] and not res["cached_features"] and res["final_epoch"] == 1
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_a_probe_head_given_as_an_encoder_names_the_weights_it_probed(dataset, mae_ckpt, tmp_path, capsys):
    """The refusal named the probe's --init: a run folder's --init now gives its newest checkpoint, which may
    have trained on since. It names the weights file the head was trained on (here behind a link, as --init)."""
    init = tmp_path / "latest.safetensors"
    init.symlink_to(mae_ckpt)
    out = tmp_path / "lp"
    assert main(["linprobe", "--init", str(init), "--data", str(dataset / "train"), "--epochs", "1",
                 "--batch-size", "6", "--out", str(out), *QUIET]) == 0
    capsys.readouterr()
    assert main(["convert", str(out), str(tmp_path / "lp.safetensors"), "--to", "timm"]) == 2
    assert f"point at the encoder it probed ({mae_ckpt.resolve()})" in capsys.readouterr().err
    assert main(["knn", "--init", str(out), "--data", str(dataset / "train")]) == 2
    assert f"point at the encoder it probed ({mae_ckpt.resolve()})" in capsys.readouterr().err


def test_knn_end_to_end_separates_coloured_classes(dataset, mae_ckpt, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert main(["knn", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--global-pool", "avg",
                 "--out", str(out), *QUIET[:2]]) == 0
    res = json.loads(out.read_text())
    assert res["k"] == 20 and res["temperature"] == 0.07 and res["val_images"] == 12
    assert res["knn_top1"] > 80  # the classes differ in colour: even random-ish features separate them
    assert main(["knn", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--limit-images", "5",
                 "--out", str(out), *QUIET[:2]]) == 0
    res = json.loads(out.read_text())
    assert res["train_images"] == 5 and res["val_images"] == 5
    assert res["k"] == 5  # a bank smaller than k votes with all it has, and the record says so
    assert "maelab: warning: --k 20 is more than the 5 images of the bank: all 5 vote" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_features_stopped_before_the_features_file_leave_no_old_features_beside_new_paths(
        dataset, mae_ckpt, tmp_path, monkeypatch, capsys, suffix):
    """A second `features --out f.npy` on other images that failed after its side files (a full disk) left the
    first run's f.npy beside the new f.paths.txt: as many rows, so read as one set."""
    from maelab.commands import features

    out = tmp_path / f"f{suffix}"
    args = ["features", "--init", str(mae_ckpt), "--out", str(out), *QUIET[:2]]
    assert main([*args, "--data", str(dataset / "test")]) == 0
    write, save = features.atomic_write_bytes, features.save_weights

    def full_disk(path, *a, **k):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return (write if suffix == ".npy" else save)(path, *a, **k)

    monkeypatch.setattr(features, "atomic_write_bytes" if suffix == ".npy" else "save_weights", full_disk)
    other = tmp_path / "other"
    for p in (dataset / "test").rglob("*.png"):
        (other / p.parent.name).mkdir(parents=True, exist_ok=True)
        (other / p.parent.name / f"x{p.name}").write_bytes(p.read_bytes())
    assert main([*args, "--data", str(other)]) == 2
    assert not out.exists() and "x000.png" in (tmp_path / "f.paths.txt").read_text()


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_features_end_to_end_with_paths(dataset, mae_ckpt, tmp_path, suffix):
    from maelab.evaluate.features import encode
    from maelab.commands.features import read_features

    out = tmp_path / f"emb{suffix}"
    assert main(["features", "--init", str(mae_ckpt), "--data", str(dataset / "test"), "--out", str(out),
                 "--batch-size", "5", *QUIET[:2]]) == 0
    got = read_features(out)
    assert got["features"].shape == (12, 32) and len(got["paths"]) == 12
    assert got["classes"] == ["class0", "class1", "class2"] and got["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    if suffix == ".safetensors":  # the header records what ran, as every command's results do
        assert (got["meta"]["device"], got["meta"]["precision"]) == ("cpu", "fp32")
    # the other format under the same name would replace emb.paths.txt under these rows: refused, nothing written
    other = out.with_suffix(".npy" if suffix == ".safetensors" else ".safetensors")
    before = (tmp_path / "emb.paths.txt").read_bytes()
    assert main(["features", "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--out", str(other),
                 *QUIET[:2]]) == 2
    assert not other.exists() and (tmp_path / "emb.paths.txt").read_bytes() == before
    first = np.asarray(Image.open(got["paths"][0]), dtype=np.float32) / 255.0
    from maelab.data.transforms import normalize

    x = normalize(torch.from_numpy(first).permute(2, 0, 1)[None])
    with torch.no_grad():
        torch.testing.assert_close(got["features"][0], encode(tiny_mae(), x)[0], rtol=0, atol=1e-4)


def test_features_of_a_flat_folder_over_labelled_ones_leave_no_stale_labels(dataset, mae_ckpt, tmp_path, capsys):
    """`--out f.npy` again on a folder without classes kept the first run's f.labels.npy (12 labels beside 4 rows)."""
    from maelab.commands.features import read_features

    flat, out = tmp_path / "flat", tmp_path / "f.npy"
    flat.mkdir()
    for p in sorted((dataset / "test" / "class1").iterdir())[:4]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert main(["features", "--init", str(mae_ckpt), "--data", str(dataset / "test"), "--out", str(out), *QUIET[:2]]) == 0
    assert len(read_features(out)["labels"]) == 12
    assert main(["features", "--init", str(mae_ckpt), "--data", str(flat), "--out", str(out), *QUIET[:2]]) == 0
    got = read_features(out)
    assert got["labels"] is None and got["classes"] == [] and len(got["features"]) == len(got["paths"]) == 4
    assert not (tmp_path / "f.labels.npy").exists() and not (tmp_path / "f.classes.txt").exists()
    (tmp_path / "f.paths.txt").write_text("a\nb\n")  # side files of another run (a copy, a cut-off write)
    with pytest.raises(MaelabError, match="has 4 rows but its paths 2: the files are from different runs"):
        read_features(out)
    sorted(flat.iterdir())[0].rename(flat / "odd\u2028name.png")  # not a line break for paths.txt: read back whole
    assert main(["features", "--init", str(mae_ckpt), "--data", str(flat), "--out", str(out), *QUIET[:2]]) == 0
    assert str(flat / "odd\u2028name.png") in read_features(out)["paths"]
    sorted(flat.iterdir())[0].rename(flat / "line\nbreak.png")  # legal on Linux: paths.txt would get 5 lines for 4 rows
    assert main(["features", "--init", str(mae_ckpt), "--data", str(flat), "--out", str(out), *QUIET[:2]]) == 2
    assert "holds a line break" in capsys.readouterr().err


def test_pretrain_knn_monitor_logs_knn_accuracy(dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "pt"
    args = ["pretrain", "--data", str(data / "train"), "--model", "mae_vit_tiny_patch4", "--img-size", "16",
            "--batch-size", "12", "--knn-every", "1", "--knn-max", "10", "--vis-every", "0", "--warmup-epochs", "0",
            "--out", str(out), *QUIET]
    assert main([*args, "--epochs", "1"]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in rows if "knn_top1" in r]
    assert len(summary) == 1 and summary[0]["epoch"] == 1 and 0 <= summary[0]["knn_top1"] <= 100
    # the query folder found beside --data is said and recorded, so a resume that finds another one says so
    assert f"kNN monitor queries {data / 'test'} (the folder beside --data" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["monitor"]["knn_data"] == str(data / "test")
    shutil.copytree(data / "test", data / "val")
    shutil.copy(data / "train" / "class0" / "000.png", data / "train" / "class0" / "extra.png")
    assert main([*args, "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert f"monitor.knn_data: '{data / 'test'}' -> '{data / 'val'}'" in captured.out + captured.err
    # an image added between the runs: the run goes on, said (24 -> 25 images, the same 2 steps per epoch)
    assert "was trained on 24 images and the data now has 25" in captured.err, captured.err


def test_a_budget_plan_counts_the_knn_monitors_decoding_once_not_every_epoch(dataset, tmp_path, monkeypatch):
    """Decoding the monitor's images (3 s here) happens once per run; the per-epoch cost the plan uses is
    only the kNN evaluation itself."""
    import time

    from maelab.evaluate import features

    original = features.decode_all

    def slow_decode(*args, **kw):
        time.sleep(3.0)
        return original(*args, **kw)

    monkeypatch.setattr(features, "decode_all", slow_decode)
    planned = record_plans(monkeypatch)
    assert main(["pretrain", "--data", str(dataset / "train"), "--model", "mae_vit_tiny_patch4", "--img-size", "16",
                 "--batch-size", "4", "--knn-every", "1", "--knn-max", "10", "--vis-every", "0", "--budget", "10m",
                 "--out", str(tmp_path / "pt"), *QUIET]) == 0
    assert len(planned) == 1 and 0 < planned[0][0] < 3.0


def test_a_knn_monitor_on_the_pre_training_images_is_warned_about(dataset, tmp_path, capsys):
    """`pretrain --knn-data` = `--data` logged a kNN of each image finding itself, without a word."""
    assert main(["pretrain", "--data", str(dataset / "train"), "--knn-data", str(dataset / "train") + "/",
                 "--model", "mae_vit_tiny_patch4", "--img-size", "16", "--epochs", "1", "--batch-size", "12",
                 "--knn-every", "1", "--knn-max", "10", "--vis-every", "0", "--out", str(tmp_path / "pt"), *QUIET]) == 0
    err = capsys.readouterr().err
    assert "maelab: warning: the validation split" in err and "kNN accuracy (--knn-data)" in err


def test_pretrain_knn_monitor_needs_labelled_held_out_data(capsys, tmp_path):
    make_folder(tmp_path / "images", 2, 4)
    msg = _error(capsys, ["pretrain", "--data", str(tmp_path / "images"), "--img-size", "16", "--epochs", "1",
                          "--batch-size", "4", "--knn-every", "1", "--out", str(tmp_path / "pt"), *QUIET])
    assert "--knn-data" in msg


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_features_and_train(dataset, mae_ckpt, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "maelab.cli"]
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    args = ["features", "--init", str(mae_ckpt), "--data", str(dataset / "test"), "--batch-size", "5", *QUIET[:2]]
    assert main([*args, "--out", str(single)]) == 0
    subprocess.run([*torchrun, *args, "--out", str(double)], check=True, env=env, capture_output=True)
    assert np.array_equal(np.load(single), np.load(double))
    assert (tmp_path / "one.paths.txt").read_text() == (tmp_path / "two.paths.txt").read_text()
    for cmd in (["finetune", "--batch-size", "4"], ["linprobe", "--batch-size", "4", "--no-augment"]):
        out = tmp_path / cmd[0]
        subprocess.run([*torchrun, *cmd, "--init", str(mae_ckpt), "--data", str(dataset / "train"), "--epochs", "1",
                        "--out", str(out), *QUIET], check=True, env=env, capture_output=True)
        res = json.loads((out / "results.json").read_text())
        assert res["processes"] == 2 and res["global_batch"] == 8 and res["val_images"] == 12


def _score_with_rank0_buffers(rank: int, store: str) -> None:
    import torch.distributed as dist

    from maelab.train.distributed import DistInfo, share_buffers

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm1d(3)
        bn.train()
        bn(torch.randn(4, 3) + 10 * rank)  # each process's last micro-batch moved its own statistics
        share_buffers(bn, DistInfo(rank, 2))
        mine = torch.cat([bn.running_mean, bn.running_var, bn.num_batches_tracked.float().view(1)])
        gathered = [torch.zeros_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        assert torch.equal(gathered[0], gathered[1])
    finally:
        dist.destroy_process_group()


def test_every_process_scores_the_linear_probe_with_rank_0s_batchnorm_statistics(tmp_path):
    """Under torchrun each process's BatchNorm statistics follow its own last micro-batch, so its share of the
    validation split was scored by another head than the one saved (reported 25 %, the saved head 15 %)."""
    import torch.multiprocessing as mp

    mp.start_processes(_score_with_rank0_buffers, args=(str(tmp_path / "store"),), nprocs=2, start_method="spawn")
