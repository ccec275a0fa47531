"""`maelab convert`: move MAE weights between maelab, the official release, timm and Hugging Face.

All key mapping lives in ``maelab.interop``; this module only reads the source and picks the writer.
"""

from __future__ import annotations

from pathlib import Path

from maelab.errors import MaelabError
from maelab.models.loading import load_mae, save_mae

TARGETS = ("maelab", "official", "timm", "hf")


def convert(src: str | Path, out: str | Path, to: str, global_pool: str = "token", hf_naming: str = "v5",
            include_decoder: bool = True) -> Path:
    """Read ``src`` (maelab run/checkpoint/file, official ``.pth``, or Hugging Face folder) and write
    ``out`` in the ``to`` format. Returns the written path."""
    if to not in TARGETS:
        raise MaelabError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    model, meta = load_mae(src)
    out = Path(out).expanduser()
    if to == "maelab":
        return save_mae(model, out, meta.get("preset"))
    if to == "official":
        from maelab.interop.official import export_official

        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(export_official(model, out, include_decoder=include_decoder))
    if to == "timm":
        from maelab.interop.timm_export import save_timm_checkpoint

        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(save_timm_checkpoint(model, out, global_pool=global_pool))
    from maelab.interop.huggingface import save_hf_pretrained

    return Path(save_hf_pretrained(model, out, naming=hf_naming))
