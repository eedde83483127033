"""One widget per pipeline stage. They continue from each other through the viewer's session:

Preprocess -> (working pair) -> Initial alignment -> (matrix) -> Affine -> (matrix) -> Non-rigid.

A stage whose input is missing for the chosen layers computes it with the defaults first
(e.g. Affine on a pair that was never preprocessed preprocesses it), so any widget can be used
on its own.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox

from ...config import RegistrationConfig, build_config
from ...conventions import affine_to_field
from ...pipeline import Pipeline
from ...progress import report
from ...result import RegistrationResult
from ...stages.affine import AffineConfig
from ...stages.initial import InitialAlignmentConfig
from ...stages.nonrigid import DenseConfig
from ...stages.preprocess import PreparedPair, PreprocessConfig
from ...threads import torch_threads
from ..layers import add_layers, image_ref, result_to_layers, snapshot, working_placement
from ..session import PairKey
from ._base import DEVICES, RunWidget, check_pair, layer_picker, source_target_pickers, threads_box
from .register import resolve_device

if TYPE_CHECKING:
    import napari

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


MASKS = {"none": None, "Otsu": "otsu", "tissue U-Net": "unet"}

#: Affine widget method -> the pipeline mode whose affine stage it runs.
AFFINE_MODES = {"optimise": "optimise", "network": "learned", "hybrid": "hybrid"}

#: Non-rigid widget method -> (pipeline mode, non-rigid method) whose non-rigid stage it runs.
NONRIGID_MODES = {
    "dense": ("optimise", "dense"),
    "patches": ("optimise", "patches"),
    "network": ("learned", "dense"),
    "network + dense": ("hybrid", "dense"),
}


def stage_pipeline(device, preprocess: PreprocessConfig, mask: str | None, **knobs) -> Pipeline:
    """The pipeline whose bound stages a widget runs: the working pair made with ``preprocess``
    and ``mask`` (None, ``"otsu"`` or ``"unet"``), the other stages set by ``knobs``
    (:func:`~napari_histreg.config.build_config`'s), so that a widget runs exactly what
    ``register`` would with the same settings."""
    base = RegistrationConfig(preprocess=preprocess)
    return Pipeline(build_config(base, mask=mask or "none", **knobs), device)


@dataclasses.dataclass
class PairPlan:
    """The working pair a stage runs on: the session's (``pair``) or one to make, with what."""

    key: PairKey
    pair: PreparedPair | None
    preprocess: PreprocessConfig
    mask: str | None


@dataclasses.dataclass
class StageOutput:
    """What a stage widget's worker hands back to the GUI thread."""

    plan: PairPlan
    pair: PreparedPair
    layers: list
    message: str
    result: RegistrationResult | None = None
    names: tuple[str, str] | None = None  # the source and target layers ``result`` belongs to
    matrix: np.ndarray | None = None  # kept in the session as the latest affine, made by ``stage``
    stage: str | None = None


class _StageWidget(RunWidget):
    """Source/target pickers, device and threads; the pair comes from the session or is made
    here. Stages that produce a transform also map the chosen source landmarks, so every
    result layer (warped image, arrows, registered landmarks) shows the same, latest result."""

    owner = "registration"  # the layers of Register too: one registration, one set of result layers
    maps_landmarks = True

    def __init__(self, napari_viewer, widgets: list, run_text: str) -> None:
        self.source, self.target = source_target_pickers(napari_viewer)
        extra = []
        if self.maps_landmarks:
            self.source_points = layer_picker(napari_viewer, "source landmarks", ("points",), nullable=True, prefer="source")
            extra.append(self.source_points)
        self.device = ComboBox(value="auto", choices=list(DEVICES), label="device")
        self.threads = threads_box()
        super().__init__(napari_viewer, [self.source, self.target, *extra, *widgets, self.device, self.threads],
                         run_text=run_text)

    def _inputs(self):
        source, target = self.source.value, self.target.value
        check_pair(source, target)
        return source, target, resolve_device(self.device.value)

    def _threaded(self, job):
        """``job`` run on the widget's torch threads (0: chosen from the free cores)."""
        threads = int(self.threads.value) or None

        def run(progress):
            with torch_threads(threads):
                return job(progress)

        return run

    def _shown(self, source_name: str) -> dict:
        """Which field layers of this source are already shown (owned by the registration): a
        stage keeps each of them up to date, so none describes an older result."""
        from ..layers import shown_field_layers

        return shown_field_layers(self.viewer, source_name, self.owner)

    def _pair_plan(self, source, target) -> PairPlan:
        """The session's pair for these layers, or what to compute it with."""
        key = PairKey.of(source, target)
        if self.session.has_pair_for(source, target):
            return PairPlan(key, self.session.pair, self.session.preprocess_config, self.session.mask_method)
        return PairPlan(key, None, self.session.preprocess_config or PreprocessConfig(), None)

    @staticmethod
    def _levels_and_pair(src, tgt, plan: PairPlan, pipeline: Pipeline, progress):
        """(source level, target level, pair): the registered levels of the layers and the
        planned pair, made by ``pipeline`` from those levels when the session has none."""
        src_level, tgt_level = image_ref(src), image_ref(tgt)
        return src_level, tgt_level, plan.pair or pipeline.prepare(src_level.data, tgt_level.data, progress)

    def _transform_output(self, result, plan, pair, points, shown, src, tgt, src_level, tgt_level, progress,
                          message, stage=None, **flags) -> StageOutput:
        """A stage's result as layers (warped source, field layers shown, mapped landmarks)."""
        report(progress, "layers", 0, 1, "warping the source")
        layers = result_to_layers(result, src_level, target_layer=tgt_level, source_points=points, **{**shown, **flags})
        return StageOutput(plan, pair, layers, message, result, (src.name, tgt.name),
                           result.matrix if stage else None, stage)

    def apply(self, out: StageOutput) -> str:
        """Keep a stage's outputs in the session (the pair when it was made here, the matrix
        when given, the result) and add its layers."""
        if self.session.pair is not out.pair:
            self.session.set_pair(out.plan.key, out.pair, out.plan.preprocess, out.plan.mask)
        if out.matrix is not None:
            self.session.set_matrix(out.matrix, out.stage)
        if out.result is not None:
            self.session.set_result(out.result, *out.names)
        add_layers(self.viewer, out.layers, owner=self.owner)
        return out.message


class PreprocessWidget(_StageWidget):
    """Preprocess the pair (grey, invert, anti-aliased resampling, padding, entropy-guided
    equalisation) and show the working pair, overlaid on the target."""

    stages = None
    owner = "preprocess"
    maps_landmarks = False

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        d = PreprocessConfig()
        self.working_size = SpinBox(value=d.working_size, min=128, max=4096, step=64, label="working size (px)")
        self.invert = CheckBox(value=d.invert, text="invert (tissue bright)")
        self.equalise = CheckBox(value=d.equalise, text="entropy-guided equalisation")
        self.clahe = CheckBox(value=d.clahe, text="CLAHE")
        self.mask = ComboBox(value="none", choices=list(MASKS), label="tissue mask")
        super().__init__(napari_viewer, [self.working_size, self.invert, self.equalise, self.clahe, self.mask], "Preprocess")

    def prepare(self):
        source, target, device = self._inputs()
        config = dataclasses.replace(
            PreprocessConfig(), working_size=int(self.working_size.value), invert=self.invert.value,
            equalise=self.equalise.value, clahe=self.clahe.value,
        )
        plan = PairPlan(PairKey.of(source, target), None, config, MASKS[self.mask.value])
        pipeline = stage_pipeline(device, config, plan.mask)
        src, tgt = snapshot(source), snapshot(target)

        def job(progress):
            src_level, tgt_level, pair = self._levels_and_pair(src, tgt, plan, pipeline, progress)
            place = working_placement(pair.target_frame, tgt_level)
            layers = [
                (pair.target, {"name": f"{tgt.name} (working)", "colormap": "green", "blending": "additive", **place}, "image"),
                (pair.source, {"name": f"{src.name} (working)", "colormap": "magenta", "blending": "additive", **place}, "image"),
            ]
            h, w = pair.target.shape
            return StageOutput(plan, pair, layers, f"working pair {h}x{w} px (scale {pair.target_frame.scale[0]:.3f})")

        return self._threaded(job)


class InitialAlignmentWidget(_StageWidget):
    """Centroid translation and an exhaustive rotation search scored by NCC."""

    stages = ("preprocess", "initial", "layers")

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        d = InitialAlignmentConfig()
        self.angle_step = FloatSpinBox(value=d.angle_step, min=0.1, max=45.0, step=0.5, label="angle step (°)")
        self.search_size = SpinBox(value=d.search_size, min=32, max=1024, step=32, label="search size (px)")
        self.use_centroid = CheckBox(value=d.use_centroid, text="centroid translation")
        super().__init__(napari_viewer, [self.angle_step, self.search_size, self.use_centroid], "Align")

    def prepare(self):
        source, target, device = self._inputs()
        plan = self._pair_plan(source, target)
        settings = {"angle_step": float(self.angle_step.value), "search_size": int(self.search_size.value),
                    "use_centroid": bool(self.use_centroid.value)}
        pipeline = stage_pipeline(device, plan.preprocess, plan.mask, overrides={"initial": settings})
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)

        def job(progress):
            src_level, tgt_level, pair = self._levels_and_pair(src, tgt, plan, pipeline, progress)
            found = pipeline.initial(pair.source, pair.target, progress)
            result = pipeline.result(pair, found.matrix, info={"stage": "initial", "angle": found.angle, "score": found.score})
            return self._transform_output(result, plan, pair, points, shown, src, tgt, src_level, tgt_level, progress,
                                          f"rotation {found.angle:.2f}°, NCC {found.score:.3f}", stage="initial")

        return self._threaded(job)


