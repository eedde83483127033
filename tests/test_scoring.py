"""One way to score a registered pair (napari_histreg.scoring) and one metric vocabulary."""

import warnings

import numpy as np
import pytest

from napari_histreg.conventions import Frame, affine_to_field
from napari_histreg.io import HistRegInputError, write_landmarks
from napari_histreg.metrics import pair_metrics
from napari_histreg.result import RegistrationResult
from napari_histreg.scoring import METRIC_COLUMNS, RESULT_COLUMNS, LandmarkPair, Landmarks, score, score_mapped


def shifted_result(shape, shift_rc):
    """A result whose backward field is a constant shift: target p shows source p + shift."""
    matrix = np.array([[1.0, 0.0, shift_rc[0]], [0.0, 1.0, shift_rc[1]]])
    frame = Frame(shape, shape, (1.0, 1.0), (0.0, 0.0))
    return RegistrationResult(affine_to_field(matrix, shape)[0].numpy(), frame, frame, matrix)


def test_pair_metrics_speak_the_anhir_names():
    source = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    target = source + [3.0, 4.0]  # 5 px apart before registration
    metrics = pair_metrics(source, target + [0.0, 1.0], target, (300, 400))  # 1 px after
    assert tuple(metrics) == METRIC_COLUMNS
    assert metrics["initial_MrTRE"] == pytest.approx(5 / 500)
    assert metrics["MrTRE"] == pytest.approx(1 / 500) and metrics["max_rTRE"] == pytest.approx(1 / 500)
    assert metrics["robustness"] == 1.0 and metrics["n_landmarks"] == 3


def test_score_maps_through_the_result_and_adds_its_confidence():
    shape = (64, 80)
    target = np.array([[20.0, 20.0], [30.0, 50.0], [40.0, 30.0]])
    source = target + [2.0, -3.0]  # the source shows target p at p + (2, -3)
    pair = LandmarkPair.from_points(source, target, shape)
    perfect = score(shifted_result(shape, (2.0, -3.0)), pair)
    assert set(perfect) == set(METRIC_COLUMNS) | set(RESULT_COLUMNS)
    assert perfect["MrTRE"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["initial_MrTRE"] == pytest.approx(np.hypot(2, 3) / np.hypot(*shape))
    assert perfect["flag"] is None  # a hand-made result carries no confidence
    wrong = score(shifted_result(shape, (-2.0, 3.0)), pair)  # the shift applied the wrong way
    assert wrong["MrTRE"] == pytest.approx(2 * perfect["initial_MrTRE"], rel=1e-4)
    with pytest.raises(ValueError, match="not finite"):
        score_mapped(np.full((3, 2), np.nan), pair)


def test_landmark_files_pair_by_id_and_warn_about_the_rest(tmp_path):
    write_landmarks(tmp_path / "s.csv", ["a", "b", "c"], np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    write_landmarks(tmp_path / "t.csv", ["c", "a", "z"], np.array([[50.0, 60.0], [10.0, 20.0], [0.0, 0.0]]))
    with pytest.warns(UserWarning, match="2 landmark ids shared, 1 only in the source file, 1 only in the target"):
        pair = LandmarkPair.read(tmp_path / "s.csv", tmp_path / "t.csv", (100, 100))
    assert [str(i) for i in pair.ids] == ["c", "a"]  # the target's order
    np.testing.assert_allclose(pair.source_rc, [[5.0, 6.0], [1.0, 2.0]])
    np.testing.assert_allclose(pair.target_rc, [[50.0, 60.0], [10.0, 20.0]])


def test_landmarks_outside_their_image_are_named(tmp_path):
    far = Landmarks("far.csv", np.array(["1", "2"], dtype=object), np.array([[5000.0, 10.0], [6000.0, 10.0]]))
    with pytest.raises(HistRegInputError, match="far.csv: all 2 landmarks lie outside the 100x50"):
        far.check_inside((50, 100))
    some = Landmarks("some.csv", np.array(["1", "2"], dtype=object), np.array([[5000.0, 10.0], [10.0, 10.0]]))
    with pytest.warns(UserWarning, match="some.csv: 1 of 2 landmarks lie outside"):
        some.check_inside((50, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Landmarks("in.csv", np.array(["1"], dtype=object), np.array([[52.0, 101.0]])).check_inside((50, 100))  # within 5 %
    with pytest.raises(HistRegInputError, match="absent.csv: file not found"):
        Landmarks.read(tmp_path / "absent.csv")
