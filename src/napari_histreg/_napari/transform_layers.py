"""Applying a registration to other layers of the source (another stain or channel, labels,
points, shapes): :func:`transform_layer`, what the Transforms widget and the console use."""

from __future__ import annotations

import numpy as np

from ..result import background_value
from .layers import LayerDataTuple, image_array, map_points_layer, placement, points_in_pixels, snapshot, warped_name


def transform_layer(result, layer, *, target_layer=None, source_image=None, name: str | None = None,
                    inverse: bool = False) -> LayerDataTuple:
    """Apply a registration to another layer of the source: an Image (another stain or channel;
    RGB kept; a channel stack ``(C, H, W)`` warped plane by plane), Labels (nearest neighbour),
    Points (``map_source_points``) or Shapes (vertices mapped; edges longer than the field's grid
    spacing densified first so curved deformations stay visible). Points and Shapes keep their
    ``features`` (a GeoJSON layer can be saved back as the same annotations).

    The layer's data coordinates are taken as source pixels (``source_image``, when given,
    converts Points/Shapes through world coordinates instead). The output is placed with
    ``target_layer``'s scale/translate (or the input layer's own scale where none is given).

    ``inverse=True`` (Points and Shapes only) maps the other way, target -> source
    (``map_target_points``, the backward field itself): the layer's coordinates are then target
    pixels (``source_image`` is the image whose pixels they are: the target), and
    ``target_layer`` is the layer to place the output on (the source image).
    """
    ref = snapshot(layer)
    tgt = snapshot(target_layer)
    out_name = name or warped_name(ref.name)
    if inverse and ref.kind not in ("points", "shapes"):
        raise ValueError(f"layer {ref.name!r}: the inverse direction (target -> source) applies to points and shapes only")
    if ref.kind == "points" and (inverse or _has_annotation_features(ref)):
        return _map_points_keeping_features(result, ref, snapshot(source_image), tgt, out_name, inverse)
    if ref.kind in ("image", "labels"):
        data = ref.data[0] if ref.multiscale else ref.data
        if ref.kind == "image" and (ref.rgb or np.ndim(data) == 2):
            array, _ = image_array(ref)
        else:
            array = np.asarray(data.compute() if hasattr(data, "compute") else data)
        order = 0 if ref.kind == "labels" else 1
        stack = array.ndim == 3 and not (ref.kind == "image" and ref.rgb)
        if array.ndim not in (2, 3):
            raise ValueError(f"layer {ref.name!r}: expected a 2D image (or a stack of 2D planes), got shape {array.shape}")
        if stack:
            warped = np.stack([result.warp(plane, order=order, cval=_fill(plane, ref.kind)) for plane in array])
            ratio = warped.shape[1] / result.target_shape[0]
        else:
            warped = result.warp(array, order=order, cval=_fill(array, ref.kind))
            ratio = warped.shape[0] / result.target_shape[0]
        kw: dict = {"name": out_name}
        if tgt is not None:
            place = placement(tgt, ratio)
        else:
            place = {"scale": ref.scale[-2:], "translate": ref.translate[-2:]}
        if stack:
            place = {"scale": (1.0,) + tuple(place["scale"]), "translate": (0.0,) + tuple(place["translate"])}
        kw.update(place)
        if ref.kind == "image":
            kw["rgb"] = ref.rgb
            if ref.extra.get("colormap") and not ref.rgb:
                kw["colormap"] = ref.extra["colormap"]
        return (warped, kw, ref.kind)
    if ref.kind == "points":
        tup = map_points_layer(result, ref, source_image=source_image, target_layer=tgt, name=out_name)
        if tgt is None:
            tup[1].update({"scale": ref.scale[-2:], "translate": ref.translate[-2:]})
        return tup
    if ref.kind == "shapes":
        from ..annotations import default_max_edge

        src = snapshot(source_image)
        mapping = result.map_target_points if inverse else result.map_source_points
        max_edge = default_max_edge(result, inverse)
        shapes, types = [], []
        for verts, kind in zip(ref.data, ref.extra["shape_type"]):
            verts = np.asarray(verts, dtype=np.float64)[:, -2:]
            if src is not None:
                verts = src.to_data(ref.to_world(np.asarray(verts)))[:, -2:]
            dense, new_kind = _densify_shape(verts, kind, max_edge=max_edge)
            shapes.append(mapping(dense))
            types.append(new_kind)
        kw = {"name": out_name, "shape_type": types}
        if len(ref.data):
            kw["edge_color"] = ref.extra["edge_color"]
            kw["face_color"] = ref.extra["face_color"]
            kw["edge_width"] = ref.extra["edge_width"]
            if ref.features is not None and len(getattr(ref.features, "columns", ())):
                kw["features"] = ref.features.copy()
        if ref.extra.get("metadata"):
            kw["metadata"] = dict(ref.extra["metadata"])
        kw.update(placement(tgt) if tgt is not None else {"scale": ref.scale[-2:], "translate": ref.translate[-2:]})
        return (shapes, kw, "shapes")
    raise ValueError(f"layer {ref.name!r}: cannot apply a transform to a {ref.kind} layer")


