"""Readers, writers and layer conversions of the napari plugin. Most need no display; the ones
that open a viewer are marked ``gui`` and fail (not skip) without one."""

from __future__ import annotations

import numpy as np
import pytest
from napari_conftest import display, qapp_cls, viewer  # noqa: F401  (fixtures)

from napari_histreg._napari import layers as L
from napari_histreg._napari.transform_layers import transform_layer
from napari_histreg._napari.readers import get_landmarks_reader, get_transform_reader, read_landmarks_csv, read_transform
from napari_histreg._napari.writers import write_image_mha, write_landmarks_csv
from napari_histreg.conventions import Frame, affine_to_field, rotation_about
from napari_histreg.io import read_landmarks, read_mha, write_landmarks
from napari_histreg.result import RegistrationResult


def _rigid_result(shape=(120, 160), angle=8.0, shift=(4.0, -6.0)) -> RegistrationResult:
    matrix = rotation_about(((shape[0] - 1) / 2, (shape[1] - 1) / 2), angle, shift)
    frame = Frame(shape, shape, (1.0, 1.0), (0.0, 0.0))
    return RegistrationResult(affine_to_field(matrix, shape)[0].numpy(), frame, frame, matrix)


# --------------------------------------------------------------------------- landmarks
def test_landmark_csv_round_trip(tmp_path):
    points = np.array([[10.5, 20.25], [30.0, 40.0], [55.125, 5.5]])
    src = write_landmarks(tmp_path / "a.csv", ["3", "7", "11"], points)
    assert get_landmarks_reader(str(src)) is read_landmarks_csv
    (data, kwargs, kind), = read_landmarks_csv(str(src))
    assert kind == "points" and kwargs["name"] == "a"
    np.testing.assert_allclose(data, points)
    assert list(kwargs["features"]["id"]) == ["3", "7", "11"]
    assert kwargs["text"]["string"] == "{id}"

    out = write_landmarks_csv(str(tmp_path / "b"), data, {"features": kwargs["features"]})
    assert out == [str(tmp_path / "b.csv")]
    assert (tmp_path / "b.csv").read_text() == src.read_text()
    ids, back = read_landmarks(tmp_path / "b.csv")
    assert list(ids) == ["3", "7", "11"]
    np.testing.assert_allclose(back, points, atol=1e-3)


def test_landmark_writer_fills_missing_and_repeated_ids(tmp_path):
    import pandas as pd

    points = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    features = pd.DataFrame({"id": ["4", "", "4", None]})
    write_landmarks_csv(str(tmp_path / "x.csv"), points, {"features": features})
    ids, _ = read_landmarks(tmp_path / "x.csv")
    assert list(ids) == ["4", "5", "6", "7"]
    # no features at all: 0..N-1; 3D points keep their last two axes
    write_landmarks_csv(str(tmp_path / "y.csv"), np.c_[np.zeros(4), points], {})
    ids, back = read_landmarks(tmp_path / "y.csv")
    assert list(ids) == ["0", "1", "2", "3"]
    np.testing.assert_allclose(back, points)


def test_landmark_reader_declines_other_csv(tmp_path):
    napari_csv = tmp_path / "napari_points.csv"
    napari_csv.write_text("index,axis-0,axis-1\n0,1.0,2.0\n")
    assert get_landmarks_reader(str(napari_csv)) is None
    assert get_landmarks_reader(str(tmp_path / "missing.csv")) is None
    assert get_landmarks_reader(str(tmp_path / "image.png")) is None


def test_landmark_reader_on_real_anhir_file(shared_data):
    path = shared_data / "rat-kidney" / "Rat-Kidney_HE.csv"
    (data, kwargs, _), = read_landmarks_csv(str(path))
    ids, points = read_landmarks(path)
    np.testing.assert_allclose(data, points)
    assert list(kwargs["features"]["id"]) == [str(i) for i in ids]


