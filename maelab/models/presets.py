"""Named MAE configurations.

Paper sizes use the reference decoder (8 blocks, width 512, 16 heads). The 32-px presets for
CIFAR-like data use ViT-Tiny (width 192, depth 12, 3 heads) with patch 4 (64 patches) or patch 2
(256 patches) and a narrow decoder of 4 blocks, width 128, 4 heads. Why narrow: the decoder runs on
all L positions while the encoder runs on L/4, so at 32 px a 512-wide decoder would cost several times
the encoder; public CIFAR reproductions use 4 blocks of width 128-192, and the paper's ablation shows
fine-tuning is insensitive to decoder width (84.8-84.9 for widths 128-512).
"""

from __future__ import annotations

from typing import Any

from maelab.errors import MaelabError

_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_SMALL_DECODER = dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)

PRESETS: dict[str, dict[str, Any]] = {
    "mae_vit_tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, **_PAPER_DECODER),
    "mae_vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, **_PAPER_DECODER),
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER),
    "mae_vit_tiny_patch4": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, **_SMALL_DECODER),
    "mae_vit_tiny_patch2": dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3, **_SMALL_DECODER),
}

# timm model names whose architecture equals each preset's encoder (for export / fine-tuning).
TIMM_NAMES = {
    "mae_vit_tiny_patch16": "vit_tiny_patch16_224",
    "mae_vit_small_patch16": "vit_small_patch16_224",
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}


def preset_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    if name not in PRESETS:
        raise MaelabError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs
