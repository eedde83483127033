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

from ...config import scaled_iterations
from ...conventions import affine_to_field
from ...pipeline import RegistrationConfig, checked_learned_affine, checked_learned_nonrigid, hybrid_affine, hybrid_nonrigid
from ...progress import report
from ...result import RegistrationResult
from ...stages.affine import AffineConfig, optimise_affine
from ...stages.initial import InitialAlignmentConfig, initial_alignment
from ...stages.learned_nonrigid import LearnedNonrigidConfig
from ...stages.mask import otsu_tissue_mask
from ...stages.nonrigid import DenseConfig, PatchConfig, dense_nonrigid, patch_nonrigid
from ...stages.preprocess import PreparedPair, PreprocessConfig, preprocess_pair
from ...stages.segment import unet_tissue_mask
from ...threads import torch_threads
from ..layers import add_layers, image_ref, map_points_layer, result_to_layers, snapshot, working_placement
from ..session import PairKey
from ._base import DEVICES, RunWidget, check_pair, layer_picker, source_target_pickers, threads_box
from .register import resolve_device

if TYPE_CHECKING:
    import napari

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


MASKS = {"none": None, "Otsu": "otsu", "tissue U-Net": "unet"}


def _tissue_mask(image: np.ndarray, method, device) -> np.ndarray:
    if method == "unet":
        return unet_tissue_mask(image, device=device)
    return otsu_tissue_mask(image)


def _prepare_pair(source, target, config: PreprocessConfig, mask, device, progress) -> PreparedPair:
    """Preprocess (and optionally mask: ``mask`` is None, ``"otsu"`` or ``"unet"``) a
    pair, reporting ``preprocess`` events."""
    report(progress, "preprocess", 0, 1, "working pair")
    pair = preprocess_pair(source, target, config, device)
    if mask:
        pair = dataclasses.replace(
            pair,
            source=pair.source * _tissue_mask(pair.source, mask, device),
            target=pair.target * _tissue_mask(pair.target, mask, device),
        )
    report(progress, "preprocess", 1, 1, "working pair")
    return pair


def _levels_and_pair(src, tgt, pair, pconfig, mask, device, progress):
    """(source level, target level, pair): the registered levels of the layers and the session's
    pair, or one made from those levels."""
    src_level, tgt_level = image_ref(src), image_ref(tgt)
    return src_level, tgt_level, pair or _prepare_pair(src_level.data, tgt_level.data, pconfig, mask, device, progress)


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
        from ..layers import owned_layer

        names = {"vectors": "deformation", "magnitude": "displacement magnitude", "jacobian": "Jacobian determinant"}
        return {flag: owned_layer(self.viewer, f"{source_name} {suffix}", self.owner) is not None for flag, suffix in names.items()}

    def _landmark_layers(self, result, points, src_level, tgt_level) -> list:
        """The registered landmarks layer for ``points`` (a snapshot, or None: no layer)."""
        if points is None:
            return []
        return [map_points_layer(result, points, source_image=src_level, target_layer=tgt_level)]

    def _pair_plan(self, source, target):
        """(pair or None, key, config, mask): the session's pair for these layers, or what to
        compute it with."""
        key = PairKey.of(source, target)
        if self.session.has_pair_for(source, target):
            return self.session.pair, key, self.session.preprocess_config, self.session.mask_method
        return None, key, self.session.preprocess_config or PreprocessConfig(), None

    def _store(self, key, pair, pconfig, mask, result, layers, names, matrix=None, stage=None) -> None:
        """Keep a stage's outputs: the pair (when it was made here), the matrix (when given), the
        result (``names``: source and target layer names), and add its layers."""
        if self.session.pair is not pair:
            self.session.set_pair(key, pair, pconfig, mask)
        if matrix is not None:
            self.session.set_matrix(matrix, stage)
        self.session.set_result(result, *names)
        add_layers(self.viewer, layers, owner=self.owner)


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
        mask = MASKS[self.mask.value]
        key = PairKey.of(source, target)
        src, tgt = snapshot(source), snapshot(target)

        def job(progress):
            src_level, tgt_level = image_ref(src), image_ref(tgt)
            pair = _prepare_pair(src_level.data, tgt_level.data, config, mask, device, progress)
            place = working_placement(pair.target_frame, tgt_level)
            layers = [
                (pair.target, {"name": f"{tgt.name} (working)", "colormap": "green", "blending": "additive", **place}, "image"),
                (pair.source, {"name": f"{src.name} (working)", "colormap": "magenta", "blending": "additive", **place}, "image"),
            ]
            return key, pair, config, mask, layers

        return self._threaded(job)

    def apply(self, payload) -> str:
        key, pair, config, mask, layers = payload
        self.session.set_pair(key, pair, config, mask)
        add_layers(self.viewer, layers, owner=self.owner)
        h, w = pair.target.shape
        return f"working pair {h}x{w} px (scale {pair.target_frame.scale[0]:.3f})"


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
        config = dataclasses.replace(
            InitialAlignmentConfig(), angle_step=float(self.angle_step.value), search_size=int(self.search_size.value),
            use_centroid=self.use_centroid.value,
        )
        pair, key, pconfig, mask = self._pair_plan(source, target)
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)

        def job(progress):
            src_level, tgt_level, p = _levels_and_pair(src, tgt, pair, pconfig, mask, device, progress)
            found = initial_alignment(p.source, p.target, config, device, progress)
            result = _affine_result(p, found.matrix, "initial")
            result.info.update(angle=found.angle, score=found.score)
            report(progress, "layers", 0, 1, "warping the source")
            layers = result_to_layers(result, src_level, target_layer=tgt_level, **shown)
            layers += self._landmark_layers(result, points, src_level, tgt_level)
            return key, p, pconfig, mask, found, result, layers, src.name, tgt.name

        return self._threaded(job)

    def apply(self, payload) -> str:
        key, pair, pconfig, mask, found, result, layers, sname, tname = payload
        self._store(key, pair, pconfig, mask, result, layers, (sname, tname), found.matrix, "initial")
        return f"rotation {found.angle:.2f}°, NCC {found.score:.3f}"


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
        method = self.method.value
        settings = RegistrationConfig()  # this widget's schedule in both of the affine optimisations
        settings.affine, settings.hybrid_affine = (
            dataclasses.replace(d, iterations=scaled_iterations(d.iterations, self.iterations.value), learning_rate=float(self.learning_rate.value))
            for d in (settings.affine, settings.hybrid_affine)
        )
        pair, key, pconfig, mask = self._pair_plan(source, target)
        start = IDENTITY
        started_from = "identity"
        if pair is not None and self.start.value == "previous stage" and self.session.matrix is not None:
            start, started_from = self.session.matrix, self.session.matrix_stage or "previous stage"
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)

        def job(progress):
            src_level, tgt_level, p = _levels_and_pair(src, tgt, pair, pconfig, mask, device, progress)
            # exactly the pipeline's affine stage of each mode, with this widget's schedule
            if method == "optimise":
                matrix = optimise_affine(p.source, p.target, start, settings.affine, device, progress)
            elif method == "network":
                matrix = checked_learned_affine(p.source, p.target, start, settings.learned_affine, device, progress)
            else:
                matrix = hybrid_affine(p.source, p.target, start, settings.learned_affine, settings.hybrid_affine, settings.affine,
                                       device, progress)
            result = _affine_result(p, matrix, "affine")
            report(progress, "layers", 0, 1, "warping the source")
            layers = result_to_layers(result, src_level, target_layer=tgt_level, **shown)
            layers += self._landmark_layers(result, points, src_level, tgt_level)
            return key, p, pconfig, mask, matrix, result, layers, src.name, tgt.name, started_from

        return self._threaded(job)

    def apply(self, payload) -> str:
        key, pair, pconfig, mask, matrix, result, layers, sname, tname, started_from = payload
        self._store(key, pair, pconfig, mask, result, layers, (sname, tname), matrix, "affine")
        return f"affine done (started from {started_from})"


