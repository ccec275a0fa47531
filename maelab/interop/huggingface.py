"""Hugging Face ``transformers`` ViTMAE (``ViTMAEForPreTraining`` / ``ViTMAEModel``) <-> maelab.

Key maps only. HF keeps q, k, v as three Linear layers; maelab (timm/official) fuses them into one
``qkv`` Linear whose output rows are ``[q; k; v]``. Two HF namings exist:

* ``v5`` (transformers 5.x): ``vit.layers.{i}.attention.{q,k,v,o}_proj``, ``layernorm_before/after``,
  ``mlp.fc1/fc2``;
* ``v4`` (4.x, and the checkpoints on the hub): ``vit.encoder.layer.{i}.attention.attention.{query,key,
  value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.

The decoder (``decoder.decoder_layers.{i}.*``) uses the same per-layer names. ``ViTMAEModel`` state
dicts are the encoder without the ``vit.`` prefix. Files written by transformers 5.x ``save_pretrained``
carry a third, mixed form: 5.x undoes its 4.x -> 5.x renaming on save, and its ``encoder.layer.`` ->
``layers.`` rule also turns ``decoder.decoder_layers.`` into ``decoder.decoder_encoder.layer.`` (4.x
per-layer names under it). Reading accepts every layer prefix with either per-layer naming.
``transformers`` is imported lazily: the pure key maps work without it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from maelab.errors import MaelabError
from maelab.interop.formats import SAFETENSORS, check_weights_file, load_torch
from maelab.interop.official import load_into_mae
from maelab.io import atomic_path
from maelab.models.mae import MaskedAutoencoder, as_mae, keeps_rng
from maelab.models.state_dicts import few

NAMINGS = ("v5", "v4")

# maelab per-block suffix -> HF per-layer suffix (module level; ".weight"/".bias" appended).
_LAYER_MAP = {
    "v5": {
        "attn.proj": "attention.o_proj",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "v4": {
        "attn.proj": "attention.output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}
_QKV = {
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
}
_ENCODER_LAYER_PREFIX = {"v5": "layers.", "v4": "encoder.layer."}
_DECODER_LAYER_PREFIX = "decoder.decoder_layers."
# What files may hold (see the module docstring): transformers 5.x files say "decoder.decoder_encoder.layer.".
_ENCODER_LAYER_PREFIXES = ("layers.", "encoder.layer.")
_DECODER_LAYER_PREFIXES = (_DECODER_LAYER_PREFIX, "decoder.decoder_encoder.layer.")
_LAYER_KEY = r"(?:^|\.)(?:layers|encoder\.layer|decoder_layers|decoder_encoder\.layer)\.\d+\."

# Non-layer keys (maelab -> HF), HF side relative to the encoder prefix ("vit." or "").
_ENCODER_MISC = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_DECODER_MISC = {
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}

_BLOCK_RE = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise MaelabError(f"naming must be one of {', '.join(NAMINGS)}, got {naming!r}")


def detect_hf_naming(state_dict: Mapping[str, Any]) -> str:
    """``"v5"`` or ``"v4"`` for a ViTMAE state dict (raises if it is neither)."""
    keys = list(state_dict)
    v5 = any(re.search(_LAYER_KEY + r"attention\.[qkvo]_proj\.", k) for k in keys)
    v4 = any(re.search(_LAYER_KEY + r"attention\.(attention|output)\.", k) for k in keys)
    if v5 and v4:
        raise MaelabError("state dict mixes transformers 4.x and 5.x ViTMAE names")
    if v5:
        return "v5"
    if v4:
        return "v4"
    raise MaelabError(f"not a Hugging Face ViTMAE state dict (keys start: {few(keys)})")


def _encoder_prefix(state_dict: Mapping[str, Any]) -> str:
    """``"vit."`` for ViTMAEForPreTraining, ``""`` for ViTMAEModel."""
    if "vit.embeddings.patch_embeddings.projection.weight" in state_dict:
        return "vit."
    if "embeddings.patch_embeddings.projection.weight" in state_dict:
        return ""
    raise MaelabError("Hugging Face ViTMAE state dict has no embeddings.patch_embeddings.projection.weight")


def hf_to_mae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAE (``ViTMAEForPreTraining`` or ``ViTMAEModel``; 4.x, 5.x or 5.x-file names) -> maelab names.

    q, k, v are concatenated into ``qkv``; every HF key must be used, and no maelab key may come from
    two HF keys (else :class:`MaelabError`)."""
    naming = detect_hf_naming(state_dict)
    enc = _encoder_prefix(state_dict)
    hf_to_mae: dict[str, str] = {enc + v: k for k, v in _ENCODER_MISC.items()}
    if enc:
        hf_to_mae.update({v: k for k, v in _DECODER_MISC.items()})
    layer_map = {v: k for k, v in _LAYER_MAP[naming].items()}
    qkv_index = {name: i for i, name in enumerate(_QKV[naming])}
    alternatives = lambda prefixes: "|".join(re.escape(p) for p in prefixes)  # noqa: E731
    layer_re = re.compile(
        r"^(?:(?P<enc>" + alternatives(enc + p for p in _ENCODER_LAYER_PREFIXES) + r")|(?P<dec>"
        + alternatives(_DECODER_LAYER_PREFIXES) + r"))(?P<i>\d+)\.(?P<mod>.+)\.(?P<param>weight|bias)$"
    )
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # maelab key -> the HF key it came from
    qkv_parts: dict[str, list] = {}
    unknown, twice = [], []

    def put(mae_key: str, hf_key: str) -> bool:
        if mae_key in source:  # e.g. both "layers.0.*" and "encoder.layer.0.*"
            twice.append(f"{source[mae_key]} / {hf_key}")
            return False
        source[mae_key] = hf_key
        return True

    for key, value in state_dict.items():
        if key in hf_to_mae:
            if put(hf_to_mae[key], key):
                out[hf_to_mae[key]] = value
            continue
        m = layer_re.match(key)
        if not m or (m.group("dec") and not enc):
            unknown.append(key)
            continue
        block = ("blocks." if m.group("enc") else "decoder_blocks.") + m.group("i")
        mod, param = m.group("mod"), m.group("param")
        if mod in layer_map:
            if put(f"{block}.{layer_map[mod]}.{param}", key):
                out[f"{block}.{layer_map[mod]}.{param}"] = value
        elif mod in qkv_index:
            if put(f"{block}.{mod}.{param}", key):
                qkv_parts.setdefault(f"{block}.attn.qkv.{param}", [None, None, None])[qkv_index[mod]] = value
        else:
            unknown.append(key)
    if unknown:
        raise MaelabError(f"unknown Hugging Face ViTMAE keys ({naming} names): {few(unknown)}")
    if twice:
        raise MaelabError(f"Hugging Face ViTMAE state dict holds the same weight under two names: {few(twice, 2)}")
    for key, parts in qkv_parts.items():
        if any(p is None for p in parts):
            absent = [n for n, p in zip("qkv", parts) if p is None]
            raise MaelabError(f"{key}: the {', '.join(absent)} part(s) are missing from the HF state dict")
        out[key] = torch.cat(parts, dim=0)
    return out


