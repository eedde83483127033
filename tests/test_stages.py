"""Each pipeline stage on realistic data, against a known answer.

Two sources of images: the haematoxylin and DAB renderings of scikit-image's IHC image (the
same tissue in two stains, exactly aligned: always available), and the rat kidney pair from
``../shared/data`` (real H&E and PanCytokeratin sections with expert landmarks; skipped where
the data are absent). Known transforms are applied with the project's conventions and the
stages must recover them. Working sizes and iterations are small: these tests check behaviour,
the accuracy benchmarks live elsewhere.
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_histreg import Pipeline, RegistrationCancelled, RegistrationConfig, register
from napari_histreg import conventions as cv
from napari_histreg import sample as sample_module
from napari_histreg.io import pair_landmarks, read_image, read_landmarks
from napari_histreg.metrics import rtre
from napari_histreg.stages.affine import AffineConfig, optimise_affine
from napari_histreg.stages.initial import InitialAlignmentConfig, initial_alignment
from napari_histreg.stages.mask import otsu_tissue_mask
from napari_histreg.stages.nonrigid import (
    DenseConfig,
    PatchConfig,
    PatchInstanceOptimiser,
    dense_nonrigid,
    patch_nonrigid,
)
from napari_histreg.stages.preprocess import (
    PreprocessConfig,
    entropy,
    equalise_by_entropy,
    prepare_image,
    preprocess_pair,
    to_grey,
    working_scale,
)

SMALL = PreprocessConfig(working_size=256)
FAST_AFFINE = AffineConfig(levels=(128, 256), iterations=(60, 30))
FAST_DENSE = DenseConfig(levels=(128, 256), iterations=(40, 20))
FAST_PATCH = PatchConfig(levels=(128, 256), iterations=(1, 1), patch_size=64)
FAST_PREDICTOR = PatchInstanceOptimiser(iterations=20)


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def stains():
    """The same tissue section in two stains, exactly aligned, on white glass (uint8 RGB)."""
    rng = np.random.default_rng(0)
    haem, dab = sample_module._stains()
    soft = sample_module._tissue_outline(haem.shape, rng)
    return SimpleNamespace(
        h=sample_module._render(soft, h=1.5 * haem),
        dab=sample_module._render(soft, h=haem, d=dab),
        outline=soft > 0.5,
    )


@pytest.fixture(scope="module")
def stains_working(stains):
    """Working images (256) of the two stains: ``source`` = DAB, ``target`` = H."""
    return preprocess_pair(stains.dab, stains.h, SMALL)


@pytest.fixture(scope="module")
def kidney(shared_data):
    folder = shared_data / "rat-kidney"
    source = read_image(folder / "Rat-Kidney_PanCytokeratin.jpg")
    target = read_image(folder / "Rat-Kidney_HE.jpg")
    ids, source_lm, target_lm = pair_landmarks(
        *read_landmarks(folder / "Rat-Kidney_PanCytokeratin.csv"), *read_landmarks(folder / "Rat-Kidney_HE.csv")
    )
    return SimpleNamespace(source=source, target=target, source_lm=source_lm, target_lm=target_lm, ids=ids)


@pytest.fixture(scope="module")
def kidney_working(kidney):
    return preprocess_pair(kidney.source, kidney.target, SMALL)


def _warp_np(image: np.ndarray, field: torch.Tensor) -> np.ndarray:
    return cv.warp(torch.as_tensor(image, dtype=torch.float32)[None, None], field.float())[0, 0].numpy()


def _apply(matrix, points):
    matrix = np.asarray(matrix)
    return np.asarray(points) @ matrix[:, :2].T + matrix[:, 2]


def _pad_square(image: np.ndarray) -> np.ndarray:
    """Centre an image in a square canvas large enough to rotate it without cropping."""
    side = int(np.ceil(np.hypot(*image.shape))) + 8
    canvas = np.zeros((side, side), dtype=np.float32)
    r0, c0 = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
    canvas[r0 : r0 + image.shape[0], c0 : c0 + image.shape[1]] = image
    return canvas


def _angle_error(a, b):
    return abs((a - b + 180.0) % 360.0 - 180.0)


def _rigid_angle(target_points, source_points):
    """Least-squares rotation (degrees, ``rotation_about``'s sign) of ``s = R p + t``."""
    p = target_points - target_points.mean(0)
    s = source_points - source_points.mean(0)
    sin = (p[:, 0] * s[:, 1] - p[:, 1] * s[:, 0]).sum()
    cos = (p * s).sum()
    return float(np.rad2deg(np.arctan2(sin, cos)))


# --------------------------------------------------------------------------- preprocessing
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


# --------------------------------------------------------------------------- mask
def test_otsu_mask_on_a_real_section(kidney, kidney_working):
    for working, frame, landmarks, image in (
        (kidney_working.target, kidney_working.target_frame, kidney.target_lm, kidney.target),
        (kidney_working.source, kidney_working.source_frame, kidney.source_lm, kidney.source),
    ):
        mask = otsu_tissue_mask(working)
        assert mask.dtype == bool and mask.shape == working.shape
        assert 0.3 < mask.mean() < 0.9
        q = np.round(frame.to_working(landmarks)).astype(int)
        assert mask[q[:, 0], q[:, 1]].mean() > 0.9  # landmarks are on tissue
        h, w = image.shape[:2]
        corners = np.round(frame.to_working([[8, 8], [8, w - 9], [h - 9, 8], [h - 9, w - 9]])).astype(int)
        assert not mask[corners[:, 0], corners[:, 1]].any()  # glass is not


def test_otsu_mask_matches_a_known_outline(stains, stains_working):
    frame = stains_working.target_frame
    mask = otsu_tissue_mask(stains_working.target)
    rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
    back = np.round(frame.to_original(np.stack((rows.ravel(), cols.ravel()), axis=1))).astype(int)
    ok = (back >= 0).all(1) & (back[:, 0] < stains.outline.shape[0]) & (back[:, 1] < stains.outline.shape[1])
    truth = np.zeros(mask.size, bool)
    truth[ok] = stains.outline[back[ok, 0], back[ok, 1]]
    truth = truth.reshape(mask.shape)
    # Glass is never taken for tissue; most of the tissue is found (Otsu drops pale stroma
    # that opens onto the section's edge: a baseline, not the learned mask).
    assert (mask & ~truth).sum() / mask.sum() < 0.05
    assert (mask & truth).sum() / truth.sum() > 0.85


def test_otsu_mask_of_a_blank_image_is_empty():
    assert not otsu_tissue_mask(np.zeros((64, 64), np.float32)).any()


# --------------------------------------------------------------------------- initial alignment
@pytest.mark.parametrize("angle", [37.0, 200.0, 123.6])
def test_initial_alignment_recovers_a_rotation(stains_working, angle):
    """Target = the source rotated by ``angle`` about its centre and shifted."""
    source = _pad_square(stains_working.target)
    shape = source.shape
    centre = (np.asarray(shape) - 1) / 2
    truth = cv.rotation_about(centre, angle, (6.0, -9.0))
    target = _warp_np(source, cv.affine_to_field(truth, shape))
    found = initial_alignment(source, target)
    assert _angle_error(found.angle, angle) < 1.0
    assert found.score > 0.8
    corners = np.array([[40.0, 40.0], [40.0, shape[1] - 41.0], [shape[0] - 41.0, 40.0], [shape[0] - 41.0, shape[1] - 41.0]])
    assert np.linalg.norm(_apply(found.matrix, corners) - _apply(truth, corners), axis=1).max() < 3.0


@pytest.mark.parametrize("angle", [37.0, 200.0])
def test_initial_alignment_across_stains_on_a_real_pair(kidney_working, kidney, angle):
    """Rat kidney: PanCytokeratin rotated by ``angle`` onto H&E. The expected angle is the
    landmarks' own rigid angle (about -1 degree) composed with the known rotation."""
    source = _pad_square(kidney_working.source)
    target = _pad_square(kidney_working.target)
    shape = source.shape
    pad = (np.asarray(shape) - np.asarray(kidney_working.source.shape)) // 2
    turn = cv.rotation_about((np.asarray(shape) - 1) / 2, angle, (5.0, -8.0))
    turned = _warp_np(source, cv.affine_to_field(turn, shape))  # turned(q) = source(turn q)
    found = initial_alignment(turned, target)
    t_pts = kidney_working.target_frame.to_working(kidney.target_lm) + pad
    s_pts = kidney_working.source_frame.to_working(kidney.source_lm) + pad
    inherent = _rigid_angle(t_pts, s_pts)
    assert _angle_error(found.angle, inherent - angle) < 1.0
    # The landmarks land near their partners: s = turn^-1 (source point).
    inverse = np.linalg.inv(np.vstack([turn, [0, 0, 1]]))[:2]
    expected = _apply(inverse, s_pts)
    diag = np.hypot(*kidney_working.target_frame.shape)
    assert np.median(np.linalg.norm(_apply(found.matrix, t_pts) - expected, axis=1)) / diag < 0.05


@pytest.mark.parametrize("angle", [37.0, 200.0])
def test_initial_alignment_across_stains_exact_truth(stains_working, angle):
    """H-stain target rotated by ``angle``; DAB source of the same, exactly aligned, section."""
    source = _pad_square(stains_working.source)
    target = _pad_square(stains_working.target)
    shape = source.shape
    truth = cv.rotation_about((np.asarray(shape) - 1) / 2, angle, (4.0, -6.0))
    found = initial_alignment(source, _warp_np(target, cv.affine_to_field(truth, shape)))
    assert _angle_error(found.angle, angle) < 1.0


def test_initial_alignment_reports_progress_in_batches(stains_working):
    events = []
    config = InitialAlignmentConfig(angle_step=2.0, batch_size=45, refine_step=0.5)
    initial_alignment(stains_working.source, stains_working.target, config, progress=events.append)
    assert [e.stage for e in events] == ["initial"] * len(events)
    assert len(events) >= 180 // 45  # one event per batch of angles, not per angle
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] == events[-1].total


