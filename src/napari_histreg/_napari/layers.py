"""Layers <-> arrays, and registration results -> napari ``LayerDataTuple``s.

Nothing here imports Qt, so it works from a script or the napari console as well as from the
widgets. Coordinates: a layer's *data* coordinates of an image are its pixels ``(row, col)``;
the registration works in original source / target pixels, and every output layer is placed
with the target layer's world transform (scale and translate), so it overlays the target.

Console example::

    from napari_histreg import register
    from napari_histreg._napari.layers import add_layers, result_to_layers

    src, tgt = viewer.layers["source"], viewer.layers["target"]
    result = register(src.data, tgt.data)
    add_layers(viewer, result_to_layers(result, src, target_layer=tgt))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from ..result import background_value

LayerDataTuple = tuple  # (data, kwargs, layer_type)

#: longer side of the grid the displacement preview (vectors, magnitude, Jacobian) is computed on
PREVIEW_SIZE = 1024
#: default number of arrows along the longer side of the target: 32 covered the canvas
VECTOR_GRID = 20
#: arrows are drawn at most this share of the grid spacing long (their 90th percentile), so they
#: do not cross each other; the ``magnitude`` feature keeps the true length in pixels
ARROW_SPACING_SHARE = 0.8

#: Landmark colours. Registered (mapped source) landmarks are always magenta, like the warped
#: source; a landmark file opened in napari takes the first of the others not yet used by a
#: landmark layer of the viewer (the sample: target lime, source orange), so target, source
#: and registered points never share a colour.
REGISTERED_COLOUR = "magenta"
LANDMARK_PALETTE = ("lime", "orange", "cyan", "yellow", "deepskyblue", "white")


# --------------------------------------------------------------------------- layer snapshots
@dataclasses.dataclass
class LayerRef:
    """What the registration needs of a layer, captured on the GUI thread so that a worker
    thread never touches a live layer. ``data`` is the layer's data (not copied)."""

    name: str
    kind: str  # "image", "labels", "points", "shapes", ...
    data: Any
    scale: tuple[float, ...] = (1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0)
    rgb: bool = False
    multiscale: bool = False
    features: Any = None
    extra: dict = dataclasses.field(default_factory=dict)
    world_matrix: Any = None  # (D+1, D+1) data -> world, or None where scale/translate say it all

    @property
    def shape(self) -> tuple[int, ...]:
        data = self.data[0] if self.multiscale else self.data
        return tuple(data.shape)

    def to_world(self, coords) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, len(self.scale))
        if self.world_matrix is not None:
            m = np.asarray(self.world_matrix, dtype=np.float64)
            return coords @ m[:-1, :-1].T + m[:-1, -1]
        return coords * np.asarray(self.scale) + np.asarray(self.translate)

    def world_matrix_2d(self) -> np.ndarray:
        """3x3 data -> world matrix of the last two axes ``(row, col)``."""
        if self.world_matrix is not None:
            return np.asarray(self.world_matrix, dtype=np.float64)[-3:, -3:]
        out = np.eye(3)
        out[[0, 1], [0, 1]] = self.scale[-2:]
        out[:2, 2] = self.translate[-2:]
        return out

    def to_data(self, world) -> np.ndarray:
        world = np.asarray(world, dtype=np.float64).reshape(-1, len(self.scale))
        if self.world_matrix is not None:
            m = np.linalg.inv(np.asarray(self.world_matrix, dtype=np.float64))
            return world @ m[:-1, :-1].T + m[:-1, -1]
        return (world - np.asarray(self.translate)) / np.asarray(self.scale)


