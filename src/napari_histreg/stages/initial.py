"""Initial alignment: centroid translation, then an exhaustive rotation search scored by NCC.

All angles of a batch are warped by one ``grid_sample`` call on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import ALIGN_CORNERS, affine_to_field, identity_grid, rotation_about, warp
from ..progress import ProgressCallback, report
from ..similarity import ncc
from .preprocess import resample


@dataclasses.dataclass
class InitialAlignmentConfig:
    """``angle_step`` in degrees over the full circle; ``search_size``: longer side of the grid
    the search runs on; ``batch_size``: angles warped per ``grid_sample`` call;
    ``refine_step``: a finer search around the best angle (0 disables it)."""

    angle_step: float = 1.0
    search_size: int = 192
    batch_size: int = 120
    refine_step: float = 0.25
    use_centroid: bool = True


@dataclasses.dataclass
class InitialAlignment:
    matrix: np.ndarray  # 2x3 backward affine in working pixels (row, col)
    angle: float  # degrees
    score: float  # NCC at the best angle
    angles: np.ndarray
    scores: np.ndarray


def centroid(image: np.ndarray) -> np.ndarray:
    """``(row, col)`` centre of mass of the tissue (Otsu foreground); the grid centre for a blank image.

    The binary foreground, not the intensities, is weighted: two stains of one section share
    its outline but not its intensity distribution, so intensity weighting shifts the centres
    apart and the rotation search then turns about the wrong point.
    """
    image = np.asarray(image, dtype=np.float64)
    if float(image.max() - image.min()) > 1e-9:
        from skimage.filters import threshold_otsu

        image = (image > threshold_otsu(image)).astype(np.float64)
    total = image.sum()
    if total <= 0:
        return (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    rows = np.arange(image.shape[0])
    cols = np.arange(image.shape[1])
    return np.array([(image.sum(1) * rows).sum() / total, (image.sum(0) * cols).sum() / total])


def _score_angles(source, target, angles_deg, center_t, center_s, batch_size, device, progress, stage_total, done):
    """NCC of ``target`` against ``source`` rotated by each angle, in batches on ``device``."""
    h, w = target.shape[-2:]
    grid = identity_grid((h, w), device=device)  # (2, H, W)
    rel = grid - torch.as_tensor(center_t, dtype=torch.float32, device=device).view(2, 1, 1)
    scores = []
    for start in range(0, len(angles_deg), batch_size):
        chunk = torch.as_tensor(np.deg2rad(angles_deg[start : start + batch_size]), dtype=torch.float32, device=device)
        cos, sin = torch.cos(chunk).view(-1, 1, 1), torch.sin(chunk).view(-1, 1, 1)
        # s = R (p - c_t) + c_s with R = [[cos, -sin], [sin, cos]] on (row, col)
        rows = cos * rel[0] - sin * rel[1] + float(center_s[0])
        cols = sin * rel[0] + cos * rel[1] + float(center_s[1])
        # pixels_to_normalised's formula, applied to each component before one stack
        sample = torch.stack((2.0 * cols / max(w - 1, 1) - 1.0, 2.0 * rows / max(h - 1, 1) - 1.0), dim=-1)
        warped = F.grid_sample(
            source.expand(len(chunk), -1, -1, -1), sample, mode="bilinear", padding_mode="zeros",
            align_corners=ALIGN_CORNERS,
        )
        scores.append(ncc(warped, target.expand_as(warped)))
        done += len(chunk)
        report(progress, "initial", done, stage_total, "rotation search")
    return torch.cat(scores).cpu().numpy(), done


def _recentre(source, target, angle, center_t, center_s) -> np.ndarray:
    """Source centre corrected by the residual shift (phase correlation) at ``angle``."""
    from skimage.registration import phase_cross_correlation

    h, w = target.shape[-2:]
    matrix = rotation_about(center_t, angle, translation_rc=np.asarray(center_s) - np.asarray(center_t))
    field = affine_to_field(matrix, (h, w), device=source.device)
    warped = warp(source, field)[0, 0].cpu().numpy()
    shift, _, _ = phase_cross_correlation(target[0, 0].cpu().numpy(), warped, upsample_factor=4, normalization=None)
    # tgt(p) ~ warped(p - shift) = src(R (p - c_t) + c_s - R shift)
    return np.asarray(center_s) - matrix[:, :2] @ np.asarray(shift)


def initial_alignment(
    source: np.ndarray,
    target: np.ndarray,
    config: InitialAlignmentConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> InitialAlignment:
    """Centroid translation + rotation search of ``source`` onto ``target`` (same grid)."""
    config = config or InitialAlignmentConfig()
    device = device or torch.device("cpu")
    h, w = target.shape
    scale = min(1.0, config.search_size / max(h, w))
    small_shape = (max(8, round(h * scale)), max(8, round(w * scale)))
    src = resample(source, small_shape, device=device)[None, None]
    tgt = resample(target, small_shape, device=device)[None, None]
    # Centres in working pixels; mapped into the small grid with the same pixel-centre rule.
    c_t = centroid(target) if config.use_centroid else (np.array([h, w]) - 1) / 2
    c_s = centroid(source) if config.use_centroid else (np.array([h, w]) - 1) / 2
    ratio = np.array([small_shape[0] / h, small_shape[1] / w])
    c_t_small = (c_t + 0.5) * ratio - 0.5
    c_s_small = (c_s + 0.5) * ratio - 0.5

    angles = np.arange(0.0, 360.0, config.angle_step)
    refine = (
        np.arange(-2 * config.angle_step, 2 * config.angle_step + 1e-9, config.refine_step)
        if config.refine_step and config.refine_step < config.angle_step
        else np.zeros(0)
    )
    total = len(angles) + len(refine)
    scores, done = _score_angles(src, tgt, angles, c_t_small, c_s_small, config.batch_size, device, progress, total, 0)
    best = float(angles[int(np.argmax(scores))])
    all_angles, all_scores = angles, scores
    if len(refine):
        # Centroids of two stains differ by a few pixels, which tilts the best angle by about a
        # degree; re-centre by phase correlation at the coarse angle, then search finely.
        c_s_small = _recentre(src, tgt, best, c_t_small, c_s_small)
        fine = best + refine
        fine_scores, _ = _score_angles(src, tgt, fine, c_t_small, c_s_small, config.batch_size, device, progress, total, done)
        idx = int(np.argmax(fine_scores))
        angle, score = float(fine[idx] % 360.0), float(fine_scores[idx])
        all_angles, all_scores = np.concatenate([angles, fine]), np.concatenate([scores, fine_scores])
    else:
        angle, score = best, float(scores.max())
    c_s = (c_s_small + 0.5) / ratio - 0.5
    matrix = rotation_about(c_t, angle, translation_rc=c_s - c_t)
    return InitialAlignment(matrix=matrix, angle=angle, score=score, angles=all_angles, scores=all_scores)