# --------------------------------------------------------------------------- affine
def test_affine_recovers_a_known_affine_across_stains(stains_working):
    """H-stain target under a small scale/shear/shift; DAB source from identity."""
    shape = stains_working.target.shape
    centre = (np.asarray(shape) - 1) / 2
    lin = np.array([[1.05, 0.04], [-0.03, 0.96]])
    truth = np.hstack([lin, (centre - lin @ centre + np.array([5.0, -4.0]))[:, None]])
    target = _warp_np(stains_working.target, cv.affine_to_field(truth, shape))
    found = optimise_affine(stains_working.source, target, np.eye(2, 3), FAST_AFFINE)
    corners = np.array([[40.0, 40.0], [40.0, shape[1] - 41.0], [shape[0] - 41.0, 40.0], [shape[0] - 41.0, shape[1] - 41.0]])
    errors = np.linalg.norm(_apply(found, corners) - _apply(truth, corners), axis=1)
    assert errors.max() < 1.0, errors


def test_initial_and_affine_on_a_real_pair(kidney, kidney_working):
    """Rat kidney: initial + affine brings the expert landmarks well below their initial error."""
    src, tgt = kidney_working.source, kidney_working.target
    matrix = initial_alignment(src, tgt).matrix
    matrix = optimise_affine(src, tgt, matrix, FAST_AFFINE)
    t_pts = kidney_working.target_frame.to_working(kidney.target_lm)
    mapped = kidney_working.source_frame.to_original(_apply(matrix, t_pts))  # target -> source
    before = np.median(rtre(kidney.source_lm, kidney.target_lm, kidney.target.shape))
    after = np.median(rtre(mapped, kidney.source_lm, kidney.target.shape))
    assert after < 0.006 < before  # an affine fit on the landmarks themselves reaches ~0.003-0.005


