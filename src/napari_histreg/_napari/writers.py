"""npe2 writers: Points -> ANHIR landmark CSV (ids kept), Image -> .mha."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import write_landmarks, write_mha
from .layers import fill_ids, landmark_ids


def _ids_for(data, meta) -> list[str]:
    n = len(data)
    features = (meta or {}).get("features")
    ids = landmark_ids(features, n) if features is not None else []
    if len(ids) != n:  # no id column, or features that do not belong to these points
        ids = [str(i) for i in range(n)]
    return fill_ids(ids)  # missing and repeated ids: fresh integers, so the file stays valid ANHIR


def write_landmarks_csv(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as an ANHIR CSV (``,X,Y``; X = column, Y = row, data coordinates)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        path = path.with_suffix(".csv")
    points = np.asarray(data, dtype=np.float64)
    points = points.reshape(-1, points.shape[-1] if points.ndim > 1 else 2)[:, -2:]
    write_landmarks(path, _ids_for(points, meta), points)
    return [str(path)]


def write_image_mha(path: str, data, meta: dict) -> list[str]:
    """Write an Image layer (level 0 of a multiscale one) as .mha; RGB as a vector image."""
    path = Path(path)
    if path.suffix.lower() not in (".mha", ".mhd"):
        path = path.with_suffix(".mha")
    if (meta or {}).get("multiscale"):
        data = data[0]
    array = np.asarray(data.compute() if hasattr(data, "compute") else data)
    rgb = bool((meta or {}).get("rgb", False))
    write_mha(path, array, vector=rgb)
    return [str(path)]
