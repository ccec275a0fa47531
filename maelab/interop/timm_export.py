"""maelab encoder -> timm ``VisionTransformer`` weights.

The encoder already uses timm's names, so the map is the identity for ``global_pool="token"``. For
``global_pool="avg"`` timm (like the MAE fine-tuning recipe) moves the final LayerNorm after pooling
and calls it ``fc_norm``; the encoder's ``norm.*`` is exported under that name. The decoder and
``mask_token`` are never exported (a ``mask_token`` key would also make timm treat the file as DINOv2).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from maelab.errors import MaelabError
from maelab.interop.formats import check_suffix, record_metadata, size_record
from maelab.io import atomic_path
from maelab.models.mae import as_mae, unwrapped
from maelab.models.state_dicts import ENCODER_PREFIXES, state_dict_mismatch
from maelab.models.vit import build_vit, check_pool, vit_arch


def to_timm_state_dict(
    mae_model_or_encoder_sd: nn.Module | Mapping[str, torch.Tensor], global_pool: str = "token"
) -> dict[str, torch.Tensor]:
    """Encoder weights under timm ``VisionTransformer`` names (no head: build timm with ``num_classes=0``).

    Accepts a :class:`MaskedAutoencoder` or an encoder / full MAE state dict (decoder keys dropped).
    ``global_pool="avg"`` renames ``norm.*`` to ``fc_norm.*`` (timm's layout for average pooling)."""
    check_pool(global_pool)
    if isinstance(mae_model_or_encoder_sd, nn.Module):
        sd = unwrapped(mae_model_or_encoder_sd).state_dict()  # an MAE, or a module of its encoder's names
    elif isinstance(mae_model_or_encoder_sd, Mapping):
        sd = mae_model_or_encoder_sd
    else:
        raise MaelabError(f"expected a MaskedAutoencoder or a state dict, got {type(mae_model_or_encoder_sd).__name__}")
    out = {k: v.detach() for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if required not in out:
            raise MaelabError(f"encoder weights lack {required!r}; not a maelab/official MAE encoder")
    if global_pool == "avg":
        out = {("fc_norm." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in out.items()}
    return out


def timm_kwargs(model: nn.Module, global_pool: str = "token") -> dict[str, Any]:
    """``VisionTransformer`` constructor kwargs matching a :class:`MaskedAutoencoder`'s encoder."""
    check_pool(global_pool)
    model = as_mae(model, "timm_kwargs")
    blk = model.blocks[0]
    embed_dim = int(model.embed_dim)
    return dict(
        img_size=tuple(model.img_size),
        patch_size=int(model.patch_size),
        in_chans=int(model.in_chans),
        embed_dim=embed_dim,
        depth=len(model.blocks),
        num_heads=int(blk.attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=float(getattr(model, "norm_eps", 1e-6))),
        num_classes=0,
        global_pool=global_pool,
    )


def create_timm_encoder(model: nn.Module, global_pool: str = "token") -> nn.Module:
    """A timm ``VisionTransformer`` (no head) with the encoder's weights loaded strictly. Works for
    non-square ``img_size``. ``forward_features`` equals ``model.forward_features`` for ``"token"``."""
    vit = VisionTransformer(**timm_kwargs(model, global_pool))
    sd = to_timm_state_dict(model, global_pool)
    vit_sd = vit.state_dict()
    missing, unexpected = set(vit_sd) - set(sd), set(sd) - set(vit_sd)
    if missing or unexpected:
        raise MaelabError(
            f"timm VisionTransformer keys differ: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    vit.load_state_dict(sd, strict=True)
    return vit.eval()


def save_timm_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, global_pool: str = "token"
) -> str:
    """Write the encoder as a timm ``.safetensors`` file, loadable with
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=0)``
    or ``timm.create_model(name, checkpoint_path=path, num_classes=0)``. Returns the path."""
    check_suffix(path, "safetensors")
    if isinstance(model, nn.Module):
        model = as_mae(model, "save_timm_checkpoint")
    sd = to_timm_state_dict(model, global_pool)
    sd = {k: v.to("cpu").contiguous().clone() for k, v in sd.items()}
    record = (size_record(model.img_size, model.patch_size, getattr(model, "norm_eps", 1e-6),
                          heads={"num_heads": getattr(model, "init_kwargs", {}).get("num_heads")})
              if isinstance(model, nn.Module) else None)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, scratch_folder=True) as tmp:  # never a half-written file; the umask's permissions
        save_file(sd, tmp, metadata={"format": "pt", "global_pool": global_pool, **(record_metadata(record) if record else {})})
    return path


def save_timm_classifier(
    state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: str | os.PathLike,
    global_pool: str | None = None,
) -> str:
    """Write a maelab fine-tuned classifier (``meta["arch"] == "vit"``: a timm ``VisionTransformer``
    state dict, head included) as a timm ``.safetensors`` file, after checking that it loads strictly
    into ``VisionTransformer(num_classes=meta["num_classes"], global_pool=meta["global_pool"])``. The
    pooling is the one it was fine-tuned with; ``global_pool`` may only repeat it. Returns the path."""
    check_suffix(path, "safetensors")
    pool = meta.get("global_pool", "token")
    if global_pool is not None and global_pool != pool:
        raise MaelabError(f"this classifier was fine-tuned with global pool {pool!r}: its head and norm only "
                          f"work that way; leave --global-pool out (or pass {pool})")
    arch = vit_arch(meta["vit"])
    num_classes = int(meta.get("num_classes") or 0)
    problem = state_dict_mismatch(build_vit(arch, num_classes, pool).state_dict(), dict(state_dict))
    if problem:
        raise MaelabError(f"the fine-tuned weights do not fit a timm VisionTransformer ({problem})")
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, scratch_folder=True) as tmp:
        save_file(sd, tmp, metadata={"format": "pt", "global_pool": pool, "num_classes": str(num_classes),
                                     **record_metadata(size_record(arch["img_size"], arch["patch_size"],
                                                                   arch.get("norm_eps", 1e-6), heads=arch))})
    return path