def snapshot(layer) -> LayerRef:
    """A :class:`LayerRef` of a napari layer (or pass a ``LayerRef`` through)."""
    if layer is None or isinstance(layer, LayerRef):
        return layer
    layer = unwrap(layer)
    kind = layer_kind(layer)
    extra: dict = {}
    if kind == "shapes":
        extra["shape_type"] = list(layer.shape_type)
        extra["edge_color"] = np.asarray(layer.edge_color).copy()
        extra["face_color"] = np.asarray(layer.face_color).copy()
        extra["edge_width"] = list(layer.edge_width)
    if kind == "points":
        extra["size"] = np.asarray(layer.size).copy()
    if kind in ("points", "shapes"):
        extra["metadata"] = dict(getattr(layer, "metadata", None) or {})  # GeoJSON collection members travel with them
    if kind == "image":
        extra["colormap"] = getattr(layer.colormap, "name", None)
        extra["contrast_limits"] = tuple(layer.contrast_limits)
    matrix = world_matrix(layer)
    features = layer.features.copy() if hasattr(layer, "features") else None
    return LayerRef(
        name=layer.name,
        kind=kind,
        data=layer.data,
        scale=tuple(float(s) for s in layer.scale),
        translate=tuple(float(t) for t in layer.translate),
        rgb=bool(getattr(layer, "rgb", False)),
        multiscale=bool(getattr(layer, "multiscale", False)),
        features=features,
        extra=extra,
        world_matrix=matrix,
    )


def unwrap(obj):
    """The object behind napari's ``PublicOnlyProxy`` (what plugin widgets are given)."""
    return getattr(obj, "__wrapped__", obj)


def layer_kind(layer) -> str:
    """``"image"``, ``"points"``, ... (``__class__`` also sees through napari's proxies)."""
    return layer.__class__.__name__.lower()


