"""The backbone adapters: shapes and strides (square and not), window attention, layer decay."""

from __future__ import annotations

import pytest
import torch

from maelab.errors import MaelabError
from maelab.models.vit import EncoderWeights, build_vit
from maelab.transfer.backbone import (MultiLevelNeck, ViTBackbone, default_out_indices, layer_decay_groups,
                                      window_partition, window_unpartition)

ARCH = dict(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)


def test_default_out_indices_are_evenly_spaced_and_end_at_the_last_block():
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(4) == (0, 1, 2, 3)
    assert default_out_indices(2) == (0, 0, 1, 1)


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (24, 40)])
def test_maps_and_neck_strides_for_square_and_non_square_inputs(size):
    torch.manual_seed(0)
    bb = ViTBackbone(None, ARCH, (32, 32))
    x = torch.randn(2, 3, *size)
    maps = bb(x)
    h, w = size[0] // 8, size[1] // 8
    assert [tuple(m.shape) for m in maps] == [(2, 32, h, w)] * 4
    neck = MultiLevelNeck(32, 8, strides=(4, 8, 16, 32)) if size[0] % 32 == 0 and size[1] % 32 == 0 else None
    if neck is not None:
        outs = neck(maps)
        assert [tuple(o.shape[-2:]) for o in outs] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


def test_neck_for_patch_16_is_the_beit_layout():
    neck = MultiLevelNeck(16, 16)
    maps = [torch.randn(1, 16, 4, 6) for _ in range(4)]
    assert [tuple(o.shape[-2:]) for o in neck(maps)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    kinds = [[type(m).__name__ for m in op.modules() if not list(m.children())] for op in neck.ops]
    assert kinds == [["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"], ["ConvTranspose2d"],
                     ["Identity"], ["MaxPool2d"]]


def test_pretrained_weights_are_loaded_and_pos_embed_resized():
    torch.manual_seed(0)
    vit = build_vit(ARCH, num_classes=0, global_pool="token")
    enc = EncoderWeights({k: v for k, v in vit.state_dict().items()}, dict(ARCH), "maelab", "mem")
    bb = ViTBackbone(enc, ARCH, (48, 32))
    assert torch.equal(bb.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert tuple(bb.pos_embed.shape) == (1, 1 + 6 * 4, 32)
    assert any("resized" in n for n in bb.notes)
    # at its native size the last map equals timm's own forward (without the final norm)
    bb2 = ViTBackbone(enc, ARCH, (32, 32)).eval()
    vit.eval()
    x = torch.randn(1, 3, 32, 32)
    tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    ref = tokens[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    assert torch.allclose(bb2(x)[-1], ref, atol=1e-5)


def test_bad_sizes_and_indices_are_refused():
    bb = ViTBackbone(None, ARCH, 32)
    with pytest.raises(MaelabError, match="divisible by the patch size"):
        bb(torch.randn(1, 3, 30, 32))
    with pytest.raises(MaelabError, match="out indices"):
        ViTBackbone(None, ARCH, 32, out_indices=(1, 7))
    with pytest.raises(MaelabError, match="increasing"):
        ViTBackbone(None, ARCH, 32, out_indices=(2, 1))
    with pytest.raises(MaelabError, match="power of two"):
        MultiLevelNeck(8, 14)


def test_partition_round_trips_with_padding():
    t = torch.randn(2, 5 * 7, 4)
    win, mask = window_partition(t, (5, 7), 3)
    assert win.shape == (2 * 2 * 3, 9, 4) and mask is not None and mask.shape == (12, 1, 1, 9)
    assert int(mask.sum()) == 2 * 35
    assert torch.equal(window_unpartition(win, (5, 7), 3, 2), t)


@pytest.mark.parametrize("window", [4, 6])  # 4 = exactly the grid, 6 = larger (padded, keys masked)
def test_window_attention_equals_global_when_the_window_covers_the_grid(window):
    torch.manual_seed(0)
    windowed = ViTBackbone(None, ARCH, 32, window_size=window).eval()
    glob = ViTBackbone(None, ARCH, 32, window_size=window, global_blocks=range(4)).eval()
    glob.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(windowed(x), glob(x)):
        assert torch.allclose(a, b, atol=1e-5)


def test_small_windows_keep_information_inside_each_window():
    torch.manual_seed(0)
    bb = ViTBackbone(None, ARCH, 32, window_size=2).eval()  # 4x4 grid -> four 2x2 windows, all blocks windowed
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :16, :16] += 1.0  # change only the top-left window (patches rows 0-1, cols 0-1)
    a, b = bb(x)[-1], bb(y)[-1]
    assert not torch.allclose(a[..., :2, :2], b[..., :2, :2])
    assert torch.allclose(a[..., 2:, :], b[..., 2:, :]) and torch.allclose(a[..., :, 2:], b[..., :, 2:])
    mixed = ViTBackbone(None, ARCH, 32, window_size=2, global_blocks=(1,)).eval()
    mixed.load_state_dict(bb.state_dict())
    assert not torch.allclose(mixed(x)[-1][..., 2:, 2:], mixed(y)[-1][..., 2:, 2:])  # a global block mixes them


def test_layer_decay_groups_scale_blocks_and_leave_the_head_at_one():
    bb = ViTBackbone(None, ARCH, 32)
    model = torch.nn.Module()
    model.backbone, model.head = bb, torch.nn.Conv2d(32, 3, 1)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(bb.pos_embed)] == 0.5 ** 5 and decay[id(bb.pos_embed)] == 0
    assert scale[id(bb.blocks[0].attn.qkv.weight)] == 0.5 ** 4
    assert scale[id(bb.blocks[3].attn.qkv.weight)] == 0.5 ** 1
    assert scale[id(model.head.weight)] == 1.0 and decay[id(model.head.weight)] == 0.05
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_every_parameter_gets_a_gradient():
    bb = ViTBackbone(None, ARCH, 32, out_indices=(0, 2), window_size=2, global_blocks=(2,))
    assert len(bb.blocks) == 3
    sum(m.sum() for m in bb(torch.randn(1, 3, 32, 48))).backward()
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
