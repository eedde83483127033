"""The registration result (result.py): a backward working field and two frames, applied to
images and points at any resolution, saved and loaded exactly, and refusing damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_histreg import RegistrationResult
from napari_histreg.conventions import Frame, affine_to_field, rotation_about
from napari_histreg.io import HistRegInputError


def _affine_result(target_shape=(300, 400), source_shape=(360, 420), working=(128, 160)):
    """A result whose working transform is a known rotation + shift, between two originals of
    different sizes placed differently on the working grid."""
    source_frame = Frame(source_shape, working, (working[0] / source_shape[0] * 0.9, working[1] / source_shape[1] * 0.9), (3.0, 5.0))
    target_frame = Frame(target_shape, working, (working[0] / target_shape[0], working[1] / target_shape[1]), (0.0, 0.0))
    matrix = rotation_about(((working[0] - 1) / 2, (working[1] - 1) / 2), 12.0, (4.0, -6.0))
    field = affine_to_field(matrix, working)[0].numpy()
    return RegistrationResult(field, source_frame, target_frame, matrix, {"total": 1.5},
                              {"mode": "hybrid", "confidence": {"score": 0.8, "flag": "ok"}})


def _expected_source_points(result, target_points):
    """Target original pixels -> source original pixels through the frames and the affine."""
    working = result.target_frame.to_working(target_points)
    moved = working @ result.matrix[:, :2].T + result.matrix[:, 2]
    return result.source_frame.to_original(moved)


def test_points_follow_the_frames_and_the_affine_both_ways():
    result = _affine_result()
    target_points = np.array([[10.0, 20.0], [150.0, 200.0], [280.5, 390.25]])
    source_points = result.map_target_points(target_points)
    np.testing.assert_allclose(source_points, _expected_source_points(result, target_points), atol=1e-3)
    # the forward map (fixed-point inversion of the backward field) undoes it
    np.testing.assert_allclose(result.map_source_points(source_points), target_points, atol=0.02)


def test_the_field_at_another_resolution_is_the_same_transform():
    result = _affine_result()
    full = result.field()
    assert full.shape == (2,) + result.target_shape
    half = result.field(source_shape=(180, 210))  # the source at half resolution, the target with it
    assert half.shape == (2, 150, 200)
    # target pixel p at half resolution maps to source p + u(p) at half resolution: the same
    # physical point as the full-resolution map of the same pixel centre
    rows, cols = np.array([20, 75, 140]), np.array([30, 100, 190])
    half_points = np.stack([rows + half[0, rows, cols], cols + half[1, rows, cols]], axis=1)
    full_target = (np.stack([rows, cols], axis=1) + 0.5) * 2.0 - 0.5
    np.testing.assert_allclose((half_points + 0.5) * 2.0 - 0.5, _expected_source_points(result, full_target), atol=0.05)


def test_warp_keeps_the_dtype_and_moves_a_bright_spot_where_the_points_go():
    result = _affine_result()
    source = np.zeros((360, 420), np.uint16)
    source[178:183, 198:203] = 4000
    warped = result.warp(source)
    assert warped.dtype == np.uint16 and warped.shape == result.target_shape
    peak = np.array(np.unravel_index(np.argmax(warped), warped.shape), float)
    np.testing.assert_allclose(result.map_source_points([[180.0, 200.0]])[0], peak, atol=1.5)


def test_save_and_load_round_trip_exactly(tmp_path):
    result = _affine_result()
    sidecar = result.save(tmp_path / "transform")
    assert sidecar.name == "transform.json" and (tmp_path / "transform.mha").is_file()
    loaded = RegistrationResult.load(tmp_path / "transform.mha")  # either file names the transform
    assert np.array_equal(loaded.working_field, result.working_field)
    assert loaded.source_frame == result.source_frame and loaded.target_frame == result.target_frame
    np.testing.assert_array_equal(loaded.matrix, result.matrix)
    assert loaded.flag == "ok" and loaded.info["mode"] == "hybrid" and loaded.timings == {"total": 1.5}


@pytest.mark.parametrize("damage, problem", [
    (lambda d: d.pop("target_frame"), "lacks 'target_frame'"),
    (lambda d: d.update(format="something else"), "not a napari-histreg transform"),
    (lambda d: d.update(version=99), "newer than"),
    (lambda d: d["source_frame"].update(scale=[0.0, 1.0]), "not a valid frame"),
    (lambda d: d.update(matrix=[1, 2, 3]), "not a 2x3 affine"),
])
def test_a_damaged_sidecar_is_refused_naming_the_file_and_the_problem(tmp_path, damage, problem):
    path = _affine_result().save(tmp_path / "t")
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(HistRegInputError, match=problem) as info:
        RegistrationResult.load(path)
    assert str(path) in str(info.value)


def test_a_field_from_another_transform_is_refused(tmp_path):
    _affine_result().save(tmp_path / "a")
    _affine_result(working=(96, 120)).save(tmp_path / "b")
    (tmp_path / "b.mha").replace(tmp_path / "a.mha")
    with pytest.raises(HistRegInputError, match="do not belong together"):
        RegistrationResult.load(tmp_path / "a.json")
