"""GeoJSON annotations (QuPath's export format) mapped through a registration, both ways.

Convention: GeoJSON positions are ``[x, y]`` = ``(column, row)`` with the origin at the top-left
corner of the image (QuPath), in pixels of the images the result was computed for (level 0 of
a whole-slide result) or, with a pixel size, in micrometres (``x_um = x_px * col_um``,
``y_um = y_px * row_um``). Inside, everything is ``(row, col)`` pixels
(:func:`napari_histreg.conventions.xy_to_rc`). Forward (``inverse=False``) maps source
annotations into the target frame with :meth:`RegistrationResult.map_source_points` (the
backward field inverted by fixed-point iteration); ``inverse=True`` maps target annotations into
the source frame with :meth:`RegistrationResult.map_target_points` (the backward field itself,
exact), never by negating displacements.

Every member of the file is kept (feature ``id``, ``properties`` with ``classification``,
``objectType``, ``measurements``, foreign members); only coordinates change (and ``bbox``
members, recomputed). QuPath cells carry a second geometry, ``nucleusGeometry`` (a member of
the feature, or of its ``properties`` in some exports): it is mapped too. Measurements are kept
as they are (areas are not re-measured in the new frame).

Long edges are densified before mapping (an edge longer than the field's grid spacing gets
points in between) so a straight edge follows the deformation; rings stay closed and keep their
orientation (a mirroring transform would otherwise reverse it); polygons that are not valid
after mapping (self-intersections) are reported, checked with shapely (a maintained geometry
engine, preferred to hand-written intersection tests).

Example::

    from napari_histreg import RegistrationResult
    from napari_histreg.annotations import read_geojson, transform_geojson, write_geojson

    result = RegistrationResult.load("transform.json")
    mapped, report = transform_geojson(read_geojson("source.geojson"), result)
    write_geojson("in_target.geojson", mapped)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .conventions import rc_to_xy, xy_to_rc
from .io import HistRegInputError, atomic_write_text

GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection")
#: feature members (and ``properties`` members) holding a second geometry (QuPath cell nuclei)
EXTRA_GEOMETRIES = ("nucleusGeometry",)
#: a ``crs`` naming one of these is geographic (longitude/latitude), not image pixels
_GEOGRAPHIC = ("4326", "CRS84", "CRS:84", "WGS84", "WGS 84", "4269", "4258", "CRS83", "CRS27")
#: per edge at most this many inserted points (a bound on the output size)
MAX_PIECES = 256
#: output coordinates are rounded to this many decimals (1e-4 px is far below any accuracy)
DECIMALS = 4


@dataclasses.dataclass
class AnnotationReport:
    """What :func:`transform_geojson` noticed: ``invalid`` lists the features (``index``,
    ``label`` naming it, ``member``: ``geometry`` or ``nucleusGeometry``, ``reason``) whose polygons are not valid after mapping although they
    were before; ``already_invalid`` those invalid in the input; ``features`` / ``points`` count
    what was mapped; ``outside`` the mapped positions that fall outside the output image (there
    the field is extrapolated from its border, and the two directions need not undo each
    other exactly)."""

    features: int = 0
    points: int = 0
    outside: int = 0
    invalid: list = dataclasses.field(default_factory=list)
    already_invalid: list = dataclasses.field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per invalid feature (what the CLI prints as warnings)."""
        out = []
        for item in self.invalid:
            member = "" if item["member"] == "geometry" else f" ({item['member']})"
            out.append(f"{item['label']}{member}: polygon not valid after mapping: {item['reason']}")
        if self.outside:
            out.append(f"{self.outside} of {self.points} positions fall outside the image they were mapped onto")
        return out


