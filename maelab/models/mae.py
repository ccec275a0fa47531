"""The Masked Autoencoder, as in section 3 of He et al., "Masked Autoencoders Are Scalable Vision
Learners" (2021). Read top to bottom: patchify -> random masking -> encoder on the visible patches
only -> lightweight decoder with a shared mask token -> MSE on the masked patches.

Parameter names follow the official release (encoder = timm ``VisionTransformer`` names, decoder =
``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``), so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import numbers
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from maelab.errors import MaelabError
from maelab.models.pos_embed import sincos_2d


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise MaelabError(f"image size must be one number or (height, width), got {size}")
    return size


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
def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - r))``, the same for every sample so batches stay dense."""
    if not 0.0 <= mask_ratio < 1.0:
        raise MaelabError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


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


def block_for_queries(blk: Block, x: torch.Tensor, start: int) -> torch.Tensor:
    """A timm ``Block`` evaluated for the tokens ``x[:, start:]`` only, attending to every token of ``x``.

    Equals ``blk(x)[:, start:]`` while skipping the query, projection and MLP work of the first
    ``start`` tokens. Used for the decoder's last block, whose visible-token outputs the loss never reads.
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None:  # a timm variant this shortcut does not mirror
        return blk(x)[:, start:]
    n, length, dim = x.shape
    h = blk.norm1(x)
    heads, head_dim = attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = nn.functional.linear(h[:, start:], w[: attn.attn_dim], None if b is None else b[: attn.attn_dim])
    kv = nn.functional.linear(h, w[attn.attn_dim :], None if b is None else b[attn.attn_dim :])
    q = attn.q_norm(q.reshape(n, length - start, heads, head_dim).transpose(1, 2))
    k, v = kv.reshape(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)
    if attn.fused_attn:
        o = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        o = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(n, length - start, attn.attn_dim))))
    x = x[:, start:] + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


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
    ):
        super().__init__()
        self.init_kwargs = dict(
            img_size=list(_pair(img_size)), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss,
            mask_ratio=mask_ratio,
        )  # recorded in every weights file, so a checkpoint rebuilds its own model
        self.img_size = _pair(img_size)
        if patch_size < 1 or min(self.img_size) < patch_size:
            raise MaelabError(f"image size {self.img_size[0]}x{self.img_size[1]} must be at least the patch size {patch_size}")
        if depth < 1 or decoder_depth < 1:
            raise MaelabError(f"encoder and decoder need at least one block, got depth={depth}, decoder_depth={decoder_depth}")
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise MaelabError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is not divisible by the patch size {patch_size}"
            )
        check_dims(embed_dim, num_heads, decoder_embed_dim, decoder_num_heads)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        check_masks_something(self.grid[0] * self.grid[1], mask_ratio)  # the default ratio, before any run starts
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.embed_dim, self.decoder_embed_dim = embed_dim, decoder_embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)

        # Encoder: a plain ViT (timm names). Position embeddings are fixed sin-cos, not learned.
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder: narrower and shallower; sees every position (visible tokens + shared mask token).
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

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

    def _select_attention(self, imgs: torch.Tensor) -> None:
        """bf16 autocast on a CPU: use timm's explicit softmax(q k^T) v path, which is 2-6x faster there
        than PyTorch's fused CPU attention kernel (benchmarks/bench_step.py); elsewhere the fused one."""
        math = (imgs.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        for blk in (*self.blocks, *self.decoder_blocks):
            blk.attn.fused_attn = not math

    def _check_input(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != (self.in_chans, *self.img_size):
            raise MaelabError(
                f"this model takes images of shape (N, {self.in_chans}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(imgs.shape)}"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid, self.in_chans)

    # Encoder: embed patches, add position, drop the masked ones, prepend cls, Transformer, norm.
    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore, ids_shuffle = random_masking(x, mask_ratio, noise, generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore, ids_shuffle

    # Decoder: embed, append mask tokens, un-shuffle, add decoder position, Transformer, norm.
    def forward_decoder_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, 1:, :]  # drop cls

    def forward_decoder_masked(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (N, L - n_visible, D) of the masked patches only, in ``ids_shuffle`` order.

        The training fast path. Self-attention does not care about token order, so the decoder runs on
        [cls, visible tokens, mask tokens] in shuffled order, each token carrying its own position
        embedding: the same outputs as the un-shuffled decoder, permuted. No un-shuffle is needed, and
        the last block computes queries, projection and MLP for the masked tokens only (the loss never
        reads the others); keys and values still come from every token."""
        x = self.decoder_embed(latent)
        n, start = x.shape[0], x.shape[1]
        mask_tokens = self.mask_token.expand(n, ids_shuffle.shape[1] + 1 - start, -1)
        pos = self.decoder_pos_embed[0]
        pos = torch.cat([pos[:1].expand(n, 1, -1), pos[1:][ids_shuffle]], dim=1)
        x = torch.cat([x, mask_tokens], dim=1) + pos
        *blocks, last = self.decoder_blocks
        for blk in blocks:
            x = blk(x)
        return self.decoder_norm(block_for_queries(last, x, start))

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
        """Returns ``(loss, pred, mask)``. With ``return_pred=False`` (training) only the masked
        tokens are projected to pixels -- the loss ignores the rest -- and ``pred`` is ``None``."""
        self._check_input(imgs)
        self._select_attention(imgs)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_masks_something(self.num_patches, ratio)
        latent, mask, ids_restore, ids_shuffle = self.forward_encoder(imgs, ratio, noise, generator)
        if return_pred:
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        pred = self.decoder_pred(self.forward_decoder_masked(latent, ids_shuffle)).float()
        ids_masked = ids_shuffle[:, latent.shape[1] - 1 :]  # same count for every sample
        target = self.target(imgs).float()
        target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        return ((pred - target) ** 2).mean(), None, mask

    # Downstream use: every patch, never masked.
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 1 + L, D) encoder tokens after the final norm, with **no masking** (cls first)."""
        self._check_input(imgs)
        self._select_attention(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ``VisionTransformer`` names (what downstream tasks load)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
