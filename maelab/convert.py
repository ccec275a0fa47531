"""`maelab convert`: move MAE weights between maelab, the official release, timm and Hugging Face.

Sources (recognised by content, not by name): a maelab pre-training run / checkpoint folder /
``.safetensors``, an official MAE ``.pth`` (or the same weights as safetensors), a Hugging Face ViTMAE
folder; for ``--to timm`` also a maelab fine-tune run (its classifier, head included). Targets: maelab,
official, Hugging Face (all need the decoder, so a pre-training checkpoint) and timm (encoder only).
All key mapping lives in ``maelab.interop``; this module only reads the source and picks the writer.
"""

from __future__ import annotations

from pathlib import Path

from maelab.errors import MaelabError
from maelab.models.loading import load_mae, maelab_file, require_decoder, save_mae

TARGETS = ("maelab", "official", "timm", "hf")
SUFFIX = {"maelab": ".safetensors", "official": ".pth", "timm": ".safetensors"}


def output_path(out: str | Path, to: str) -> Path:
    """``out`` with the suffix its format needs added when it has none (timm chooses its loader by the
    file extension); a timm output with another suffix is refused."""
    out = Path(out).expanduser()
    if to not in SUFFIX:
        return out
    if not out.suffix:
        return out.with_name(out.name + SUFFIX[to])
    if to == "timm" and out.suffix != ".safetensors":
        raise MaelabError(f"--to timm writes safetensors, and timm picks its loader by the file extension: name the "
                          f"output {out.name}.safetensors or {out.stem}.safetensors")
    return out


def convert(src: str | Path, out: str | Path, to: str, global_pool: str | None = None, hf_naming: str = "v5",
            include_decoder: bool = True) -> Path:
    """Read ``src`` (maelab run/checkpoint/file, official ``.pth``, or Hugging Face folder; for ``to="timm"``
    also a maelab fine-tune run) and write ``out`` in the ``to`` format. Returns the written path, which
    has ``.safetensors`` / ``.pth`` appended when ``out`` had no suffix. ``global_pool`` (timm): ``token``
    by default for an MAE; a fine-tuned classifier keeps its own."""
    if to not in TARGETS:
        raise MaelabError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    out = output_path(out, to)
    found = maelab_file(src)
    if found is not None and found[1].get("arch") == "vit" and to == "timm":
        from maelab.interop.timm_export import save_timm_classifier
        from maelab.train.checkpoint import read_weights

        weights, meta = read_weights(found[0])
        return Path(save_timm_classifier(weights, meta, out, global_pool=global_pool))
    model, meta = load_mae(src)
    if to != "timm" and not (to == "official" and not include_decoder):
        require_decoder(meta, src, f"--to {to}", "`--to timm` or `--to official --encoder-only` export its encoder")
    if to == "maelab":
        return save_mae(model, out, meta.get("preset"))
    if to == "official":
        from maelab.interop.official import export_official

        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(export_official(model, out, include_decoder=include_decoder))
    if to == "timm":
        from maelab.interop.timm_export import save_timm_checkpoint

        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(save_timm_checkpoint(model, out, global_pool=global_pool or "token"))
    from maelab.interop.huggingface import save_hf_pretrained

    return Path(save_hf_pretrained(model, out, naming=hf_naming))
