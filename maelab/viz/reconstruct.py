"""MAE reconstructions, drawn like Figs. 2-4 of He et al. (2021).

For each image and mask ratio: the masked input (removed patches in grey), the decoder's prediction
for every patch, and the prediction with the visible patches pasted back in (what the paper shows).

Masks are drawn from a ``torch.Generator`` seeded by ``seed`` on the model's device, so a picture is
reproducible; because every ratio uses the same noise, the visible set at a higher ratio is a subset
of the visible set at a lower one.

A ``norm_pix_loss`` model predicts each patch normalised by its own mean and variance. To show
pixels we de-normalise every predicted patch with the **true** mean/std of the target patch (same
unbiased variance + 1e-6 as the loss). That hands the model the low-frequency content of each masked
patch, so such pictures look better than the model is: the figure says so in a caption.

Figures are bare :class:`matplotlib.figure.Figure` objects (Agg canvas), never pyplot, so no display
is needed and the global backend is untouched.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from maelab.data.folders import load_images
from maelab.data.transforms import denormalize
from maelab.errors import MaelabError
from maelab.models.checks import ratio_run
from maelab.models.masking import grid_step, mask_noise
from maelab.viz.curves import save_figure_atomic

MASK_GREY = 0.5
NORM_PIX_CAPTION = (
    "norm-pix model: predicted patches shown de-normalised with the true patch mean/std "
    "(this leaks the patch statistics)"
)
PANELS = ("masked", "reconstruction", "reconstruction_visible")
_PANEL_TITLES = {"reconstruction": "reconstruction", "reconstruction_visible": "reconstruction + visible"}


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


# --- reconstruction -------------------------------------------------------------------------------
def reconstruct(model, images: torch.Tensor, mask_ratio: float, seed: int = 0,
                mask_type: str = "random") -> dict[str, torch.Tensor]:
    """Mask ``images`` (ImageNet-normalised, (N, 3, H, W) or (3, H, W)) with ``mask_ratio`` and run
    the MAE. Returns CPU float32 tensors in [0, 1] pixel space:

    - ``original``, ``masked`` (removed patches grey), ``reconstruction`` (prediction for every
      patch), ``reconstruction_visible`` (prediction on removed patches, the original on visible
      ones — exactly equal to ``original`` there): each (N, 3, H, W);
    - ``mask``: (N, 1, H, W), 1 where the patch was removed.

    Deterministic for a given ``seed``. Runs under ``torch.no_grad()`` in eval mode and restores the
    model's previous mode. For a ``norm_pix_loss`` model predicted patches are de-normalised with the
    true per-patch mean/std of the target (see the module docstring).
    """
    if not isinstance(images, torch.Tensor):
        raise MaelabError(f"images must be a tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if model.in_chans != 3:  # denormalize() undoes ImageNet's RGB statistics: a grey image came out tinted
        raise MaelabError(f"this MAE takes {model.in_chans}-channel images; reconstruction pictures are drawn in "
                          f"RGB with ImageNet's statistics, so they need a 3-channel model")
    if not images.is_floating_point():  # uint8 pixels were cast to float and drawn as white, without a word
        model._check_input(images)
    device, dtype = _model_device_dtype(model)
    imgs = images.detach().to(device=device, dtype=torch.float32)  # full precision for display
    images = imgs.to(dtype)
    model._check_input(images)
    n = images.shape[0]

    # random noise is drawn on the model's device; block / grid masks on the CPU, as training draws them
    gen = torch.Generator(device=device if mask_type == "random" else "cpu").manual_seed(int(seed))
    noise = mask_noise(mask_type, n, model.grid, mask_ratio, gen, device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise, return_pred=True)
            pred = pred.float()
            if model.norm_pix_loss:
                target = model.patchify(imgs)
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)  # unbiased, as the loss
                pred = pred * (var + 1.0e-6) ** 0.5 + mean
            recon = model.unpatchify(pred)
            p = model.patch_size
            mask_px = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * model.in_chans))
            mask_px = mask_px[:, :1] > 0.5  # (N, 1, H, W), True = removed
    finally:
        model.train(was_training)

    original = denormalize(imgs).cpu()
    recon_px = denormalize(recon).cpu()
    mask_px = mask_px.cpu()
    grey = torch.full_like(original, MASK_GREY)
    return {
        "original": original,
        "masked": torch.where(mask_px, grey, original),
        "reconstruction": recon_px,
        "reconstruction_visible": torch.where(mask_px, recon_px, original),
        "mask": mask_px.float(),
    }


# --- figures --------------------------------------------------------------------------------------
def _ratio_label(r: float, num_patches: int) -> str:
    """The share of patches the picture hides: "75%", "90.6%" (0.9 of 64 keeps 6); "(75% asked)" beside it
    when the two are a point or more apart (0.75 of 10 patches keeps 2: 80%; 0.9 of 4 keeps one: 75%)."""
    ran, asked = 100 * ratio_run(num_patches, r), 100 * r
    return f"{ran:.3g}%" + (f" ({asked:.4g}% asked)" if abs(ran - asked) >= 1 else "")


def row_title(path: str | os.PathLike) -> str:
    """A picture row's label: class folder / file."""
    return str(Path(Path(path).parent.name) / Path(path).name)