#: Affine widget methods: instance optimisation, the affine network, hybrid mode's network + short optimisation.
STAGE_METHODS = tuple(AFFINE_MODES)


class AffineWidget(_StageWidget):
    """The affine network, or optimisation of the six affine parameters (-NCC on a pyramid), or
    the network followed by a short optimisation (as ``hybrid`` mode runs it, falling back to the
    full optimisation if the network's start is clearly worse), from the initial alignment."""

    stages = ("preprocess", "affine", "layers")

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        d = AffineConfig()
        self.method = ComboBox(value="optimise", choices=list(STAGE_METHODS), label="method")
        self.start = ComboBox(value="previous stage", choices=["previous stage", "identity"], label="start from")
        self.iterations = FloatSpinBox(value=1.0, min=0.05, max=10.0, step=0.25, label="iterations ×")
        self.learning_rate = FloatSpinBox(value=d.learning_rate, min=1e-5, max=1.0, step=0.001, label="learning rate")
        super().__init__(napari_viewer, [self.method, self.start, self.iterations, self.learning_rate], "Affine")

    def prepare(self):
        source, target, device = self._inputs()
        plan = self._pair_plan(source, target)
        rate = {"learning_rate": float(self.learning_rate.value)}  # both affine optimisations: full and hybrid's short one
        pipeline = stage_pipeline(device, plan.preprocess, plan.mask, mode=AFFINE_MODES[self.method.value],
                                  iterations_factor=float(self.iterations.value),
                                  overrides={"affine": dict(rate), "hybrid_affine": dict(rate)})
        start, started_from = IDENTITY, "identity"
        if plan.pair is not None and self.start.value == "previous stage" and self.session.matrix is not None:
            start, started_from = self.session.matrix, self.session.matrix_stage or "previous stage"
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)

        def job(progress):
            src_level, tgt_level, pair = self._levels_and_pair(src, tgt, plan, pipeline, progress)
            matrix = pipeline.affine(pair.source, pair.target, start, progress)
            result = pipeline.result(pair, matrix, info={"stage": "affine"})
            return self._transform_output(result, plan, pair, points, shown, src, tgt, src_level, tgt_level, progress,
                                          f"affine done (started from {started_from})", stage="affine")

        return self._threaded(job)


