"""Pictures: MAE reconstruction grids (like Figs. 2-4 of the paper) and training curves.

Everything draws on bare ``matplotlib.figure.Figure`` objects (Agg canvas), so no display is needed
and importing this package does not touch pyplot or the global backend. PNGs are written atomically.
"""

from maelab.choices import PICTURE_IMAGES
from maelab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from maelab.viz.curves import plot_curves, plot_loss_overlay, read_metrics, save_figure_atomic
from maelab.viz.reconstruct import (
    NORM_PIX_CAPTION,
    load_images_for_model,
    reconstruct,
    reconstruction_grid,
    save_reconstruction_grid,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORM_PIX_CAPTION",
    "PICTURE_IMAGES",
    "denormalize",
    "load_images_for_model",
    "normalize",
    "plot_curves",
    "plot_loss_overlay",
    "read_metrics",
    "reconstruct",
    "reconstruction_grid",
    "save_figure_atomic",
    "save_reconstruction_grid",
]
