"""The Masked Autoencoder, as in section 3 of He et al., "Masked Autoencoders Are Scalable Vision
Learners" (2021). Read top to bottom: patchify -> random masking -> encoder on the visible patches
only -> lightweight decoder with a shared mask token -> MSE on the masked patches -> forward.

Parameter names follow the official release (encoder = timm ``VisionTransformer`` names, decoder =
``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``), so official checkpoints load with ``strict=True``. Argument checks live in
:mod:`maelab.models.checks`, the training fast path of the decoder in :mod:`maelab.models.fast_path`.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from maelab.errors import MaelabError
from maelab.models import fast_path
from maelab.models.attention import attention_for_autocast
from maelab.models.checks import check_mae, check_masks_something, num_visible, pair
from maelab.models.pos_embed import sincos_2d
from maelab.models.presets import preset_kwargs
from maelab.models.state_dicts import ENCODER_PREFIXES


# --- 1. Patches -----------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): patches row-major; inside a patch (row, column, channel),
    channel fastest. This is the layout ``decoder_pred`` predicts (official weights rely on it)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise MaelabError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the inverse of :func:`patchify` for a (rows, cols) grid."""
    n, length, _ = x.shape
    rows, cols = grid
    p = patch_size
    if rows * cols != length:
        raise MaelabError(f"{length} patches do not form a {rows}x{cols} grid")
    x = x.reshape(n, rows, cols, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, rows * p, cols * p)


