"""The initial alignment (stages/initial.py): centroid + rotation search, against known rotations and a real pair.

Data: :mod:`stage_data` (two stains of one section, exactly aligned; the rat kidney pair)."""

from __future__ import annotations

import numpy as np
import pytest
from stage_data import angle_error, apply_affine, pad_square, rigid_angle, warp_np

from napari_histreg import conventions as cv
from napari_histreg.stages.initial import InitialAlignmentConfig, initial_alignment


@pytest.mark.parametrize("angle", [37.0, 200.0, 123.6])
def test_initial_alignment_recovers_a_rotation(stains_working, angle):
    """Target = the source rotated by ``angle`` about its centre and shifted."""
    source = pad_square(stains_working.target)
    shape = source.shape
    centre = (np.asarray(shape) - 1) / 2
    truth = cv.rotation_about(centre, angle, (6.0, -9.0))
    target = warp_np(source, cv.affine_to_field(truth, shape))
    found = initial_alignment(source, target)
    assert angle_error(found.angle, angle) < 1.0
    assert found.score > 0.8
    corners = np.array([[40.0, 40.0], [40.0, shape[1] - 41.0], [shape[0] - 41.0, 40.0], [shape[0] - 41.0, shape[1] - 41.0]])
    assert np.linalg.norm(apply_affine(found.matrix, corners) - apply_affine(truth, corners), axis=1).max() < 3.0


@pytest.mark.parametrize("angle", [37.0, 200.0])
def test_initial_alignment_across_stains_on_a_real_pair(kidney_working, kidney, angle):
    """Rat kidney: PanCytokeratin rotated by ``angle`` onto H&E. The expected angle is the
    landmarks' own rigid angle (about -1 degree) composed with the known rotation."""
    source = pad_square(kidney_working.source)
    target = pad_square(kidney_working.target)
    shape = source.shape
    pad = (np.asarray(shape) - np.asarray(kidney_working.source.shape)) // 2
    turn = cv.rotation_about((np.asarray(shape) - 1) / 2, angle, (5.0, -8.0))
    turned = warp_np(source, cv.affine_to_field(turn, shape))  # turned(q) = source(turn q)
    found = initial_alignment(turned, target)
    t_pts = kidney_working.target_frame.to_working(kidney.target_lm) + pad
    s_pts = kidney_working.source_frame.to_working(kidney.source_lm) + pad
    inherent = rigid_angle(t_pts, s_pts)
    assert angle_error(found.angle, inherent - angle) < 1.0
    # The landmarks land near their partners: s = turn^-1 (source point).
    inverse = np.linalg.inv(np.vstack([turn, [0, 0, 1]]))[:2]
    expected = apply_affine(inverse, s_pts)
    diag = np.hypot(*kidney_working.target_frame.shape)
    assert np.median(np.linalg.norm(apply_affine(found.matrix, t_pts) - expected, axis=1)) / diag < 0.05


@pytest.mark.parametrize("angle", [37.0, 200.0])
def test_initial_alignment_across_stains_exact_truth(stains_working, angle):
    """H-stain target rotated by ``angle``; DAB source of the same, exactly aligned, section."""
    source = pad_square(stains_working.source)
    target = pad_square(stains_working.target)
    shape = source.shape
    truth = cv.rotation_about((np.asarray(shape) - 1) / 2, angle, (4.0, -6.0))
    found = initial_alignment(source, warp_np(target, cv.affine_to_field(truth, shape)))
    assert angle_error(found.angle, angle) < 1.0


def test_polar_search_scores_every_angle_as_the_grid_search_does(stains_working):
    """The polar scores (one FFT for all angles) against warping the source once per angle:
    the same criterion, so the same peak and nearly the same values, off-centre centres included."""
    import torch

    from napari_histreg.stages.initial import _grid_angle_scores, polar_angle_scores
    from napari_histreg.stages.preprocess import level_shape, resample

    shape = level_shape(stains_working.target.shape, 192)
    source = resample(stains_working.source, shape)[None, None]
    target = resample(stains_working.target, shape)[None, None]
    turn = cv.rotation_about((np.asarray(shape) - 1) / 2, 70.0)
    turned = torch.from_numpy(warp_np(source[0, 0].numpy(), cv.affine_to_field(turn, shape)))[None, None]
    angles = np.arange(0.0, 360.0, 1.0)
    centre_t, centre_s = (np.asarray(shape) - 1) / 2 + (3.2, -5.1), (np.asarray(shape) - 1) / 2 + (-4.0, 2.5)
    for moving in (source, turned):
        grid, _ = _grid_angle_scores(moving, target, angles, centre_t, centre_s, 90, torch.device("cpu"), None, 1, 0)
        polar = polar_angle_scores(moving, target, angles, centre_t, centre_s)
        assert angle_error(angles[polar.argmax()], angles[grid.argmax()]) <= 1.0
        assert np.abs(polar - grid).max() < 0.03
        assert np.corrcoef(polar, grid)[0, 1] > 0.999
    # between the samples of the polar grid, read by interpolation: a quarter-degree search agrees too
    fine = 70.0 + np.arange(-2.0, 2.01, 0.25)
    grid, _ = _grid_angle_scores(turned, target, fine, centre_t, centre_t, 90, torch.device("cpu"), None, 1, 0)
    assert np.abs(polar_angle_scores(turned, target, fine, centre_t, centre_t) - grid).max() < 0.03


def test_initial_alignment_reports_progress_in_batches(stains_working):
    events = []
    config = InitialAlignmentConfig(angle_step=2.0, batch_size=45, refine_step=0.5, search_method="grid")
    initial_alignment(stains_working.source, stains_working.target, config, progress=events.append)
    assert [e.stage for e in events] == ["initial"] * len(events)
    assert len(events) >= 180 // 45  # one event per batch of angles, not per angle
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] == events[-1].total



