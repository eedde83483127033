"""Synthetic serial sections with known maps (shared by tests/test_stack.py and the stack GUI test).

scikit-image's immunohistochemistry image inside an oval outline on white glass, in two stain
renderings; section ``k`` is it turned by ``k * STEP_DEG`` degrees about the centre and shifted
by ``k * STEP_SHIFT``, alternating stains.
"""

from __future__ import annotations

import numpy as np

from napari_histreg import conventions as cv

STEP_DEG, STEP_SHIFT = 4.0, np.array([5.0, -3.0])


def _rigid(angle_deg, centre, shift) -> np.ndarray:
    """2x3 backward (row, col) map ``s = R (p - c) + c + shift``."""
    return cv.rotation_about(centre, angle_deg, translation_rc=shift)


def _apply(matrix, points):
    return np.asarray(points) @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def make_section_base():
    """A tissue-shaped section on white glass in two stain renderings (float RGB in [0, 1])."""
    import skimage.data
    from skimage.color import hed2rgb, rgb2hed

    rgb = skimage.data.immunohistochemistry()[::2, ::2] / 255.0  # 256 x 256, tissue everywhere
    hed = rgb2hed(np.clip(rgb, 1e-4, 1))
    rows, cols = np.mgrid[0:320, 0:320]
    blob = (((rows - 160) / 120.0) ** 2 + ((cols - 165) / 95.0) ** 2) < 1.0  # an oval outline
    renderings = []
    for weights in ([1.4, 0.0, 0.2], [0.7, 0.0, 0.9]):
        stained = np.clip(hed2rgb(hed * weights), 0, 1)
        canvas = np.ones((320, 320, 3))
        canvas[32:288, 32:288] = stained
        canvas[~blob] = 1.0  # glass outside the tissue
        renderings.append(canvas.astype(np.float32))
    return renderings


def _warp_rgb(image, matrix):
    """``image`` sampled through the backward map ``matrix`` (white outside)."""
    import torch

    field = cv.affine_to_field(matrix, image.shape[:2])
    inverted = torch.from_numpy(np.ascontiguousarray(1.0 - image.transpose(2, 0, 1)))[None]
    return (1.0 - cv.warp(inverted, field)[0].numpy().transpose(1, 2, 0)).astype(np.float32)


def make_known_stack(section_base, count: int = 4):
    """Four sections; section k is the base turned by ``k * STEP_DEG`` about the centre and
    shifted, alternating stains. ``to_base[k]`` maps section-k pixels to base pixels."""
    centre = np.array([159.5, 159.5])
    images, to_base = [], []
    for k in range(count):
        m = _rigid(k * STEP_DEG, centre, k * STEP_SHIFT)
        images.append(_warp_rgb(section_base[k % 2], m))
        to_base.append(m)
    return images, to_base


def _points_inside():
    rows, cols = np.mgrid[110:210:20, 110:210:20]
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)


def _true_map(to_base, i, j, points):
    """Section ``i`` points in section ``j``'s pixels (exact)."""
    base = _apply(to_base[i], points)  # section i pixel p shows base(to_base[i](p))
    a, b = np.asarray(to_base[j])[:, :2], np.asarray(to_base[j])[:, 2]
    return (base - b) @ np.linalg.inv(a).T


