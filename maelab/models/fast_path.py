"""The training fast path of the MAE decoder: the same loss and gradients as the plain path in
:mod:`maelab.models.mae`, with less work (1-6 % per step, docs/benchmarks.md).

Self-attention does not care about token order, so the decoder runs on [cls, visible tokens, mask
tokens] in *shuffled* order, each token carrying its own position embedding: the outputs are the
un-shuffled decoder's, permuted, and no un-shuffle is needed. The last block computes queries,
projection and MLP for the masked tokens only (the loss never reads the others); keys and values
still come from every token. Only those tokens are projected to pixels. Tested equal to the plain
path (loss and gradients, fp32 and bf16, both attention kernels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block


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


def decode_masked(model, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """Decoder outputs (N, L - n_visible, D) of the masked patches only, in ``ids_shuffle`` order."""
    x = model.decoder_embed(latent)
    n, start = x.shape[0], x.shape[1]
    mask_tokens = model.mask_token.expand(n, ids_shuffle.shape[1] + 1 - start, -1)
    pos = model.decoder_pos_embed[0]
    pos = torch.cat([pos[:1].expand(n, 1, -1), pos[1:][ids_shuffle]], dim=1)
    x = torch.cat([x, mask_tokens], dim=1) + pos
    *blocks, last = model.decoder_blocks
    for blk in blocks:
        x = blk(x)
    return model.decoder_norm(block_for_queries(last, x, start))


def masked_loss(model, imgs: torch.Tensor, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """The MAE loss from the masked patches alone: every sample masks the same number of patches, so
    the mean over the gathered (N, masked, p*p*C) errors is the plain path's masked mean."""
    pred = model.decoder_pred(decode_masked(model, latent, ids_shuffle)).float()
    ids_masked = ids_shuffle[:, latent.shape[1] - 1 :]
    target = model.target(imgs).float()
    target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    return ((pred - target) ** 2).mean()
