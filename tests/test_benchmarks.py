"""The benchmark scripts' model builders keep working as the model changes (they are not run by CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_asymmetry import BASELINE, build_models, loss_fn  # noqa: E402


def test_asymmetry_variants_share_the_encoder_and_train():
    models = build_models("mae_vit_tiny_patch4", with_sym1=True)
    assert models["MAE, 1-block decoder"].blocks is models["MAE, 8-block decoder"].blocks
    imgs = torch.randn(2, 3, 32, 32)
    for name, model in models.items():
        loss = loss_fn(model)(imgs)
        loss.backward()
        assert torch.isfinite(loss), name
    # the baseline's encoder sees every token, so its mask token gets a gradient
    assert models[BASELINE].enc_mask_token.grad is not None