# --- 2. Random masking ----------------------------------------------------------------------------
def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a uniformly random subset of tokens per sample (noise + argsort, no replacement).

    Returns ``(x_visible, mask, ids_restore, ids_shuffle)``: ``mask`` is (N, L) in the original order
    with 1 = removed; ``ids_restore`` un-shuffles; ``ids_shuffle[:, keep:]`` are the removed patches.
    Pass ``noise`` (N, L) or a ``generator`` to make the mask reproducible.
    """
    n, length, dim = x.shape
    keep = num_visible(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=x.device, generator=generator)
    elif noise.shape != (n, length):
        raise MaelabError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore, ids_shuffle


# --- 3. The model ---------------------------------------------------------------------------------
class MaskedAutoencoder(nn.Module):
    """ViT encoder on visible patches + lightweight Transformer decoder that predicts masked pixels."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        norm_eps: float = 1e-6,
        encoder_mask_tokens: bool = False,
    ):
        super().__init__()
        self.img_size = pair(img_size)
        self.grid = check_mae(self.img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
                              decoder_depth, decoder_num_heads, mask_ratio)
        self.init_kwargs = dict(
            img_size=list(self.img_size), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss,
            mask_ratio=mask_ratio, norm_eps=norm_eps, encoder_mask_tokens=encoder_mask_tokens,
        )  # recorded in every weights file, so a checkpoint rebuilds its own model
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.embed_dim, self.decoder_embed_dim = embed_dim, decoder_embed_dim
        if not 0 < norm_eps < 1:
            raise MaelabError(f"LayerNorm eps must be in (0, 1), got {norm_eps}")
        self.norm_eps = float(norm_eps)  # 1e-6 as the official model; a Hugging Face config may say otherwise
        norm_layer = partial(nn.LayerNorm, eps=self.norm_eps)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        num_patches = self.num_patches

        # Encoder: a plain ViT (timm names). Position embeddings are fixed sin-cos, not learned.
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder: narrower and shallower; sees every position (visible tokens + shared mask token).
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        # Ablation only (paper Table 1c): the encoder sees every position, masked ones as a shared learned
        # token, and the decoder gets them all back; worse and slower, which is why MAE drops them.
        self.encoder_mask_tokens = bool(encoder_mask_tokens)
        if self.encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.initialize_weights()

    @property
    def has_unused_parameters(self) -> bool:
        """With mask tokens in the encoder, the decoder's ``mask_token`` is never used (kept, so checkpoints
        keep one layout): multi-process training must not wait for its gradient."""
        return self.encoder_mask_tokens

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def initialize_weights(self) -> None:
        """The reference initialisation: sin-cos tables, xavier-uniform Linear/patch-embed, N(0, .02)
        tokens, LayerNorm 1/0."""
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_embed_dim, self.grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_input(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != (self.in_chans, *self.img_size):
            raise MaelabError(
                f"this model takes images of shape (N, {self.in_chans}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(imgs.shape)}"
            )
        if imgs.shape[0] == 0:  # the loss of no patches is 0 / 0: NaN, without a word
            raise MaelabError("this model got an empty batch (0 images)")
        # torch's own "Input type (unsigned char) and bias type (float) should be the same" says less
        weight = self.patch_embed.proj.weight.dtype
        if not imgs.is_floating_point():
            raise MaelabError(f"this model takes ImageNet-normalised float images, got {imgs.dtype}: "
                              f"maelab.data.transforms.normalize(x.float() / 255) for uint8 pixels")
        if imgs.dtype != weight and not torch.is_autocast_enabled(imgs.device.type):
            raise MaelabError(f"this model's weights are {weight} and the images {imgs.dtype}: x.to({weight}), or "
                              f"run it under torch.autocast")
        attention_for_autocast(self, imgs.device)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid, self.in_chans)

    # Encoder: embed patches, add position, drop the masked ones, prepend cls, Transformer, norm.
    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """cls token (with its position) + the given patch tokens -> Transformer -> final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        tokens = self._embed(imgs)
        x, mask, ids_restore, ids_shuffle = random_masking(tokens, mask_ratio, noise, generator)
        if self.encoder_mask_tokens:  # every position, in order; the masked ones become the mask token
            m = mask.unsqueeze(-1).to(tokens.dtype)
            x = tokens * (1 - m) + (self.encoder_mask_token + self.pos_embed[:, 1:, :]) * m
        return self._encode(x), mask, ids_restore, ids_shuffle

    # Decoder: embed, append mask tokens, un-shuffle, add decoder position, Transformer, norm, predict.
    def forward_decoder_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        if not self.encoder_mask_tokens:  # visible tokens only: append the mask tokens, un-shuffle
            n, length = ids_restore.shape
            mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, 1:, :]  # drop cls

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (N, L, p*p*C) for every patch."""
        return self.decoder_pred(self.forward_decoder_tokens(latent, ids_restore))

    # Objective: MSE on masked patches only, optionally against per-patch normalised pixels.
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = (pred.float() - self.target(imgs).float()) ** 2
        loss = loss.mean(dim=-1)  # per-patch MSE
        return (loss * mask).sum() / mask.sum()  # masked patches only

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_pred: bool = True,
    ):
        """Returns ``(loss, pred, mask)``. With ``return_pred=False`` (training) the decoder takes the
        fast path (:mod:`maelab.models.fast_path`: same loss, masked patches only) and ``pred`` is ``None``."""
        self._check_input(imgs)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_masks_something(self.num_patches, ratio)
        latent, mask, ids_restore, ids_shuffle = self.forward_encoder(imgs, ratio, noise, generator)
        if not return_pred and not self.encoder_mask_tokens:
            return fast_path.masked_loss(self, imgs, latent, ids_shuffle), None, mask
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred if return_pred else None, mask

    # Downstream use: every patch, never masked.
    def called_in_parts(self) -> list[nn.Module]:
        """Blocks the training fast path runs piece by piece rather than through their ``forward``
        (the decoder's last block, :func:`fast_path.block_for_queries`): a wrapper that hooks
        ``forward`` (FSDP's per-block sharding) must leave them to the enclosing unit."""
        return [self.decoder_blocks[-1]]

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 1 + L, D) encoder tokens after the final norm, with **no masking** (cls first)."""
        self._check_input(imgs)
        return self._encode(self._embed(imgs))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ``VisionTransformer`` names (what downstream tasks load)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def create_model(name: str, **overrides: Any) -> MaskedAutoencoder:
    """Build a preset, e.g. ``create_model("mae_vit_tiny_patch4", img_size=32, norm_pix_loss=True)``.

    Any constructor argument can be overridden (``img_size=(32, 64)`` for non-square inputs)."""
    return MaskedAutoencoder(**preset_kwargs(name, **overrides))


def unwrapped(model: Any) -> Any:
    """The module behind ``torch.compile`` / DDP / DataParallel wrappers (itself when there is none)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


def as_mae(model: Any, what: str) -> MaskedAutoencoder:
    """The :class:`MaskedAutoencoder` behind wrappers (:func:`unwrapped`), for writers that read its constructor
    arguments and state dict: a compiled model's keys start with ``_orig_mod.``, so its file saved without a
    word and then loaded as no MAE (and a wrapper has no ``init_kwargs``)."""
    inner = unwrapped(model)
    if not isinstance(inner, MaskedAutoencoder):
        raise MaelabError(f"{what} takes a maelab MaskedAutoencoder, got {type(inner).__name__}")
    return inner


def keeps_rng(fn):
    """Run ``fn`` with the CPU random state restored afterwards: a loader builds a model whose random init the
    weights overwrite, and that init drew from the caller's (a seeded notebook's) random stream."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return wrapper
