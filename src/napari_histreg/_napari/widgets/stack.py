"""The Register stack widget: serial sections into one reference frame, shown as a 3D layer."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Select, SpinBox, Table

from ...config import MODES, RegistrationConfig, build_config
from ...progress import report
from ..layers import add_layers, image_ref, landmark_ids, layer_kind, points_in_pixels, snapshot, unwrap
from ._base import DEVICES, RunWidget, on_destroyed, threads_box

if TYPE_CHECKING:
    import napari

ORDERS = ("layer list, bottom to top", "layer list, top to bottom", "estimate from the images")
MIDDLE = "(middle section)"
QC_COLUMNS = ("section", "flag", "confidence", "registered to", "landmarks", "MrTRE before", "MrTRE")


def _stem(name: str) -> str:
    """A layer name without napari's `` [k]`` suffix and a file extension."""
    name = re.sub(r" \[\d+\]$", "", str(name))
    return re.sub(r"\.(csv|jpe?g|png|tiff?|ome\.tiff?|zarr|mha)$", "", name, flags=re.IGNORECASE)


def landmarks_for(image_name: str, points_layers) -> object | None:
    """The Points layer that carries ``image_name``'s landmarks: the one whose name is the
    image's (``lung_lesion_he`` for ``lung_lesion_he.jpg``'s ``lung_lesion_he.csv``) or starts with it."""
    stem = _stem(image_name)
    exact = [p for p in points_layers if _stem(p.name) == stem]
    if exact:
        return exact[0]
    starts = [p for p in points_layers if _stem(p.name).startswith(stem + " ") or _stem(p.name).startswith(stem + "_")]
    return starts[0] if len(starts) == 1 else None