ROW_LABEL_POINTS = 8  # font size of a row's label, drawn up the side of its first panel


def fit_label(text: str, panel_inches: float, most_lines: int = 3) -> str:
    """A row label broken into lines that fit the height of its panel (it is drawn rotated, along the
    panel's side): a long ``class/file`` ran into the rows above and below. Breaks after ``/`` first; a
    label that needs more than ``most_lines`` keeps its start and its end (the file name) around "…"."""
    chars = max(8, int(panel_inches * 72 * 0.95 / (0.7 * ROW_LABEL_POINTS)))  # a wide glyph is ~0.7 em
    parts = [p + "/" for p in text.split("/")[:-1]] + [text.split("/")[-1]]
    lines: list[str] = []
    for chunk in (c for part in parts for c in textwrap.wrap(part, chars, break_on_hyphens=False)):
        if lines and len(lines[-1]) + len(chunk) <= chars and lines[-1].endswith("/"):
            lines[-1] += chunk  # short parts share a line
        else:
            lines.append(chunk)
    lines = lines or [""]
    if len(lines) > most_lines:
        lines = lines[:1] + ["…" + lines[-(most_lines - 1)][-(chars - 1):]] + lines[len(lines) - most_lines + 2:]
    return "\n".join(lines)


def _prepare(model, images, titles):
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
    elif isinstance(images, (str, os.PathLike)) or (
        isinstance(images, Sequence) and images and all(isinstance(p, (str, os.PathLike)) for p in images)
    ):
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if titles is None:
            titles = [row_title(p) for p in paths]
        images = load_images_for_model(paths, model.img_size)
    else:
        raise MaelabError("images must be a (N, 3, H, W) tensor or a list of image paths")
    if titles is not None:
        titles = [str(t) for t in titles]
        if len(titles) != images.shape[0]:
            raise MaelabError(f"got {len(titles)} titles for {images.shape[0]} images")
    return images, titles