# --------------------------------------------------------------------------- non-rigid
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
    return SimpleNamespace(source=image, target=_warp_np(image, truth), truth=truth, mask=image > 0.05)


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
    target = _warp_np(image, truth)
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
    target = _warp_np(stains_working.target, truth)
    zero = np.zeros((2,) + shape, np.float32)
    mask = stains_working.target > 0.05
    before = _median_error(zero, truth, mask)
    field = dense_nonrigid(stains_working.source, target, zero, FAST_DENSE)
    assert _median_error(field, truth, mask) < 0.85 * before


# --------------------------------------------------------------------------- pipeline, progress, cancel
FAST_CONFIG = RegistrationConfig(
    preprocess=SMALL,
    initial=InitialAlignmentConfig(search_size=128),
    affine=FAST_AFFINE,
    dense=FAST_DENSE,
)


def test_progress_events_cover_every_stage(stains):
    events = []
    result = register(stains.dab, stains.h, FAST_CONFIG, progress=events.append)
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    for stage in ("preprocess", "initial", "affine", "nonrigid"):
        assert stage in stages
    assert order.index("preprocess") < order.index("initial") < order.index("affine") < order.index("nonrigid")
    assert all(0 <= e.step <= e.total for e in events)
    assert result.working_field.shape == (2,) + result.working_target.shape


