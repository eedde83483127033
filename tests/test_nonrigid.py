"""The non-rigid engines (stages/nonrigid.py): dense field and patch groups against known elastic warps.

Data: :mod:`stage_data` (two stains of one section, exactly aligned; the rat kidney pair)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stage_data import FAST_DENSE, FAST_PATCH, FAST_PREDICTOR, warp_np

from napari_histreg import RegistrationCancelled
from napari_histreg import conventions as cv
from napari_histreg import sample as sample_module
from napari_histreg.stages.nonrigid import (
    dense_nonrigid,
    patch_nonrigid,
)


def _elastic(shape, seed=1, scale=0.8):
    field = sample_module._elastic_field(shape, np.random.default_rng(seed), bumps=5) * scale
    return torch.as_tensor(field, dtype=torch.float32)[None]


def _median_error(field, truth, mask):
    return float(np.median(np.linalg.norm(np.asarray(field) - truth[0].numpy(), axis=0)[mask]))


@pytest.fixture(scope="module", params=["H-stain", "rat-kidney"])
def elastic_case(request, stains_working):
    """A working image and the same image under a known smooth elastic warp (mono-stain)."""
    if request.param == "H-stain":
        image = stains_working.target
    else:
        image = request.getfixturevalue("kidney_working").target
    truth = _elastic(image.shape)
    return SimpleNamespace(source=image, target=warp_np(image, truth), truth=truth, mask=image > 0.05)


def test_dense_nonrigid_recovers_an_elastic_warp(elastic_case):
    c = elastic_case
    zero = np.zeros((2,) + c.source.shape, np.float32)
    before = _median_error(zero, c.truth, c.mask)
    field = dense_nonrigid(c.source, c.target, zero, FAST_DENSE)
    assert field.shape == zero.shape and field.dtype == np.float32
    assert before > 1.0
    assert _median_error(field, c.truth, c.mask) < 0.4 * before


def test_patch_nonrigid_recovers_an_elastic_warp(elastic_case):
    c = elastic_case
    zero = np.zeros((2,) + c.source.shape, np.float32)
    before = _median_error(zero, c.truth, c.mask)
    events = []
    field = patch_nonrigid(c.source, c.target, zero, FAST_PREDICTOR, FAST_PATCH, progress=events.append)
    assert field.shape == zero.shape
    assert _median_error(field, c.truth, c.mask) < 0.7 * before
    assert events and events[-1].step == events[-1].total  # one event per group of patches


def test_nonrigid_builds_on_the_initial_field(stains_working):
    """The engines refine a given affine field: the truth is elastic composed with it."""
    image = stains_working.target
    shape = image.shape
    affine = cv.affine_to_field(cv.rotation_about((np.asarray(shape) - 1) / 2, 3.0, (3.0, -2.0)), shape)
    elastic = _elastic(shape, seed=2)
    truth = cv.compose(elastic, affine)
    target = warp_np(image, truth)
    mask = image > 0.05
    inner = np.zeros(shape, bool)
    inner[16:-16, 16:-16] = True
    mask &= inner
    before = _median_error(affine[0].numpy(), truth, mask)
    dense = dense_nonrigid(image, target, affine[0].numpy(), FAST_DENSE)
    patch = patch_nonrigid(image, target, affine[0].numpy(), FAST_PREDICTOR, FAST_PATCH)
    assert _median_error(dense, truth, mask) < 0.4 * before
    assert _median_error(patch, truth, mask) < 0.7 * before


def test_dense_nonrigid_across_stains(stains_working):
    """DAB source onto an elastically warped H-stain target: harder, but the error must drop."""
    shape = stains_working.target.shape
    truth = _elastic(shape)
    target = warp_np(stains_working.target, truth)
    zero = np.zeros((2,) + shape, np.float32)
    mask = stains_working.target > 0.05
    before = _median_error(zero, truth, mask)
    field = dense_nonrigid(stains_working.source, target, zero, FAST_DENSE)
    assert _median_error(field, truth, mask) < 0.85 * before


def test_cancel_inside_the_patch_engine(stains_working):
    calls = []

    def progress(event):
        calls.append(event)
        raise RegistrationCancelled

    zero = np.zeros((2,) + stains_working.target.shape, np.float32)
    with pytest.raises(RegistrationCancelled):
        patch_nonrigid(stains_working.source, stains_working.target, zero, FAST_PREDICTOR, FAST_PATCH, progress=progress)
    assert len(calls) == 1 and calls[0].step == 1  # after the first group of patches
