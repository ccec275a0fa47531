"""`maelab convert`: move MAE weights between maelab, the official release, timm and Hugging Face.

Sources (recognised by content, not by name): a maelab pre-training run / checkpoint folder /
``.safetensors``, an official MAE ``.pth`` (or the same weights as safetensors), a Hugging Face ViTMAE
folder; also a fine-tuned classifier (a maelab fine-tune run, an official / timm fine-tuned checkpoint,
head included), which becomes timm weights, a maelab fine-tune file or the official layout. Targets for an
MAE: maelab, official, Hugging Face (all need the decoder, so a pre-training checkpoint) and timm
(encoder only).
All key mapping lives in ``maelab.interop``; this module only reads the source and picks the writer.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from maelab.errors import MaelabError
from maelab.interop.encoders import img_size_arg, read_classifier
from maelab.interop.formats import TORCH_SUFFIXES, size_record
from maelab.interop.huggingface import is_vit_mae_folder, save_hf_pretrained
from maelab.interop.mae_weights import load_mae, require_decoder, save_mae
from maelab.interop.official import export_official, save_official
from maelab.interop.timm_export import save_timm_checkpoint, save_timm_classifier
from maelab.io import save_weights


ONLY_FOR = {"global_pool": "timm", "hf_naming": "hf", "encoder_only": "official"}  # flag -> the --to it shapes


def run(args: argparse.Namespace) -> Path:
    for name, target in ONLY_FOR.items():  # given for another format, they were passed over without a word
        if getattr(args, name) not in (None, False) and args.to != target:
            raise MaelabError(f"--{name.replace('_', '-')} shapes a --to {target} export; it does nothing for --to {args.to}")
    out = convert(args.src, args.out, args.to, args.global_pool, args.hf_naming or "v5", not args.encoder_only,
                  args.num_heads, img_size_arg(args.img_size))
    added = out.name != Path(args.out).expanduser().name
    print(f"wrote {out}" + (f" ({out.suffix} added: {args.out} had no file extension)" if added else ""))
    return out


TARGETS = ("maelab", "official", "timm", "hf")
SUFFIX = {"maelab": ".safetensors", "official": ".pth", "timm": ".safetensors"}
SUFFIXES = {"maelab": (".safetensors",), "official": TORCH_SUFFIXES, "timm": (".safetensors",)}
WRITES = {"maelab": "safetensors", "official": "a torch.save checkpoint", "timm": "safetensors"}


def output_path(out: str | Path, to: str) -> Path:
    """``out`` with the suffix its format needs added when it has none; a suffix of another format is
    refused: maelab reads files by their content, but timm and torch.load / safetensors users pick the
    reader by the extension, so a safetensors file named ``.pth`` fails for them."""
    out = Path(out).expanduser()
    if to not in SUFFIX:  # a Hugging Face folder: new, empty, or a ViTMAE folder written again
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
        if held and not is_vit_mae_folder(out):
            raise MaelabError(f"{out} holds other files ({', '.join(held[:4])}) and is not a Hugging Face ViTMAE "
                              f"folder: config.json and model.safetensors written there would replace or sit beside "
                              f"them (and change what --init {out} loads); choose a new or empty folder")
        return out
    if out.is_dir():  # the added suffix would write beside the folder, not into it
        raise MaelabError(f"{out} is a folder, and --to {to} writes one file: give a file name, e.g. "
                          f"{out / ('model' + SUFFIX[to])}")
    if not out.suffix:
        return out.with_name(out.name + SUFFIX[to])
    if out.suffix.lower() not in SUFFIXES[to]:
        raise MaelabError(f"--to {to} writes {WRITES[to]}, and other tools pick their reader by the file extension: "
                          f"name the output {out.name}{SUFFIX[to]} or {out.stem}{SUFFIX[to]}")
    return out


def refuse_overwriting_source(src: str | Path, out: Path) -> None:
    """The output may not be the source, nor a file that exists inside a source folder (a run's
    checkpoint, a Hugging Face folder's weights): the conversion would replace the weights it came from."""
    source, target = Path(src).expanduser().resolve(), out.resolve()
    inside = source.is_dir() and source in target.parents and target.exists()
    if target == source or inside:
        what = "is the source" if target == source else f"is a file inside the source folder {src}"
        raise MaelabError(f"the output {out} {what}: converting would overwrite the weights it reads; "
                          f"choose another output path")


def convert(src: str | Path, out: str | Path, to: str, global_pool: str | None = None, hf_naming: str = "v5",
            include_decoder: bool = True, num_heads: int | None = None, img_size: tuple[int, int] | None = None) -> Path:
    """Read ``src`` (maelab run/checkpoint/file, official ``.pth``, or Hugging Face folder; for ``to="timm"``
    also a maelab fine-tune run) and write ``out`` in the ``to`` format. Returns the written path, which
    has ``.safetensors`` / ``.pth`` appended when ``out`` had no suffix. ``global_pool`` (timm): ``token``
    by default for an MAE; a fine-tuned classifier keeps its own. ``img_size``: see ``--img-size``."""
    if to not in TARGETS:
        raise MaelabError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    out = output_path(out, to)
    refuse_overwriting_source(src, out)
    classifier = read_classifier(src, num_heads, img_size)
    if classifier is not None:
        size = tuple(classifier[1]["vit"]["img_size"])
        if img_size is not None and size != tuple(img_size):
            raise MaelabError(f"{src} is a classifier for {size[0]}x{size[1]} px; convert does not resize a classifier "
                              f"(--img-size {img_size[0]} {img_size[1]}): fine-tune it at the new size with --init")
        for note in classifier[1].get("notes", []):
            print(f"maelab convert: {note}", flush=True)
        return convert_classifier(src, *classifier, out, to, global_pool)
    model, meta = load_mae(src, img_size=img_size, num_heads=num_heads)
    for note in meta.get("notes", []):
        print(f"maelab convert: {note}", flush=True)
    if to != "timm" and not (to == "official" and not include_decoder):
        require_decoder(meta, src, f"--to {to}", "`--to timm` or `--to official --encoder-only` export its encoder")
    if to == "maelab":
        return save_mae(model, out, meta.get("preset"))
    if to == "official":
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(export_official(model, out, include_decoder=include_decoder))
    if to == "timm":
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(save_timm_checkpoint(model, out, global_pool=global_pool or "token"))
    created = not out.exists()
    try:
        return Path(save_hf_pretrained(model, out, naming=hf_naming))
    except BaseException:  # a full disk after config.json: no folder that looks like a model but is not one
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def convert_classifier(src: str | Path, weights: dict, meta: dict, out: Path, to: str, global_pool: str | None) -> Path:
    """A fine-tuned classifier (maelab, official or timm) -> timm weights, a maelab fine-tune file or the
    official layout; it has no decoder, so never a Hugging Face ViTMAE."""
    if to == "timm":
        return Path(save_timm_classifier(weights, meta, out, global_pool=global_pool))
    if to == "maelab":
        save_weights(out, weights, meta)
        return out
    if to == "official":
        vit = meta["vit"]
        return Path(save_official(weights, out, size_record(vit["img_size"], vit["patch_size"],
                                                            vit.get("norm_eps", 1e-6), heads=vit)))
    raise MaelabError(f"{src} is a fine-tuned classifier ({meta.get('num_classes')} classes, {meta.get('global_pool')} "
                      f"pooling): it has no decoder, and a Hugging Face ViTMAE needs one; export it with --to timm, "
                      f"--to maelab or --to official, or use it with --init of finetune / linprobe / knn / features")
