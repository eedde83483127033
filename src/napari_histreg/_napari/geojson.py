"""GeoJSON annotations (QuPath) <-> napari Shapes and Points layers, without loss.

napari shapes have no holes and no multi-part shapes, so a feature becomes one shape per ring
(or line) and one point per position, and the layer's ``features`` table says where each came
from: ``feature`` (its index in the file), ``member`` (``geometry``, or ``nucleusGeometry`` for
a QuPath cell's nucleus), ``geometry`` (the GeoJSON type), ``part`` (the polygon / line / point
of a Multi* geometry), ``ring`` (0 = exterior, 1.. = holes; -1 for lines and points), the
``classification`` and ``name`` to look at, and ``geojson``: the whole feature without its
geometries as JSON text (id, properties, measurements, foreign members), what the writer puts
back. Shapes drawn by hand (``feature`` -1) are written as one new feature each.

Coordinates: GeoJSON ``[x, y]`` = napari data ``(row, col)`` swapped (pixels, origin top-left).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..annotations import (
    DECIMALS,
    EXTRA_GEOMETRIES,
    feature_label,
    features_of,
    geometry_members,
    is_geojson,
    validate_geojson,
    write_geojson,
)
from ..io import HistRegInputError
from .readers import _paths, reader_if_all
from .transform_layers import _densify_shape

COLUMNS = ("feature", "member", "geometry", "part", "ring", "classification", "name", "object_type", "geojson")
DEFAULTS = {"feature": -1, "member": "geometry", "geometry": "", "part": 0, "ring": -1, "classification": "",
            "name": "", "object_type": "", "geojson": ""}
DEFAULT_COLOUR = "yellow"


# --------------------------------------------------------------------------- reader
def is_geojson_path(path) -> bool:
    """A ``.geojson`` file, or a ``.json`` file holding GeoJSON (not a napari-histreg transform)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".geojson", ".json"):
        return False
    if suffix == ".geojson":
        return True
    try:
        with open(path, encoding="utf-8") as handle:
            return is_geojson(json.load(handle))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def get_geojson_reader(path):
    """npe2 reader hook for GeoJSON annotations (QuPath export)."""
    return reader_if_all(path, is_geojson_path, read_geojson_layers)


def read_geojson_layers(path) -> list[tuple]:
    """A Shapes layer (polygons, lines) and a Points layer (points), where the file has them."""
    from ..annotations import read_geojson

    layers = []
    for p in _paths(path) or []:
        layers += geojson_to_layers(read_geojson(p), name=p.stem.removesuffix(".geojson"), source=str(p))
    return layers


def _colour(props) -> str | list:
    cls = props.get("classification") if isinstance(props, dict) else None
    colour = cls.get("color") if isinstance(cls, dict) else None
    if isinstance(colour, list) and len(colour) == 3 and all(isinstance(c, (int, float)) for c in colour):
        return [float(c) / 255.0 for c in colour] + [1.0]
    if isinstance(colour, int):  # QuPath's packed (A)RGB integer in old exports
        return [((colour >> 16) & 255) / 255.0, ((colour >> 8) & 255) / 255.0, (colour & 255) / 255.0, 1.0]
    return DEFAULT_COLOUR


def _text(value) -> str:
    if isinstance(value, dict):
        value = value.get("name")
    return "" if value is None else str(value)


