"""MAE models from anything a user may point at, and maelab's own weights file.

Sources: a run folder, a checkpoint folder, a maelab safetensors file (self-describing: the
constructor arguments are in its header), an official MAE ``.pth`` (or the same weights as
safetensors) or a Hugging Face ViTMAE folder -- recognised by content (:mod:`maelab.interop.formats`).
Anything that holds no MAE is refused with a line saying what it is and what it can be used for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maelab.errors import MaelabError
from maelab.interop.formats import TORCH, check_suffix, check_weights_file, read_record
from maelab.interop.huggingface import detect_hf_naming, load_hf_folder
from maelab.interop.official import classify_official, infer_mae_architecture, load_into_mae, read_official, resize_mae
from maelab.io import read_weights, save_weights
from maelab.models.checks import pair
from maelab.models.mae import MaskedAutoencoder, as_mae, keeps_rng
from maelab.models.state_dicts import check_state_dict
from maelab.models.vit import describe, vit_arch
from maelab.train.checkpoint import resolve_weights_path


def model_meta(preset: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a weights file records about its model (JSON in the safetensors header)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return {"arch": "mae", "preset": preset, "kwargs": clean}


USE_AS_INIT = "use it with --init of finetune / linprobe / knn / features"
NEEDS_MAE = ("reconstructions and the maelab / official / hf formats need an MAE pre-training checkpoint (a "
             "`maelab pretrain` run, an official MAE .pth, a Hugging Face ViTMAE folder)")


def check_num_heads(num_heads: int | None) -> None:
    if num_heads is not None and num_heads < 1:
        raise MaelabError(f"--num-heads must be at least 1, got {num_heads}")


def probed_encoder(meta: dict[str, Any]) -> str:
    """The encoder a linear-probe head was trained on: the weights file it read (its ``--init`` may name a run
    that has trained on since, whose newest checkpoint is another encoder)."""
    return meta.get("encoder_weights") or meta.get("init") or "see its config.yaml"


def not_an_mae(path: str | Path, meta: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> MaelabError:
    """The error for a weights file that holds no Masked Autoencoder: what it is and what it is good for."""
    arch = meta.get("arch")
    if arch == "vit":
        try:
            what = f"{describe(vit_arch(meta['vit']))}, {meta.get('num_classes', '?')} classes"
        except (KeyError, TypeError, MaelabError):
            what = "a ViT classifier"
        return MaelabError(f"{path} is a fine-tuned maelab classifier ({what}), not an MAE pre-training checkpoint: "
                           f"it has no decoder. Use it with --init of finetune / linprobe / knn / features, or export it with "
                           f"`maelab convert {path} OUT.safetensors --to timm`; {NEEDS_MAE}")
    if arch == "linprobe":
        return MaelabError(f"{path} is a linear-probe head (BatchNorm + Linear on frozen features), not an MAE: it "
                           f"holds no encoder or decoder; point at the encoder it probed ({probed_encoder(meta)})")
    if arch is not None:
        return MaelabError(f"{path} holds a maelab {arch!r} model, not an MAE; {NEEDS_MAE}")
    keys = sorted(weights or {})
    if any(k.startswith("blocks.") for k in keys) and "patch_embed.proj.weight" in keys:
        return MaelabError(f"{path} holds encoder-only ViT weights (a timm export or an encoder checkpoint, no "
                           f"decoder): with no decoder it cannot become an MAE checkpoint or draw reconstructions; "
                           f"{USE_AS_INIT}")
    if weights:
        try:
            detect_hf_naming(weights)
            return MaelabError(f"{path} holds Hugging Face ViTMAE weights without their config: point at the folder "
                               f"that holds it together with config.json")
        except MaelabError:
            pass
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    return MaelabError(f"{path} holds no MAE weights (no maelab model description in its header and no MAE/ViT "
                       f"parameter names{': ' + shown if shown else ''})")


def _mae_from_state_dict(sd: dict[str, torch.Tensor], record: dict[str, Any] | None, notes: list[str],
                         img_size: tuple[int, int] | None = None, num_heads: int | None = None
                         ) -> tuple[MaskedAutoencoder, str]:
    """An official-layout state dict -> (model shaped like it, loaded strictly; "full" / "encoder" / "finetuned").
    ``img_size``: the size of a file that records none and whose position table does not show its grid;
    ``num_heads``: the encoder's heads (else the record's, else the paper's table)."""
    kind = classify_official(sd)
    kwargs = infer_mae_architecture(sd, img_size=img_size, num_heads=num_heads, record=record, notes=notes)
    model = MaskedAutoencoder(**kwargs)
    given = {"num_heads"} if num_heads is not None else set()
    assumed = [f"{kwargs[k]} {what}" for k, what in (("num_heads", "encoder"), ("decoder_num_heads", "decoder"))
               if k in kwargs and k not in (record or {}) and k not in given]
    if assumed:  # files maelab wrote record them
        notes.append(f"attention heads: {', '.join(assumed)} (the paper's table for these widths; the file does not "
                     f"record them)")
    load_into_mae(model, sd)
    return model, kind