class NonrigidWidget(_StageWidget):
    """Dense instance optimisation, the patch-group engine with per-patch optimisation, or the
    patch-group network (``network``), from the last affine."""

    stages = ("preprocess", "nonrigid", "layers")

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        d = DenseConfig()
        self.method = ComboBox(value="dense", choices=["dense", "patches", "network", "network + dense"], label="method")
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
        factor = float(self.iterations.value)
        dense = DenseConfig()
        dense = dataclasses.replace(dense, iterations=scaled_iterations(dense.iterations, factor), regularisation=float(self.regularisation.value))
        patches = PatchConfig()
        patches = dataclasses.replace(patches, iterations=scaled_iterations(patches.iterations, factor))
        pair, key, pconfig, mask = self._pair_plan(source, target)
        matrix = self.session.matrix if pair is not None and self.session.matrix is not None else IDENTITY
        started_from = self.session.matrix_stage if pair is not None and self.session.matrix is not None else "identity"
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = self._shown(src.name)
        flags = dict(vectors=self.show_vectors.value or shown["vectors"], magnitude=self.show_magnitude.value or shown["magnitude"],
                     jacobian=self.show_jacobian.value or shown["jacobian"])

        def job(progress):
            src_level, tgt_level, p = _levels_and_pair(src, tgt, pair, pconfig, mask, device, progress)
            start = affine_to_field(matrix, p.target.shape)[0].numpy()
            if method == "network":  # exactly the pipeline's learned non-rigid stage
                field = checked_learned_nonrigid(p.source, p.target, start, LearnedNonrigidConfig(), device, progress)
            elif method == "network + dense":  # exactly the pipeline's hybrid non-rigid stage
                field = hybrid_nonrigid(p.source, p.target, start, LearnedNonrigidConfig(), dense, device, progress)
            elif method == "dense":
                field = dense_nonrigid(p.source, p.target, start, dense, device, progress)
            else:
                field = patch_nonrigid(p.source, p.target, start, None, patches, device, progress)
            result = RegistrationResult(
                np.asarray(field, dtype=np.float32), p.source_frame, p.target_frame, np.asarray(matrix, dtype=np.float64),
                info={"stage": "nonrigid", "method": method}, working_source=p.source, working_target=p.target,
            )
            report(progress, "layers", 0, 1, "warping the source")
            layers = result_to_layers(result, src_level, target_layer=tgt_level, source_points=points, **flags)
            return key, p, pconfig, mask, result, layers, src.name, tgt.name, started_from

        return self._threaded(job)

    def apply(self, payload) -> str:
        key, pair, pconfig, mask, result, layers, sname, tname, started_from = payload
        self._store(key, pair, pconfig, mask, result, layers, (sname, tname))
        return f"non-rigid done (started from {started_from})"


#: Affine widget methods: instance optimisation, the affine network, hybrid mode's network + short optimisation.
STAGE_METHODS = ("optimise", "network", "hybrid")


def _affine_result(pair: PreparedPair, matrix, stage: str) -> RegistrationResult:
    field = affine_to_field(matrix, pair.target.shape)[0].numpy().astype(np.float32)
    return RegistrationResult(
        field, pair.source_frame, pair.target_frame, np.asarray(matrix, dtype=np.float64),
        info={"stage": stage}, working_source=pair.source, working_target=pair.target,
    )
