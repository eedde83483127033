"""Applying a registration to other layers of the source (another stain or channel, labels,
points, shapes): :func:`transform_layer`, what the Transforms widget and the console use."""

from __future__ import annotations

import numpy as np

from ..result import background_value
from .layers import LayerDataTuple, image_array, map_points_layer, placement, snapshot, warped_name


def transform_layer(result, layer, *, target_layer=None, source_image=None, name: str | None = None) -> LayerDataTuple:
    """Apply a registration to another layer of the source: an Image (another stain or channel;
    RGB kept; a channel stack ``(C, H, W)`` warped plane by plane), Labels (nearest neighbour),
    Points (``map_source_points``) or Shapes (vertices mapped; edges densified first so curved
    deformations stay visible).

    The layer's data coordinates are taken as source pixels (``source_image``, when given,
    converts Points/Shapes through world coordinates instead). The output is placed with
    ``target_layer``'s scale/translate (or the input layer's own scale where none is given).
    """
    ref = snapshot(layer)
    tgt = snapshot(target_layer)
    out_name = name or warped_name(ref.name)
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
        src = snapshot(source_image)
        shapes, types = [], []
        for verts, kind in zip(ref.data, ref.extra["shape_type"]):
            verts = np.asarray(verts, dtype=np.float64)[:, -2:]
            if src is not None:
                verts = src.to_data(ref.to_world(np.asarray(verts)))[:, -2:]
            dense, new_kind = _densify_shape(verts, kind)
            shapes.append(result.map_source_points(dense))
            types.append(new_kind)
        kw = {"name": out_name, "shape_type": types}
        if len(ref.data):
            kw["edge_color"] = ref.extra["edge_color"]
            kw["face_color"] = ref.extra["face_color"]
            kw["edge_width"] = ref.extra["edge_width"]
        kw.update(placement(tgt) if tgt is not None else {"scale": ref.scale[-2:], "translate": ref.translate[-2:]})
        return (shapes, kw, "shapes")
    raise ValueError(f"layer {ref.name!r}: cannot apply a transform to a {ref.kind} layer")


def _fill(array, kind: str) -> float:
    return background_value(array) if kind == "image" else 0.0


def _densify_shape(verts: np.ndarray, kind: str, pieces: int = 16) -> tuple[np.ndarray, str]:
    """Vertices of a shape as a polygon/path with ``pieces`` points per edge (ellipses: 64)."""
    if kind == "ellipse":
        centre = verts.mean(axis=0)
        # napari ellipse vertices are the 4 corners of the bounding box (possibly rotated)
        a = (verts[1] - verts[0]) / 2.0
        b = (verts[3] - verts[0]) / 2.0
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)[:, None]
        return centre + np.cos(t) * a + np.sin(t) * b, "polygon"
    closed = kind in ("rectangle", "polygon")
    pts = np.vstack([verts, verts[:1]]) if closed else verts
    dense = [pts[0][None]]
    for p, q in zip(pts[:-1], pts[1:]):
        s = np.linspace(0, 1, pieces + 1)[1:, None]
        dense.append(p + s * (q - p))
    dense = np.vstack(dense)
    if closed:
        dense = dense[:-1]
    return dense, ("polygon" if closed else "path")