# --------------------------------------------------------------------------- images, transforms
def test_mha_writer(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    (path,) = write_image_mha(str(tmp_path / "rgb"), rgb, {"rgb": True})
    assert path.endswith("rgb.mha")
    np.testing.assert_array_equal(read_mha(path), rgb)
    grey = np.random.default_rng(1).random((70, 90)).astype(np.float32)
    (path,) = write_image_mha(str(tmp_path / "grey.mha"), [grey, grey[::2, ::2]], {"multiscale": True})
    np.testing.assert_array_equal(read_mha(path), grey)


def test_transform_reader_recognises_only_sidecars(tmp_path):
    json_path = _rigid_result().save(tmp_path / "t")
    assert get_transform_reader(str(json_path)) is read_transform
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    assert get_transform_reader(str(other)) is None
    (tmp_path / "broken.json").write_text("{not json")
    assert get_transform_reader(str(tmp_path / "broken.json")) is None


# --------------------------------------------------------------------------- conversions
def test_field_to_vectors_grid_and_direction():
    field = np.zeros((2, 300, 600), np.float32)
    field[0], field[1] = 3.0, -4.0
    vectors, magnitude = L.field_to_vectors(field, grid=30)
    assert vectors.shape[1:] == (2, 2)
    cols = np.unique(vectors[:, 0, 1])
    assert 28 <= len(cols) <= 32  # ~30 arrows along the longer side
    np.testing.assert_allclose(vectors[:, 1], [[3.0, -4.0]] * len(vectors))
    np.testing.assert_allclose(magnitude, 5.0)
    # a preview at half resolution gives the same arrows in full-resolution pixels
    half, _ = L.field_to_vectors(field[:, ::2, ::2] / 2, grid=30, ratio=0.5)
    np.testing.assert_allclose(half[:, 1], [[3.0, -4.0]] * len(half))
    assert half[:, 0].max() < 600


def test_jacobian_determinant_of_a_scaling():
    rows, cols = np.mgrid[:50, :60].astype(np.float32)
    field = np.stack([0.1 * rows, -0.2 * cols])  # p -> (1.1 r, 0.8 c)
    np.testing.assert_allclose(L.jacobian_determinant(field), 1.1 * 0.8, rtol=1e-5)


def test_placements_put_pixels_where_the_target_is():
    from napari.layers import Image

    target = Image(np.zeros((100, 200)), scale=(2.0, 3.0), translate=(5.0, -7.0))
    place = L.placement(target, ratio=0.5)  # a half-resolution array of the target grid
    a = np.array([10.0, 20.0])
    world_from_half = a * place["scale"] + place["translate"]
    np.testing.assert_allclose(world_from_half, ((a + 0.5) / 0.5 - 0.5) * target.scale + target.translate)

    frame = Frame((100, 200), (64, 128), (0.5, 0.5), (7.0, 14.0))
    place = L.working_placement(frame, target)
    p = np.array([[30.0, 60.0]])
    np.testing.assert_allclose(frame.to_working(p) * place["scale"] + place["translate"], p * target.scale + target.translate)


def test_world_matrix_matches_napari_for_rotated_layers():
    from napari.layers import Image, Points

    image = Image(np.zeros((50, 80)), scale=(2.0, 0.5), translate=(3.0, 4.0), rotate=20.0, shear=[0.1])
    pts = Points(np.array([[10.0, 20.0], [30.0, 5.0]]))
    ref = L.snapshot(image)
    assert ref.world_matrix is not None
    coords = np.array([[1.0, 2.0], [40.0, 70.0]])
    expected = np.array([image.data_to_world(c) for c in coords])
    np.testing.assert_allclose(ref.to_world(coords), expected, atol=1e-9)
    np.testing.assert_allclose(ref.to_data(expected), coords, atol=1e-9)
    # points drawn in world coordinates on the rotated image, read back in its pixels
    pts.data = expected
    np.testing.assert_allclose(L.points_in_pixels(pts, image), coords, atol=1e-9)
    assert L.snapshot(pts).world_matrix is None


def test_multiscale_layers_register_a_level_placed_in_the_world():
    from napari.layers import Image

    levels = [np.zeros((s, 2 * s), np.uint8) for s in (400, 200, 100, 50)]
    layer = Image(levels, multiscale=True, scale=(0.5, 0.5), translate=(3.0, 4.0))
    array, ratio = L.image_array(layer, max_side=150)
    assert array.shape == (100, 200) and ratio == 0.25  # the smallest level at least 150 px long
    ref = L.image_ref(layer, max_side=150)
    assert not ref.multiscale and ref.data.shape == (100, 200)
    # level pixel a covers level-0 pixels around (a + 0.5) / ratio - 0.5
    a = np.array([[10.0, 20.0]])
    np.testing.assert_allclose(ref.to_world(a), ((a + 0.5) / 0.25 - 0.5) * 0.5 + [3.0, 4.0])


def test_transform_layer_channel_stack_and_warp_agree():
    from napari.layers import Image

    result = _rigid_result()
    stack = np.random.default_rng(2).random((3, 120, 160)).astype(np.float32)
    data, kwargs, kind = transform_layer(result, Image(stack, name="channels"))
    assert kind == "image" and data.shape == stack.shape and kwargs["name"] == "channels registered"
    np.testing.assert_allclose(data[1], result.warp(stack[1], cval=L.background_value(stack[1])))
    assert len(kwargs["scale"]) == 3


def test_result_to_layers_from_arrays():
    result = _rigid_result()
    source = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    out = L.result_to_layers(result, source, vectors=True, magnitude=True, jacobian=True)
    kinds = [(kw["name"], kind) for _, kw, kind in out]
    assert kinds == [
        ("source registered", "image"),
        ("source deformation", "vectors"),
        ("source displacement magnitude", "image"),
        ("source Jacobian determinant", "image"),
    ]
    assert out[0][1]["rgb"] is True and out[0][0].shape == source.shape
    np.testing.assert_allclose(out[3][0], 1.0, atol=1e-3)  # rigid: area kept


# --------------------------------------------------------------------------- through the viewer
@pytest.mark.gui
def test_open_and_save_through_napari(viewer, tmp_path):
    import napari

    from napari_histreg._napari.session import get_session

    csv_path = write_landmarks(tmp_path / "marks.csv", ["1", "2"], np.array([[5.0, 6.0], [7.0, 8.0]]))
    layers = viewer.open(str(csv_path), plugin="napari-histreg")
    assert len(layers) == 1 and layers[0].name == "marks"
    assert list(layers[0].features["id"]) == ["1", "2"]
    layers[0].data = layers[0].data + 1.0
    written = napari.save_layers(str(tmp_path / "moved.csv"), [layers[0]], plugin="napari-histreg")
    assert written == [str(tmp_path / "moved.csv")]
    ids, points = read_landmarks(tmp_path / "moved.csv")
    assert list(ids) == ["1", "2"]
    np.testing.assert_allclose(points, [[6.0, 7.0], [8.0, 9.0]])

    json_path = _rigid_result().save(tmp_path / "transform")
    before = len(viewer.layers)
    viewer.open(str(json_path), plugin="napari-histreg")
    assert len(viewer.layers) == before  # a transform adds no layer...
    assert get_session(viewer).result is not None  # ...it becomes the viewer's current transform
