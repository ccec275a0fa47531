"""Mask sampling strategies (paper Fig. 6): random, block-wise, grid -- shape, the exact number of
masked patches per sample, reproducibility from the seed, and the shape of the masks."""

from __future__ import annotations

import pytest
import torch

from maelab.commands.pretrain import PretrainConfig
from maelab.commands.pretrain import run as run_pretrain
from maelab.config import build_config
from maelab.errors import MaelabError
from maelab.models.checks import num_visible
from maelab.models.mae import random_masking
from maelab.models.masking import MASK_TYPES, mask_noise


def masks(kind: str, n: int = 6, grid=(8, 8), ratio: float = 0.75, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = mask_noise(kind, n, grid, ratio, g)
    assert noise.shape == (n, grid[0] * grid[1])
    tokens = torch.zeros(n, grid[0] * grid[1], 4)
    _, mask, _, _ = random_masking(tokens, ratio, noise=noise)
    return mask.reshape(n, *grid)


@pytest.mark.parametrize("kind,ratio,grid", [
    *[(kind, ratio, grid) for kind in ("random", "block")
      for ratio, grid in ((0.75, (8, 8)), (0.5, (8, 8)), (0.9, (14, 14)), (0.75, (4, 16)))],
    ("grid", 0.75, (8, 8)), ("grid", 0.75, (4, 16)), ("grid", 8 / 9, (9, 9)), ("grid", 0.9375, (16, 16))])
def test_every_strategy_masks_exactly_the_count_of_random_masking(kind, ratio, grid):
    m = masks(kind, grid=grid, ratio=ratio)
    length = grid[0] * grid[1]
    assert (m.reshape(m.shape[0], -1).sum(1) == length - num_visible(length, ratio)).all()


@pytest.mark.parametrize("kind", MASK_TYPES)
def test_masks_are_reproducible_from_the_seed_and_differ_across_samples(kind):
    assert torch.equal(masks(kind, seed=3), masks(kind, seed=3))
    m = masks(kind, n=8, seed=3)
    assert len({tuple(x.flatten().tolist()) for x in m}) > 1


def test_grid_keeps_one_patch_of_every_two_by_two():
    for m in masks("grid", n=4):
        kept = (m == 0).nonzero()
        assert len(kept) == 16
        assert len({int(r) % 2 for r, _ in kept}) == 1 and len({int(c) % 2 for _, c in kept}) == 1


@pytest.mark.parametrize("ratio, grid, k", [(8 / 9, (9, 9), 3), (0.9375, (16, 16), 4), (0.75, (6, 10), 2)])
def test_grid_keeps_one_patch_of_every_k_by_k(ratio, grid, k):
    for m in masks("grid", n=4, grid=grid, ratio=ratio):
        kept = (m == 0).nonzero()
        assert len(kept) == grid[0] * grid[1] // (k * k)
        assert len({int(r) % k for r, _ in kept}) == 1 and len({int(c) % k for _, c in kept}) == 1


def test_grid_masking_refuses_a_ratio_without_a_lattice_and_warns_on_an_uneven_grid():
    """At 0.5 the lattice step rounded to 1 and "grid" was random masking; at 0.6 a lattice plus random
    patches; on 7x7 the lattice's size depended on its offset. None of it was said."""
    from maelab.models.masking import check_mask_type

    for ratio in (0.5, 0.6, 0.9):
        with pytest.raises(MaelabError, match=f"--mask-ratio {ratio:g} has no such lattice"):
            check_mask_type("grid", (8, 8), ratio)
        with pytest.raises(MaelabError, match="grid masking needs a ratio 1 - 1/k"):
            mask_noise("grid", 1, (8, 8), ratio, torch.Generator())
    with pytest.warns(UserWarning, match="the 7x7 patch grid is not a multiple of 2"):
        check_mask_type("grid", (7, 7), 0.75)
    for ratio, kept, fix in ((0.889, 15, "0.8888888888888888"), (0.751, 35, "0.75")):  # within 1 %, one short
        with pytest.raises(MaelabError, match=rf"keeps int\(144 x \(1 - {ratio:g}\)\) = {kept} patches, but the "
                                              rf"\d+x\d+ lattice .* has {kept + 1}: give --mask-ratio {fix}$"):
            check_mask_type("grid", (12, 12) if ratio > 0.8 else (8, 18), ratio)
    check_mask_type("random", (7, 7), 0.5)  # the other types take any ratio


@pytest.mark.parametrize("ratio, grid", [(0.75, (8, 8)), (0.75, (14, 14)), (0.5, (8, 8)), (0.9, (7, 7))])
def test_block_masks_cover_exactly_the_count_so_no_block_has_a_hole(ratio, grid):
    """A rectangle that overshot the count was kept and the surplus unmasked again at random: visible holes
    inside half of the samples' blocks. Covering exactly the count leaves the tiebreak nothing to undo."""
    from maelab.models.masking import _cover_with_blocks

    length = grid[0] * grid[1]
    target = length - num_visible(length, ratio)
    covered = _cover_with_blocks(256, *grid, target, torch.Generator().manual_seed(0))
    assert (covered.flatten(1).sum(1) == target).all()
    noise = mask_noise("block", 64, grid, ratio, torch.Generator().manual_seed(1))
    _, mask, _, _ = random_masking(torch.zeros(64, length, 4), ratio, noise=noise)
    assert torch.equal(mask.bool(), noise >= 1)  # what is masked is exactly the blocks (noise 1 + tiebreak)


def test_block_masks_are_clumped_unlike_random_ones():
    def masked_neighbours(m):  # masked 4-neighbours of masked patches, on average
        p = torch.nn.functional.pad(m, (1, 1, 1, 1))
        around = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
        return float((around * m).sum() / m.sum())

    assert masked_neighbours(masks("block", n=32, grid=(14, 14), ratio=0.5)) > \
        masked_neighbours(masks("random", n=32, grid=(14, 14), ratio=0.5)) + 0.3


def test_unknown_mask_type_is_refused():
    with pytest.raises(MaelabError, match="mask type"):
        mask_noise("spiral", 1, (4, 4), 0.75, torch.Generator())


def test_pretraining_with_block_masks_runs(cifar_tiny, tmp_path):
    cfg = build_config(PretrainConfig, dict(data=str(cifar_tiny), out=str(tmp_path), model="mae_vit_tiny_patch4",
                                            decoder_depth=1, batch_size=16, epochs=1, vis_every=0, device="cpu",
                                            num_workers=0, mask_type="block"))
    result = run_pretrain(cfg)
    assert result.global_step == 4 and "mask_type: block" in (tmp_path / "config.yaml").read_text()


def test_a_ratio_that_would_hide_every_patch_says_the_ratio_that_runs():
    """--mask-ratio 0.999 on 64 patches trained at 63/64 = 0.984 without a word (one patch stays visible)."""
    import warnings

    from maelab.models.mae import MaskedAutoencoder

    with pytest.warns(UserWarning, match="mask ratio 0.999 would hide all 64 patches; one stays visible .* 0.9844"):
        MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2, mask_ratio=0.999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2, mask_ratio=0.98)  # 1 of 64 visible: as asked
        # 0.9 of 10 patches keeps exactly one: int(10 * (1 - 0.9)) is 0 by float rounding, but nothing changes
        MaskedAutoencoder(img_size=(8, 20), patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2, mask_ratio=0.9)