def require_decoder(meta: dict[str, Any], path: str | Path, what: str, hint: str = USE_AS_INIT) -> None:
    """Refuse ``what`` for a model whose decoder did not come from the file (an encoder-only official .pth)."""
    if meta.get("kind") in ("encoder", "finetuned"):
        raise MaelabError(f"{path} is an encoder-only checkpoint ({meta['kind']} layout, no decoder weights): "
                          f"{what} needs the decoder; {hint}")


def save_mae(model: MaskedAutoencoder, path: str | Path, preset: str | None = None) -> Path:
    """A self-describing maelab weights file (safetensors + constructor arguments in the header)."""
    model = as_mae(model, "save_mae")
    path = Path(path)
    check_suffix(path, "safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, model.state_dict(), model_meta(preset, model.init_kwargs))
    return path


@keeps_rng  # the random init the weights overwrite drew from the caller's stream
def load_mae(path: str | Path, device: str | torch.device = "cpu", img_size: int | tuple[int, int] | None = None,
             num_heads: int | None = None) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """(model in eval mode, its metadata) from a run folder, checkpoint folder, weights file (maelab
    safetensors, or an official-layout ``.pth`` / safetensors), or a Hugging Face ViTMAE folder. The
    file format is recognised by content, not by name. Official files that lack the decoder load into
    the encoder (``meta["kind"]`` is then ``"encoder"`` or ``"finetuned"``; see :func:`require_decoder`).
    ``img_size`` other than the checkpoint's gives the resized model (:func:`resize_mae`); ``num_heads``: the
    encoder's attention heads, for an official file that does not record them (a count contradicting a
    file's own record is refused); what loading did is listed in ``meta["notes"]``."""
    check_num_heads(num_heads)
    model, meta = _load_mae(Path(path).expanduser(), None if img_size is None else pair(img_size), num_heads)
    heads = int(model.blocks[0].attn.num_heads)
    if num_heads is not None and heads != num_heads:  # maelab / HF files record theirs (official: checked on reading)
        raise MaelabError(f"{path} records {heads} attention heads (its num_heads), not {num_heads}: leave the head "
                          f"count out")
    notes = meta.setdefault("notes", [])
    if img_size is not None and tuple(pair(img_size)) != tuple(model.img_size):
        old = model.img_size
        model = resize_mae(model, img_size)
        notes.append(f"resized from {old[0]}x{old[1]} to {model.img_size[0]}x{model.img_size[1]} px "
                     f"(position tables for the {model.grid[0]}x{model.grid[1]} grid)")
    return model.to(device).eval(), meta


def _load_mae(p: Path, img_size: tuple[int, int] | None = None,
              num_heads: int | None = None) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    notes: list[str] = []
    if p.is_file() and check_weights_file(p) == TORCH:
        model, kind = _mae_from_state_dict(*read_official(p), notes, img_size, num_heads)
        return model, {"arch": "mae", "preset": None, "source": "official", "kind": kind, "notes": notes}
    if p.is_dir() and (p / "config.json").is_file():
        model, kind = load_hf_folder(p)
        return model, {"arch": "mae", "preset": None, "source": "huggingface", "kind": kind}
    weights_path = resolve_weights_path(p)
    weights, meta = read_weights(weights_path)
    if meta.get("arch") == "mae" and "kwargs" in meta:
        model = MaskedAutoencoder(**dict(meta["kwargs"]))
        check_state_dict(model, weights, str(weights_path))
        model.load_state_dict(weights)
        return model, meta
    if not meta and any(k.startswith("decoder_blocks.") for k in weights):  # official layout saved as safetensors
        model, kind = _mae_from_state_dict(weights, read_record(weights_path), notes, img_size, num_heads)
        return model, {"arch": "mae", "preset": None, "source": "official", "kind": kind, "notes": notes}
    raise not_an_mae(p, meta, weights)
