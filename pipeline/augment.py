"""Training-time augmentation (``train.augment``) and the contact sheet of what the model sees.

Every augmentation but the horizontal flip is off by default. What each one does to an
image (pixel values in [0, 255], RGB, before the model's own input scaling):

* ``crop_area`` [a0, a1], ``crop_ratio`` [r0, r1]: random resized crop. Area fraction
  a ~ U[a0, a1], aspect ratio r ~ log-U[r0, r1]; width sqrt(a r) and height sqrt(a / r)
  of the image's, each at most 1 (so a very elongated crop covers less than a); its centre
  uniform over the positions that keep it inside the image; resampled (bilinear) to the
  full size. Off at [1, 1].
* ``scale_jitter`` j: zoom about the crop's centre by z ~ U[1 - j, 1 + j]; z > 1 enlarges
  the face, z < 1 shrinks it, the border filled by mirroring the image at its edges (as at
  the edge of a crop that touches the image's edge). With the crop, one resampling does both.
* ``brightness`` b: x * f, f ~ U[1 - b, 1 + b].
* ``contrast`` c: (x - m) * f + m, m the image's mean grey, f ~ U[1 - c, 1 + c].
* ``saturation`` s: g + (x - g) * f, g each pixel's grey, f ~ U[1 - s, 1 + s].
* ``temperature`` t: white balance, red x (1 + k) and blue x (1 - k), k ~ U[-t, t]
  (k > 0 warmer, k < 0 cooler).
* ``grayscale`` p: with probability p the image becomes its grey (in all 3 channels), so
  one run sees colour and grey faces mixed.
* ``flip``: the mirror image with probability 1/2, drawn as before (``train._epoch_batches``).

They are applied in that order, each colour step clamped to [0, 255]. Grey is
0.299 R + 0.587 G + 0.114 B, the weights of the model's own grayscale input.

Randomness. Everything except the flip comes from one ``[steps, batch, 10]`` block of
uniform numbers per epoch (:func:`epoch_draws`), drawn on the host from a generator seeded
by (training seed, epoch) and separate from the one that orders the batches and draws the
flips: turning an augmentation on changes neither the batches nor the flips, and each
augmentation reads its own column, so turning one on does not change the others' draws. An
epoch depends only on (seed, epoch), so a run resumed after a crash draws what an
uninterrupted one does. The block is copied to the training device once per epoch; a step
then only slices it and runs batched tensor operations (one ``affine_grid`` /
``grid_sample`` for all geometry), with no read back to the host. Draws are made for the
global batch and each process takes its slice, as with the flips. When nothing but the
flip is on, no draws are made and the trainer takes exactly the path it took before
augmentation existed (same bits).

:func:`write_preview` draws the contact sheet ``reports/figures/augmented.png``
(``python -m pipeline augment-preview``): the same training faces un-augmented, under
each enabled augmentation alone, and under all of them together.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import AugmentParams

#: The columns of one image's draws (uniform in [0, 1)), in this order.
COLUMNS = ("area", "ratio", "centre_x", "centre_y", "zoom", "brightness", "contrast", "saturation", "temperature",
           "grayscale")
N_DRAWS = len(COLUMNS)
_COL = {name: k for k, name in enumerate(COLUMNS)}

#: Weights of the grey value (the model's grayscale input uses the same).
GREY = (0.299, 0.587, 0.114)

#: Separates the augmentation stream from other uses of (seed, epoch).
_STREAM = 0xA06


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s augmentation draws in the run of training seed ``seed``."""
    state = np.random.SeedSequence([int(seed), int(epoch), _STREAM]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # < 2**63


def epoch_draws(params: AugmentParams, seed: int, epoch: int, steps: int, global_batch: int, *, rank: int = 0,
                world: int = 1) -> Tensor | None:
    """``[steps, global_batch // world, N_DRAWS]`` float32 uniform draws of this process for one
    epoch, or None when no augmentation besides the flip is on (nothing is drawn then)."""
    if not params.active():
        return None
    generator = torch.Generator().manual_seed(augment_seed(seed, epoch))
    draws = torch.rand((steps, global_batch, N_DRAWS), generator=generator)
    per = global_batch // world
    return draws[:, rank * per : (rank + 1) * per].contiguous()


def grey(x: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` grey values."""
    weights = torch.tensor(GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _factor(u: Tensor, strength: float) -> Tensor:
    """``[B]`` uniform draws -> ``[B, 1, 1, 1]`` factors in [1 - strength, 1 + strength]."""
    return (1.0 + strength * (2.0 * u - 1.0)).view(-1, 1, 1, 1)


def _geometry(x: Tensor, u: Tensor, params: AugmentParams) -> Tensor:
    """Random resized crop and zoom of every image of ``x`` with one batched resampling."""
    ones = torch.ones_like(u[:, 0])
    width, height, cx, cy = ones, ones, torch.zeros_like(ones), torch.zeros_like(ones)
    if params.crop_area != (1.0, 1.0):
        a0, a1 = params.crop_area
        area = a0 + (a1 - a0) * u[:, _COL["area"]]
        r0, r1 = math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1])
        ratio = torch.exp(r0 + (r1 - r0) * u[:, _COL["ratio"]])
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        # centre in [-1, 1] coordinates: the crop (half-width `width`) stays inside the image
        cx = (2.0 * u[:, _COL["centre_x"]] - 1.0) * (1.0 - width)
        cy = (2.0 * u[:, _COL["centre_y"]] - 1.0) * (1.0 - height)
    if params.scale_jitter > 0:
        zoom = 1.0 + params.scale_jitter * (2.0 * u[:, _COL["zoom"]] - 1.0)
        width, height = width / zoom, height / zoom
    zeros = torch.zeros_like(ones)
    theta = torch.stack([torch.stack([width, zeros, cx], dim=1), torch.stack([zeros, height, cy], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def apply(x: Tensor, draws: Tensor, params: AugmentParams) -> Tensor:
    """Augment ``x`` ``[B, 3, H, W]`` float (values in [0, 255]) with ``draws`` ``[B, N_DRAWS]``
    (on the same device); the flip is not applied here. Returns a new tensor."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"augment: expected [B, 3, H, W] RGB images, got {list(x.shape)}")
    u = draws[: x.shape[0]].to(dtype=x.dtype)
    if params.crop_area != (1.0, 1.0) or params.scale_jitter > 0:
        x = _geometry(x, u, params)
    if params.brightness > 0:
        x = (x * _factor(u[:, _COL["brightness"]], params.brightness)).clamp(0.0, 255.0)
    if params.contrast > 0:
        mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * _factor(u[:, _COL["contrast"]], params.contrast) + mean).clamp(0.0, 255.0)
    if params.saturation > 0:
        g = grey(x)
        x = (g + (x - g) * _factor(u[:, _COL["saturation"]], params.saturation)).clamp(0.0, 255.0)
    if params.temperature > 0:
        k = params.temperature * (2.0 * u[:, _COL["temperature"]] - 1.0)
        gains = torch.stack([1.0 + k, torch.ones_like(k), 1.0 - k], dim=1).view(-1, 3, 1, 1)
        x = (x * gains).clamp(0.0, 255.0)
    if params.grayscale > 0:
        to_grey = (u[:, _COL["grayscale"]] < params.grayscale).view(-1, 1, 1, 1)
        x = torch.where(to_grey, grey(x).expand_as(x), x)
    return x


def apply_uint8(images: Tensor, draws: Tensor, params: AugmentParams, flips: Tensor | None = None) -> Tensor:
    """:func:`apply` on ``[B, H, W, 3]`` uint8 images (and the flips, if given): uint8 out, rounded."""
    x = apply(images.permute(0, 3, 1, 2).float(), draws, params)
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------- contact sheet
#: What each column of the contact sheet shows: (title, the augmentation params used).
def preview_columns(params: AugmentParams) -> list[tuple[str, AugmentParams, bool]]:
    """``(title, params with only that augmentation on, flip?)`` per column, for the enabled ones,
    then every enabled one together (twice, with other draws)."""
    off = AugmentParams(flip=False)
    a = params
    single = {
        "crop": ("random resized crop\narea {0[0]:g}-{0[1]:g}, ratio {1[0]:.2f}-{1[1]:.2f}".format(a.crop_area,
                                                                                              a.crop_ratio),
                 {"crop_area": a.crop_area, "crop_ratio": a.crop_ratio}),
        "scale_jitter": (f"scale jitter ±{a.scale_jitter:g}", {"scale_jitter": a.scale_jitter}),
        "brightness": (f"brightness ±{a.brightness:g}", {"brightness": a.brightness}),
        "contrast": (f"contrast ±{a.contrast:g}", {"contrast": a.contrast}),
        "saturation": (f"saturation ±{a.saturation:g}", {"saturation": a.saturation}),
        "temperature": (f"temperature ±{a.temperature:g}\n(warm/cool)", {"temperature": a.temperature}),
        "grayscale": (f"grayscale p={a.grayscale:g}\n(grey shown where drawn)", {"grayscale": a.grayscale}),
    }
    columns = [("original", off, False)]
    if a.flip:
        columns.append(("flip (p=0.5)", off, True))
    for name in a.active():
        title, values = single[name]
        columns.append((title, off.model_copy(update=values), False))
    if a.active():
        columns += [("all together", a, a.flip), ("all together\n(other draws)", a, a.flip)]
    return columns


def preview_grid(images: np.ndarray, params: AugmentParams, *, seed: int = 0, grayscale_model: bool = False
                 ) -> tuple[list[str], np.ndarray]:
    """``(titles, tiles [rows, columns, H, W, 3] uint8)``: each face (row) under each column of
    :func:`preview_columns`. Draws from ``seed``; a column's flips are all on (the flip column),
    as drawn (all together) or off. ``grayscale_model``: shown grey, as the model sees them."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    n = len(batch)
    generator = torch.Generator().manual_seed(augment_seed(seed, 0))
    titles, tiles = [], []
    for k, (title, values, flip) in enumerate(preview_columns(params)):
        draws = torch.rand((n, N_DRAWS), generator=generator)
        flip_draws = torch.rand(n, generator=generator) < 0.5
        if title.startswith("original"):
            flips = None
        elif title.startswith("flip"):
            flips = torch.ones(n, dtype=torch.bool)
        else:
            flips = flip_draws if flip else None
        out = apply_uint8(batch, draws, values, flips)
        if grayscale_model:
            g = grey(out.permute(0, 3, 1, 2).float()).round().clamp(0, 255).to(torch.uint8)
            out = g.expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
        titles.append(title)
        tiles.append(out.numpy())
    return titles, np.stack(tiles, axis=1)


def write_preview(params: AugmentParams, train_shards: str | Path, target: str | Path, *, faces: int = 8,
                  seed: int = 0, grayscale_model: bool = False) -> Path:
    """The contact sheet of augmented training faces: ``faces`` training images (one per identity,
    the first identities in label order), un-augmented and under each enabled augmentation."""
    from pipeline.io import atomic_file
    from pipeline.shards import read_shards

    data = read_shards(train_shards)
    first = [int(np.flatnonzero(data.labels == label)[0]) for label in np.unique(data.labels)[:faces]]
    titles, tiles = preview_grid(data.decode_all(first), params, seed=seed, grayscale_model=grayscale_model)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    rows, cols = tiles.shape[:2]
    width = max(1.35 * cols, 6.0)  # room for the title with few columns
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.35 * rows + 1.1), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(tiles[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=6.5)
    off = [name for name in ("crop", "scale_jitter", "brightness", "contrast", "saturation", "temperature",
                             "grayscale") if name not in params.active()] + ([] if params.flip else ["flip"])
    on = (["flip"] if params.flip else []) + params.active()
    note = (f"train.augment on: {', '.join(on) or 'nothing'}; off: {', '.join(off) or 'nothing'}. "
            f"Illustrative draws (seed {seed}); training draws per (training seed, epoch)."
            + (" Shown grey: model.grayscale is on." if grayscale_model else ""))
    fig.suptitle("What the model sees: training faces (rows) un-augmented and augmented (columns)\n"
                 + textwrap.fill(note, width=int(width * 15)), fontsize=7.5)
    fig.tight_layout()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return target
