"""GeoJSON annotations (annotations.py, slides/pixel_size.py, `histreg transform-annotations`):
a QuPath-style file mapped forward then backward through a non-rigid result comes back within
0.5 px with every property unchanged; micrometres and pixels agree; bad files are refused
naming the feature."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from console import histreg

from napari_histreg import RegistrationResult
from napari_histreg.annotations import (
    densify,
    read_geojson,
    transform_geojson,
    transform_geojson_file,
    validate_geojson,
)
from napari_histreg.conventions import Frame, affine_to_field, rotation_about
from napari_histreg.io import HistRegInputError
from napari_histreg.slides.pixel_size import read_pixel_size

SOURCE_SHAPE = (480, 640)
TARGET_SHAPE = (500, 600)
WORKING = (96, 128)


def nonrigid_result() -> RegistrationResult:
    """Rotation by 8 degrees + shift + a smooth bump of up to ~2.5 working px (12 original px),
    between originals of different sizes placed differently on a 5x coarser working grid."""
    h, w = WORKING
    matrix = rotation_about(((h - 1) / 2, (w - 1) / 2), 8.0, (3.0, -4.0))
    field = affine_to_field(matrix, WORKING)[0].numpy().astype(np.float64)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    field[0] += 2.5 * np.sin(2 * np.pi * cols / w) * np.sin(np.pi * rows / h)
    field[1] += 2.0 * np.cos(2 * np.pi * rows / h) * np.sin(np.pi * cols / w)
    source_frame = Frame(SOURCE_SHAPE, WORKING, (h / SOURCE_SHAPE[0] * 0.95, w / SOURCE_SHAPE[1] * 0.95), (2.0, 3.0))
    target_frame = Frame(TARGET_SHAPE, WORKING, (h / TARGET_SHAPE[0], w / TARGET_SHAPE[1]), (0.0, 0.0))
    return RegistrationResult(field.astype(np.float32), source_frame, target_frame, matrix, info={"stage": "test"})


def _ring(cx, cy, r, n, clockwise=False):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) * (-1 if clockwise else 1)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).round(3).tolist()
    return pts + [pts[0]]


def _square(x0, y0, x1, y1, clockwise=False):
    pts = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    if clockwise:
        pts = pts[::-1]
    return pts + [pts[0]]


def qupath_collection() -> dict:
    """What QuPath exports: annotations with classification {name, color}, measurements, a
    cell detection with its nucleus, a multipolygon, points, a line (x = column, y = row)."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature", "id": "6a1f0c52-aaaa-4f7b-9d35-000000000001",
                "geometry": {"type": "Polygon", "coordinates": [_square(150, 120, 450, 360), _square(250, 180, 330, 260, True)]},
                "properties": {"objectType": "annotation", "name": "Tumour core",
                               "classification": {"name": "Tumor", "color": [200, 0, 0]}, "isLocked": False,
                               "measurements": {"Area µm^2": 12345.6, "Num Detections": 3}},
            },
            {
                "type": "Feature", "id": "6a1f0c52-aaaa-4f7b-9d35-000000000002",
                "geometry": {"type": "MultiPolygon", "coordinates": [
                    [_ring(100, 400, 40, 24)],
                    [_square(500, 60, 600, 160), _ring(550, 110, 20, 12, clockwise=True)],
                ]},
                "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 150, 0]}},
            },
            {
                "type": "Feature", "id": "6a1f0c52-aaaa-4f7b-9d35-000000000003",
                "geometry": {"type": "Polygon", "coordinates": [_ring(380, 300, 14, 16)]},
                "nucleusGeometry": {"type": "Polygon", "coordinates": [_ring(381, 301, 6, 10)]},
                "properties": {"objectType": "cell", "classification": {"name": "Positive", "color": [255, 0, 0]},
                               "measurements": {"Nucleus: Area": 113.1, "Cell: DAB OD mean": 0.42}},
            },
            {
                "type": "Feature",
                "geometry": {"type": "MultiPoint", "coordinates": [[200.5, 100.25], [320.0, 400.0], [610.0, 450.0]]},
                "properties": {"objectType": "annotation", "name": "Seeds",
                               "classification": {"name": "Immune cells", "color": [160, 90, 160]}},
            },
            {
                "type": "Feature", "id": "pt",
                "geometry": {"type": "Point", "coordinates": [62.0, 77.5]},
                "properties": {"objectType": "annotation", "name": "Landmark A"},
            },
            {
                "type": "Feature", "id": "line",
                "geometry": {"type": "LineString", "coordinates": [[50.0, 60.0], [600.0, 440.0]]},
                "properties": {"objectType": "annotation", "name": "Margin", "classification": {"name": "Region*"}},
            },
        ],
    }


