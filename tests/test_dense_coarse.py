"""The dense engine's coarse parts (noise-scaled regularisation) and its fast building blocks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from napari_histreg import conventions as cv
from napari_histreg.similarity import (_box_mean, box_mean, diffusion, fixed_local_stats, local_ncc, local_ncc_fast,
                                      local_ncc_to_fixed, ncc)
from napari_histreg.stages.nonrigid import (
    DenseConfig,
    _coarse_spacings,
    _dissimilarity,
    _grid_diffusion,
    _upsample_params,
    dense_nonrigid,
)

FAST = DenseConfig(levels=(128, 256), iterations=(40, 20))


# --------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("window", [3, 5, 7, 9, 4])
def test_box_mean_matches_the_convolution(window):
    x = torch.rand(2, 3, 23, 31, dtype=torch.float64)
    assert torch.allclose(box_mean(x, window), _box_mean(x, window), atol=1e-12)


def test_box_mean_gradient():
    x = torch.rand(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 5), (x,))


def test_local_ncc_fast_matches_local_ncc():
    a = torch.rand(2, 1, 40, 50, requires_grad=True)
    b = (a.detach() + 0.2 * torch.rand_like(a)).requires_grad_(True)
    slow = local_ncc(a, b, 7)
    fast = local_ncc_fast(a, b, 7)
    assert fast.shape == (2,)
    assert torch.allclose(fast, slow, atol=1e-6)
    g_slow = torch.autograd.grad(slow.sum(), (a, b))
    g_fast = torch.autograd.grad(fast.sum(), (a, b))
    for s, f in zip(g_slow, g_fast):
        assert torch.allclose(f, s, atol=1e-7)


def test_local_ncc_to_a_fixed_target_matches_local_ncc():
    """The target's statistics computed once give the same values and source gradients."""
    b = torch.rand(1, 1, 40, 50)  # one target for the whole batch
    a = (b + 0.3 * torch.rand(3, 1, 40, 50)).requires_grad_(True)
    reference = local_ncc(a, b.expand_as(a), 7)
    fixed = local_ncc_to_fixed(a, fixed_local_stats(b, 7), 7)
    assert fixed.shape == (3,) and torch.allclose(fixed, reference, atol=1e-6)
    assert reference.min() > 0.5  # a correlated pair: the comparison is not of two zeros
    (g_ref,), (g_fixed,) = torch.autograd.grad(reference.sum(), a), torch.autograd.grad(fixed.sum(), a)
    assert torch.allclose(g_fixed, g_ref, atol=1e-7)


@pytest.mark.parametrize("grid, shape", [((4, 5), (8, 8)), ((18, 24), (576, 768)), ((13, 7), (13, 50))])
def test_upsample_params_is_bicubic(grid, shape):
    p = torch.randn((1, 2) + grid)
    expected = F.interpolate(p, size=shape, mode="bicubic", align_corners=True)
    assert torch.allclose(_upsample_params(p, shape), expected, atol=1e-5)
    assert _upsample_params(p, grid) is p


@pytest.mark.parametrize("grid, shape", [((4, 5), (8, 8)), ((6, 8), (144, 192)), ((18, 24), (576, 768))])
def test_grid_diffusion_equals_diffusion_of_the_upsampled_field(grid, shape):
    p = torch.randn((1, 2) + grid, requires_grad=True)
    direct = diffusion(_upsample_params(p, shape))
    fast = _grid_diffusion(p, shape)
    assert torch.allclose(fast, direct, rtol=1e-4)
    (g_direct,) = torch.autograd.grad(direct.sum(), p)
    (g_fast,) = torch.autograd.grad(fast.sum(), p)
    assert torch.allclose(g_fast, g_direct, rtol=1e-3, atol=1e-7)


def test_coarse_spacings_accepts_one_value_a_list_or_nothing():
    assert _coarse_spacings((32, 64)) == (32, 64)
    assert _coarse_spacings([32, 64]) == (32, 64)  # from a JSON config
    assert _coarse_spacings(16) == (16,)
    assert _coarse_spacings(()) == () and _coarse_spacings(None) == () and _coarse_spacings(0) == ()
    with pytest.raises(ValueError):
        _coarse_spacings((32, -4))


def test_dissimilarity_is_one_minus_ncc():
    a = torch.rand(1, 1, 30, 40)
    b = 0.5 * a + 0.3 * torch.rand_like(a)
    assert _dissimilarity(a, a) == pytest.approx(0.0, abs=1e-6)
    assert _dissimilarity(a, 2 * a + 1) == pytest.approx(0.0, abs=1e-6)  # any linear intensity map
    assert _dissimilarity(a, b) == pytest.approx(1 - float(ncc(a, b)), abs=1e-5)
    assert _dissimilarity(a, torch.rand_like(a)) > 0.8  # unrelated images


# --------------------------------------------------------------------------- behaviour
def _flat_shapes(n: int = 256) -> np.ndarray:
    """Flat-filled shapes on an empty background: only their outlines carry information."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    image = np.zeros((n, n), np.float32)
    image[(np.abs(yy - 80) + np.abs(xx - 90)) < 50] = 0.8
    image[((yy - 170) ** 2 + (xx - 160) ** 2) < 45**2] = 0.5
    image[40:110, 150:220] = 0.3
    return gaussian_filter(image, 1.0)


def _smooth_warp(shape, amplitude: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    nodes = torch.tensor(rng.normal(0, 1, (1, 2, 4, 4)), dtype=torch.float32)
    field = F.interpolate(nodes, size=shape, mode="bicubic", align_corners=True)
    return (field / field.abs().max() * amplitude)[0]


@pytest.mark.parametrize("seed", [0, 3])
def test_coarse_parts_recover_a_smooth_warp_of_flat_shapes(seed):
    """The aperture problem: along the straight edges of flat shapes similarity cannot place a
    point; the dense residual alone stops halfway, the coarse parts extrapolate the warp."""
    image = _flat_shapes()
    truth = _smooth_warp(image.shape, 8.0, seed)
    target = cv.warp(torch.from_numpy(image)[None, None], truth[None])[0, 0].numpy()
    zero = np.zeros((2,) + image.shape, np.float32)
    inside = image > 0.05

    def error(field):
        return float(np.median(np.linalg.norm(field - truth.numpy(), axis=0)[inside]))

    dense_only = dense_nonrigid(image, target, zero, dataclasses.replace(FAST, coarse_spacings=()))
    with_coarse = dense_nonrigid(image, target, zero, FAST)
    assert error(zero) > 3.0
    assert error(with_coarse) < 1.0
    assert error(with_coarse) < 0.4 * error(dense_only)


def test_without_coarse_parts_the_dense_engine_still_refines():
    """``coarse_spacings=()`` is the former engine (dense residual only) on textured images."""
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random((256, 256)).astype(np.float32), 3.0)
    image = (image - image.min()) / (image.max() - image.min())
    truth = _smooth_warp(image.shape, 4.0, 1)
    target = cv.warp(torch.from_numpy(image)[None, None], truth[None])[0, 0].numpy()
    zero = np.zeros((2,) + image.shape, np.float32)
    inner = (slice(16, -16), slice(16, -16))
    field = dense_nonrigid(image, target, zero, dataclasses.replace(FAST, coarse_spacings=()))
    before = np.median(np.linalg.norm(truth.numpy(), axis=0)[inner])
    after = np.median(np.linalg.norm(field - truth.numpy(), axis=0)[inner])
    assert field.dtype == np.float32 and after < 0.4 * before
