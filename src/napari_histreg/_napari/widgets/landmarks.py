"""Landmark quality control: per-landmark and median rTRE between the target landmarks and the
registered (mapped source) landmarks, paired by their ``id`` feature, recomputed live while
points are added, moved or deleted."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, FileEdit, Label, PushButton, Table

from ...metrics import rtre
from ..layers import fill_ids, landmark_ids, points_in_pixels, unwrap
from ..writers import write_landmarks_csv
from ._base import layer_picker, make_scrollable, on_destroyed

if TYPE_CHECKING:
    import napari

COLUMNS = ["id", "error (px)", "rTRE"]


def _table(rows: list) -> dict:
    """magicgui Table value in "split" form (it needs the index key to recognise it)."""
    return {"data": rows, "index": list(range(len(rows))), "columns": COLUMNS}


def fill_missing_ids(layer) -> bool:
    """Give points without an id, or with a repeated one (napari copies the last values for a
    new point), the next free integer id. Returns whether anything changed."""
    n = len(layer.data)
    ids = landmark_ids(layer.features, n) if "id" in layer.features.columns else [""] * n
    fixed = fill_ids(ids)
    changed = fixed != ids
    if changed:
        features = layer.features.copy()
        features["id"] = np.asarray(fixed, dtype=object)
        layer.features = features
        if hasattr(layer, "refresh_text"):
            layer.refresh_text()
    return changed


def landmark_errors(target_points, moving_points, target_image=None) -> dict:
    """Pair two Points layers by ``id`` and measure the distances in target image pixels.

    Returns ``ids``, ``errors`` (px), ``rtre`` (distance / target diagonal), ``MrTRE``,
    ``mean_rTRE``, ``max_rTRE`` and ``n`` (NaN statistics when nothing pairs).
    """
    t_rc = points_in_pixels(target_points, target_image)
    m_rc = points_in_pixels(moving_points, target_image)
    t_ids = landmark_ids(target_points.features, len(t_rc))
    m_ids = landmark_ids(moving_points.features, len(m_rc))
    index = {i: k for k, i in enumerate(m_ids) if i != ""}
    pairs = [(i, k, index[i]) for k, i in enumerate(t_ids) if i in index]
    if target_image is not None:
        shape = target_image.data[0].shape[:2] if getattr(target_image, "multiscale", False) else target_image.data.shape[:2]
    else:
        everything = np.vstack([t_rc, m_rc]) if len(t_rc) + len(m_rc) else np.ones((1, 2))
        shape = tuple(np.ceil(everything.max(axis=0) + 1))
    if not pairs:
        return {"ids": [], "errors": np.zeros(0), "rtre": np.zeros(0), "MrTRE": np.nan, "mean_rTRE": np.nan, "max_rTRE": np.nan, "n": 0}
    ids = [p[0] for p in pairs]
    t = t_rc[[p[1] for p in pairs]]
    m = m_rc[[p[2] for p in pairs]]
    errors = np.linalg.norm(m - t, axis=1)
    rel = rtre(m, t, shape)
    return {
        "ids": ids, "errors": errors, "rtre": rel, "MrTRE": float(np.median(rel)),
        "mean_rTRE": float(np.mean(rel)), "max_rTRE": float(np.max(rel)), "n": len(ids),
    }


def not_guides(layers, word: str):
    """The shortest-named layer with ``word`` in its name that is not a guide layer of *Refine
    with landmarks* ("target guides" is a shorter name than "target landmarks", yet the QC table
    is about the landmarks); None when there is none (the picker's own rules then apply)."""
    found = [layer for layer in layers if word in layer.name.lower() and "guide" not in layer.name.lower()]
    return min(found, key=lambda layer: len(layer.name)) if found else None


class LandmarksWidget(Container):
    """rTRE per landmark and its median, live; save either landmark layer as an ANHIR CSV."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        self.viewer = napari_viewer = unwrap(napari_viewer)
        self.target_image = layer_picker(napari_viewer, "target image", ("image",), prefer="target")
        self.target_points = layer_picker(napari_viewer, "target landmarks", ("points",), prefer="target",
                                          choose=lambda layers: not_guides(layers, "target"))
        self.moving_points = layer_picker(napari_viewer, "registered landmarks", ("points",), prefer="registered")
        self.summary = Label(value="", label="median rTRE")
        self.table = Table(value=_table([]))
        self.table.native.setMinimumHeight(180)
        self.path = FileEdit(mode="w", filter="*.csv", label="CSV file")
        self.save_target = PushButton(text="Save target landmarks")
        self.save_moving = PushButton(text="Save registered landmarks")
        buttons = Container(widgets=[self.save_target, self.save_moving], layout="horizontal", labels=False)
        super().__init__(
            widgets=[self.target_image, self.target_points, self.moving_points, self.summary, self.table, self.path, buttons],
        )
        make_scrollable(self)
        self.stats: dict = {}
        self._connected: list = []
        on_destroyed(self, self._disconnect_layers)
        for combo in (self.target_image, self.target_points, self.moving_points):
            combo.changed.connect(self._rewire)
        self.save_target.changed.connect(lambda *_: self.save(self.target_points.value))
        self.save_moving.changed.connect(lambda *_: self.save(self.moving_points.value))
        self._rewire()

    # ------------------------------------------------------------------ wiring
    def _disconnect_layers(self) -> None:
        for emitter, callback in self._connected:
            emitter.disconnect(callback)
        self._connected = []

    def _rewire(self, *_args) -> None:
        self._disconnect_layers()
        for layer in {id(l): l for l in (self.target_points.value, self.moving_points.value) if l is not None}.values():
            callback = functools.partial(self._on_points_changed, layer)
            layer.events.data.connect(callback)
            layer.events.features.connect(self.update)
            self._connected += [(layer.events.data, callback), (layer.events.features, self.update)]
        if self.target_image.value is not None:
            self.target_image.value.events.data.connect(self.update)
            self._connected.append((self.target_image.value.events.data, self.update))
        self.update()

    def _on_points_changed(self, layer, event=None) -> None:
        action = str(getattr(event, "action", "") or "")
        if action in ("adding", "removing"):  # the data has not changed yet
            return
        if action == "added" and fill_missing_ids(layer):
            return  # the features event that follows recomputes
        self.update()

    # ------------------------------------------------------------------ numbers
    def update(self, *_args) -> dict:
        """Recompute the errors and refresh the table; returns the statistics."""
        target, moving = self.target_points.value, self.moving_points.value
        if target is None or moving is None or target is moving:
            self.stats = {}
            self.summary.value = "choose a target and a registered landmarks layer"
            self.table.value = _table([])
            return self.stats
        stats = self.stats = landmark_errors(target, moving, self.target_image.value)
        if stats["n"] == 0:
            self.summary.value = "no landmark ids in common"
        else:
            self.summary.value = (
                f"{stats['MrTRE']:.5f} (mean {stats['mean_rTRE']:.5f}, max {stats['max_rTRE']:.5f}, "
                f"{stats['n']} pairs)"
            )
        rows = [[i, round(float(e), 2), round(float(r), 6)] for i, e, r in zip(stats["ids"], stats["errors"], stats["rtre"])]
        self.table.value = _table(rows)
        return stats

    def save(self, layer, path=None) -> str | None:
        """Write ``layer`` as an ANHIR CSV (ids from its ``id`` feature) to ``path`` or the
        chosen file."""
        from napari.utils.notifications import show_info

        path = path or self.path.value
        if layer is None or not str(path) or str(path) in (".", ""):
            self.summary.tooltip = "choose a layer and a CSV file first"
            return None
        written = write_landmarks_csv(str(path), layer.data, {"features": layer.features, "name": layer.name})
        show_info(f"wrote {len(layer.data)} landmarks to {written[0]}")
        return written[0]