def _sequences(geometry):
    """Every coordinate sequence of a geometry as an (n, 2) array."""
    kind, coords = geometry["type"], geometry["coordinates"]
    if kind == "Point":
        return [np.array([coords])]
    if kind in ("MultiPoint", "LineString"):
        return [np.array(coords)]
    if kind in ("MultiLineString", "Polygon"):
        return [np.array(c) for c in coords]
    return [np.array(ring) for polygon in coords for ring in polygon]


def _geometries(feature):
    out = [feature["geometry"]] if feature.get("geometry") is not None else []
    if "nucleusGeometry" in feature:
        out.append(feature["nucleusGeometry"])
    return out


def _round_trip_error(original, back) -> float:
    """The largest distance from an original vertex to its closest returned vertex (densified
    vertices are extra), checking that every sequence keeps its place."""
    worst = 0.0
    for f0, f1 in zip(original["features"], back["features"]):
        for g0, g1 in zip(_geometries(f0), _geometries(f1)):
            assert g0["type"] == g1["type"]
            s0, s1 = _sequences(g0), _sequences(g1)
            assert len(s0) == len(s1)
            for a, b in zip(s0, s1):
                d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2).min(axis=1)
                worst = max(worst, float(d.max()))
    return worst


def _without_geometry(feature):
    return {k: v for k, v in feature.items() if k not in ("geometry", "nucleusGeometry")}


def test_forward_then_backward_returns_within_half_a_pixel_keeping_every_property():
    result = nonrigid_result()
    data = qupath_collection()
    before = copy.deepcopy(data)
    forward, report = transform_geojson(data, result)
    assert data == before  # the input is never modified
    assert report.features == 6 and not report.invalid and report.outside == 0
    back, report_back = transform_geojson(forward, result, inverse=True)
    assert not report_back.invalid
    error = _round_trip_error(data, back)
    print(f"round-trip error (max, px): {error:.4f}")
    assert error < 0.5
    for f0, f1, f2 in zip(data["features"], forward["features"], back["features"]):
        assert _without_geometry(f1) == _without_geometry(f0) == _without_geometry(f2)  # ids, properties, members
    # the forward map is the result's own map_source_points, and it moved things
    corner = forward["features"][4]["geometry"]["coordinates"]
    expected = result.map_source_points([[77.5, 62.0]])[0]
    np.testing.assert_allclose(corner, [expected[1], expected[0]], atol=1e-3)
    assert np.hypot(corner[0] - 62.0, corner[1] - 77.5) > 5
    # rings stay closed, holes stay holes (inside the exterior), orientation kept
    from shapely.geometry import shape

    for feature in forward["features"][:3]:
        for g in _geometries(feature):
            for ring in _sequences(g):
                assert np.array_equal(ring[0], ring[-1])
            assert shape(g).is_valid
    tumour = shape(forward["features"][0]["geometry"])
    assert len(tumour.interiors) == 1 and tumour.exterior.is_ccw == shape(data["features"][0]["geometry"]).exterior.is_ccw
    # the line was densified (a straight edge follows the deformation)
    assert len(forward["features"][5]["geometry"]["coordinates"]) > 20


def test_densify_keeps_the_original_vertices_and_closes_rings():
    ring = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 0.0]])
    dense, kept = densify(ring, 2.0, closed=True)
    np.testing.assert_array_equal(dense[kept], ring)
    assert np.array_equal(dense[0], dense[-1]) and np.hypot(*np.diff(dense, axis=0).T).max() <= 2.0 + 1e-9


def test_micrometre_and_pixel_inputs_give_the_same_result():
    result = nonrigid_result()
    data = qupath_collection()
    source_um, target_um = (0.5, 0.25), (0.4, 0.4)

    def scaled(geojson, size):
        out = copy.deepcopy(geojson)
        for feature in out["features"]:
            for g in _geometries(feature):
                g["coordinates"] = json.loads(json.dumps(g["coordinates"]), parse_float=float)
                g["coordinates"] = _scale_coords(g["coordinates"], size)
        return out

    in_px, _ = transform_geojson(data, result)
    in_um, _ = transform_geojson(scaled(data, source_um), result, pixel_size=source_um, target_pixel_size=target_um)
    assert _round_trip_error(scaled(in_px, target_um), in_um) < 1e-3
    back_um, _ = transform_geojson(in_um, result, inverse=True, pixel_size=source_um, target_pixel_size=target_um)
    assert _round_trip_error(scaled(data, source_um), back_um) < 0.5 * max(source_um)
    with pytest.raises(HistRegInputError, match="pixel size"):
        transform_geojson(data, result, units="um")


