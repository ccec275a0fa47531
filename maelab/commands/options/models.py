"""`maelab models`'s options."""

from __future__ import annotations

import argparse


NAME = "models"
DESCRIPTION = "The MAE presets --model accepts: input size, patch, encoder and decoder sizes."
Config = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass
