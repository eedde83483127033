"""Human-guided correction (napari_histreg.guided): a few corresponding points correct the
automatic result, restart it when it is wrong, or align the pair on their own."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from napari_histreg import register
from napari_histreg.conventions import rotation_about
from napari_histreg.guided import (
    GuideConfig,
    fit_backward_affine,
    points_result,
    refine_result,
    turned_result,
)
from napari_histreg.io import HistRegInputError
from napari_histreg.sample import make_sample_pair
from napari_histreg.stages.nonrigid import DenseConfig, dense_nonrigid

from stage_data import FAST_CONFIG


def _errors(result, pair, keep) -> np.ndarray:
    mapped = result.map_source_points(pair.source_landmarks[keep])
    return np.linalg.norm(mapped - pair.target_landmarks[keep], axis=1)


@pytest.fixture(scope="module")
def sample_registration():
    pair = make_sample_pair(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = register(pair.source, pair.target, FAST_CONFIG, threads=2)
    return pair, result


def _guides(pair, count=6, seed=0):
    rng = np.random.default_rng(seed)
    guides = rng.choice(len(pair.source_landmarks), size=count, replace=False)
    keep = np.setdiff1d(np.arange(len(pair.source_landmarks)), guides)
    return guides, keep


@pytest.mark.parametrize("model", ["translation", "rigid", "similarity", "affine"])
def test_fit_backward_affine_recovers_the_model(model):
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 500, size=(7, 2))
    truth = {
        "translation": np.array([[1.0, 0, 12.5], [0, 1.0, -7.0]]),
        "rigid": rotation_about((250, 250), 33.0, (5.0, -3.0)),
        "similarity": np.hstack([1.3 * rotation_about((0, 0), -71.0)[:, :2], [[4.0], [9.0]]]),
        "affine": np.array([[1.1, 0.2, 3.0], [-0.15, 0.8, 20.0]]),
    }[model]
    source = target @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(fit_backward_affine(source, target, model), truth, atol=1e-8)


def test_fit_backward_affine_takes_a_mirror_only_as_affine():
    target = np.array([[0.0, 0], [0, 100], [100, 0], [100, 100]])
    source = target * [1, -1] + [0, 100]  # mirrored left-right
    np.testing.assert_allclose(fit_backward_affine(source, target, "affine")[:, :2], [[1, 0], [0, -1]], atol=1e-9)
    assert np.linalg.det(fit_backward_affine(source, target, "rigid")[:, :2]) > 0


def test_bad_guide_points_name_the_problem():
    with pytest.raises(HistRegInputError, match="3 source points but 2 target points"):
        points_result((10, 10), (10, 10), np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(HistRegInputError, match="NaN or infinite"):
        points_result((10, 10), (10, 10), [[np.nan, 1.0]], [[1.0, 1.0]])
    with pytest.raises(HistRegInputError, match="thin-plate spline needs at least 3"):
        points_result((10, 10), (10, 10), [[1.0, 1.0], [5, 5]], [[1.0, 1.0], [5, 6]], model="tps")


def test_points_result_affine_and_thin_plate_spline():
    pair = make_sample_pair(0)
    source_pts, target_pts = pair.source_landmarks[:8], pair.target_landmarks[:8]
    tps = points_result(pair.source.shape, pair.target.shape, source_pts, target_pts, model="tps")
    # a spline passes through its points, in both directions
    np.testing.assert_allclose(tps.map_target_points(target_pts), source_pts, atol=0.05)
    np.testing.assert_allclose(tps.map_source_points(source_pts), target_pts, atol=0.05)
    affine = points_result(pair.source.shape, pair.target.shape, source_pts, target_pts, model="affine")
    # the sample's warp is a rotation + shift + a few pixels of elastic field: an affine of the
    # points explains the other landmarks far better than no transform
    rest = slice(8, None)
    before = np.linalg.norm(pair.source_landmarks[rest] - pair.target_landmarks[rest], axis=1)
    after = np.linalg.norm(affine.map_source_points(pair.source_landmarks[rest]) - pair.target_landmarks[rest], axis=1)
    assert np.median(after) < 0.3 * np.median(before)
    assert affine.info["guide"]["model"] == "affine" and tps.info["guide"]["model"] == "tps"


def test_landmark_term_pulls_the_dense_field_to_a_guide():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    image = np.asarray(__import__("scipy.ndimage", fromlist=["gaussian_filter"]).gaussian_filter(image, 2))
    zero = np.zeros((2, 64, 64), np.float32)
    config = DenseConfig(levels=(64,), iterations=(60,), coarse_spacings=())
    target_point = np.array([[32.0, 32.0]])
    source_point = target_point + [4.0, 0.0]  # the guide says: 4 px further down
    free = dense_nonrigid(image, image, zero, config)
    guided = dense_nonrigid(image, image, zero, config, guides=(source_point, target_point, 1.0))
    assert abs(free[0, 32, 32]) < 0.5  # same image: nothing moves without the guide
    assert guided[0, 32, 32] > 2.0


def test_refine_meets_the_guides_and_leaves_far_landmarks(sample_registration):
    pair, automatic = sample_registration
    guides, keep = _guides(pair)
    refined = refine_result(automatic, pair.source_landmarks[guides], pair.target_landmarks[guides], threads=2)
    miss = np.linalg.norm(refined.map_target_points(pair.target_landmarks[guides]) - pair.source_landmarks[guides], axis=1)
    assert miss.max() < 2.0
    assert refined.info["guide"]["restarted_from_points"] is False
    # the correction is local: landmarks far from every guide keep their mapping
    sigma = GuideConfig().correction_sigma * max(automatic.working_field.shape[1:]) / automatic.target_frame.scale[0]
    far = [k for k in keep if np.linalg.norm(pair.target_landmarks[guides] - pair.target_landmarks[k], axis=1).min() > 5 * sigma]
    if far:
        np.testing.assert_allclose(refined.map_source_points(pair.source_landmarks[far]),
                                   automatic.map_source_points(pair.source_landmarks[far]), atol=0.05)
    assert automatic.info.get("guide") is None  # the automatic result is not changed


def test_guides_restart_a_result_turned_by_90_degrees(sample_registration):
    pair, automatic = sample_registration
    guides, keep = _guides(pair)
    failing = turned_result(automatic, 90.0)
    diagonal = np.hypot(*pair.target.shape[:2])
    assert np.median(_errors(failing, pair, keep)) / diagonal > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = refine_result(failing, pair.source_landmarks[guides], pair.target_landmarks[guides], config=FAST_CONFIG, threads=2)
    assert fixed.info["guide"]["restarted_from_points"] is True
    assert np.median(_errors(fixed, pair, keep)) / diagonal < 0.01
    miss = np.linalg.norm(fixed.map_target_points(pair.target_landmarks[guides]) - pair.source_landmarks[guides], axis=1)
    assert miss.max() < 2.0


def test_register_with_guide_points(sample_registration):
    pair, automatic = sample_registration
    guides, keep = _guides(pair, count=4, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = register(pair.source, pair.target, FAST_CONFIG, threads=2,
                          guide_points=(pair.source_landmarks[guides], pair.target_landmarks[guides]))
    assert result.info["guide"]["points"] == 4
    miss = np.linalg.norm(result.map_target_points(pair.target_landmarks[guides]) - pair.source_landmarks[guides], axis=1)
    assert miss.max() < 2.0
    # as good as the automatic result elsewhere (the guides agree with it)
    assert np.median(_errors(result, pair, keep)) < np.median(_errors(automatic, pair, keep)) + 0.5


def test_refining_a_loaded_transform_needs_its_images(sample_registration, tmp_path):
    from napari_histreg import RegistrationResult

    pair, automatic = sample_registration
    loaded = RegistrationResult.load(automatic.save(tmp_path / "t"))
    guides, _ = _guides(pair)
    with pytest.raises(HistRegInputError, match="needs the source and target images"):
        refine_result(loaded, pair.source_landmarks[guides], pair.target_landmarks[guides])
    refined = refine_result(loaded, pair.source_landmarks[guides], pair.target_landmarks[guides], config=FAST_CONFIG,
                            source_image=pair.source, target_image=pair.target, threads=2)
    assert refined.info["guide"]["final_max_miss_source_px"] < 0.5
    wrong = dataclasses.replace(FAST_CONFIG, preprocess=dataclasses.replace(FAST_CONFIG.preprocess, working_size=128))
    with pytest.raises(HistRegInputError, match="not the images"):
        refine_result(loaded, pair.source_landmarks[guides], pair.target_landmarks[guides], config=wrong,
                      source_image=pair.source, target_image=pair.target)