def geojson_to_layers(data, name: str = "annotations", source: str | None = None) -> list[tuple]:
    """Parsed GeoJSON -> ``[Shapes LayerDataTuple][, Points LayerDataTuple]`` (see the module
    docstring for the ``features`` columns). Raises :class:`HistRegInputError` naming the feature
    for what cannot be shown (a GeometryCollection)."""
    validate_geojson(data)
    if isinstance(data, dict) and data.get("type") not in ("FeatureCollection", "Feature"):
        data = [{"type": "Feature", "geometry": data, "properties": {}}]
    shapes, shape_types, shape_rows, shape_colours = [], [], [], []
    points, point_rows, point_colours = [], [], []
    empty = {}
    for index, feature in enumerate(features_of(data)):
        props = feature.get("properties") or {}
        rest = {k: v for k, v in feature.items() if k not in ("geometry",) + EXTRA_GEOMETRIES}
        if isinstance(rest.get("properties"), dict):
            rest["properties"] = {k: v for k, v in rest["properties"].items() if k not in EXTRA_GEOMETRIES}
        base = {"feature": index, "classification": _text(props.get("classification")), "name": _text(props.get("name")),
                "object_type": _text(props.get("objectType")), "geojson": json.dumps(rest)}
        colour = _colour(props)
        if feature.get("geometry") is None:
            empty[index] = feature  # no geometry: kept in the layer's metadata
        for member, geometry in geometry_members(feature):
            if geometry is None:
                continue
            kind = geometry["type"]
            row = dict(base, member=member, geometry=kind)
            coords = geometry.get("coordinates")
            if kind == "GeometryCollection":
                raise HistRegInputError(
                    f"{feature_label(feature, index)}: a GeometryCollection cannot be shown as napari layers; map the file "
                    "with `histreg transform-annotations` instead"
                )
            if kind in ("Point", "MultiPoint"):
                for part, position in enumerate([coords] if kind == "Point" else coords):
                    points.append([position[1], position[0]])
                    point_rows.append(dict(row, part=part, ring=-1))
                    point_colours.append(colour)
                continue
            if kind in ("LineString", "MultiLineString"):
                for part, line in enumerate([coords] if kind == "LineString" else coords):
                    shapes.append(np.asarray(line, dtype=np.float64)[:, 1::-1])
                    shape_types.append("path")
                    shape_rows.append(dict(row, part=part, ring=-1))
                    shape_colours.append(colour)
                continue
            for part, polygon in enumerate([coords] if kind == "Polygon" else coords):
                for ring, positions in enumerate(polygon):
                    shapes.append(np.asarray(positions[:-1], dtype=np.float64)[:, 1::-1])  # open ring, (row, col)
                    shape_types.append("polygon")
                    shape_rows.append(dict(row, part=part, ring=ring))
                    shape_colours.append(colour)
    top = {}
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        top = {k: v for k, v in data.items() if k != "features"}
    metadata = {"geojson": {"collection": top, "empty_features": {str(k): v for k, v in empty.items()}, "source": source}}
    layers = []
    if shapes or not points:
        kw = {"name": name, "shape_type": shape_types, "features": _table(shape_rows), "feature_defaults": DEFAULTS,
              "edge_color": shape_colours or DEFAULT_COLOUR, "face_color": "transparent", "edge_width": 2,
              "metadata": metadata}
        layers.append((shapes, kw, "shapes"))
    if points:
        kw = {"name": f"{name} points" if shapes else name, "features": _table(point_rows), "feature_defaults": DEFAULTS,
              "face_color": point_colours, "border_color": "black", "size": 10, "metadata": metadata}
        layers.append((np.asarray(points, dtype=np.float64), kw, "points"))
    return layers


def _table(rows):
    import pandas as pd

    return pd.DataFrame({c: [r.get(c, DEFAULTS[c]) for r in rows] for c in COLUMNS})


# --------------------------------------------------------------------------- writer
def write_geojson_layers(path: str, layer_data: list) -> list[str]:
    """npe2 writer: Shapes and Points layers -> one GeoJSON FeatureCollection (QuPath reads it).
    Features read from GeoJSON are rebuilt (holes, multi-part geometries, nuclei, every
    property); shapes and points without a source feature become one feature each."""
    path = Path(path)
    if path.suffix.lower() not in (".geojson", ".json"):
        path = path.with_suffix(".geojson")
    write_geojson(path, layers_to_geojson(layer_data))
    return [str(path)]


def _column(features, name, n):
    if features is None:
        return [DEFAULTS[name]] * n
    columns = features.keys() if isinstance(features, dict) else getattr(features, "columns", ())
    if name not in columns:
        return [DEFAULTS[name]] * n
    values = list(features[name])
    return values if len(values) == n else [DEFAULTS[name]] * n


