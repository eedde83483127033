"""A pair's landmarks and the one way a registered pair is scored.

:class:`LandmarkPair` loads two landmark files (or takes two point sets), checks them against
their images and pairs them by id; :func:`score` maps the source landmarks through a result
and returns one row in the one metric vocabulary (:data:`METRIC_COLUMNS`, the ANHIR names,
plus the result's confidence, :data:`RESULT_COLUMNS`). ``histreg register`` / ``evaluate`` /
``register-batch``, the benchmarks and the napari Landmark QC all score through here.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from .io import HistRegInputError, pair_landmarks, read_landmarks
from .metrics import pair_metrics

#: The ANHIR metrics of one pair (:func:`napari_histreg.metrics.pair_metrics`).
METRIC_COLUMNS = ("initial_MrTRE", "MrTRE", "mean_rTRE", "max_rTRE", "robustness", "n_landmarks")
#: What the registration says of itself (landmark-free): its confidence, initial choice and the
#: representation its result was computed on (``haematoxylin`` where the counterstain retry was kept).
RESULT_COLUMNS = ("confidence", "flag", "weakest", "initial_choice", "compared")

#: Landmarks further than this share of the image's longer side outside it count as outside.
OUTSIDE_MARGIN = 0.05


@dataclasses.dataclass
class Landmarks:
    """One landmark file (or point set): ``ids`` and ``points`` ``(N, 2)`` ``(row, col)``;
    ``name`` (the file) prefixes every message."""

    name: str
    ids: np.ndarray
    points: np.ndarray

    @classmethod
    def read(cls, path) -> "Landmarks":
        path = Path(path)
        if not path.exists():
            raise HistRegInputError(f"{path}: file not found")
        ids, points = read_landmarks(path)
        return cls(str(path), ids, points)

    def outside(self, shape) -> int:
        """How many points lie outside an image of ``shape`` (beyond :data:`OUTSIDE_MARGIN`)."""
        points = np.asarray(self.points, dtype=float).reshape(-1, 2)
        h, w = shape[:2]
        margin = OUTSIDE_MARGIN * max(h, w)
        out = (points[:, 0] < -margin) | (points[:, 0] > h + margin) | (points[:, 1] < -margin) | (points[:, 1] > w + margin)
        return int(out.sum())

    def check_inside(self, shape) -> None:
        """An input error when every point lies outside the image (another image, another scale),
        a warning when some do."""
        n = self.outside(shape)
        if n and n == len(self.points):
            raise HistRegInputError(f"{self.name}: all {n} landmarks lie outside the {shape[1]}x{shape[0]} (w x h) image; "
                                    "are they for another image or another scale?")
        if n:
            warnings.warn(f"{self.name}: {n} of {len(self.points)} landmarks lie outside the {shape[1]}x{shape[0]} "
                          "(w x h) image", stacklevel=3)


@dataclasses.dataclass
class LandmarkPair:
    """Corresponding landmarks of a registered pair: ``source_rc[k]`` and ``target_rc[k]`` are
    one structure (id ``ids[k]``); ``target_shape`` is the target image's, whose diagonal the
    relative errors are divided by."""

    ids: np.ndarray
    source_rc: np.ndarray
    target_rc: np.ndarray
    target_shape: tuple

    @classmethod
    def from_landmarks(cls, source: Landmarks, target: Landmarks, target_shape, source_shape=None) -> "LandmarkPair":
        """Pair two landmark sets by id (warning about ids only one of them has), after checking
        each against its image's shape."""
        if source_shape is not None:
            source.check_inside(source_shape)
        target.check_inside(target_shape)
        ids, s, t = pair_landmarks(source.ids, source.points, target.ids, target.points, source.name, target.name)
        only_s, only_t = len(source.ids) - len(ids), len(target.ids) - len(ids)
        if only_s or only_t:
            warnings.warn(f"{source.name} and {target.name}: {len(ids)} landmark ids shared, {only_s} only in the source "
                          f"file, {only_t} only in the target file (those are left out of the metrics)", stacklevel=2)
        return cls(ids, np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64), tuple(target_shape[:2]))

    @classmethod
    def read(cls, source_csv, target_csv, target_shape, source_shape=None) -> "LandmarkPair":
        """Two ANHIR landmark files, checked and paired by id."""
        return cls.from_landmarks(Landmarks.read(source_csv), Landmarks.read(target_csv), target_shape, source_shape)

    @classmethod
    def from_points(cls, source_rc, target_rc, target_shape) -> "LandmarkPair":
        """Points already in correspondence (row ``k`` of each), ids ``0..N-1``."""
        source_rc = np.asarray(source_rc, dtype=np.float64).reshape(-1, 2)
        target_rc = np.asarray(target_rc, dtype=np.float64).reshape(-1, 2)
        if source_rc.shape != target_rc.shape:
            raise ValueError(f"landmark sets differ in size: {len(source_rc)} vs {len(target_rc)}")
        return cls(np.arange(len(source_rc)).astype(str).astype(object), source_rc, target_rc, tuple(target_shape[:2]))

    def __len__(self) -> int:
        return len(self.ids)


def result_columns(result) -> dict:
    """:data:`RESULT_COLUMNS` of a result (None where it has no confidence, e.g. a peer's)."""
    confidence = getattr(result, "confidence", None) or {}
    info = getattr(result, "info", None) or {}
    return {"confidence": confidence.get("score"), "flag": confidence.get("flag"), "weakest": confidence.get("weakest"),
            "initial_choice": info.get("initial", {}).get("chosen"),
            "compared": getattr(result, "compared", None)}


def finite_points(mapped_rc, name: str = "") -> np.ndarray:
    """Mapped landmarks as float64, or an error: a non-finite mapping means a broken transform,
    never a number. ``name`` (the landmark file) prefixes the message."""
    mapped_rc = np.asarray(mapped_rc, dtype=np.float64)
    if not np.isfinite(mapped_rc).all():
        raise ValueError(f"{name + ': ' if name else ''}mapped landmarks are not finite (the transform is broken)")
    return mapped_rc


def score_mapped(mapped_rc, pair: LandmarkPair) -> dict:
    """:data:`METRIC_COLUMNS` of source landmarks already mapped into the target frame
    (:func:`finite_points`)."""
    return pair_metrics(pair.source_rc, finite_points(mapped_rc), pair.target_rc, pair.target_shape)


def score(result, pair: LandmarkPair) -> dict:
    """One scored row: :data:`METRIC_COLUMNS` of ``pair``'s source landmarks mapped through
    ``result`` (``map_source_points``), and :data:`RESULT_COLUMNS`."""
    return {**score_mapped(result.map_source_points(pair.source_rc), pair), **result_columns(result)}
