"""The models under comparison, built to the same sizes: maelab, Hugging Face ``ViTMAEForPreTraining``
and an MAE assembled from lightly's building blocks (``MaskedVisionTransformerTIMM`` +
``MaskedVisionTransformerDecoderTIMM``, as in lightly's own MAE example), each with a
``loss(imgs) -> scalar`` training objective at mask ratio 0.75 with the per-patch normalised target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common  # noqa: F401  (puts the repository on sys.path)

MASK_RATIO = 0.75


@dataclass(frozen=True)
class Size:
    key: str
    preset: str  # maelab preset
    img: int
    patch: int
    width: int
    depth: int
    heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    batch: int

    @property
    def label(self) -> str:
        enc = {192: "ViT-Tiny", 768: "ViT-Base", 1024: "ViT-Large"}.get(self.width, f"ViT-{self.width}")
        return (
            f"{enc}/{self.patch} at {self.img} px, decoder {self.dec_width} wide x {self.dec_depth} blocks "
            f"({self.dec_heads} heads), batch {self.batch}"
        )


SIZES = {
    "tiny": Size("tiny", "mae_vit_tiny_patch4", 32, 4, 192, 12, 3, 128, 4, 4, 128),
    "base": Size("base", "mae_vit_base_patch16", 224, 16, 768, 12, 12, 512, 8, 16, 16),
}


@dataclass
class Candidate:
    name: str
    model: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]


def norm_pix(target: torch.Tensor) -> torch.Tensor:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5


# --- maelab ---------------------------------------------------------------------------------------
def maelab_model(size: Size, **overrides) -> nn.Module:
    import maelab

    return maelab.create_model(size.preset, norm_pix_loss=True, mask_ratio=MASK_RATIO, **overrides)


def set_fused_attn(model: nn.Module, on: bool) -> None:
    """timm's ``Attention.fused_attn``: True = ``F.scaled_dot_product_attention``, False = the explicit
    ``softmax(q k^T) v`` ("math") path. A run-time attribute of maelab's (timm) blocks."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on


def maelab_candidate(
    size: Size, return_pred: bool = False, model: nn.Module | None = None, math_attn: bool = False
) -> Candidate:
    model = maelab_model(size) if model is None else model

    def loss(imgs):
        if not math_attn:
            return model(imgs, return_pred=return_pred)[0]
        set_fused_attn(model, False)  # the graph keeps what it needs; restoring at once is safe
        try:
            return model(imgs, return_pred=return_pred)[0]
        finally:
            set_fused_attn(model, True)

    name = "maelab" + (" return_pred=True" if return_pred else "")
    if math_attn:
        name += ", math attention (experiment)"
    return Candidate(name, model, loss)


# --- Hugging Face transformers --------------------------------------------------------------------
def hf_model(size: Size, attn: str = "sdpa") -> nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=size.img,
        patch_size=size.patch,
        hidden_size=size.width,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        intermediate_size=4 * size.width,
        decoder_hidden_size=size.dec_width,
        decoder_num_hidden_layers=size.dec_depth,
        decoder_num_attention_heads=size.dec_heads,
        decoder_intermediate_size=4 * size.dec_width,
        mask_ratio=MASK_RATIO,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        attn_implementation=attn,
    )
    model = ViTMAEForPreTraining(config)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"HF model uses {model.config._attn_implementation!r} attention, wanted sdpa")
    return model


def hf_candidate(size: Size, attn: str = "sdpa") -> Candidate:
    model = hf_model(size, attn)
    name = "HF transformers" + ("" if attn == "sdpa" else f" ({attn} attention)")
    return Candidate(name, model, lambda imgs: model(pixel_values=imgs).loss)


# --- lightly --------------------------------------------------------------------------------------
def lightly_available() -> str | None:
    """None if lightly's MAE blocks import, else the reason they don't."""
    try:
        from lightly.models.modules import (  # noqa: F401
            MaskedVisionTransformerDecoderTIMM,
            MaskedVisionTransformerTIMM,
        )
    except Exception as exc:  # ImportError, or a version clash inside lightly
        return f"{type(exc).__name__}: {exc}"
    return None


class LightlyMAE(nn.Module):
    """lightly's MAE example (encoder on the kept tokens, decoder on all, loss on the masked ones),
    with the per-patch normalised target added so the objective matches the other two."""

    def __init__(self, size: Size):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(
            img_size=size.img,
            patch_size=size.patch,
            embed_dim=size.width,
            depth=size.depth,
            num_heads=size.heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
        )
        self.patch = size.patch
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        num_patches = vit.patch_embed.num_patches
        self.decoder_embed = nn.Linear(size.width, size.dec_width)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=num_patches, embed_dim=size.dec_width, depth=size.dec_depth, num_heads=size.dec_heads
        )
        self.decoder_pred = nn.Linear(size.dec_width, size.patch**2 * 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        batch = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch, self.sequence_length), mask_ratio=MASK_RATIO, device=images.device
        )
        x = self.backbone.encode(images=images, idx_keep=idx_keep)
        x = self.decoder_embed(x)
        tokens = utils.repeat_token(self.decoder.mask_token, (batch, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        tokens = self.decoder(tokens)
        pred = self.decoder_pred(utils.get_at_index(tokens, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch), idx_mask - 1)
        return F.mse_loss(pred.float(), norm_pix(target).float())


def lightly_candidate(size: Size) -> Candidate:
    model = LightlyMAE(size)
    return Candidate("lightly blocks", model, model)


# --- optimisers -----------------------------------------------------------------------------------
def adamw(params, kind: str = "fused") -> tuple[torch.optim.Optimizer, str]:
    """AdamW with the MAE pre-training betas / weight decay. kind: fused | foreach | for-loop.
    Returns (optimizer, what was actually built)."""
    params = list(params)
    kw = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    if kind == "fused":
        try:
            opt = torch.optim.AdamW(params, fused=True, **kw)
            return opt, "fused"
        except (RuntimeError, ValueError, TypeError):
            kind = "foreach"
    if kind == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kw), "foreach"
    return torch.optim.AdamW(params, foreach=False, **kw), "for-loop"


def build(name: str, size: Size) -> Candidate:
    if name == "maelab":
        return maelab_candidate(size)
    if name == "maelab-rp":
        return maelab_candidate(size, return_pred=True)
    if name == "maelab-math":
        return maelab_candidate(size, math_attn=True)
    if name == "hf":
        return hf_candidate(size)
    if name == "hf-eager":
        return hf_candidate(size, "eager")
    if name == "lightly":
        return lightly_candidate(size)
    raise ValueError(name)