def reconstruction_grid(
    model,
    images,
    mask_ratios: Sequence[float] | float,
    seed: int = 0,
    titles: Sequence[str] | None = None,
    panel_height: float = 1.6,
    mask_type: str = "random",
) -> Figure:
    """A figure with one row per image: ``original | masked (r%) | reconstruction |
    reconstruction + visible`` for each mask ratio ``r`` (the original shown once per row).

    ``images``: ImageNet-normalised (N, 3, H, W) tensor, or a list of image paths (loaded with
    :func:`load_images_for_model`; titles default to "folder/file", i.e. the class and the file of an ImageFolder). ``titles``: one label per row.
    ``panel_height``: inches per panel; the width follows the image aspect ratio (non-square works).
    ``mask_type``: the masks drawn (a block / grid run's pictures show its own kind, named in the title;
    random where the kind has none, see :func:`picture_mask_type`).
    A norm-pix model gets :data:`NORM_PIX_CAPTION` under the grid.
    """
    if isinstance(mask_ratios, (int, float)):
        mask_ratios = [mask_ratios]
    mask_ratios = [float(r) for r in mask_ratios]
    if not mask_ratios:
        raise MaelabError("give at least one mask ratio")
    images, titles = _prepare(model, images, titles)
    kinds = [picture_mask_type(mask_type, r) for r in mask_ratios]
    results = [reconstruct(model, images, r, seed=seed, mask_type=k) for r, k in zip(mask_ratios, kinds)]
    n = images.shape[0]
    height, width = model.img_size

    gap = 0.15  # spacer column between ratio groups, in panel widths
    width_ratios = [1.0]
    for _ in mask_ratios:
        width_ratios += [gap, 1.0, 1.0, 1.0]
    ncols = len(width_ratios)
    panel_h = float(panel_height)
    panel_w = panel_h * width / height
    space = 0.04  # between panels, fraction of a panel
    labels = [fit_label(t, panel_height) for t in titles] if titles else None
    left = 0.2 + 0.14 * max(label.count("\n") + 1 for label in labels) if labels else 0.1
    right, top = 0.1, 0.45
    caption = NORM_PIX_CAPTION if model.norm_pix_loss else None
    bottom = 0.4 if caption else 0.1
    grid_w = panel_w * (sum(width_ratios) + space * (ncols - 1))
    grid_h = panel_h * (n + space * (n - 1))
    fig_w, fig_h = left + grid_w + right, top + grid_h + bottom
    if caption:  # make sure the one-line caption fits
        fig_w = max(fig_w, 0.075 * len(caption) + 0.4)
        extra = fig_w - (left + grid_w + right)
        left, right = left + extra / 2, right + extra / 2

    fig = Figure(figsize=(fig_w, fig_h))
    gs = fig.add_gridspec(
        n,
        ncols,
        width_ratios=width_ratios,
        left=left / fig_w,
        right=1 - right / fig_w,
        bottom=bottom / fig_h,
        top=1 - top / fig_h,
        wspace=space * len(width_ratios) / sum(width_ratios),
        hspace=space,
    )

    def show(ax, img: torch.Tensor, title: str | None):
        ax.imshow(img.permute(1, 2, 0).numpy(), aspect="equal")  # default: antialiased down, nearest up
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if title:
            ax.set_title(title, fontsize=9)

    for i in range(n):
        ax = fig.add_subplot(gs[i, 0])
        show(ax, results[0]["original"][i], "original" if i == 0 else None)
        if labels:
            ax.set_ylabel(labels[i], fontsize=ROW_LABEL_POINTS)
        for k, (r, res) in enumerate(zip(mask_ratios, results)):
            for j, key in enumerate(PANELS):
                title = None
                if i == 0:
                    kind = "" if kinds[k] == "random" else f", {kinds[k]}"
                    title = f"masked {_ratio_label(r, model.num_patches)}{kind}" if key == "masked" else _PANEL_TITLES[key]
                show(fig.add_subplot(gs[i, 1 + 4 * k + 1 + j]), res[key][i], title)

    if caption:
        fig.text(0.5, 0.12 / fig_h, caption, ha="center", va="bottom", fontsize=8, style="italic")
    return fig


def picture_mask_type(mask_type: str, mask_ratio: float) -> str:
    """The masks a picture at ``mask_ratio`` draws: the run's own kind (block, grid), or random where that
    kind has no mask (grid at a ratio without a lattice: a run at 0.75 is also drawn at 0.9)."""
    return "random" if mask_type == "grid" and grid_step(mask_ratio) is None else mask_type


def save_reconstruction_grid(
    model,
    images,
    mask_ratios: Sequence[float] | float,
    path: str | os.PathLike,
    seed: int = 0,
    titles: Sequence[str] | None = None,
    panel_height: float = 1.6,
    dpi: int = 100,
    mask_type: str = "random",
) -> Path:
    """:func:`reconstruction_grid` written as a PNG to ``path`` atomically (temp file in the same
    folder, then ``os.replace``). Returns the path."""
    fig = reconstruction_grid(model, images, mask_ratios, seed=seed, titles=titles, panel_height=panel_height,
                              mask_type=mask_type)
    return save_figure_atomic(fig, path, dpi=dpi)


load_images_for_model = load_images  # the name viz has always exported
