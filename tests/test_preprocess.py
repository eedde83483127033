"""The preprocessing stage (stages/preprocess.py): grey, invert, working grid and frames, entropy-guided equalisation.

Data: :mod:`stage_data` (two stains of one section, exactly aligned; the rat kidney pair)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from stage_data import SMALL

from napari_histreg import conventions as cv
from napari_histreg.stages.preprocess import (
    PreprocessConfig,
    entropy,
    equalise_by_entropy,
    prepare_image,
    preprocess_pair,
    to_grey,
    working_scale,
)


def test_preprocess_common_grid_and_frames(stains):
    source = stains.dab[20:500, 60:470]  # a different size: 480 x 410
    pair = preprocess_pair(source, stains.h, PreprocessConfig(working_size=200, pad_multiple=32))
    assert pair.source.shape == pair.target.shape == pair.source_frame.shape == pair.target_frame.shape
    assert all(s % 32 == 0 for s in pair.source.shape)
    for image in (pair.source, pair.target):
        assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    # One pixel size for both images (up to the rounding of each working size).
    scale = working_scale([source.shape[:2], stains.h.shape[:2]], 200)
    for frame in (pair.source_frame, pair.target_frame):
        assert frame.scale == pytest.approx((scale, scale), rel=0.01)
    assert pair.source_frame.original_shape == (480, 410)
    # The frame says where each image sits: the working image at T(p) is the original at p.
    rng = np.random.default_rng(0)
    for image, working, frame in ((source, pair.source, pair.source_frame), (stains.h, pair.target, pair.target_frame)):
        grey = 1.0 - to_grey(image)
        from scipy.ndimage import gaussian_filter

        smooth = gaussian_filter(grey, 1.0 / scale / 1.25)
        p = rng.uniform(5, np.array(image.shape[:2]) - 6, (300, 2))
        q = frame.to_working(p)
        at_q = cv.sample_field_at_points(torch.as_tensor(working)[None], torch.as_tensor(q, dtype=torch.float32))[:, 0].numpy()
        at_p = smooth[np.round(p[:, 0]).astype(int), np.round(p[:, 1]).astype(int)]
        assert np.corrcoef(at_q, at_p)[0, 1] > 0.9
        # and nothing but padding outside the image's own area
        inside = np.zeros(working.shape, bool)
        top, left = np.round(frame.to_working([[-0.5, -0.5]])[0] + 0.5).astype(int)
        bottom, right = np.round(frame.to_working([[image.shape[0] - 0.5, image.shape[1] - 0.5]])[0] + 0.5).astype(int)
        inside[top:bottom, left:right] = True
        assert (working[~inside] == 0).all()


def test_preprocess_tissue_is_bright(stains, stains_working):
    for image, working, frame in (
        (stains.h, stains_working.target, stains_working.target_frame),
        (stains.dab, stains_working.source, stains_working.source_frame),
    ):
        rows, cols = np.mgrid[: image.shape[0] : 4, : image.shape[1] : 4]
        points = np.stack((rows.ravel(), cols.ravel()), axis=1)
        tissue = stains.outline[points[:, 0], points[:, 1]]
        values = cv.sample_field_at_points(
            torch.as_tensor(working)[None], torch.as_tensor(frame.to_working(points), dtype=torch.float32)
        )[:, 0].numpy()
        assert values[tissue].mean() > 0.3
        assert values[~tissue].mean() < 0.05  # white glass becomes ~0


def test_preprocess_tissue_is_bright_on_a_real_section(kidney, kidney_working):
    frame, working = kidney_working.target_frame, kidney_working.target
    q = frame.to_working(kidney.target_lm)  # expert landmarks sit on tissue
    at_landmarks = cv.sample_field_at_points(torch.as_tensor(working)[None], torch.as_tensor(q, dtype=torch.float32))[:, 0]
    corners = frame.to_working([[5, 5], [5, kidney.target.shape[1] - 6], [kidney.target.shape[0] - 6, 5]])  # glass
    at_corners = cv.sample_field_at_points(torch.as_tensor(working)[None], torch.as_tensor(corners, dtype=torch.float32))[:, 0]
    assert float(at_landmarks.median()) > 0.4
    assert float(at_corners.max()) < 0.15


def _quantiles(image):
    return np.quantile(image, np.linspace(0.05, 0.95, 19))


def _check_entropy_equalisation(source_rgb, target_rgb):
    scale = working_scale([source_rgb.shape[:2], target_rgb.shape[:2]], SMALL.working_size)
    a, b = prepare_image(source_rgb, scale, SMALL), prepare_image(target_rgb, scale, SMALL)
    ea, eb = equalise_by_entropy(a, b)
    low, high, low_eq, high_eq = (a, b, ea, eb) if entropy(a) < entropy(b) else (b, a, eb, ea)
    np.testing.assert_array_equal(high_eq, high)  # the richer image is left alone
    assert np.abs(_quantiles(low_eq) - _quantiles(high)).max() < 0.03
    assert np.abs(_quantiles(low) - _quantiles(high)).max() > 0.05  # it did have to move
    assert abs(entropy(low_eq) - entropy(high)) < abs(entropy(low) - entropy(high))
    # Symmetric in the order of the arguments.
    sb, sa = equalise_by_entropy(b, a)
    np.testing.assert_allclose(sa, ea, atol=1e-6)
    np.testing.assert_allclose(sb, eb, atol=1e-6)
    # And preprocess_pair does exactly this before padding when asked to.
    pair = preprocess_pair(source_rgb, target_rgb, dataclasses.replace(SMALL, equalise=True))
    for equalised, working, frame in ((ea, pair.source, pair.source_frame), (eb, pair.target, pair.target_frame)):
        r0, c0 = (int(o) for o in frame.offset)
        np.testing.assert_allclose(working[r0 : r0 + equalised.shape[0], c0 : c0 + equalised.shape[1]], equalised, atol=1e-6)


def test_entropy_guided_equalisation(stains):
    _check_entropy_equalisation(stains.dab, stains.h)


def test_entropy_guided_equalisation_on_a_real_pair(kidney):
    _check_entropy_equalisation(kidney.source, kidney.target)


def test_entropy_of_simple_images():
    assert entropy(np.zeros((10, 10))) == 0.0
    halves = np.zeros((10, 10))
    halves[:, 5:] = 1.0
    assert entropy(halves) == pytest.approx(1.0)



