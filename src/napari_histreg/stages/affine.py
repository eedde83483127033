"""Affine stage: instance optimisation of the six affine parameters with -NCC on a pyramid
(:func:`optimise_affine`), or the learned affine network applied recurrently
(:func:`learned_affine`). Both fit the same slot: any callable
``(source, target, matrix, progress) -> matrix``; the hybrid mode is :func:`learned_affine`
followed by a short :func:`optimise_affine`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..conventions import (
    ALIGN_CORNERS,
    affine_normalised_to_pixels,
    affine_pixels_to_normalised,
    normalised_affine_grid,
    sample,
    to_tensor,
    warp_affine_xy,
    swap_theta_axes,
)
from ..progress import ProgressCallback, report
from ..similarity import ncc
from .preprocess import level_shape, resample


@dataclasses.dataclass
class AffineConfig:
    """``levels``: longer side of each pyramid level, coarse to fine; ``iterations`` per level;
    ``learning_rate`` of Adam on normalised parameters."""

    levels: tuple[int, ...] = (128, 256, 384)
    iterations: tuple[int, ...] = (100, 60, 40)
    learning_rate: float = 0.003
    #: NCC over the overlap of the two images' content (inside the zero padding, inside the
    #: source's grid) rather than the whole grid, where whatever maps outside the source counts as
    #: glass: a crop cut inside the tissue would line up the step to the padding instead of the
    #: tissue, and a section cut by the source's frame would be stretched until its cut ends fill
    #: the target's section. The measurements: benchmarks/README.md, "AffineConfig.overlap_only".
    overlap_only: bool = True


def optimise_affine(
    source: np.ndarray,
    target: np.ndarray,
    matrix: np.ndarray,
    config: AffineConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """Refine a 2x3 backward pixel affine of ``source`` onto ``target`` (same working grid)."""
    return optimise_affines(source, target, np.asarray(matrix, dtype=np.float64)[None], config, device, progress)[0]


def optimise_affines(
    source: np.ndarray,
    target: np.ndarray,
    matrices: np.ndarray,
    config: AffineConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """:func:`optimise_affine` of a batch of starts ``(B, 2, 3)`` at once: one ``grid_sample``
    per step for all of them. The loss is the sum of the per-start losses and Adam acts per
    element, so each start follows exactly the path it would follow alone."""
    config = config or AffineConfig()
    device = device or torch.device("cpu")
    h, w = target.shape
    starts = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    batch = len(starts)
    params = torch.tensor(np.stack([affine_pixels_to_normalised(m, (h, w)) for m in starts]), dtype=torch.float32, device=device)
    params.requires_grad_(True)
    total = int(sum(config.iterations))
    done = 0
    if config.overlap_only:
        from .initial import content_box

        src_box, tgt_box = content_box(source).astype(np.float32), content_box(target).astype(np.float32)
    for size, iterations in zip(config.levels, config.iterations):
        shape = level_shape((h, w), size)
        src = resample(source, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        tgt = resample(target, shape, device=device, align_corners=ALIGN_CORNERS)[None, None].expand(batch, -1, -1, -1)
        if config.overlap_only:
            src = torch.cat([src, resample(src_box, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]], dim=1)
            tgt_inside = resample(tgt_box, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        src = src.expand(batch, -1, -1, -1)
        optimiser = torch.optim.Adam([params], lr=config.learning_rate)
        for _ in range(iterations):
            optimiser.zero_grad()
            grid = normalised_affine_grid(params, shape)
            warped = sample(src, grid)
            if config.overlap_only:  # NCC over the overlap of the two images' content only
                loss = -ncc(warped[:, :1], tgt, warped[:, 1:].detach() * tgt_inside).sum()
            else:
                loss = -ncc(warped, tgt).sum()
            loss.backward()
            optimiser.step()
            done += 1
            if done % 10 == 0 or done == total:
                report(progress, "affine", done, total, f"level {shape[0]}x{shape[1]}")
    found = params.detach().double().cpu().numpy()
    return np.stack([affine_normalised_to_pixels(m, (h, w)) for m in found])


# --------------------------------------------------------------------------- learned affine
@dataclasses.dataclass
class LearnedAffineConfig:
    """``weights``: a weights file, or ``"affine"`` for the shipped network. ``passes``: how
    many times the network is applied, each time to the source re-warped by the estimate so
    far, its residual composed onto it. ``symmetric``: each pass averages the forward
    estimate with the inverse of the backward one (cancels the matcher's bias; about 1.6x
    the time of a plain pass).

    The default, two symmetric passes, was chosen on the landmark-free validation set
    (benchmarks/README.md, "Settings and how they were chosen")."""

    weights: str = "affine"
    passes: int = 2
    symmetric: bool = True


def load_affine_network(weights: str = "affine", device=None):
    """The :class:`~napari_histreg.networks.affine.AffineNet` of ``weights`` on ``device``
    (eval mode), loaded once (see :func:`~napari_histreg.networks.checkpoint.cached_network`)."""
    from ..networks.checkpoint import cached_network

    return cached_network(weights, "affine", device)


def learned_affine(
    source: np.ndarray,
    target: np.ndarray,
    matrix: np.ndarray,
    config: LearnedAffineConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """Refine a 2x3 backward pixel affine of ``source`` onto ``target`` (same working grid)
    with the affine network: ``passes`` times, warp the source by the current matrix, predict
    the residual affine and compose it. Returns the refined 2x3 backward pixel ``(row, col)``
    affine, like :func:`optimise_affine`.

    The network sees both images zero-padded to a centred square and resampled to its input
    size once; each pass re-warps that small source from the matrix composed so far (one
    interpolation, no accumulated blur).
    """
    from ..networks.affine import compose_theta, square_padding

    config = config or LearnedAffineConfig()
    if np.shape(source) != np.shape(target) or np.ndim(target) != 2:
        raise ValueError(f"source {np.shape(source)} and target {np.shape(target)} must be (H, W) on one grid")
    device = torch.device(device or "cpu")
    net = load_affine_network(config.weights, device)
    h, w = target.shape
    side, top, left = square_padding((h, w))
    offset = np.array([top, left], dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    # pixel affine on the working grid -> on the centred square (q = p + offset)
    square = np.hstack([m[:, :2], (m[:, :2] @ -offset + m[:, 2] + offset)[:, None]])
    theta = torch.tensor(swap_theta_axes(affine_pixels_to_normalised(square, (side, side))), dtype=torch.float32, device=device)[None]
    passes = max(0, int(config.passes))
    with torch.no_grad():
        src = net.prepare(to_tensor(source, device=device)[None, None])
        tgt = net.prepare(to_tensor(target, device=device)[None, None])
        tgt_features = net.features(tgt)
        predict = net.predict_symmetric if config.symmetric else net.predict_square
        for k in range(passes):
            warped = warp_affine_xy(src, theta)
            theta = compose_theta(theta, predict(warped, tgt, tgt_features))
            report(progress, "affine", k + 1, passes, "learned affine")
    square = affine_normalised_to_pixels(swap_theta_axes(theta[0].double().cpu().numpy()), (side, side))
    out = np.hstack([square[:, :2], (square[:, :2] @ offset + square[:, 2] - offset)[:, None]])
    return out
