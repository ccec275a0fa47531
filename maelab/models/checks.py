"""The sizes and ratios an MAE or a ViT can have, checked before a model is built or a run starts.

Kept apart from :mod:`maelab.models.mae` so that file reads as the method; every check raises
:class:`~maelab.errors.MaelabError` with the offending number.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

from maelab.errors import MaelabError


def pair(size: Any) -> tuple[int, int]:
    """One number (square) or (height, width) -> (height, width)."""
    if isinstance(size, numbers.Integral):
        return int(size), int(size)
    try:
        size = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise MaelabError(f"image size must be one number or (height, width), got {size!r}") from None
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise MaelabError(f"image size must be one number or (height, width), got {size}")
    return size


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - r))``, the same for every sample so batches stay dense."""
    if not 0.0 <= mask_ratio < 1.0:
        raise MaelabError(f"mask ratio (--mask-ratio) must be in (0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def ratio_run(num_patches: int, mask_ratio: float) -> float:
    """The share of patches a ratio hides once :func:`num_visible` has rounded (0.9 of 64 keeps 6: 0.906)."""
    return 1 - num_visible(num_patches, mask_ratio) / num_patches


def warn_if_one_is_kept(num_patches: int, mask_ratio: float) -> None:
    """A ratio that would hide every patch (0.999 of 64) keeps one visible: said, with the ratio that runs."""
    ran = ratio_run(num_patches, mask_ratio)  # 0.9 of 10 keeps one, though int(10 * (1 - 0.9)) is 0
    if num_patches > 1 and int(num_patches * (1 - mask_ratio)) < 1 and abs(ran - mask_ratio) > 1e-9:
        warnings.warn(f"mask ratio {mask_ratio:g} would hide all {num_patches} patches; one stays visible (the encoder "
                      f"needs a token), so the ratio that runs is {1 - 1 / num_patches:.4g}", stacklevel=3)


def check_masks_something(num_patches: int, mask_ratio: float) -> None:
    """The ratio is in [0, 1) and removes at least one of ``num_patches`` (else the loss has no target)."""
    if num_visible(num_patches, mask_ratio) == num_patches:
        raise MaelabError(
            f"mask ratio {mask_ratio} masks none of the {num_patches} patches: there is nothing to reconstruct"
            + (" (use a ratio above 0)" if num_patches > 1 else " (the image is a single patch)")
        )


def check_dims(embed_dim: int, num_heads: int, decoder_embed_dim: int | None = None,
               decoder_num_heads: int | None = None) -> None:
    """Widths and head counts a ViT with fixed 2-D sin-cos position embeddings can have: positive,
    the width divisible by the heads (each head gets width / heads channels) and by 4 (the sin-cos
    table gives a quarter of the channels to each of sin / cos of the column / row index)."""
    parts = [("embed_dim", embed_dim, "num_heads", num_heads)]
    if decoder_embed_dim is not None or decoder_num_heads is not None:
        parts.append(("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads))
    for dim_name, dim, heads_name, heads in parts:
        for name, value in ((dim_name, dim), (heads_name, heads)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise MaelabError(f"{name} must be a positive whole number, got {value!r}")
        if dim % heads:
            raise MaelabError(f"{dim_name}={dim} is not divisible by {heads_name}={heads}: every attention head "
                              f"gets {dim_name} / {heads_name} channels")
        if dim % 4:
            raise MaelabError(f"{dim_name}={dim} must be a multiple of 4: the 2-D sin-cos position embedding "
                              f"splits the width into sin / cos of the column and row index")


def check_image_size(img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The (rows, cols) patch grid of an image size the patch size divides."""
    h, w = img_size
    if patch_size < 1 or min(h, w) < patch_size:
        raise MaelabError(f"image size {h}x{w} must be at least the patch size {patch_size}")
    if h % patch_size or w % patch_size:
        raise MaelabError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def check_mae(img_size: tuple[int, int], patch_size: int, embed_dim: int, depth: int, num_heads: int,
              decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, mask_ratio: float) -> tuple[int, int]:
    """Everything a :class:`~maelab.models.mae.MaskedAutoencoder` needs of its arguments; returns the grid."""
    if depth < 1 or decoder_depth < 1:
        raise MaelabError(f"encoder and decoder need at least one block, got depth={depth}, decoder_depth={decoder_depth}")
    grid = check_image_size(img_size, patch_size)
    check_dims(embed_dim, num_heads, decoder_embed_dim, decoder_num_heads)
    check_masks_something(grid[0] * grid[1], mask_ratio)  # the default ratio, before any run starts
    warn_if_one_is_kept(grid[0] * grid[1], mask_ratio)
    return grid