def test_a_grid_run_begun_at_a_ratio_without_a_lattice_still_resumes(cifar_tiny, tmp_path):
    """Such a run, begun before those ratios were refused, could not be resumed by any command: grid was
    refused, and random was a changed setting. It resumes with the masks it began with, and says so."""
    common = dict(data=str(cifar_tiny), out=str(tmp_path), model="mae_vit_tiny_patch4", decoder_depth=1,
                  batch_size=16, vis_every=0, device="cpu", num_workers=0, mask_ratio=0.5, warmup_epochs=0)
    run_pretrain(build_config(PretrainConfig, dict(common, epochs=1)))
    config = tmp_path / "config.yaml"  # as the code of then recorded it
    config.write_text(config.read_text().replace("mask_type: random", "mask_type: grid"))
    with pytest.warns(UserWarning, match="began with --mask-type grid at --mask-ratio 0.5, before grid masking"):
        result = run_pretrain(build_config(PretrainConfig, dict(common, epochs=2, mask_type="grid")))
    assert result.global_step == 8
    with pytest.raises(MaelabError, match="has no such lattice"):  # a new run at that ratio is refused
        run_pretrain(build_config(PretrainConfig, dict(common, epochs=1, mask_type="grid", out=str(tmp_path / "new"))))
    g = torch.Generator().manual_seed(0)
    legacy = mask_noise("grid", 2, (8, 8), 0.5, g, legacy_grid=True)  # step 1: every patch alike, random masks
    assert legacy.shape == (2, 64) and bool((legacy < 1).all())