def _feature_index(value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        return -1
    return value


def layers_to_geojson(layer_data: list) -> dict:
    """``[(data, meta, layer_type), ...]`` (Shapes, Points) -> a GeoJSON FeatureCollection."""
    grouped: dict = {}  # (feature index, geojson text) -> {member: [(geometry type, part, ring, kind, xy)]}
    new_features = []
    collection: dict = {}
    empty: dict = {}
    for data, meta, kind in layer_data:
        meta = meta or {}
        info = (meta.get("metadata") or {}).get("geojson") or {}
        collection = collection or dict(info.get("collection") or {})
        empty.update(info.get("empty_features") or {})
        if kind == "shapes":
            items = [np.asarray(d, dtype=np.float64)[:, -2:] for d in data]
            types = list(meta.get("shape_type") or ["polygon"] * len(items))
        elif kind == "points":
            items = [p[None] for p in np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1] if len(data) else 2)[:, -2:]]
            types = ["point"] * len(items)
        else:
            continue
        n = len(items)
        features = meta.get("features")
        cols = {c: _column(features, c, n) for c in COLUMNS}
        for k, (rc, shape_type) in enumerate(zip(items, types)):
            xy = rc[:, ::-1]
            index, text = _feature_index(cols["feature"][k]), cols["geojson"][k]
            if index < 0 or not isinstance(text, str) or not text:
                new_features.append(_new_feature(xy, shape_type))
                continue
            key = (index, text)
            entry = (str(cols["geometry"][k]), int(cols["part"][k]), int(cols["ring"][k]), shape_type, xy)
            grouped.setdefault(key, {}).setdefault(str(cols["member"][k]), []).append(entry)
    out = []
    for (index, text), members in sorted(grouped.items(), key=lambda item: item[0][0]):
        feature = json.loads(text)
        feature["type"] = "Feature"
        for member, entries in members.items():
            geometry = _rebuild(entries)
            if member.startswith("properties."):
                feature.setdefault("properties", {})[member.split(".", 1)[1]] = geometry
            else:
                feature[member] = geometry
        order = ["type", "id", "geometry"]
        feature = {k: feature[k] for k in order if k in feature} | {k: v for k, v in feature.items() if k not in order}
        out.append((index, feature))
    for key, feature in empty.items():
        out.append((_feature_index(key), feature))
    out.sort(key=lambda item: item[0])
    result = {"type": "FeatureCollection"} | {k: v for k, v in collection.items() if k != "type"}
    result["features"] = [f for _, f in out] + new_features
    return result


def _closed(xy) -> list:
    xy = np.asarray(xy, dtype=np.float64)
    values = np.round(xy, DECIMALS).tolist()
    return values + [values[0]]


def _rebuild(entries) -> dict:
    kind = entries[0][0]
    entries = sorted(entries, key=lambda e: (e[1], e[2]))
    if kind == "Point":
        return {"type": kind, "coordinates": np.round(entries[0][4][0], DECIMALS).tolist()}
    if kind == "MultiPoint":
        return {"type": kind, "coordinates": [np.round(e[4][0], DECIMALS).tolist() for e in entries]}
    if kind == "LineString":
        return {"type": kind, "coordinates": np.round(entries[0][4], DECIMALS).tolist()}
    if kind == "MultiLineString":
        return {"type": kind, "coordinates": [np.round(e[4], DECIMALS).tolist() for e in entries]}
    polygons: dict = {}
    for _, part, ring, _, xy in entries:
        polygons.setdefault(part, []).append(_closed(xy))
    rings = [polygons[p] for p in sorted(polygons)]
    if kind == "Polygon":
        return {"type": kind, "coordinates": rings[0]}
    return {"type": "MultiPolygon", "coordinates": rings}


def _new_feature(xy, shape_type: str) -> dict:
    """A shape or point drawn in napari as a new QuPath annotation."""
    if shape_type == "point":
        geometry = {"type": "Point", "coordinates": np.round(xy[0], DECIMALS).tolist()}
    elif shape_type in ("path", "line"):
        geometry = {"type": "LineString", "coordinates": np.round(xy, DECIMALS).tolist()}
    else:
        if shape_type == "ellipse":
            xy = _densify_shape(xy[:, ::-1], "ellipse")[0][:, ::-1]
        geometry = {"type": "Polygon", "coordinates": [_closed(xy)]}
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation"}}