def _scale_coords(coords, size):
    if isinstance(coords[0], (int, float)):
        return [coords[0] * size[1], coords[1] * size[0]]
    return [_scale_coords(c, size) for c in coords]


def test_a_list_of_features_and_a_single_feature_keep_their_shape():
    result = nonrigid_result()
    features = qupath_collection()["features"]
    out, _ = transform_geojson(features, result)
    assert isinstance(out, list) and len(out) == len(features)
    features[0]["bbox"] = [150.0, 120.0, 450.0, 360.0]  # a stale bbox is recomputed
    out, _ = transform_geojson(features, result)
    xy = np.array(out[0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(out[0]["bbox"], [*xy.min(axis=0), *xy.max(axis=0)], atol=1e-3)
    out, _ = transform_geojson(features[2], result)
    assert out["type"] == "Feature" and out["nucleusGeometry"]["type"] == "Polygon"
    assert out["nucleusGeometry"]["coordinates"] != features[2]["nucleusGeometry"]["coordinates"]


def test_a_self_intersection_after_mapping_is_reported_naming_the_feature():
    # a fold: a backward field that mirrors the middle columns makes a wide polygon cross itself
    shape = (64, 64)
    frame = Frame(shape, shape, (1.0, 1.0), (0.0, 0.0))
    field = np.zeros((2,) + shape, np.float32)
    cols = np.arange(shape[1], dtype=np.float32)
    field[1] += np.where((cols > 20) & (cols < 44), 2 * (32 - cols), 0)[None, :]
    result = RegistrationResult(field, frame, frame)
    data = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "zigzag", "properties": {"name": "fold"},
        "geometry": {"type": "Polygon", "coordinates": [[[5, 10], [60, 10], [60, 20], [30, 40], [5, 20], [5, 10]]]},
    }]}
    _, report = transform_geojson(data, result, inverse=True)
    assert report.invalid and "fold" in report.messages()[0] and "feature 0" in report.messages()[0]


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda d: d.update(crs={"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}), "CRS84"),
        (lambda d: d["features"][1].update(crs={"type": "name", "properties": {"name": "EPSG:4326"}}),
         "feature 1 .*EPSG:4326"),
        (lambda d: d["features"][0]["geometry"].update(coordinates=[[[1, 2], [3, 4], [1, 2]]]),
         r"feature 0 \(id '6a1f.*name 'Tumour core'\).*3 positions"),
        (lambda d: d["features"][0]["geometry"].update(coordinates=_square(1, 2, 30, 40)),
         "feature 0 .*nested wrongly|feature 0 .*position"),
        (lambda d: d["features"][4]["geometry"].update(coordinates=[42.0, "x"]), "feature 4 .*Landmark A.*non-numeric"),
        (lambda d: d["features"][5]["geometry"].update(coordinates=[[1.0, float("nan")], [2.0, 3.0]]),
         "feature 5 .*Margin.*NaN"),
        (lambda d: d["features"][2]["nucleusGeometry"].update(coordinates=[[[0, 0], [1, 0], [1, 1], [0, 1]]]),
         "feature 2 .*nucleusGeometry.*not closed"),
        (lambda d: d["features"][3].update(geometry={"type": "Circle", "coordinates": [1, 2]}),
         "feature 3 .*Seeds.*unknown geometry type 'Circle'"),
    ],
)
def test_a_wrong_crs_or_malformed_geometry_is_refused_naming_the_feature(tmp_path, mutate, problem):
    data = qupath_collection()
    mutate(data)
    with pytest.raises(HistRegInputError, match=problem):
        validate_geojson(data)
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(data))
    with pytest.raises(HistRegInputError, match="bad.geojson: "):
        read_geojson(path)


