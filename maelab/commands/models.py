"""`maelab models`: the model presets, one line each."""

from __future__ import annotations

import argparse

from maelab.models.presets import PRESETS


def run(args: argparse.Namespace) -> None:
    for name, kw in PRESETS.items():
        print(f"{name:24s} img {kw['img_size']}  patch {kw['patch_size']:2d}  encoder {kw['embed_dim']}x{kw['depth']} "
              f"({kw['num_heads']} heads)  decoder {kw['decoder_embed_dim']}x{kw['decoder_depth']} "
              f"({kw['decoder_num_heads']} heads)")