class StackWidget(RunWidget):
    """Register several image layers (serial sections) into the frame of one of them.

    The sections are the chosen image layers in layer-list order (or estimated from the
    images); each is registered to its neighbour towards the reference and the transforms are
    composed. The result is one image layer ``(z, y, x)`` (z = section; napari shows it as
    slices or, in 3D, as a volume), one 3D Points layer with every section's landmarks mapped
    into the reference frame (for sections that have a Points layer named like them), and the
    QC table: each section's flag, confidence and, with landmarks, its rTRE against the
    reference's landmarks (paired by ``id``).
    """

    run_text = "Register stack"
    owner = "stack"
    stages = None  # the stack's own events: 100 steps per section

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        viewer = self._layers_of = unwrap(napari_viewer)  # before RunWidget sets self.viewer: the pickers need it
        defaults = RegistrationConfig()

        def image_layers(_widget=None):
            return [(layer.name, layer) for layer in viewer.layers if layer_kind(layer) == "image"]

        self.sections = Select(label="sections", choices=image_layers,
                               tooltip="the serial sections (all image layers by default); ctrl-click to choose")
        self.order = ComboBox(value=ORDERS[0], choices=list(ORDERS), label="stack order")
        self.reference = ComboBox(label="reference", choices=self._reference_choices)
        self.direct = CheckBox(value=False, text="register every section directly to the reference")
        self.skip_failed = CheckBox(value=False, text="skip sections flagged 'check'")
        self.mode = ComboBox(value=defaults.mode, choices=list(MODES), label="mode")
        self.working_size = SpinBox(value=defaults.preprocess.working_size, min=128, max=4096, step=64, label="working size (px)")
        self.device = ComboBox(value="auto", choices=list(DEVICES), label="device")
        self.threads = threads_box()
        self.qc = Table(value={"data": [], "index": [], "columns": list(QC_COLUMNS)}, label="QC")
        super().__init__(viewer, [self.sections, self.order, self.reference, self.direct, self.skip_failed, self.mode,
                                  self.working_size, self.device, self.threads, self.qc])
        self._select_all()
        self.sections.changed.connect(lambda *_: self.reference.reset_choices())
        self._auto = True  # new image layers join the selection until the user chooses by hand
        self._alive = True
        self.sections.changed.connect(self._user_choice)
        self._emitters = (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved)
        for emitter in self._emitters:
            emitter.connect(self._refresh_sections)
        on_destroyed(self, self._disconnect)

    def _image_layers(self) -> list:
        return [layer for layer in self._layers_of.layers if layer_kind(layer) == "image"]

    def _refresh_sections(self, *_):
        """Layers added, removed or moved: keep the chosen ones, add new images while the user has
        not chosen by hand (never the stack's own output)."""
        if not self.__dict__.get("_alive", False):
            return
        chosen = list(self.sections.value)
        self._refreshing = True
        try:
            self.sections.reset_choices()
            images = self._image_layers()
            present = [c for c in chosen if any(c is layer for layer in images)]
            new = [layer for layer in images if layer.metadata.get("histreg_owner") != self.owner
                   and not any(layer is c for c in chosen)]
            self.sections.value = present + (new if self._auto else [])
        finally:
            self._refreshing = False
        self.reference.reset_choices()

    def _disconnect(self, *_):
        import contextlib

        # napari's emitters hold bound methods weakly, so a collected widget drops out by itself;
        # this runs while Qt deletes the widget, when Python may already have cleared its state
        self.__dict__["_alive"] = False
        for emitter in self.__dict__.get("_emitters", ()):
            with contextlib.suppress(Exception):  # the viewer may be gone first
                emitter.disconnect(self._refresh_sections)

    # ------------------------------------------------------------------ inputs
    def _select_all(self) -> None:
        self._refreshing = True
        try:
            self.sections.value = [layer for layer in self.sections.choices
                                   if getattr(layer, "metadata", {}).get("histreg_owner") != self.owner]
        finally:
            self._refreshing = False
        self.reference.reset_choices()

    def _user_choice(self, *_):
        if not getattr(self, "_refreshing", False):
            self._auto = False

    def ordered_sections(self) -> list:
        """The chosen image layers in stack order (layer-list order, or reversed)."""
        chosen = list(self.sections.value or [])
        layers = [layer for layer in self._layers_of.layers if any(layer is c for c in chosen)]
        return layers[::-1] if self.order.value == ORDERS[1] else layers

    def _reference_choices(self, _widget=None):
        if not hasattr(self, "sections"):
            return [(MIDDLE, None)]
        return [(MIDDLE, None)] + [(layer.name, layer) for layer in self.ordered_sections()]

    def config(self) -> RegistrationConfig:
        return build_config(working_size=self.working_size.value, mode=self.mode.value)

    # ------------------------------------------------------------------ run
    def prepare(self):
        from ...scoring import Landmarks
        from ...stack import landmarks_in_reference, one_kind, register_stack
        from .register import resolve_device

        layers = self.ordered_sections()
        if len(layers) < 2:
            raise ValueError("choose at least two image layers (sections)")
        reference_layer = self.reference.value
        reference = None if reference_layer is None else next(k for k, layer in enumerate(layers) if layer is reference_layer)
        refs = [snapshot(layer) for layer in layers]
        points_layers = [layer for layer in self.viewer.layers if layer_kind(layer) == "points"
                         and layer.metadata.get("histreg_owner") != self.owner]
        found = [landmarks_for(layer.name, points_layers) for layer in layers]
        marks = [None if f is None else (f.name, np.asarray(landmark_ids(f), dtype=object), snapshot(f)) for f in found]
        config, device = self.config(), resolve_device(self.device.value)
        threads = int(self.threads.value) or None
        direct, skip_failed = self.direct.value, self.skip_failed.value
        order = "auto" if self.order.value == ORDERS[2] else None

        def job(progress):
            levels = [image_ref(ref) for ref in refs]
            arrays = [np.asarray(level.data) for level in levels]
            # in the pixels of the level registered (a multiscale layer's, not its level 0)
            landmarks = [None if m is None else Landmarks(m[0], m[1], points_in_pixels(m[2], level))
                         for m, level in zip(marks, levels)]
            stack = register_stack(arrays, reference=reference, order=order, config=config, direct=direct,
                                   skip_failed=skip_failed, names=[ref.name for ref in refs], device=device,
                                   threads=threads, progress=progress)
            permutation = stack.info.get("order") or list(range(len(arrays)))
            report(progress, "stack", 0, 1, "warping the sections onto the reference")
            aligned = stack.aligned(one_kind([arrays[k] for k in permutation]))
            # mapped and scored here, in the worker: inverting fields is no work for the GUI thread
            mapped = landmarks_in_reference(stack, [landmarks[k] for k in permutation])
            return stack, aligned, levels[permutation[stack.reference]], mapped

        return job

    def apply(self, payload) -> str:
        stack, aligned, ref_level, mapped = payload
        reference_name = stack.sections[stack.reference].name
        rgb = aligned.ndim == 4 and aligned.shape[-1] in (3, 4)
        # z = section, one unit apart; (y, x) placed as the reference layer
        place = {"scale": (1.0,) + tuple(ref_level.scale[-2:]), "translate": (0.0,) + tuple(ref_level.translate[-2:])}
        layers = [(aligned, {"name": "registered stack", "rgb": rgb, **place,
                             "metadata": {"histreg_reference": reference_name,
                                          "histreg_sections": [s.name for s in stack.sections]}}, "image")]
        points, ids, section_of = [], [], []
        rows = []
        for k, (section, entry) in enumerate(zip(stack.sections, mapped)):
            row = [section.name, section.flag, "" if section.confidence is None else f"{section.confidence:.2f}",
                   "" if section.registered_to is None else stack.sections[section.registered_to].name, "", "", ""]
            if entry is not None:
                points.append(np.column_stack([np.full(len(entry["mapped"]), float(k)), entry["mapped"]]))
                ids.extend(str(i) for i in entry["landmarks"].ids)
                section_of.extend([section.name] * len(entry["mapped"]))
                row[4] = str(len(entry["mapped"]))
                if entry["metrics"] is not None:
                    row[5], row[6] = f"{entry['metrics']['initial_MrTRE']:.4f}", f"{entry['metrics']['MrTRE']:.4f}"
            rows.append(row)
        if points:
            size = max(4.0, max(aligned.shape[1:3]) / 80.0)
            layers.append((np.concatenate(points), {
                "name": "stack landmarks", **place,
                "features": {"id": np.asarray(ids, dtype=object), "section": np.asarray(section_of, dtype=object)},
                "text": {"string": "{id}", "size": 8, "color": "magenta", "anchor": "upper_left"},
                "face_color": "magenta", "border_color": "black", "size": size, "out_of_slice_display": True,
            }, "points"))
        add_layers(self.viewer, layers, owner=self.owner)
        self.qc.value = {"data": rows, "index": [str(k) for k in range(len(rows))], "columns": list(QC_COLUMNS)}
        flagged = stack.flagged
        text = f"registered {len(stack.sections)} sections onto {reference_name} in {stack.info.get('seconds', 0):.1f} s"
        if flagged:
            names = ", ".join(stack.sections[k].name for k in flagged)
            text += f"; needs a look: {names}"
            from napari.utils.notifications import show_warning

            show_warning(f"napari-histreg: stack sections that need a look: {names}")
        return text