def test_the_command_line_both_ways_and_its_errors(tmp_path, capsys):
    result = nonrigid_result()
    transform = result.save(tmp_path / "transform.json")
    data = qupath_collection()
    source = tmp_path / "source.geojson"
    source.write_text(json.dumps(data))
    out = tmp_path / "in_target.geojson"
    assert histreg(["transform-annotations", str(source), str(transform), "-o", str(out)]) == 0
    assert "mapped 6 features" in capsys.readouterr().out
    back = tmp_path / "back.geojson"
    assert histreg(["transform-annotations", str(out), str(transform), "-o", str(back), "--inverse"]) == 0
    assert _round_trip_error(data, json.loads(back.read_text())) < 0.5
    # micrometres with the pixel sizes read from slides' metadata
    tifffile = pytest.importorskip("tifffile")
    slide = tmp_path / "source.ome.tif"
    tifffile.imwrite(slide, np.zeros((8, 8), np.uint8), ome=True, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    um = tmp_path / "um.geojson"
    um.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {**f, "geometry": {**f["geometry"], "coordinates": _scale_coords(f["geometry"]["coordinates"], (0.5, 0.5))}}
        for f in data["features"][3:]
    ]}))
    out_um = tmp_path / "um_out.geojson"
    assert histreg(["transform-annotations", str(um), str(transform), "-o", str(out_um), "--pixel-size-from", str(slide)]) == 0
    px = json.loads(out.read_text())["features"][4]["geometry"]["coordinates"]
    np.testing.assert_allclose(json.loads(out_um.read_text())["features"][1]["geometry"]["coordinates"],
                               np.array(px) * 0.5, atol=1e-3)
    capsys.readouterr()
    # exit code 2, one line naming the file: refusing the input as output, a malformed file, no overwrite
    assert histreg(["transform-annotations", str(source), str(transform), "-o", str(source)]) == 2
    assert capsys.readouterr().err.startswith("histreg: error: ")
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x1", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]}))
    assert histreg(["transform-annotations", str(bad), str(transform), "-o", str(tmp_path / "o.geojson")]) == 2
    err = capsys.readouterr().err
    assert "bad.geojson" in err and "feature 0 (id 'x1')" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.geojson").exists()
    assert histreg(["transform-annotations", str(source), str(transform), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert histreg(["transform-annotations", str(source), str(transform), "-o", str(out), "--overwrite"]) == 0
    assert histreg(["transform-annotations", str(source), str(transform), "-o", str(tmp_path / "x.geojson"),
                    "--pixel-size-from", str(tmp_path / "transform.mha")]) == 2
    assert "no pixel size" in capsys.readouterr().err


def test_transform_geojson_file_refuses_to_overwrite_the_transform(tmp_path):
    transform = nonrigid_result().save(tmp_path / "t.json")
    source = tmp_path / "a.geojson"
    source.write_text(json.dumps(qupath_collection()))
    with pytest.raises(HistRegInputError):
        transform_geojson_file(source, transform, transform)


# --------------------------------------------------------------------------- pixel sizes
def test_pixel_size_from_ome_xml_tiff_resolution_and_ome_zarr(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    image = np.zeros((16, 16), np.uint8)
    ome = tmp_path / "a.ome.tif"
    tifffile.imwrite(ome, image, ome=True, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5,
                                                     "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    assert read_pixel_size(ome) == pytest.approx((0.5, 0.25))
    nm = tmp_path / "nm.ome.tif"
    tifffile.imwrite(nm, image, ome=True, metadata={"PhysicalSizeX": 250, "PhysicalSizeY": 250,
                                                    "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"})
    assert read_pixel_size(nm) == pytest.approx((0.25, 0.25))
    cm = tmp_path / "cm.tif"  # 40000 pixels per cm = 0.25 µm
    tifffile.imwrite(cm, image, resolution=(40000, 20000), resolutionunit="CENTIMETER")
    assert read_pixel_size(cm) == pytest.approx((0.5, 0.25))
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, image, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    assert read_pixel_size(inch) == pytest.approx((0.5, 0.5))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, image)
    assert read_pixel_size(plain) is None
    assert read_pixel_size(tmp_path / "nothing.png") is None

    store = tmp_path / "slide.zarr"
    store.mkdir()
    (store / ".zattrs").write_text(json.dumps({"multiscales": [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.46, 0.46]}]},
                     {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.92, 0.92]}]}],
    }]}))
    assert read_pixel_size(store) == pytest.approx((0.46, 0.46))
    v05 = tmp_path / "v05.zarr"
    v05.mkdir()
    (v05 / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "y", "type": "space", "unit": "millimeter"}, {"name": "x", "type": "space", "unit": "millimeter"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.0005, 0.00025]}]}],
        }]}}}))
    assert read_pixel_size(v05) == pytest.approx((0.5, 0.25))
