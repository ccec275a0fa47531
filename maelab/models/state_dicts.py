"""Parameter-name groups of an MAE / ViT state dict, and the one readable report of how a state
dict differs from a model's (used wherever weights are loaded: checkpoints, official, timm, HF)."""

from __future__ import annotations

import torch

from maelab.errors import MaelabError

# timm / official names: the encoder, the MAE decoder, and a classifier's head.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
HEAD_PREFIXES = ("head.", "fc_norm.")


def few(keys, named: int = 4) -> str:
    """The first ``named`` keys (sorted) and how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:named]) + (f" (+{len(keys) - named} more)" if len(keys) > named else "")


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                        optional: tuple[str, ...] = (), named: int = 4) -> str:
    """How ``given`` differs from ``expected`` in keys and shapes, as one readable phrase naming the first
    few of each (empty when they fit). Expected keys starting with ``optional`` may be missing."""
    missing = [k for k in expected if k not in given and not k.startswith(optional)]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(expected)
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {few(missing, named)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {few(unexpected, named)}")
    if shapes:
        more = f" (+{len(shapes) - named} more)" if len(shapes) > named else ""
        parts.append(f"shape mismatch {len(shapes)}: {'; '.join(shapes[:named])}{more}")
    return "; ".join(parts)


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict key/shape comparison with a readable message instead of a wall of text."""
    problem = state_dict_mismatch(model.state_dict(), state_dict)
    if problem:
        raise MaelabError(f"{source} does not fit this model ({problem})")
