"""npe2 readers: ANHIR landmark CSVs as Points layers, napari-histreg transforms (.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..io import read_landmarks
from .layers import landmark_layer, next_landmark_colour


def _paths(path) -> list[Path] | None:
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    return paths or None


def reader_if_all(path, accepts, reader):
    """An npe2 reader hook's answer: ``reader`` when ``accepts`` every path napari offers, else None
    (napari then asks the next plugin)."""
    paths = _paths(path)
    return reader if paths and all(accepts(p) for p in paths) else None


def is_landmark_csv(path) -> bool:
    """An existing ``.csv`` whose header has ``X`` and ``Y`` columns (ANHIR landmarks)."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    header = [cell.strip() for cell in header]
    return "X" in header and "Y" in header


def is_transform_json(path) -> bool:
    """A napari-histreg transform sidecar (``RegistrationResult.save``)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with open(path) as handle:
            return json.load(handle).get("format") == "napari-histreg transform"
    except (OSError, ValueError, AttributeError):
        return False


def get_landmarks_reader(path):
    """npe2 reader hook: a reader for ANHIR landmark CSVs, or None for other CSVs (napari's
    own CSV reader takes those)."""
    return reader_if_all(path, is_landmark_csv, read_landmarks_csv)


def read_landmarks_csv(path) -> list[tuple]:
    """One Points layer per file: ``(row, col)`` data, the ids as the ``id`` feature and text,
    each file in a colour no landmark layer of the current viewer has yet (so the target and
    source landmarks differ, and neither is the registered landmarks' magenta)."""
    viewer = _current_viewer()
    layers, taken = [], []
    for p in _paths(path):
        ids, points = read_landmarks(p)
        extent = (points.max(axis=0) + 1) if len(points) else None
        colour = next_landmark_colour(viewer, taken)
        taken.append(colour)
        layers.append(landmark_layer(points, ids, name=p.stem, extent=extent, color=colour))
    return layers


def _current_viewer():
    try:
        import napari

        return napari.current_viewer()
    except Exception:  # pragma: no cover - no napari, or no viewer
        return None


def get_transform_reader(path):
    """npe2 reader hook for a saved transform (``NAME.json`` beside ``NAME.mha``)."""
    paths = _paths(path)
    if paths and len(paths) == 1 and is_transform_json(paths[0]):
        return read_transform
    return None


def read_transform(path) -> list[tuple]:
    """Load the transform as the current viewer's transform (see the Transforms widget); it
    adds no layer, so it returns napari's "nothing to add" sentinel ``[(None,)]``."""
    from ..result import RegistrationResult

    p = _paths(path)[0]
    result = RegistrationResult.load(p)
    try:
        import napari
        from napari.utils.notifications import show_info

        from .session import get_session

        viewer = napari.current_viewer()
    except ImportError:  # pragma: no cover
        viewer = None
    if viewer is not None:
        get_session(viewer).set_result(result, None, None)
        (hs, ws), (ht, wt) = result.source_shape, result.target_shape
        show_info(
            f"napari-histreg: loaded transform {p.name} (source {hs}x{ws} -> target {ht}x{wt}); "
            "apply it with the Transforms widget"
        )
    return [(None,)]