def mae_to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor] | nn.Module, naming: str = "v5", target: str = "pretraining"
) -> dict[str, torch.Tensor]:
    """maelab -> HF names. ``target="pretraining"`` gives ``ViTMAEForPreTraining`` keys (``vit.`` prefix,
    decoder included when present); ``target="encoder"`` gives ``ViTMAEModel`` keys (decoder dropped).
    ``qkv`` is split into q, k, v. Keys maelab does not know (e.g. ``head.*``) raise :class:`MaelabError`."""
    _check_naming(naming)
    if target not in ("pretraining", "encoder"):
        raise MaelabError(f"target must be 'pretraining' or 'encoder', got {target!r}")
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    enc = "vit." if target == "pretraining" else ""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _ENCODER_MISC:
            out[enc + _ENCODER_MISC[key]] = value
            continue
        if key in _DECODER_MISC:
            if target == "pretraining":
                out[_DECODER_MISC[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if not m:
            unknown.append(key)
            continue
        group, i, mod, param = m.groups()
        if group == "blocks":
            prefix = f"{enc}{_ENCODER_LAYER_PREFIX[naming]}{i}."
        elif target == "pretraining":
            prefix = f"{_DECODER_LAYER_PREFIX}{i}."
        else:
            continue
        if mod == "attn.qkv":
            if value.shape[0] % 3:
                raise MaelabError(f"{key} has {value.shape[0]} rows, not divisible into q, k, v")
            for name, part in zip(_QKV[naming], value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{param}"] = part.clone()
        elif mod in _LAYER_MAP[naming]:
            out[f"{prefix}{_LAYER_MAP[naming][mod]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise MaelabError(f"keys with no Hugging Face ViTMAE equivalent: {few(unknown)}")
    return out


# --- configs ----------------------------------------------------------------------------------------
def _mae_dims(model: nn.Module) -> dict[str, Any]:
    if not hasattr(model, "decoder_blocks") or not hasattr(model, "blocks"):
        raise MaelabError("expected a maelab MaskedAutoencoder")
    enc_blk = model.blocks[0]
    dims = dict(
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(enc_blk.attn.num_heads),
        intermediate=int(enc_blk.mlp.fc1.out_features),
        decoder_embed_dim=int(model.decoder_embed_dim),
        decoder_depth=len(model.decoder_blocks),
        decoder_num_heads=int(model.decoder_blocks[0].attn.num_heads) if len(model.decoder_blocks) else 16,
        decoder_intermediate=int(model.decoder_blocks[0].mlp.fc1.out_features)
        if len(model.decoder_blocks)
        else 4 * int(model.decoder_embed_dim),
    )
    return dims


def hf_config_from_mae(model: nn.Module, mask_ratio: float | None = None):
    """A ``transformers.ViTMAEConfig`` for ``model``: sizes, ``image_size``, ``patch_size``,
    ``mask_ratio``, ``norm_pix_loss``, decoder sizes, ``layer_norm_eps`` (the model's), ``hidden_act="gelu"``
    (exact GELU), no dropout. HF ViTMAE supports square images only. ``mask_ratio`` overrides the
    model's (e.g. 0.0: a ``ViTMAEModel`` that returns every patch, which a maelab model refuses as its
    default ratio)."""
    model = as_mae(model, "hf_config_from_mae")
    from transformers import ViTMAEConfig

    h, w = model.img_size
    if h != w:
        raise MaelabError(
            f"Hugging Face ViTMAE supports square images only (its sin-cos tables and patchify assume a "
            f"square grid); this model takes {h}x{w}"
        )
    d = _mae_dims(model)
    return ViTMAEConfig(
        hidden_size=d["embed_dim"],
        num_hidden_layers=d["depth"],
        num_attention_heads=d["num_heads"],
        intermediate_size=d["intermediate"],
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=float(getattr(model, "norm_eps", 1e-6)),
        image_size=int(h),
        patch_size=int(model.patch_size),
        num_channels=int(model.in_chans),
        qkv_bias=True,
        decoder_num_attention_heads=d["decoder_num_heads"],
        decoder_hidden_size=d["decoder_embed_dim"],
        decoder_num_hidden_layers=d["decoder_depth"],
        decoder_intermediate_size=d["decoder_intermediate"],
        mask_ratio=float(model.mask_ratio if mask_ratio is None else mask_ratio),
        norm_pix_loss=bool(model.norm_pix_loss),
        architectures=["ViTMAEForPreTraining"],
    )


HF_DEFAULT_WIDTH = 768  # ViTMAEConfig's hidden_size when a config.json leaves it out


def mae_kwargs_from_hf_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """:class:`MaskedAutoencoder` kwargs from a ViTMAE config (``ViTMAEConfig`` or its ``config.json`` dict).

    ``layer_norm_eps`` is carried over as ``norm_eps`` (HF's default and the hub configs say 1e-12, the
    official model 1e-6; the outputs only equal HF's with HF's eps). Activations other than exact
    ``gelu`` are refused.
    ``mask_ratio=0`` (masks nothing) becomes 0.75, the paper's ratio."""
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    if cfg.get("model_type", "vit_mae") != "vit_mae":
        raise MaelabError(f"not a ViTMAE config (model_type={cfg.get('model_type')!r}): maelab reads Hugging Face "
                          f"ViTMAE folders (ViTMAEForPreTraining, ViTMAEModel), not other models such as ViTModel "
                          f"or ViTForImageClassification")
    get = lambda k, default: cfg.get(k, default)  # noqa: E731 - HF defaults below
    act = get("hidden_act", "gelu")
    if act != "gelu":
        raise MaelabError(f"hidden_act={act!r} is not supported; maelab blocks use exact GELU ('gelu')")
    if not get("qkv_bias", True):
        raise MaelabError("qkv_bias=False is not supported; MAE uses a qkv bias")
    hidden, dec_hidden = int(get("hidden_size", HF_DEFAULT_WIDTH)), int(get("decoder_hidden_size", 512))
    ratio = int(get("intermediate_size", 3072)) / hidden
    dec_ratio = int(get("decoder_intermediate_size", 2048)) / dec_hidden
    if ratio != dec_ratio:
        raise MaelabError(f"encoder MLP ratio {ratio} differs from decoder MLP ratio {dec_ratio}; maelab uses one")
    image_size = get("image_size", 224)
    image_size = tuple(int(s) for s in image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
    patch = get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise MaelabError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    mask_ratio = float(get("mask_ratio", 0.75))
    if mask_ratio <= 0:
        # a common way to get unmasked features out of a transformers ViTMAEModel; maelab has
        # forward_features for that, and its default ratio must mask something
        warnings.warn(f"the Hugging Face config has mask_ratio={mask_ratio} (masks nothing); the maelab model "
                      f"gets the paper's 0.75 as its default ratio (forward_features never masks)", stacklevel=2)
        mask_ratio = 0.75
    return dict(
        img_size=image_size,
        patch_size=int(patch),
        in_chans=int(get("num_channels", 3)),
        embed_dim=hidden,
        depth=int(get("num_hidden_layers", 12)),
        num_heads=int(get("num_attention_heads", 12)),
        decoder_embed_dim=dec_hidden,
        decoder_depth=int(get("decoder_num_hidden_layers", 8)),
        decoder_num_heads=int(get("decoder_num_attention_heads", 16)),
        mlp_ratio=ratio,
        norm_pix_loss=bool(get("norm_pix_loss", False)),
        mask_ratio=mask_ratio,
        norm_eps=float(get("layer_norm_eps", 1e-12)),
    )


# --- folders ----------------------------------------------------------------------------------------
def _read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    st, st_index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    pt, pt_index = os.path.join(path, "pytorch_model.bin"), os.path.join(path, "pytorch_model.bin.index.json")

    def load_pt(file: str) -> dict[str, torch.Tensor]:
        if check_weights_file(file) == SAFETENSORS:
            return load_file(file, device="cpu")
        return dict(load_torch(file))

    if os.path.isfile(st):
        return load_file(st, device="cpu")
    for index, loader in ((st_index, lambda f: load_file(f, device="cpu")), (pt_index, load_pt)):
        if os.path.isfile(index):
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(loader(os.path.join(path, shard)))
            return sd
    if os.path.isfile(pt):
        return load_pt(pt)
    raise MaelabError(f"{path} has no model.safetensors or pytorch_model.bin")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model folder as a dict; a missing, unreadable or non-object file
    is a one-line :class:`MaelabError` naming it."""
    cfg_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise MaelabError(f"{os.fspath(path)} is not a Hugging Face model folder (no config.json)")
    try:
        with open(cfg_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise MaelabError(f"cannot read {cfg_file}: {e}") from None
    if not isinstance(config, dict):
        raise MaelabError(f"{cfg_file} is not a Hugging Face config (a JSON object of settings)")
    return config


def is_vit_mae_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ViTMAE ``config.json`` (a folder ``--to hf`` may write over)."""
    try:
        return read_hf_config(path).get("model_type") == "vit_mae"
    except MaelabError:
        return False


@keeps_rng
def load_hf_pretrained_dir(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """A maelab :class:`MaskedAutoencoder` from a local HF ViTMAE folder (``config.json`` +
    ``model.safetensors`` / ``pytorch_model.bin``, sharded or not; 4.x or 5.x names).

    A ``ViTMAEModel`` folder (encoder only) loads into the encoder; the decoder keeps its fresh init.
    Position tables missing from the file keep maelab's own sin-cos tables (the same numbers).
    ``overrides`` go to the constructor (e.g. ``norm_pix_loss=True``)."""
    return load_hf_folder(path, **overrides)[0]


@keeps_rng
def load_hf_folder(path: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, str]:
    """:func:`load_hf_pretrained_dir` and what the folder held: ``"full"`` (``ViTMAEForPreTraining``) or
    ``"encoder"`` (``ViTMAEModel``: the decoder is a fresh one, which reconstructions and conversions that
    keep a decoder must not take for a trained one)."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    config = read_hf_config(path)
    try:
        kwargs = mae_kwargs_from_hf_config(config)
    except (TypeError, ValueError) as e:  # a setting that is not a number where one is needed
        raise MaelabError(f"{cfg_file} holds a setting maelab cannot read: {e}") from None
    except MaelabError as e:
        if config.get("model_type", "vit_mae") != "vit_mae":
            raise MaelabError(f"{cfg_file}: {e}") from None
        check_width(cfg_file, config, _read_hf_weights(path))  # a config edited apart from its weights says so
        raise MaelabError(f"{e}{defaults_taken(config)}") from None
    kwargs.update(overrides)
    model = MaskedAutoencoder(**kwargs)
    sd = hf_to_mae_state_dict(_read_hf_weights(path))
    own = model.state_dict()
    for table in ("pos_embed", "decoder_pos_embed"):
        if table not in sd and (table == "pos_embed" or "decoder_embed.weight" in sd):
            sd[table] = own[table].clone()
    try:
        loaded = load_into_mae(model, sd)
    except MaelabError as e:
        raise MaelabError(f"{e}{defaults_taken(config)}") from None
    return model, loaded["kind"]


# the settings that shape a ViTMAE's weights, with ViTMAEConfig's defaults (what transformers takes too)
SHAPE_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": HF_DEFAULT_WIDTH,
                  "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                  "decoder_hidden_size": 512, "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16,
                  "decoder_intermediate_size": 2048}


def defaults_taken(config: dict[str, Any]) -> str:
    """For a message about weights that do not fit: the shape settings config.json leaves out, whose
    Hugging Face defaults were taken (often the cause, in a hand-written or trimmed config)."""
    missing = [k for k in SHAPE_DEFAULTS if k not in config]
    if not missing:
        return ""
    return (f" (config.json does not set {', '.join(missing)}: Hugging Face's defaults "
            f"{', '.join(str(SHAPE_DEFAULTS[k]) for k in missing)} were taken, as transformers takes them)")


def check_width(cfg_file: str, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Refuse a config.json whose ``hidden_size`` is not the width of its folder's weights (the patch
    embedding's output channels): a consequence of it, such as an MLP ratio, would otherwise be named."""
    patch = next((v for k, v in weights.items() if k.endswith("patch_embeddings.projection.weight")), None)
    width = config.get("hidden_size", HF_DEFAULT_WIDTH)
    if patch is not None and patch.shape[0] != width:
        raise MaelabError(f"{cfg_file} says hidden_size {width}, but the weights beside it are {patch.shape[0]} "
                          f"wide: the config does not belong to these weights")


def save_hf_pretrained(model: nn.Module, directory: str | os.PathLike, naming: str = "v5") -> str:
    """Write ``config.json`` + ``model.safetensors`` that ``ViTMAEForPreTraining.from_pretrained``
    loads (``naming="v4"`` writes the 4.x hub names, which transformers 5.x renames on load)."""
    _check_naming(naming)
    model = as_mae(model, "save_hf_pretrained")
    config = hf_config_from_mae(model)
    sd = mae_to_hf_state_dict(model.state_dict(), naming=naming)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):  # os.makedirs's FileExistsError
        raise MaelabError(f"cannot write {directory}: {directory} is a file, not a folder")  # as the CLI says it
    os.makedirs(directory, exist_ok=True)
    # both files are written in full under temporary names and only then put in place, together: written
    # one after the other, a stop between them left a folder written again with the new config.json beside
    # the old weights, which loaded as a model that never existed
    # (the weights, inner, are synced and renamed first: the config's small sync is all that lies between)
    with atomic_path(os.path.join(directory, "config.json")) as config_file, \
            atomic_path(os.path.join(directory, "model.safetensors"), scratch_folder=True) as weights:
        config.to_json_file(config_file, use_diff=True)  # what save_pretrained writes
        save_file(sd, weights, metadata={"format": "pt"})  # whole file, umask permissions
    return directory


def hf_model_from_mae(model: nn.Module, encoder_only: bool = False, mask_ratio: float | None = None) -> nn.Module:
    """An in-memory ``ViTMAEForPreTraining`` (or ``ViTMAEModel`` with ``encoder_only``) holding
    ``model``'s weights, loaded strictly (``mask_ratio``: see :func:`hf_config_from_mae`)."""
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    model = as_mae(model, "hf_model_from_mae")
    config = hf_config_from_mae(model, mask_ratio)
    hf = (ViTMAEModel if encoder_only else ViTMAEForPreTraining)(config)
    naming = detect_hf_naming(hf.state_dict())  # whichever major version is installed
    sd = mae_to_hf_state_dict(model.state_dict(), naming=naming, target="encoder" if encoder_only else "pretraining")
    hf.load_state_dict(sd, strict=True)
    return hf.eval()
