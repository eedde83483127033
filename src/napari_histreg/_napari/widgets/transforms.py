"""Save / load the last transform and apply it to other layers of the source section."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, Label, PushButton

from ...result import RegistrationResult
from ..layers import add_layers, snapshot
from ..transform_layers import transform_layer
from ._base import RunWidget, layer_picker, on_destroyed

if TYPE_CHECKING:
    import napari


def describe(result: RegistrationResult | None, source: str | None = None, target: str | None = None) -> str:
    if result is None:
        return "none yet: run Register (or a stage), or load a transform"
    stage = result.info.get("stage", "registration") if isinstance(result.info, dict) else "registration"
    (hs, ws), (ht, wt) = result.source_shape, result.target_shape
    names = f"{source} → {target}, " if source and target else ""
    return f"{stage}: {names}source {hs}x{ws} → target {ht}x{wt}, working {result.working_field.shape[1]}x{result.working_field.shape[2]}"


class TransformsWidget(RunWidget):
    """The current transform (the last run or a loaded one): save it as ``.mha`` + ``.json``,
    load one, and apply it to an image (another stain or channel; RGB kept), labels (nearest
    neighbour), points or shapes of the source."""

    run_text = "Apply to layer"
    stages = None
    owner = "transforms"

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        self.current = Label(value="", label="transform")
        if hasattr(self.current.native, "setWordWrap"):
            self.current.native.setWordWrap(True)
        self.save_path = FileEdit(mode="w", filter="*.json", label="save as")
        self.save_button = PushButton(text="Save transform")
        self.load_path = FileEdit(mode="r", filter="*.json", label="load from")
        self.load_button = PushButton(text="Load transform")
        self.layer = layer_picker(napari_viewer, "layer to transform", ("image", "labels", "points", "shapes"))
        self.target = layer_picker(napari_viewer, "place on (target)", ("image",), nullable=True, prefer="target")
        self.source_image = layer_picker(napari_viewer, "points/shapes frame (source image)", ("image",), nullable=True)
        io_box = Container(
            widgets=[self.save_path, self.save_button, self.load_path, self.load_button], label="", labels=True
        )
        super().__init__(napari_viewer, [self.current, io_box, self.layer, self.target, self.source_image])
        self.save_button.changed.connect(lambda *_: self.save())
        self.load_button.changed.connect(lambda *_: self.load())
        self.session.changed.connect(self._session_changed)
        on_destroyed(self, lambda: self.session.changed.disconnect(self._session_changed))
        self._session_changed("result")

    def _session_changed(self, what: str) -> None:
        if what != "result":
            return
        s = self.session
        self.current.value = describe(s.result, s.result_source_name, s.result_target_name)
        if s.result_target_name and s.result_target_name in self.viewer.layers:
            self.target.value = self.viewer.layers[s.result_target_name]
        if s.result_source_name and s.result_source_name in self.viewer.layers:
            self.source_image.value = self.viewer.layers[s.result_source_name]

    # ------------------------------------------------------------------ save / load
    def save(self, path=None) -> Path | None:
        result = self.session.result
        path = Path(path or self.save_path.value)
        if result is None:
            self._set_status("nothing to save: no transform yet", error=True)
            return None
        if not str(path) or path == Path("."):
            self._set_status("choose a file to save the transform to", error=True)
            return None
        written = result.save(path)
        self._set_status(f"saved {written.with_suffix('.mha').name} + {written.name}")
        return written

    def load(self, path=None) -> RegistrationResult | None:
        path = Path(path or self.load_path.value)
        try:
            result = RegistrationResult.load(path)
        except (OSError, ValueError, KeyError) as err:
            self._set_status(f"cannot load {path}: {err}", error=True)
            return None
        self.session.set_result(result, None, None)
        self._set_status(f"loaded {path.name}")
        return result

    # ------------------------------------------------------------------ apply
    def prepare(self):
        result = self.session.result
        if result is None:
            raise ValueError("no transform: run a registration or load a transform first")
        layer = self.layer.value
        if layer is None:
            raise ValueError("choose a layer to transform")
        ref = snapshot(layer)
        target = snapshot(self.target.value)
        source_image = snapshot(self.source_image.value)

        def job(progress):
            progress_event(progress, 0)
            out = transform_layer(result, ref, target_layer=target, source_image=source_image, name=transformed_name(ref.name))
            progress_event(progress, 1)
            return out

        return job

    def apply(self, payload) -> str:
        (layer,) = add_layers(self.viewer, [payload], owner=self.owner)
        return f"added {layer.name!r}"


def transformed_name(name: str) -> str:
    """The Transforms widget's output name: never the Register result's ``<name> registered``."""
    return f"{name} transformed"


def progress_event(progress, step: int) -> None:
    from ...progress import report

    report(progress, "apply", step, 1, "warping")