def world_matrix(layer):
    """The layer's ``(D+1, D+1)`` data-to-world matrix, ``affine @ (rotate shear scale +
    translate)`` from public properties; None when scale and translate alone describe it."""
    scale = np.asarray(layer.scale, dtype=np.float64)
    translate = np.asarray(layer.translate, dtype=np.float64)
    n = len(scale)
    rotate = np.asarray(getattr(layer, "rotate", np.eye(n)), dtype=np.float64)
    shear = np.asarray(getattr(layer, "shear", np.zeros(n * (n - 1) // 2)), dtype=np.float64)
    affine = getattr(layer, "affine", None)
    outer = np.asarray(affine.affine_matrix, dtype=np.float64) if affine is not None else np.eye(n + 1)
    if np.allclose(rotate, np.eye(n)) and not np.any(shear) and np.allclose(outer, np.eye(n + 1)):
        return None
    if shear.ndim == 2:
        shear_matrix = shear
    else:
        shear_matrix = np.eye(n)
        shear_matrix[np.triu_indices(n, 1)] = shear
    inner = np.eye(n + 1)
    inner[:n, :n] = rotate @ shear_matrix @ np.diag(scale)
    inner[:n, n] = translate
    return outer @ inner


# --------------------------------------------------------------------------- image arrays
def image_array(layer, max_side: int | None = 4096) -> tuple[np.ndarray, float]:
    """A 2D image layer (grey or RGB, numpy, dask, or multiscale) as a numpy array.

    For a multiscale layer the smallest level whose longer side is at least ``max_side`` is
    used (the registration works at a much lower resolution anyway). Returns the array and the
    ratio ``level pixels / level-0 pixels`` (1.0 for a single-scale layer).
    """
    ref = snapshot(layer)
    data = ref.data
    ratio = 1.0
    if ref.multiscale:
        levels = list(data)
        full = levels[0].shape
        chosen = levels[0]
        for level in levels:
            if max_side is None or max(level.shape[:2]) >= max_side:
                chosen = level
        data = chosen
        ratio = chosen.shape[0] / full[0]
    if hasattr(data, "compute") and not isinstance(data, np.ndarray):
        data = data.compute()
    array = np.asarray(data)
    if array.ndim not in (2, 3) or (array.ndim == 3 and not ref.rgb and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"layer {ref.name!r}: expected a 2D grey or RGB image, got shape {array.shape}; "
            "select one plane or channel first"
        )
    return array, ratio


def image_ref(layer, max_side: int | None = 4096) -> LayerRef:
    """A single-scale :class:`LayerRef` with numpy data: for a multiscale layer the level
    chosen by :func:`image_array`, placed where it sits in the world. Downstream code can then
    treat it as the image that was registered."""
    ref = snapshot(layer)
    array, ratio = image_array(ref, max_side)
    if ratio == 1.0:
        return dataclasses.replace(ref, data=array, multiscale=False)
    place = placement(ref, ratio)
    return dataclasses.replace(
        ref, data=array, multiscale=False, scale=place["scale"], translate=place["translate"],
        world_matrix=None,
    )


# --------------------------------------------------------------------------- placement
def placement(target, ratio: float = 1.0) -> dict:
    """``scale`` / ``translate`` kwargs that put an array on the target grid into the target
    layer's world frame. ``ratio`` is array pixels per target pixel (1 for full resolution)."""
    if target is None:
        return {}
    ref = snapshot(target)
    scale = np.asarray(ref.scale[-2:], dtype=np.float64)
    translate = np.asarray(ref.translate[-2:], dtype=np.float64)
    if ratio != 1.0:
        # pixel centres: array pixel a sits at target pixel (a + 0.5) / ratio - 0.5
        translate = translate + scale * (0.5 / ratio - 0.5)
        scale = scale / ratio
    return {"scale": tuple(scale.tolist()), "translate": tuple(translate.tolist())}


def working_placement(frame, target=None) -> dict:
    """``scale`` / ``translate`` that overlay a working-grid image on the target layer:
    working ``w`` is original target pixel ``(w - offset + 0.5) / scale - 0.5``."""
    s = np.asarray(frame.scale, dtype=np.float64)
    off = np.asarray(frame.offset, dtype=np.float64)
    ref = snapshot(target) if target is not None else None
    t_scale = np.asarray(ref.scale[-2:], dtype=np.float64) if ref else np.ones(2)
    t_trans = np.asarray(ref.translate[-2:], dtype=np.float64) if ref else np.zeros(2)
    scale = t_scale / s
    translate = t_trans + t_scale * ((0.5 - off) / s - 0.5)
    return {"scale": tuple(scale.tolist()), "translate": tuple(translate.tolist())}


def points_in_pixels(points_layer, image_layer=None) -> np.ndarray:
    """``(N, 2)`` (row, col) of a Points layer in the pixels of ``image_layer`` (through world
    coordinates); without an image layer the points' own data coordinates are used."""
    ref = snapshot(points_layer)
    data = np.asarray(ref.data, dtype=np.float64).reshape(-1, len(ref.scale))
    if image_layer is None:
        return data[:, -2:]
    image = snapshot(image_layer)
    world = ref.to_world(data)[:, -2:]
    return image.to_data(world)[:, -2:]


# --------------------------------------------------------------------------- landmarks
def next_landmark_colour(viewer=None, taken=()) -> str:
    """The first colour of :data:`LANDMARK_PALETTE` that no Points layer of ``viewer`` (and
    nothing in ``taken``) uses yet."""
    used = set(taken)
    if viewer is not None:
        for layer in unwrap(viewer).layers:
            if layer_kind(layer) == "points":
                colour = layer.metadata.get("histreg_colour")
                if colour:
                    used.add(colour)
    for colour in LANDMARK_PALETTE:
        if colour not in used:
            return colour
    return LANDMARK_PALETTE[len(used) % len(LANDMARK_PALETTE)]


def landmark_layer(points_rc, ids=None, name="landmarks", *, color="yellow", size=None, extent=None, **kwargs) -> LayerDataTuple:
    """A Points ``LayerDataTuple`` with the landmark ids as the ``id`` feature and as text."""
    points = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    if ids is None:
        ids = [str(i) for i in range(len(points))]
    ids = np.asarray([str(i) for i in ids], dtype=object)
    if size is None:
        size = max(4.0, (max(extent) / 80.0) if extent is not None else 10.0)
    kw = {
        "name": name,
        "features": {"id": ids},
        "feature_defaults": {"id": ""},
        "text": {"string": "{id}", "size": 9, "color": color, "anchor": "upper_left"},
        "face_color": color,
        "border_color": "black",
        "size": size,
        "symbol": "disc",
        "metadata": {"histreg_colour": color},
    }
    kw.update(kwargs)
    return (points, kw, "points")


def landmark_ids(layer_or_features, n: int | None = None) -> list[str]:
    """The ``id`` feature of a Points layer as strings (``0..N-1`` where it has none)."""
    features = getattr(layer_or_features, "features", layer_or_features)
    if n is None:
        n = len(getattr(layer_or_features, "data", features if features is not None else []))
    columns = features.keys() if isinstance(features, dict) else getattr(features, "columns", ())
    if features is not None and "id" in columns:
        return [_id_str(v) for v in features["id"]]
    return [str(i) for i in range(n)]


def fill_ids(ids) -> list[str]:
    """``ids`` as strings with empty and repeated ones replaced by fresh integers (one more than
    the largest integer id, counting up), so that every landmark has its own id."""
    ids = [str(i) for i in ids]
    numbers = [int(i) for i in ids if i.lstrip("-").isdigit()]
    fresh = (max(numbers) + 1) if numbers else 0
    seen: set[str] = set()
    out = []
    for value in ids:
        if value == "" or value in seen:
            value = str(fresh)
            fresh += 1
        seen.add(value)
        out.append(value)
    return out


def _id_str(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- fields
def preview_field(result, max_side: int = PREVIEW_SIZE) -> tuple[np.ndarray, float]:
    """The backward field on a grid no larger than ``max_side`` along the longer target side,
    in *target pixels* of that grid, and the ratio ``grid pixels / target pixels``."""
    h, w = result.target_shape
    ratio = min(1.0, max_side / max(h, w))
    if ratio >= 1.0:
        return result.field(), 1.0
    hs, ws = result.source_shape
    field = result.field(source_shape=(max(1, round(hs * ratio)), max(1, round(ws * ratio))))
    return field, field.shape[1] / h


def field_to_vectors(field: np.ndarray, grid: int = VECTOR_GRID, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Subsample a backward field ``(2, H, W)`` to about ``grid`` arrows along the longer side.

    Returns napari vectors ``(N, 2, 2)`` (start ``(row, col)``, projection ``(drow, dcol)``) in
    full-resolution target pixels, and their magnitudes. The arrow at target pixel ``p`` points
    to ``p + u(p)``, the source position that ``p`` samples. ``ratio``: grid pixels per target
    pixel of ``field`` (see :func:`preview_field`).
    """
    field = np.asarray(field, dtype=np.float32)
    _, h, w = field.shape
    step = max(1, int(round(max(h, w) / max(1, grid))))
    rows = np.arange(step // 2, h, step)
    cols = np.arange(step // 2, w, step)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    starts = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.float64)
    proj = field[:, rr.ravel(), cc.ravel()].T.astype(np.float64)
    if ratio != 1.0:
        starts = (starts + 0.5) / ratio - 0.5
        proj = proj / ratio
    vectors = np.stack([starts, proj], axis=1)
    return vectors, np.linalg.norm(proj, axis=1)


def magnitude_limits(magnitudes) -> dict:
    """``{"edge_contrast_limits": (min, max)}`` of the arrows' magnitudes, or ``{}`` when they
    are all equal (napari's own choice then)."""
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    if magnitudes.size == 0 or not np.ptp(magnitudes) > 0:
        return {}
    return {"edge_contrast_limits": (float(magnitudes.min()), float(magnitudes.max()))}


def arrow_length(magnitudes, spacing: float) -> float:
    """The Vectors ``length`` factor that draws the 90th-percentile arrow at most
    :data:`ARROW_SPACING_SHARE` of the grid ``spacing`` long (1 when they are short already)."""
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    if magnitudes.size == 0:
        return 1.0
    long = float(np.percentile(magnitudes, 90))
    if long <= 0:
        return 1.0
    return float(min(1.0, ARROW_SPACING_SHARE * spacing / long))


def jacobian_determinant(field: np.ndarray) -> np.ndarray:
    """``det(I + grad u)`` of the map ``p -> p + u(p)`` (1: area kept, <0: folding)."""
    u = np.asarray(field, dtype=np.float64)
    dr_dr, dr_dc = np.gradient(u[0])
    dc_dr, dc_dc = np.gradient(u[1])
    return ((1.0 + dr_dr) * (1.0 + dc_dc) - dr_dc * dc_dr).astype(np.float32)


# --------------------------------------------------------------------------- results
def warped_name(source_name: str) -> str:
    return f"{source_name} registered"


def result_to_layers(
    result,
    source=None,
    *,
    target_layer=None,
    source_points=None,
    source_name: str | None = None,
    vectors: bool = True,
    grid: int = VECTOR_GRID,
    magnitude: bool = False,
    jacobian: bool = False,
) -> list[LayerDataTuple]:
    """``LayerDataTuple``s showing a :class:`~napari_histreg.RegistrationResult`.

    ``source``: the source image (a napari Image layer or an array, any resolution of the
    registered source) to warp onto the target; ``target_layer``: the target Image layer (or
    ``LayerRef``), whose scale/translate every output gets so that it overlays the target;
    ``source_points``: a Points layer of source landmarks, mapped into the target frame (ids
    kept). ``vectors``: the deformation as a Vectors layer of about ``grid`` arrows along the
    longer side, coloured by the ``magnitude`` feature; ``magnitude`` / ``jacobian``: also
    images of the displacement magnitude and the Jacobian determinant.

    Layers are named after the source (``"<source> registered"``, ``"<source> deformation"``,
    ...), so adding them again (:func:`add_layers`, or returning them from a magicgui widget)
    updates the same layers in place.
    """
    src_ref = snapshot(source) if source is not None and not isinstance(source, np.ndarray) and hasattr(source, "data") else None
    name = source_name or (src_ref.name if src_ref is not None else "source")
    tgt_ref = snapshot(target_layer)
    out: list[LayerDataTuple] = []
    info = {"histreg": {"stage": result.info.get("stage", "register"), "timings": dict(result.timings)}}

    if source is not None:
        if src_ref is not None and src_ref.kind == "image":
            array, _ = image_array(src_ref)
            rgb = src_ref.rgb
        else:
            array = np.asarray(source)
            rgb = array.ndim == 3 and array.shape[-1] in (3, 4)
        warped = result.warp(array, cval=background_value(array))
        ratio = warped.shape[0] / result.target_shape[0]
        kw = {"name": warped_name(name), "opacity": 0.6, "blending": "translucent", "metadata": info, **placement(tgt_ref, ratio)}
        if not rgb:
            kw["colormap"] = "magenta"
            kw["blending"] = "additive"
            kw["opacity"] = 0.8
            if src_ref is not None and src_ref.extra.get("contrast_limits"):
                kw["contrast_limits"] = src_ref.extra["contrast_limits"]
        kw["rgb"] = bool(rgb)
        out.append((warped, kw, "image"))

    if vectors or magnitude or jacobian:
        field, ratio = preview_field(result)
        extent = max(result.target_shape)
        if vectors:
            vec, mag = field_to_vectors(field, grid, ratio)
            step = extent / max(1, grid)
            length = arrow_length(mag, step)
            out.append(
                (
                    vec,
                    {
                        "name": f"{name} deformation",
                        "features": {"magnitude": mag},
                        "edge_color": "magnitude",
                        "edge_colormap": "viridis",
                        # given, not left to napari: an update in place keeps the first run's
                        # limits otherwise, and a smaller deformation drew every arrow dark
                        **magnitude_limits(mag),
                        "edge_width": max(1.0, step / 14.0),
                        "opacity": 0.8,
                        "length": length,
                        "vector_style": "arrow",
                        "metadata": {"histreg_arrow_scale": length, "histreg_grid": grid},
                        **placement(tgt_ref),
                    },
                    "vectors",
                )
            )
        if magnitude:
            out.append(
                (
                    np.hypot(field[0], field[1]).astype(np.float32) / ratio,
                    {"name": f"{name} displacement magnitude", "colormap": "inferno", "visible": False, **placement(tgt_ref, ratio)},
                    "image",
                )
            )
        if jacobian:
            det = jacobian_determinant(field)
            out.append(
                (
                    det,
                    {
                        "name": f"{name} Jacobian determinant",
                        "colormap": "PiYG",
                        "contrast_limits": (0.0, 2.0),
                        "visible": False,
                        **placement(tgt_ref, ratio),
                    },
                    "image",
                )
            )

    if source_points is not None:
        out.append(map_points_layer(result, source_points, source_image=src_ref, target_layer=tgt_ref))
    return out


def map_points_layer(result, points, *, source_image=None, target_layer=None, name=None) -> LayerDataTuple:
    """Source landmarks (a Points layer) mapped into the target frame, ids kept."""
    ref = snapshot(points)
    src = snapshot(source_image)
    if src is not None and src.multiscale is False and src.kind == "image":
        rc = points_in_pixels(ref, src)
        source_shape = src.shape[:2]
    else:
        rc = points_in_pixels(ref)
        source_shape = None
    rc = to_registered_pixels(rc, source_shape, result.source_shape)
    mapped = result.map_source_points(rc) if len(rc) else np.zeros((0, 2))
    ids = landmark_ids(ref.features, len(rc)) if ref.features is not None else None
    size = float(np.median(ref.extra["size"])) if ref.extra.get("size") is not None and np.size(ref.extra["size"]) else None
    return landmark_layer(
        mapped, ids, name or warped_name(ref.name), color=REGISTERED_COLOUR, size=size, extent=result.target_shape,
        **placement(target_layer),
    )


def to_registered_pixels(rc, shown_shape, registered_shape) -> np.ndarray:
    """``(row, col)`` pixels of an image as shown (``shown_shape``: a pyramid level, a layer at
    another resolution; None: as registered) -> pixels of the image at the resolution it was
    registered at (``registered_shape``)."""
    from ..conventions import rescale_pixels

    if shown_shape is None or tuple(shown_shape[:2]) == tuple(registered_shape[:2]):
        return np.asarray(rc, dtype=np.float64)
    return rescale_pixels(rc, np.asarray(registered_shape[:2], dtype=np.float64) / np.asarray(shown_shape[:2], dtype=np.float64))


# --------------------------------------------------------------------------- viewer updates
# kwargs that only a constructor takes: a change of them means replacing the layer
_CONSTRUCT_ONLY = {"rgb", "multiscale", "ndim", "cache", "feature_defaults"}


def owned_layer(viewer, name: str, owner: str):
    """The layer that ``owner`` made under the name ``name`` (napari may have renamed it
    ``name [1]`` when another layer had that name), or None."""
    for layer in unwrap(viewer).layers:
        meta = getattr(layer, "metadata", {}) or {}
        if meta.get("histreg_owner") == owner and meta.get("histreg_name") == name:
            return layer
    return None


def shown_field_layers(viewer, source_name: str, owner: str) -> dict:
    """Which field layers of ``source_name`` (``vectors``, ``magnitude``, ``jacobian``: the
    :func:`result_to_layers` flags) ``owner`` already shows: a widget that replaces the result
    keeps each of them up to date, so none describes an older result."""
    names = {"vectors": "deformation", "magnitude": "displacement magnitude", "jacobian": "Jacobian determinant"}
    return {flag: owned_layer(viewer, f"{source_name} {suffix}", owner) is not None for flag, suffix in names.items()}


def add_layers(viewer, layer_data: Sequence[LayerDataTuple], owner: str = "console") -> list:
    """Add ``LayerDataTuple``s to ``viewer`` on behalf of ``owner`` (a widget's name; the
    console's by default). A layer this owner added before under the same name is updated in
    place (data and properties), so re-running a registration replaces its outputs; a layer of
    that name made by anyone else (the user, another widget) is never replaced: the new layer
    gets napari's next free name (``name [1]``)."""
    viewer = unwrap(viewer)
    layers = []
    for datum in layer_data:
        data, kwargs, kind = (tuple(datum) + ({}, "image"))[:3]
        kwargs = dict(kwargs or {})
        name = kwargs.get("name")
        metadata = dict(kwargs.get("metadata") or {})
        metadata.update(histreg_owner=owner, histreg_name=name)
        kwargs["metadata"] = metadata
        existing = owned_layer(viewer, name, owner) if name else None
        if existing is not None and layer_kind(existing) == kind and _compatible(existing, data, kwargs):
            _update_layer(existing, data, {**kwargs, "name": existing.name})
            layers.append(existing)
            continue
        index = viewer.layers.index(existing) if existing is not None else None
        if existing is not None:
            viewer.layers.remove(existing)  # ours, but of another kind or shape: rebuilt
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        if index is not None:
            viewer.layers.move(viewer.layers.index(layer), index)
        layers.append(layer)
    return layers


def _compatible(layer, data, kwargs) -> bool:
    if layer_kind(layer) == "shapes":
        return False  # shape types and per-shape styles: simpler to rebuild
    if "rgb" in kwargs and bool(getattr(layer, "rgb", False)) != bool(kwargs["rgb"]):
        return False
    if hasattr(data, "ndim") and hasattr(layer, "ndim") and layer_kind(layer) in ("image", "labels"):
        data_ndim = data.ndim - (1 if kwargs.get("rgb") else 0)
        return data_ndim == layer.ndim
    return True


def _update_layer(layer, data, kwargs) -> None:
    kind = layer_kind(layer)
    props = {k: v for k, v in kwargs.items() if k not in _CONSTRUCT_ONLY and k != "name"}
    features = props.pop("features", None)
    # Every setter refreshes the layer (its slice, extent and thumbnail), and an update sets about
    # ten of them: the three result layers took 0.26-0.44 s of the GUI thread, most of it
    # refreshing unchanged scale/translate and redrawing the arrows' thumbnail six times. So the
    # refreshes are held for the whole update (napari's own ``_block_refresh``, where it has
    # one), unchanged values are not set again, and the layer is refreshed once at the end.
    hold = getattr(layer, "_block_refresh", None)
    with hold() if callable(hold) else contextlib.nullcontext():
        layer.data = data
        if features is not None:
            layer.features = features
        for key, value in props.items():
            if _unchanged(getattr(layer, key, _ABSENT), value):
                continue
            try:
                setattr(layer, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    layer.refresh()
    if kind == "image" and "contrast_limits" not in kwargs:
        layer.reset_contrast_limits()


_ABSENT = object()


def _unchanged(current, value) -> bool:
    """Whether a layer property already holds ``value`` (arrays element-wise, same shape); any
    value that cannot be compared counts as changed."""
    if current is _ABSENT:
        return False
    try:
        same = current == value
        if isinstance(same, np.ndarray):
            return np.shape(current) == np.shape(value) and bool(same.all())
        return bool(same)
    except Exception:  # noqa: BLE001 - e.g. dicts holding arrays: set it again
        return False
