"""Affine stage: instance optimisation of the six affine parameters with -NCC on a pyramid.

The learned affine network plugs into the same slot: any callable
``(source, target, matrix, progress) -> matrix``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import (
    ALIGN_CORNERS,
    affine_normalised_to_pixels,
    affine_pixels_to_normalised,
    normalised_affine_grid,
)
from ..progress import ProgressCallback, report
from ..similarity import ncc
from .preprocess import resample


@dataclasses.dataclass
class AffineConfig:
    """``levels``: longer side of each pyramid level, coarse to fine; ``iterations`` per level;
    ``learning_rate`` of Adam on normalised parameters."""

    levels: tuple[int, ...] = (128, 256, 384)
    iterations: tuple[int, ...] = (100, 60, 40)
    learning_rate: float = 0.003


def optimise_affine(
    source: np.ndarray,
    target: np.ndarray,
    matrix: np.ndarray,
    config: AffineConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """Refine a 2x3 backward pixel affine of ``source`` onto ``target`` (same working grid)."""
    config = config or AffineConfig()
    device = device or torch.device("cpu")
    h, w = target.shape
    params = torch.tensor(affine_pixels_to_normalised(matrix, (h, w)), dtype=torch.float32, device=device)
    params = params.unsqueeze(0).requires_grad_(True)
    total = int(sum(config.iterations))
    done = 0
    for size, iterations in zip(config.levels, config.iterations):
        scale = min(1.0, size / max(h, w))
        shape = (max(8, round(h * scale)), max(8, round(w * scale)))
        src = resample(source, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        tgt = resample(target, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        optimiser = torch.optim.Adam([params], lr=config.learning_rate)
        for _ in range(iterations):
            optimiser.zero_grad()
            grid = normalised_affine_grid(params, shape)
            warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)
            loss = -ncc(warped, tgt).mean()
            loss.backward()
            optimiser.step()
            done += 1
            if done % 10 == 0 or done == total:
                report(progress, "affine", done, total, f"level {shape[0]}x{shape[1]}")
    return affine_normalised_to_pixels(params.detach()[0].cpu().numpy(), (h, w))
