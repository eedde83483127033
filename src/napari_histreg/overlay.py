"""Before/after overlay pictures of a registration (matplotlib, Agg canvas, no pyplot state).

The target is drawn in magenta and the moving image (source before, warped source after) in
green, each as tissue-bright grey, so well aligned tissue looks white/grey and misaligned
tissue shows as magenta or green fringes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DISPLAY_SIZE = 1024  # longer side of each panel, in pixels


def _display_shape(shape, size: int = DISPLAY_SIZE) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def tissue_grey(image: np.ndarray, shape=None) -> np.ndarray:
    """Grey float32 in ``[0, 1]`` with tissue bright (inverted), optionally resized to ``shape``
    (anti-aliased), contrast stretched between the 1st and 99.5th percentiles."""
    from skimage.transform import resize

    from .stages.preprocess import to_grey

    grey = 1.0 - to_grey(np.asarray(image))
    if shape is not None and tuple(grey.shape) != tuple(shape[:2]):
        grey = resize(grey, tuple(shape[:2]), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    lo, hi = np.percentile(grey, (1.0, 99.5))
    if hi - lo < 1e-6:
        return np.zeros(grey.shape, dtype=np.float32)
    return np.clip((grey - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def overlay_rgb(target: np.ndarray, moving: np.ndarray, shape=None) -> np.ndarray:
    """``(H, W, 3)`` uint8 composite: target in magenta, ``moving`` (resized to the target's
    shape, or both to ``shape``) in green."""
    shape = tuple(shape[:2]) if shape is not None else tuple(np.asarray(target).shape[:2])
    t = tissue_grey(target, shape)
    m = tissue_grey(moving, shape)
    rgb = np.stack([t, m, t], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def save_overlay(
    path: str | os.PathLike,
    target: np.ndarray,
    source: np.ndarray,
    warped: np.ndarray,
    title: str | None = None,
    size: int = DISPLAY_SIZE,
) -> Path:
    """Write a PNG with two panels: target vs source resized to the target's shape (before) and
    target vs warped source (after). Written atomically; matplotlib's pyplot is not used."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_path

    shape = _display_shape(np.asarray(target).shape, size)
    before = overlay_rgb(target, source, shape)
    after = overlay_rgb(target, warped, shape)
    aspect = shape[0] / shape[1]
    fig = Figure(figsize=(12, 6 * aspect + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, image, label in (
        (axes[0], before, "before: source resized to target"),
        (axes[1], after, "after: warped source"),
    ):
        ax.imshow(image, interpolation="antialiased")
        ax.set_title(label, fontsize=11)
        ax.set_axis_off()
    fig.suptitle((title + "\n" if title else "") + "magenta: target, green: source", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
