"""GeoJSON annotations in napari (_napari/geojson.py, the Transforms widget): a QuPath file opens
as Shapes + Points, is transformed both ways and saved back with every feature and property.
The viewer tests are marked ``gui`` (Xvfb; they fail, not skip, without a display)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from napari_conftest import display, qapp_cls, run_widget  # noqa: F401  (fixtures)
from test_annotations import (
    _geometries,
    _round_trip_error,
    _without_geometry,
    nonrigid_result,
    qupath_collection,
)

from napari_histreg._napari.geojson import (
    get_geojson_reader,
    layers_to_geojson,
    read_geojson_layers,
)
from napari_histreg._napari.readers import get_transform_reader
from napari_histreg.annotations import transform_geojson


def _same_features(a: dict, b: dict, atol: float) -> None:
    assert len(a["features"]) == len(b["features"])
    for fa, fb in zip(a["features"], b["features"]):
        assert _without_geometry(fa) == _without_geometry(fb)
        assert [g["type"] for g in _geometries(fa)] == [g["type"] for g in _geometries(fb)]
    assert _round_trip_error(a, b) <= atol and _round_trip_error(b, a) <= atol


def test_layers_hold_the_features_losslessly(tmp_path):
    data = qupath_collection()
    data["name"] = "slide 1 annotations"  # a member of the collection itself
    data["features"].append({"type": "Feature", "id": "empty", "geometry": None, "properties": {"name": "no geometry"}})
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(data))
    assert get_geojson_reader(str(path)) is read_geojson_layers
    layers = read_geojson_layers(str(path))
    assert [kind for *_, kind in layers] == ["shapes", "points"]
    shapes, kw, _ = layers[0]
    # tumour: exterior + hole; stroma: 2 polygons, one with a hole; cell + nucleus; the line
    assert len(shapes) == 2 + 3 + 2 + 1
    features = kw["features"]
    assert list(features["ring"][:2]) == [0, 1] and set(features["member"]) == {"geometry", "nucleusGeometry"}
    assert features["classification"][0] == "Tumor" and features["name"][0] == "Tumour core"
    np.testing.assert_allclose(shapes[0][0], [120, 150])  # (row, col) = (y, x)
    assert len(layers[1][0]) == 4  # the multipoint's 3 and the point
    written = layers_to_geojson(layers)
    assert written["name"] == "slide 1 annotations" and written["features"][-1]["id"] == "empty"
    _same_features(data, written, atol=1e-9)
    # a hand-drawn shape (no source feature) becomes a new feature of its own
    extra = ([np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 10.0], [10.0, 0.0]])], {"shape_type": ["rectangle"]}, "shapes")
    assert layers_to_geojson(layers + [extra])["features"][-1]["geometry"]["type"] == "Polygon"


def test_json_files_go_to_the_right_reader(tmp_path):
    geo = tmp_path / "annotations.json"
    geo.write_text(json.dumps(qupath_collection()["features"]))  # QuPath's bare list of features
    transform = nonrigid_result().save(tmp_path / "transform.json")
    assert get_geojson_reader(str(geo)) is read_geojson_layers and get_transform_reader(str(geo)) is None
    assert get_geojson_reader(str(transform)) is None
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"use_mask": True}))
    assert get_geojson_reader(str(other)) is None


@pytest.mark.gui
@pytest.mark.usefixtures("display")
def test_geojson_opens_as_shapes_is_transformed_both_ways_and_saved(make_napari_viewer, qtbot, tmp_path):
    import napari

    from napari_histreg._napari.widgets import TransformsWidget

    result = nonrigid_result()
    data = qupath_collection()
    path = tmp_path / "source.geojson"
    path.write_text(json.dumps(data))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-histreg")
    assert [type(layer).__name__ for layer in viewer.layers] == ["Shapes", "Points"]
    shapes, points = viewer.layers

    widget = TransformsWidget(viewer)
    viewer.window.add_dock_widget(widget)  # the viewer owns it and closes it with itself
    widget.session.set_result(result, None, None)
    widget.target.value = widget.source_image.value = None

    def apply(layer, inverse=False):
        widget.layer.value = layer
        widget.inverse.value = inverse
        assert run_widget(qtbot, widget, timeout=60_000) == "done", widget.status
        return viewer.layers[f"{layer.name} {'to source' if inverse else 'transformed'}"]

    moved_shapes, moved_points = apply(shapes), apply(points)
    assert type(moved_shapes).__name__ == "Shapes" and list(moved_shapes.features["feature"]) == list(shapes.features["feature"])
    out = tmp_path / "in_target.geojson"
    napari.save_layers(str(out), [moved_shapes, moved_points], plugin="napari-histreg")
    saved = json.loads(out.read_text())
    expected, _ = transform_geojson(data, result)
    _same_features(expected, saved, atol=0.01)  # the widget maps as the library does

    # and back: target -> source through the field itself
    back_shapes, back_points = apply(moved_shapes, inverse=True), apply(moved_points, inverse=True)
    back = tmp_path / "back.geojson"
    napari.save_layers(str(back), [back_shapes, back_points], plugin="napari-histreg")
    returned = json.loads(back.read_text())
    _same_features(data, returned, atol=np.inf)
    error = _round_trip_error(data, returned)
    print(f"napari round-trip error (max, px): {error:.4f}")
    assert error < 0.5

    # images cannot go the inverse way: a message, no worker
    viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    widget.layer.value = viewer.layers["img"]
    widget.inverse.value = True
    assert widget.run() is None and "points and shapes" in widget.status
