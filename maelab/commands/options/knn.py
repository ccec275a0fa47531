"""`maelab knn`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.commands.options.sections import ClassDataConfig, EncoderConfig, EvalRunConfig
from maelab.config import command_config, option


NAME = "knn"
DESCRIPTION = ("Weighted k-nearest-neighbour classification on L2-normalised features: the training split is the "
               "memory bank, the validation split the queries.")


@dataclass
class KnnParams:
    k: int = option(20, "neighbours that vote")
    temperature: float = option(0.07, "vote weight exp(cosine similarity / temperature)")


KnnConfig = Config = command_config(
    "KnnConfig", __name__, model=EncoderConfig, data=ClassDataConfig, knn=KnnParams, run=EvalRunConfig)
