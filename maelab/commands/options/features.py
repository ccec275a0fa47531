"""`maelab features`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from maelab.commands.options.sections import EncoderConfig, EvalRunConfig, ImagesConfig
from maelab.config import command_config, option


NAME = "features"
DESCRIPTION = ("Encoder features (cls token or mean of the patch tokens after the final norm; never masked) for "
               "every image of a folder, in a fixed order.")


@dataclass
class FeaturesRunConfig(EvalRunConfig):
    seed: int = option(0, "seed for the random encoder of --init none")
    out: str = option("features.npy", "output: .npy (+ .paths.txt, and .labels.npy for class folders) or .safetensors "
                                  "(features, labels; paths in the header, and .paths.txt)")


FeaturesConfig = Config = command_config(
    "FeaturesConfig", __name__, model=EncoderConfig, data=ImagesConfig, run=FeaturesRunConfig)
