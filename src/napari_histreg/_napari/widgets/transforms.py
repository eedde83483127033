"""Save / load the last transform, export it for other software (ITK, affine CSV), and apply it
to other layers of the source section."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, Container, FileEdit, Label, PushButton

from ...export import is_affine_only
from ...result import RegistrationResult
from ..layers import add_layers, snapshot
from ..transform_layers import affine_layer, transform_layer
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
    load one, export it (an ITK transform file or the affine part as a 3x3 CSV: the numbers come
    from :mod:`napari_histreg.export`), show an affine-only result as the source layer with a
    layer ``affine`` (no resampling), and apply it to an image (another stain or channel; RGB
    kept), labels (nearest neighbour), points or shapes of the source (points and shapes also the other way, target →
    source, with the ``inverse`` box)."""

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
        self.export_path = FileEdit(mode="w", filter="*.h5 *.tfm *.csv", label="export as")
        self.export_button = PushButton(text="Export ITK / affine CSV")
        self.export_button.tooltip = (".h5 / .tfm: ITK transform (affine + displacement field, pixels as physical "
                                      "units); .csv: the affine part as a 3x3 matrix, source to target (affinder)")
        self.affine_button = PushButton(text="Show as affine layer")
        self.affine_button.tooltip = "for an affine-only result: the source image with a layer affine, not resampled"
        self.layer = layer_picker(napari_viewer, "layer to transform", ("image", "labels", "points", "shapes"))
        self.target = layer_picker(napari_viewer, "place on (target)", ("image",), nullable=True, prefer="target")
        self.source_image = layer_picker(napari_viewer, "points/shapes frame (source image)", ("image",), nullable=True)
        io_box = Container(
            widgets=[self.save_path, self.save_button, self.load_path, self.load_button, self.export_path,
                     self.export_button, self.affine_button], label="", labels=True
        )
        self.inverse = CheckBox(value=False, text="inverse: target → source (points, shapes)")
        self.inverse.tooltip = ("map points / shapes drawn on the target into the source frame (the transform's exact "
                                "direction); the output is placed on the source image")
        super().__init__(napari_viewer, [self.current, io_box, self.layer, self.target, self.source_image, self.inverse])
        self.save_button.changed.connect(lambda *_: self.save())
        self.load_button.changed.connect(lambda *_: self.load())
        self.export_button.changed.connect(lambda *_: self.export())
        self.affine_button.changed.connect(lambda *_: self.show_affine())
        self.session.changed.connect(self._session_changed)
        # bound now: when Qt deletes the widget at exit its Python attributes may be gone already
        # (``self.session`` then raises inside a Qt slot, which aborts the process)
        session, handler = self.session, self._session_changed
        on_destroyed(self, lambda: session.changed.disconnect(handler))
        self._session_changed("result")

    def _session_changed(self, what: str) -> None:
        if what != "result":
            return
        s = self.session
        self.current.value = describe(s.result, s.result_source_name, s.result_target_name)
        self.affine_button.enabled = s.result is not None and is_affine_only(s.result)
        if s.result_target_name and s.result_target_name in self.viewer.layers:
            self.target.value = self.viewer.layers[s.result_target_name]
        if s.result_source_name and s.result_source_name in self.viewer.layers:
            self.source_image.value = self.viewer.layers[s.result_source_name]

    # ------------------------------------------------------------------ save / load
    def _result_and_destination(self, path, verb: str, choose: str):
        """The current result and the file to write it to, or ``(None, None)`` with the status
        saying which is missing (``verb``: what the button does; ``choose``: the file it wants)."""
        result, path = self.session.result, Path(path)
        if result is None:
            self._set_status(f"nothing to {verb}: no transform yet", error=True)
            return None, None
        if not str(path) or path == Path("."):
            self._set_status(f"choose a file to {verb} {choose}", error=True)
            return None, None
        return result, path

    def save(self, path=None) -> Path | None:
        result, path = self._result_and_destination(path or self.save_path.value, "save", "the transform to")
        if result is None:
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

    # ------------------------------------------------------------------ other software
    def export(self, path=None) -> Path | None:
        """Write the current transform for other software: ``.csv`` the affine part (forward,
        3x3), ``.h5`` / ``.tfm`` / ``.txt`` an ITK transform (in pixels)."""
        from ...export import write_affine_csv, write_itk_transform

        result, path = self._result_and_destination(path or self.export_path.value, "export",
                                                    "to (.h5 for ITK, .csv for the affine matrix)")
        if result is None:
            return None
        try:
            if path.suffix.lower() == ".csv":
                write_affine_csv(result, path, overwrite=True)
                note = "" if is_affine_only(result) else "; the non-rigid part is only in an ITK export"
                self._set_status(f"exported {path.name} (affine 3x3, source → target{note})")
            else:
                write_itk_transform(result, path, overwrite=True)
                self._set_status(f"exported {path.name} (ITK affine + displacement field, in pixels)")
        except (OSError, ValueError) as err:
            self._set_status(f"cannot export {path}: {err}", error=True)
            return None
        return path

    def show_affine(self):
        """Add the source image again, laid over the target by a layer ``affine`` (no
        resampling), when the current result is affine-only."""
        result = self.session.result
        if result is None or not is_affine_only(result):
            self._set_status("only an affine-only result can be shown as a layer affine", error=True)
            return None
        try:
            data = affine_layer(result, self.source_image.value, self.target.value)
        except ValueError as err:
            self._set_status(str(err), error=True)
            return None
        (layer,) = add_layers(self.viewer, [data], owner=self.owner)
        self._set_status(f"added {layer.name!r} (layer affine, not resampled)")
        return layer

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
        inverse = bool(self.inverse.value)
        if inverse:
            if ref.kind not in ("points", "shapes"):
                raise ValueError("the inverse direction (target → source) applies to points and shapes only")
            # the layer is in the target's pixels; the output goes onto the source image
            target, source_image = source_image, target

        def job(progress):
            progress_event(progress, 0)
            out = transform_layer(result, ref, target_layer=target, source_image=source_image,
                                  name=transformed_name(ref.name, inverse), inverse=inverse)
            progress_event(progress, 1)
            return out

        return job

    def apply(self, payload) -> str:
        (layer,) = add_layers(self.viewer, [payload], owner=self.owner)
        return f"added {layer.name!r}"


def transformed_name(name: str, inverse: bool = False) -> str:
    """The Transforms widget's output name: never the Register result's ``<name> registered``."""
    return f"{name} to source" if inverse else f"{name} transformed"


def progress_event(progress, step: int) -> None:
    from ...progress import report

    report(progress, "apply", step, 1, "warping")