def _fill(array, kind: str) -> float:
    return background_value(array) if kind == "image" else 0.0


def _has_annotation_features(ref) -> bool:
    """A Points layer whose features are more than landmark ids (a GeoJSON layer): keep them all."""
    columns = list(getattr(ref.features, "columns", ()))
    return bool(columns) and columns != ["id"]


def _map_points_keeping_features(result, ref, frame, place, name, inverse) -> LayerDataTuple:
    """Points mapped either way with every feature kept (``frame``: the image whose pixels the
    points are in; ``place``: the layer the output is placed on)."""
    rc = points_in_pixels(ref, frame)
    mapping = result.map_target_points if inverse else result.map_source_points
    mapped = mapping(rc) if len(rc) else np.zeros((0, 2))
    kw: dict = {"name": name}
    if ref.features is not None and len(getattr(ref.features, "columns", ())):
        kw["features"] = ref.features.copy()
    if ref.extra.get("size") is not None and np.size(ref.extra["size"]):
        kw["size"] = float(np.median(ref.extra["size"]))
    if ref.extra.get("face_color") is not None and len(mapped):
        kw["face_color"] = ref.extra["face_color"]
    if ref.extra.get("metadata"):
        kw["metadata"] = dict(ref.extra["metadata"])
    kw.update(placement(place) if place is not None else {"scale": ref.scale[-2:], "translate": ref.translate[-2:]})
    return (mapped, kw, "points")


def _densify_shape(verts: np.ndarray, kind: str, max_edge: float | None = None) -> tuple[np.ndarray, str]:
    """Vertices of a shape as a polygon (ellipses: 64 points) or a path, every edge cut into
    pieces at most ``max_edge`` pixels long (:func:`napari_histreg.annotations.densify`, the
    GeoJSON mapping's own rule: an already dense outline, as QuPath writes, gets none)."""
    from ..annotations import densify

    if kind == "ellipse":
        centre = verts.mean(axis=0)
        # napari ellipse vertices are the 4 corners of the bounding box (possibly rotated)
        a = (verts[1] - verts[0]) / 2.0
        b = (verts[3] - verts[0]) / 2.0
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)[:, None]
        return centre + np.cos(t) * a + np.sin(t) * b, "polygon"
    closed = kind in ("rectangle", "polygon")
    dense, _ = densify(np.vstack([verts, verts[:1]]) if closed else verts, max_edge, closed=closed)
    return (dense[:-1] if closed else dense), ("polygon" if closed else "path")


def affine_layer(result, source_layer, target_layer=None, name: str | None = None) -> LayerDataTuple:
    """The source image again, laid over the target by a layer ``affine`` (no resampling): for a
    result that is affine-only (:func:`napari_histreg.export.is_affine_only`).

    The layer ``affine`` maps the source layer's data pixels to the world: the forward affine
    (:func:`napari_histreg.export.affine_matrix_3x3`, source ``(row, col)`` -> target
    ``(row, col)``), between the resolutions of the layers' data and of the registered images
    (:func:`~napari_histreg.conventions.rescale_matrix`), then the target layer's own data ->
    world placement (its scale / translate, or full world matrix)."""
    from ..conventions import rescale_matrix
    from ..export import affine_matrix_3x3

    src = snapshot(source_layer)
    tgt = snapshot(target_layer)
    if src is None or src.kind != "image":
        raise ValueError("choose the source image layer to lay over the target")
    source_shape = src.shape[:2]
    to_registered_source = rescale_matrix(np.asarray(result.source_shape, float) / np.asarray(source_shape, float))
    forward = affine_matrix_3x3(result, "forward")
    if tgt is None:
        to_world = np.eye(3)
    else:
        to_target_data = rescale_matrix(np.asarray(tgt.shape[:2], float) / np.asarray(result.target_shape, float))
        to_world = tgt.world_matrix_2d() @ to_target_data
    kw: dict = {"name": name or f"{src.name} affine", "affine": to_world @ forward @ to_registered_source,
                "rgb": src.rgb, "multiscale": src.multiscale}
    if src.extra.get("colormap") and not src.rgb:
        kw["colormap"] = src.extra["colormap"]
    if src.extra.get("contrast_limits"):
        kw["contrast_limits"] = src.extra["contrast_limits"]
    return (src.data, kw, "image")
