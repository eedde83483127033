"""The one-click Register widget: the whole pipeline with sensible defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, SpinBox

from ...config import MASK_METHODS, MODES, RegistrationConfig, build_config
from ...pipeline import describe_representation, register
from ...stages.preprocess import REPRESENTATIONS
from ...progress import report
from ..layers import add_layers, image_ref, result_to_layers, snapshot
from ._base import DEVICES, RunWidget, check_pair, layer_picker, source_target_pickers, threads_box

if TYPE_CHECKING:
    import napari


def resolve_device(name: str):
    """``auto`` / ``cpu`` / ``cuda`` / ``mps`` to a torch device; an unavailable one raises a
    ``ValueError`` naming it (before any worker starts)."""
    from ...conventions import default_device

    return default_device(None if name == "auto" else name)


class RegisterWidget(RunWidget):
    """Register a source section onto a target section and show the result.

    Adds the warped source on the target (same scale/translate, updated in place when run
    again), the deformation as arrows, and, when a source landmarks layer is chosen, the
    landmarks mapped into the target frame. The advanced section holds the stage parameters.
    """

    run_text = "Register"
    owner = "registration"  # shared with the step widgets: one registration result, one set of layers
    stages = ("preprocess", "mask", "initial", "affine", "nonrigid", "layers")

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        defaults = RegistrationConfig()
        self.source, self.target = source_target_pickers(napari_viewer)
        self.source_points = layer_picker(napari_viewer, "source landmarks", ("points",), nullable=True, prefer="source")
        self.mode = ComboBox(
            value=defaults.mode, choices=list(MODES), label="mode",
            tooltip="optimise: instance optimisation (accurate); learned: the networks only (fastest); "
            "hybrid (default): networks, then the optimisation from their result",
        )
        self.show_vectors = CheckBox(value=True, text="show deformation arrows")
        self.show_advanced = CheckBox(value=False, text="advanced settings")
        self.working_size = SpinBox(value=defaults.preprocess.working_size, min=128, max=4096, step=64, label="working size (px)")
        self.representation = ComboBox(
            value=defaults.preprocess.representation, choices=list(REPRESENTATIONS), label="compare",
            tooltip="grey: luminance; a colour pair flagged 'check' is registered once more on the haematoxylin "
            "channel and the clearly more confident result kept. haematoxylin: the counterstain channel from the start",
        )
        self.use_initial = CheckBox(value=defaults.use_initial, text="initial alignment (rotation search)")
        self.use_affine = CheckBox(value=defaults.use_affine, text="affine")
        self.use_mask = CheckBox(value=defaults.use_mask, text="tissue mask")
        self.mask_method = ComboBox(value=defaults.mask_method, choices=list(MASK_METHODS), label="mask method")
        self.nonrigid_method = ComboBox(value=defaults.nonrigid_method, choices=["dense", "patches", "none"], label="non-rigid")
        self.iterations = FloatSpinBox(value=1.0, min=0.05, max=10.0, step=0.25, label="iterations ×")
        self.regularisation = FloatSpinBox(value=defaults.dense.regularisation, min=0.0, max=1000.0, step=0.5, label="regularisation")
        self.show_magnitude = CheckBox(value=False, text="displacement magnitude image")
        self.show_jacobian = CheckBox(value=False, text="Jacobian determinant image")
        self.device = ComboBox(value="auto", choices=list(DEVICES), label="device")
        self.threads = threads_box()
        self.advanced = Container(
            widgets=[
                self.working_size, self.representation, self.use_initial, self.use_affine, self.use_mask, self.mask_method, self.nonrigid_method,
                self.iterations, self.regularisation, self.show_magnitude, self.show_jacobian, self.device, self.threads,
            ],
            label="",
        )
        self.advanced.visible = False
        self.show_advanced.changed.connect(self._toggle_advanced)
        super().__init__(
            napari_viewer,
            [self.source, self.target, self.source_points, self.mode, self.show_vectors, self.show_advanced, self.advanced],
        )

    def _toggle_advanced(self, value: bool) -> None:
        self.advanced.visible = bool(value)

    def config(self) -> RegistrationConfig:
        return build_config(
            working_size=self.working_size.value,
            nonrigid_method=self.nonrigid_method.value,
            iterations_factor=self.iterations.value,
            regularisation=self.regularisation.value,
            use_initial=self.use_initial.value,
            use_affine=self.use_affine.value,
            mask=self.mask_method.value if self.use_mask.value else "none",
            mode=self.mode.value,
            representation=self.representation.value,
        )

    def prepare(self):
        source, target = self.source.value, self.target.value
        check_pair(source, target)
        config = self.config()
        device = resolve_device(self.device.value)
        threads = int(self.threads.value) or None
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        vectors, magnitude, jacobian = self.show_vectors.value, self.show_magnitude.value, self.show_jacobian.value
        self._active_stages = tuple(
            s for s in self.stages
            if s not in ("initial", "affine", "mask", "nonrigid")
            or (s == "initial" and config.use_initial)
            or (s == "affine" and config.use_affine)
            or (s == "mask" and config.use_mask)
            or (s == "nonrigid" and config.nonrigid_method != "none")
        )

        def job(progress):
            src_level, tgt_level = image_ref(src), image_ref(tgt)
            result = register(src_level.data, tgt_level.data, config, device=device, progress=progress,
                              threads=threads)
            result.info["stage"] = "register"
            report(progress, "layers", 0, 1, "warping the source")
            layers = result_to_layers(
                result, src_level, target_layer=tgt_level, source_points=points,
                vectors=vectors, magnitude=magnitude, jacobian=jacobian,
            )
            report(progress, "layers", 1, 1, "adding layers")
            return result, layers, src.name, tgt.name

        return job

    def apply(self, payload) -> str:
        result, layers, source_name, target_name = payload
        add_layers(self.viewer, layers, owner=self.owner)
        self.session.set_result(result, source_name, target_name)
        total = result.timings.get("total")
        threads = result.info.get("threads")
        text = (f"registered {source_name} onto {target_name}" + (f" in {total:.1f} s" if total else "")
                + (f" ({threads} thread{'s' if threads != 1 else ''})" if threads else ""))
        compared = describe_representation(result)
        if compared:
            text += f"; {compared}"
        if result.confidence:
            from ...confidence import describe

            # a flagged result also raised RegistrationNeedsCheck in the worker: a notification
            text += f"; {describe(result.confidence)}" + (": needs a look" if result.flag == "check" else "")
        return text