@pytest.mark.parametrize("stop_in", ["initial", "affine", "nonrigid"])
def test_cancel_from_the_progress_callback_stops_promptly(stains, stop_in):
    events = []
    raised_at = []

    def progress(event):
        assert not raised_at, "the callback was called again after it cancelled"
        events.append(event)
        if event.stage == stop_in and event.step > 0:
            raised_at.append(time.perf_counter())
            raise RegistrationCancelled("stop")

    with pytest.raises(RegistrationCancelled):
        register(stains.dab, stains.h, FAST_CONFIG, progress=progress)
    assert raised_at and time.perf_counter() - raised_at[0] < 1.0
    later = {"initial": ("affine", "nonrigid"), "affine": ("nonrigid",), "nonrigid": ()}[stop_in]
    assert not any(e.stage in later for e in events)


def test_cancel_inside_the_patch_engine(stains_working):
    calls = []

    def progress(event):
        calls.append(event)
        raise RegistrationCancelled

    zero = np.zeros((2,) + stains_working.target.shape, np.float32)
    with pytest.raises(RegistrationCancelled):
        patch_nonrigid(stains_working.source, stains_working.target, zero, FAST_PREDICTOR, FAST_PATCH, progress=progress)
    assert len(calls) == 1 and calls[0].step == 1  # after the first group of patches


def test_a_replaced_stage_is_used(stains):
    pipeline = Pipeline(FAST_CONFIG)
    seen = []

    def my_mask(image):
        seen.append(image.shape)
        return image > 0.05

    pipeline.mask = my_mask
    pipeline.nonrigid = None
    result = pipeline.run(stains.dab, stains.h)
    assert len(seen) == 2 and seen[0] == result.working_target.shape
    assert "mask" in result.timings and "nonrigid" not in result.timings
    # Without a non-rigid stage the field is the affine one.
    expected = cv.affine_to_field(result.matrix, result.working_target.shape)[0].numpy()
    np.testing.assert_allclose(result.working_field, expected, atol=1e-3)


def test_ncc_without_a_mask_is_the_all_ones_mask_exactly():
    """The mask-free fast path of ``ncc`` (the rotation search scores 360 angles with it) must
    give the very numbers of an all-ones mask, and the known values at the extremes."""
    from napari_histreg.similarity import ncc

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, 1, 37, 29, generator=gen)
    b = 0.3 * a + torch.rand(5, 1, 37, 29, generator=gen)
    assert torch.equal(ncc(a, b), ncc(a, b, torch.ones_like(a)))
    torch.testing.assert_close(ncc(a, a), torch.ones(5))
    torch.testing.assert_close(ncc(a, 1 - a), -torch.ones(5))
    half = torch.zeros_like(a)
    half[..., :15] = 1
    assert not torch.allclose(ncc(a, b, half), ncc(a, b))  # a real mask still counts
