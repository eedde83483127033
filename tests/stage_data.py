"""Data and helpers shared by the tests of the registration stages (``test_preprocess``,
``test_mask``, ``test_initial``, ``test_affine``, ``test_nonrigid``, ``test_pipeline``): the
two stains of scikit-image's IHC image (always available) and the rat kidney pair of
``../shared/data`` (skipped where the data are absent). Small working sizes and iterations:
the tests check behaviour, the accuracy benchmarks live elsewhere."""

from __future__ import annotations

import numpy as np
import torch

from napari_histreg import RegistrationConfig
from napari_histreg import conventions as cv
from napari_histreg.stages.affine import AffineConfig
from napari_histreg.stages.initial import InitialAlignmentConfig
from napari_histreg.stages.nonrigid import (
    DenseConfig,
    PatchConfig,
    PatchInstanceOptimiser,
)
from napari_histreg.stages.preprocess import (
    PreprocessConfig,
)

SMALL = PreprocessConfig(working_size=256)
FAST_AFFINE = AffineConfig(levels=(128, 256), iterations=(60, 30))
FAST_DENSE = DenseConfig(levels=(128, 256), iterations=(40, 20))
FAST_PATCH = PatchConfig(levels=(128, 256), iterations=(1, 1), patch_size=64)
FAST_PREDICTOR = PatchInstanceOptimiser(iterations=20)


FAST_CONFIG = RegistrationConfig(
    preprocess=SMALL,
    initial=InitialAlignmentConfig(search_size=128),
    affine=FAST_AFFINE,
    dense=FAST_DENSE,
)




def warp_np(image: np.ndarray, field: torch.Tensor) -> np.ndarray:
    return cv.warp(torch.as_tensor(image, dtype=torch.float32)[None, None], field.float())[0, 0].numpy()


def apply_affine(matrix, points):
    matrix = np.asarray(matrix)
    return np.asarray(points) @ matrix[:, :2].T + matrix[:, 2]


def pad_square(image: np.ndarray) -> np.ndarray:
    """Centre an image in a square canvas large enough to rotate it without cropping."""
    side = int(np.ceil(np.hypot(*image.shape))) + 8
    canvas = np.zeros((side, side), dtype=np.float32)
    r0, c0 = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
    canvas[r0 : r0 + image.shape[0], c0 : c0 + image.shape[1]] = image
    return canvas


def angle_error(a, b):
    return abs((a - b + 180.0) % 360.0 - 180.0)


def rigid_angle(target_points, source_points):
    """Least-squares rotation (degrees, ``rotation_about``'s sign) of ``s = R p + t``."""
    p = target_points - target_points.mean(0)
    s = source_points - source_points.mean(0)
    sin = (p[:, 0] * s[:, 1] - p[:, 1] * s[:, 0]).sum()
    cos = (p * s).sum()
    return float(np.rad2deg(np.arctan2(sin, cos)))