class NonrigidWidget(_StageWidget):
    """Dense instance optimisation, the patch-group engine with per-patch optimisation, or the
    patch-group network (``network``, alone or followed by the dense optimisation), from the
    last affine."""

    stages = ("preprocess", "nonrigid", "layers")

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        d = DenseConfig()
        self.method = ComboBox(value="dense", choices=list(NONRIGID_MODES), label="method")
        self.iterations = FloatSpinBox(value=1.0, min=0.05, max=10.0, step=0.25, label="iterations ×")
        self.regularisation = FloatSpinBox(value=d.regularisation, min=0.0, max=1000.0, step=0.5, label="regularisation")
        self.show_vectors = CheckBox(value=True, text="deformation arrows")
        self.show_magnitude = CheckBox(value=False, text="displacement magnitude image")
        self.show_jacobian = CheckBox(value=False, text="Jacobian determinant image")
        super().__init__(
            napari_viewer,
            [self.method, self.iterations, self.regularisation, self.show_vectors, self.show_magnitude, self.show_jacobian],
            "Register non-rigidly",
        )

    def prepare(self):
        source, target, device = self._inputs()
        method = self.method.value
        mode, nonrigid_method = NONRIGID_MODES[method]
        plan = self._pair_plan(source, target)
        pipeline = stage_pipeline(device, plan.preprocess, plan.mask, mode=mode, nonrigid_method=nonrigid_method,
                                  iterations_factor=float(self.iterations.value), regularisation=float(self.regularisation.value))
        previous = plan.pair is not None and self.session.matrix is not None
        matrix = self.session.matrix if previous else IDENTITY
        started_from = self.session.matrix_stage if previous else "identity"
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)
        flags = dict(vectors=self.show_vectors.value or shown["vectors"], magnitude=self.show_magnitude.value or shown["magnitude"],
                     jacobian=self.show_jacobian.value or shown["jacobian"])

        def job(progress):
            src_level, tgt_level, pair = self._levels_and_pair(src, tgt, plan, pipeline, progress)
            start = affine_to_field(matrix, pair.target.shape)[0].numpy()
            field = pipeline.nonrigid(pair.source, pair.target, start, progress)
            result = pipeline.result(pair, matrix, field, info={"stage": "nonrigid", "method": method})
            return self._transform_output(result, plan, pair, points, shown, src, tgt, src_level, tgt_level, progress,
                                          f"non-rigid done (started from {started_from})", **flags)

        return self._threaded(job)