# --------------------------------------------------------------------------- reading
def read_geojson(path: str | os.PathLike) -> Any:
    """The parsed GeoJSON of ``path`` (FeatureCollection, Feature, a list of features or a bare
    geometry), validated: any problem raises :class:`HistRegInputError` naming the file and the
    feature (index and id / name)."""
    path = Path(path)
    if not path.is_file():
        raise HistRegInputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HistRegInputError(f"{path}: not valid JSON ({err})") from None
    try:
        validate_geojson(data)
    except HistRegInputError as err:
        raise HistRegInputError(f"{path}: {err}") from None
    return data


def write_geojson(path: str | os.PathLike, data: Any) -> Path:
    """Write GeoJSON atomically (compact, one feature per line for large files)."""
    return atomic_write_text(path, json.dumps(data, allow_nan=False) + "\n")


def is_geojson(data: Any) -> bool:
    """Whether parsed JSON looks like GeoJSON (a FeatureCollection, a Feature, a geometry or a
    list of features), without validating it."""
    if isinstance(data, list):
        return bool(data) and all(isinstance(f, dict) and f.get("type") == "Feature" for f in data)
    return isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature") + GEOMETRY_TYPES


def features_of(data: Any) -> list:
    """The features of parsed GeoJSON (a bare geometry: none)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return data.get("features") or []
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    return []


def feature_label(feature: Any, index: int) -> str:
    """``feature 3 (id '...', name '...')``: how every message names a feature."""
    parts = []
    if isinstance(feature, dict):
        if feature.get("id") is not None:
            parts.append(f"id {feature['id']!r}")
        props = feature.get("properties")
        if isinstance(props, dict):
            if props.get("name") is not None:
                parts.append(f"name {props['name']!r}")
            cls = props.get("classification")
            cls_name = cls.get("name") if isinstance(cls, dict) else cls
            if cls_name is not None and not parts:
                parts.append(f"classification {cls_name!r}")
    return f"feature {index}" + (f" ({', '.join(parts)})" if parts else "")


def _check_crs(crs: Any, where: str) -> None:
    if crs is None:
        return
    name = crs
    if isinstance(crs, dict):
        props = crs.get("properties")
        name = (props.get("name") or props.get("href")) if isinstance(props, dict) else None
        name = name or json.dumps(crs)
    text = str(name)
    if any(marker.lower() in text.lower() for marker in _GEOGRAPHIC):
        raise HistRegInputError(
            f"{where}declares the geographic CRS {text!r} (longitude/latitude); histology annotations must be in image "
            "pixels (QuPath's GeoJSON export, no 'crs') or micrometres (--units um)"
        )
    if "epsg" in text.lower() or "urn:ogc" in text.lower():
        raise HistRegInputError(
            f"{where}declares the map CRS {text!r}; histology annotations must be in image pixels (no 'crs') or "
            "micrometres (--units um)"
        )


def validate_geojson(data: Any) -> None:
    """Raise :class:`HistRegInputError` (naming the feature) for anything this module cannot
    map: a geographic or map ``crs``, a feature that is not one, malformed geometry (wrong
    nesting, a ring of fewer than 4 positions or not closed, a line of fewer than 2, a
    non-numeric or NaN coordinate)."""
    features = _check_top(data)
    if features is None:
        _parse_geometry(data, "the geometry")
        return
    for index, feature in enumerate(features):
        _parse_feature(feature, index)


def _check_top(data: Any) -> list | None:
    """The features of GeoJSON whose top level (type, ``crs``) is valid; None for a bare geometry."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        _check_crs(data.get("crs"), "the feature collection ")
        features = data.get("features")
        if not isinstance(features, list):
            raise HistRegInputError("FeatureCollection without a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in GEOMETRY_TYPES:
        _check_crs(data.get("crs"), "the geometry ")
        return None
    elif isinstance(data, list):
        features = data
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise HistRegInputError(
            f"not GeoJSON (a FeatureCollection, a Feature or a list of features), found {kind!r}"
        )
    return features


def _parse_feature(feature: Any, index: int) -> dict:
    """``{member path: parsed geometry}`` of one feature (validated)."""
    label = feature_label(feature, index)
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        kind = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
        raise HistRegInputError(f"{label}: not a GeoJSON Feature (type {kind!r})")
    _check_crs(feature.get("crs"), f"{label} ")
    if "geometry" not in feature:
        raise HistRegInputError(f"{label}: has no 'geometry' member")
    props = feature.get("properties")
    if props is not None and not isinstance(props, dict):
        raise HistRegInputError(f"{label}: 'properties' must be an object or null, not {type(props).__name__}")
    parsed = {}
    for member, geometry in geometry_members(feature):
        where = label if member == "geometry" else f"{label} ({member})"
        parsed[member] = None if geometry is None else _parse_geometry(geometry, where)
    return parsed


def geometry_members(feature: dict):
    """``(member path, geometry)`` of every geometry a feature holds: ``geometry`` first, then
    the :data:`EXTRA_GEOMETRIES` of the feature (``nucleusGeometry``) and of its ``properties``
    (``properties.nucleusGeometry``); a member without a geometry is left out, ``geometry`` never."""
    yield "geometry", feature.get("geometry")
    for key in EXTRA_GEOMETRIES:
        if feature.get(key) is not None:
            yield key, feature[key]
        props = feature.get("properties")
        if isinstance(props, dict) and props.get(key) is not None:
            yield f"properties.{key}", props[key]


# A parsed geometry: {"type": ..., "parts": nested lists whose leaves are _Seq}.
@dataclasses.dataclass
class _Seq:
    xy: np.ndarray  # (n, dims) float64, positions as in the file
    kind: str  # "point" (one position), "points", "line", "ring"
    before: np.ndarray | None = None  # the positions as read, once xy holds the mapped ones


def _position_array(value, where: str, what: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise HistRegInputError(f"{where}: {what} must be a non-empty list of positions [x, y], got {_short(value)}")
    try:  # the common case in one step: a regular array of numbers
        fast = np.asarray(value)
    except ValueError:  # ragged
        fast = None
    if fast is not None and fast.dtype.kind in "iuf" and fast.ndim == 2 and fast.shape[1] in (2, 3):
        fast = fast.astype(np.float64)
        if np.isfinite(fast).all():
            return fast
    dims = None
    for position in value:
        if not isinstance(position, list) or not 2 <= len(position) <= 3:
            raise HistRegInputError(f"{where}: {what}: a position must be [x, y] (or [x, y, z]), got {_short(position)}")
        for number in position:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise HistRegInputError(f"{where}: {what}: non-numeric coordinate {_short(number)} in {_short(position)}")
        dims = len(position) if dims is None else dims
    xy = np.array([p[:2] + [p[2] if len(p) > 2 else math.nan] for p in value], dtype=np.float64)
    if not np.isfinite(xy[:, :2]).all():
        raise HistRegInputError(f"{where}: {what}: NaN or infinite coordinate")
    has_z = np.isfinite(xy[:, 2])
    if has_z.all():
        return xy
    if has_z.any():
        raise HistRegInputError(f"{where}: {what}: positions mix [x, y] and [x, y, z]")
    return xy[:, :2]


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_geometry(geometry: Any, where: str) -> dict:
    if not isinstance(geometry, dict):
        raise HistRegInputError(f"{where}: geometry must be an object, got {_short(geometry)}")
    kind = geometry.get("type")
    if kind not in GEOMETRY_TYPES:
        raise HistRegInputError(f"{where}: unknown geometry type {kind!r} (GeoJSON has {', '.join(GEOMETRY_TYPES)})")
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise HistRegInputError(f"{where}: GeometryCollection without a 'geometries' list")
        return {"type": kind, "parts": [_parse_geometry(g, f"{where} member {k}") for k, g in enumerate(members)]}
    coords = geometry.get("coordinates")
    if coords is None:
        raise HistRegInputError(f"{where}: {kind} without 'coordinates'")

    def nested(value, depth: int, what: str) -> list:
        if not isinstance(value, list):
            raise HistRegInputError(f"{where}: {kind} coordinates nested wrongly: {what} must be a list, got {_short(value)}")
        if depth == 0:
            return value
        return [nested(v, depth - 1, what) for v in value]

    def line(value, k=None) -> _Seq:
        what = "line" if k is None else f"line {k}"
        xy = _position_array(value, where, what)
        if len(xy) < 2:
            raise HistRegInputError(f"{where}: {kind} {what} has {len(xy)} position(s); a line needs at least 2")
        return _Seq(xy, "line")

    def ring(value, polygon=None, k=0) -> _Seq:
        what = ("exterior ring" if k == 0 else f"hole {k}") + ("" if polygon is None else f" of polygon {polygon}")
        xy = _position_array(value, where, what)
        if len(xy) < 4:
            raise HistRegInputError(f"{where}: {kind} {what} has {len(xy)} positions; a ring needs at least 4 (closed)")
        if not np.array_equal(xy[0], xy[-1]):
            raise HistRegInputError(f"{where}: {kind} {what} is not closed (its first and last positions differ)")
        return _Seq(xy, "ring")

    def polygon(value, p=None) -> list:
        rings = nested(value, 0, "a polygon's list of rings")
        if not rings:
            raise HistRegInputError(f"{where}: {kind} {'' if p is None else f'polygon {p} '}has no rings")
        return [ring(r, p, k) for k, r in enumerate(rings)]

    if kind == "Point":
        if not isinstance(coords, list) or (coords and isinstance(coords[0], list)):
            raise HistRegInputError(f"{where}: Point coordinates must be one position [x, y], got {_short(coords)}")
        return {"type": kind, "parts": _Seq(_position_array([coords], where, "point"), "point")}
    if kind == "MultiPoint":
        return {"type": kind, "parts": _Seq(_position_array(coords, where, "points"), "points")}
    if kind == "LineString":
        return {"type": kind, "parts": line(coords)}
    if kind == "MultiLineString":
        return {"type": kind, "parts": [line(v, k) for k, v in enumerate(nested(coords, 0, "the list of lines"))]}
    if kind == "Polygon":
        return {"type": kind, "parts": polygon(coords)}
    return {"type": kind, "parts": [polygon(v, k) for k, v in enumerate(nested(coords, 0, "the list of polygons"))]}


# --------------------------------------------------------------------------- units
def _pair(value, name: str) -> np.ndarray | None:
    """A pixel size as ``(row_um, col_um)``: one number for both axes, or two."""
    if value is None:
        return None
    array = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    if array.size == 1:
        array = np.repeat(array, 2)
    if array.size != 2 or not np.isfinite(array).all() or (array <= 0).any():
        raise HistRegInputError(f"{name}: a pixel size must be one or two positive numbers (µm per pixel), got {value!r}")
    return array


# --------------------------------------------------------------------------- mapping
def _walk(parts):
    """Every _Seq of a parsed geometry's parts, in order."""
    if isinstance(parts, _Seq):
        yield parts
    elif isinstance(parts, dict):
        yield from _walk(parts["parts"])
    else:
        for p in parts:
            yield from _walk(p)


def densify(xy: np.ndarray, max_edge: float, closed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Points inserted along every edge longer than ``max_edge`` (equally spaced, at most
    :data:`MAX_PIECES` pieces per edge); returns the new positions and the indices of the
    original ones in it. ``xy`` is ``(n, 2 or 3)`` in pixels (z, when there, is interpolated).
    A closed ring keeps its closing position."""
    if max_edge is None or max_edge <= 0 or len(xy) < 2:
        return xy, np.arange(len(xy))
    lengths = np.hypot(*(xy[1:, :2] - xy[:-1, :2]).T)
    pieces = np.clip(np.ceil(lengths / max_edge), 1, MAX_PIECES).astype(int)
    if (pieces == 1).all():
        return xy, np.arange(len(xy))
    out = [xy[:1]]
    for p, q, n in zip(xy[:-1], xy[1:], pieces):
        s = (np.arange(1, n + 1) / n)[:, None]
        out.append(p + s * (q - p))
    dense = np.vstack(out)
    if closed:
        dense[-1] = dense[0]
    return dense, np.concatenate([[0], np.cumsum(pieces)])


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def default_max_edge(result, inverse: bool = False) -> float:
    """The densification length: the field's grid spacing in the pixels of the input frame (the
    field is bilinear between its grid points, so an edge shorter than that bends at most once)."""
    frame = result.target_frame if inverse else result.source_frame
    return float(1.0 / max(abs(frame.scale[0]), abs(frame.scale[1])))


def transform_geojson(
    data: Any,
    result,
    inverse: bool = False,
    pixel_size=None,
    target_pixel_size=None,
    max_edge_px: float | None | str = "auto",
    units: str | None = None,
) -> tuple[Any, AnnotationReport]:
    """Map parsed GeoJSON through a registration; returns ``(new GeoJSON, report)``. The input is
    never modified.

    ``inverse=False``: source annotations into the target frame
    (:meth:`~napari_histreg.result.RegistrationResult.map_source_points`); ``True``: target
    annotations into the source frame (``map_target_points``). Coordinates are ``[x, y]`` =
    ``(column, row)`` pixels of the images the result was computed for (level 0 for a
    whole-slide result); with ``pixel_size`` (the source slide's µm per pixel: one number, or
    ``(row_um, col_um)``) they are micrometres: divided by the input frame's pixel size, mapped,
    multiplied by the output frame's one. ``target_pixel_size`` is the target slide's (default:
    ``pixel_size``); forward reads with ``pixel_size`` and writes with ``target_pixel_size``,
    inverse the other way round. ``units="um"`` requires a pixel size; ``"px"`` ignores none given.

    ``max_edge_px``: edges longer than this (input pixels) are densified before mapping;
    ``"auto"`` is the field's grid spacing (:func:`default_max_edge`), ``None`` or 0 none.
    """
    _check_top(data)  # each feature is checked as it is parsed below
    source_um = _pair(pixel_size, "pixel size")
    target_um = _pair(target_pixel_size, "target pixel size")
    if units not in (None, "px", "um"):
        raise ValueError(f"units must be 'px' or 'um', not {units!r}")
    if units == "px":
        source_um = target_um = None
    else:
        if target_um is None:
            target_um = source_um
        if source_um is None:
            source_um = target_um
        if units == "um" and source_um is None:
            raise HistRegInputError("coordinates in micrometres need a pixel size (--pixel-size or --pixel-size-from)")
    in_um, out_um = (target_um, source_um) if inverse else (source_um, target_um)
    max_edge = default_max_edge(result, inverse) if max_edge_px == "auto" else max_edge_px

    out = _copy(data)
    report = AnnotationReport()
    # every geometry of the copy, parsed: (feature index, label, member path, container, key, parsed)
    entries = []
    if isinstance(out, dict) and out.get("type") in GEOMETRY_TYPES:
        entries.append((None, "the geometry", "geometry", None, None, _parse_geometry(out, "the geometry")))
    for index, feature in enumerate(features_of(out)):
        label = feature_label(feature, index)
        for member, parsed in _parse_feature(feature, index).items():
            if parsed is None:
                continue
            if member.startswith("properties."):
                container, key = feature["properties"], member.split(".", 1)[1]
            else:
                container, key = feature, member
            entries.append((index, label, member, container, key, parsed))
    report.features = len(features_of(out))

    # densify and collect every position (pixels, (row, col)) for one batched mapping
    seqs = []
    for *_, parsed in entries:
        for seq in _walk(parsed):
            xy = seq.xy.copy()
            if in_um is not None:
                xy[:, 0] /= in_um[1]
                xy[:, 1] /= in_um[0]
            if seq.kind in ("line", "ring"):
                xy, _ = densify(xy, max_edge, closed=seq.kind == "ring")
            seq.before = seq.xy
            seq.xy = xy
            seqs.append(seq)
    counts = [len(s.xy) for s in seqs]
    if counts:
        rc = xy_to_rc(np.vstack([s.xy[:, :2] for s in seqs]))
        mapped = result.map_target_points(rc) if inverse else result.map_source_points(rc)
        shape = np.asarray(result.source_shape if inverse else result.target_shape, dtype=np.float64)
        report.outside = int(((mapped < -0.5) | (mapped > shape - 0.5)).any(axis=1).sum())
        mapped_xy = rc_to_xy(mapped)
        if out_um is not None:
            mapped_xy = mapped_xy * np.array([out_um[1], out_um[0]])
        start = 0
        for seq, n in zip(seqs, counts):
            new = seq.xy.copy()
            new[:, :2] = mapped_xy[start : start + n]
            start += n
            if seq.kind == "ring":
                new[-1] = new[0]
                area_before = _signed_area(seq.before)
                if area_before != 0 and np.sign(_signed_area(new)) != np.sign(area_before):
                    new = new[::-1].copy()  # a mirroring transform: keep the ring's orientation
            seq.xy = new
        report.points = int(sum(counts))

    checked = []
    for index, label, member, container, key, parsed in entries:
        geometry = container[key] if container is not None else out
        _write_coordinates(geometry, parsed)
        checked.append((index, label, member, parsed))
    _check_validity(report, checked)
    _update_bboxes(out)
    return out, report


def _to_json(seq: _Seq):
    values = np.round(seq.xy, DECIMALS).tolist()
    return values[0] if seq.kind == "point" else values


def _write_coordinates(geometry: dict, parsed: dict) -> None:
    if parsed["type"] == "GeometryCollection":
        for member, sub in zip(geometry["geometries"], parsed["parts"]):
            _write_coordinates(member, sub)
        return

    def build(parts):
        return _to_json(parts) if isinstance(parts, _Seq) else [build(p) for p in parts]

    geometry["coordinates"] = build(parsed["parts"])


def _copy(value):
    """A deep copy, except a geometry's ``coordinates``: those are shared, only read, and then
    replaced (never changed in place) by the mapped ones, so the input stays as it was."""
    if isinstance(value, dict):
        geometry = value.get("type") in GEOMETRY_TYPES
        return {k: (v if geometry and k == "coordinates" else _copy(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return copy.copy(value)


def _polygons(parsed: dict, which: str) -> list:
    """The (Multi)Polygons of a parsed geometry as shapely geometries, from the positions
    ``before`` or ``after`` mapping (GeometryCollection members included)."""
    import shapely

    def ring(seq):
        xy = seq.before if which == "before" and seq.before is not None else seq.xy
        return xy[:, :2]

    def polygon(rings):
        return shapely.Polygon(ring(rings[0]), [ring(r) for r in rings[1:]])

    if parsed["type"] == "GeometryCollection":
        return [g for sub in parsed["parts"] for g in _polygons(sub, which)]
    if parsed["type"] == "Polygon":
        return [polygon(parsed["parts"])]
    if parsed["type"] == "MultiPolygon":
        return [shapely.MultiPolygon([polygon(p) for p in parsed["parts"]])]
    return []


def _check_validity(report: AnnotationReport, checked: list) -> None:
    # shapely (GEOS) decides validity, vectorised over every polygon: self-intersections, holes
    # outside or crossing their shell. A maintained geometry engine rather than our own tests.
    import shapely

    owners, before, after = [], [], []
    for index, label, member, parsed in checked:
        b, a = _polygons(parsed, "before"), _polygons(parsed, "after")
        owners += [(index, label, member)] * len(a)
        before += b
        after += a
    if not after:
        return
    was_valid = shapely.is_valid(np.array(before, dtype=object))
    now_valid = shapely.is_valid(np.array(after, dtype=object))
    seen = set()
    for (index, label, member), was, now, geometry in zip(owners, was_valid, now_valid, after):
        if now or (index, member) in seen:
            continue
        seen.add((index, member))
        item = {"index": index, "label": label, "member": member, "reason": shapely.is_valid_reason(geometry)}
        (report.invalid if was else report.already_invalid).append(item)


def _bbox_of(geometry) -> list | None:
    points = []

    def collect(value):
        if isinstance(value, list) and value and isinstance(value[0], (int, float)):
            points.append(value[:2])
        elif isinstance(value, list):
            for v in value:
                collect(v)

    if not isinstance(geometry, dict):
        return None
    if geometry.get("type") == "GeometryCollection":
        for g in geometry.get("geometries") or []:
            collect(g.get("coordinates") if isinstance(g, dict) else None)
    else:
        collect(geometry.get("coordinates"))
    if not points:
        return None
    array = np.asarray(points, dtype=np.float64)
    return np.round(np.concatenate([array.min(axis=0), array.max(axis=0)]), DECIMALS).tolist()


def _update_bboxes(out) -> None:
    """Recompute the ``bbox`` members that the input had (they would be stale after mapping)."""
    boxes = []
    for feature in features_of(out):
        geometry = feature.get("geometry")
        if not ("bbox" in feature or "bbox" in out or (isinstance(geometry, dict) and "bbox" in geometry)):
            continue
        box = _bbox_of(geometry)
        if isinstance(geometry, dict) and "bbox" in geometry and box is not None:
            geometry["bbox"] = box
        if "bbox" in feature and box is not None:
            feature["bbox"] = box
        if box is not None:
            boxes.append(box)
    if isinstance(out, dict) and out.get("type") in GEOMETRY_TYPES and "bbox" in out:
        out["bbox"] = _bbox_of(out)
    if isinstance(out, dict) and out.get("type") == "FeatureCollection" and "bbox" in out and boxes:
        array = np.asarray(boxes)
        out["bbox"] = array[:, :2].min(axis=0).tolist() + array[:, 2:].max(axis=0).tolist()


def transform_geojson_file(
    path, transform, output, *, inverse: bool = False, pixel_size=None, target_pixel_size=None,
    units: str | None = None, overwrite: bool = False, max_edge_px="auto",
) -> tuple[Path, AnnotationReport]:
    """Read ``path``, map it through ``transform`` (a :class:`RegistrationResult` or the path of a
    saved one) and write ``output`` atomically (never over an input; over an earlier output only
    with ``overwrite``). Returns the written path and the report."""
    from .outputs import check_output_file
    from .result import RegistrationResult

    inputs = [path] + ([transform] if isinstance(transform, (str, os.PathLike)) else [])
    if isinstance(transform, (str, os.PathLike)):
        json_path = Path(transform).with_suffix(".json")
        inputs += [json_path, json_path.with_suffix(".mha")]
    check_output_file(output, inputs=inputs, overwrite=overwrite, is_ours=_is_geojson_file, what="GeoJSON")
    data = read_geojson(path)
    result = RegistrationResult.load(transform) if isinstance(transform, (str, os.PathLike)) else transform
    try:
        mapped, report = transform_geojson(data, result, inverse=inverse, pixel_size=pixel_size,
                                           target_pixel_size=target_pixel_size, units=units, max_edge_px=max_edge_px)
    except HistRegInputError as err:
        raise HistRegInputError(f"{path}: {err}") from None
    return write_geojson(output, mapped), report


def _is_geojson_file(path) -> bool:
    """An existing GeoJSON file may be replaced with ``overwrite`` (an earlier output)."""
    try:
        return is_geojson(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
