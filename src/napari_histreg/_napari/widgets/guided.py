"""*Refine with landmarks*: a few corresponding points clicked on the source and the target
correct the last registration (:func:`napari_histreg.guided.refine_result`), or align the pair
on their own, the manual fallback (:func:`napari_histreg.guided.points_result`: an affine, a
similarity or a thin-plate spline). Thin: layers -> arrays, the worker, the result -> the same
layers the Register widget makes (updated in place) and the session (Transforms, Landmark QC)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox

from ...progress import report
from ..layers import (
    add_layers,
    image_ref,
    landmark_ids,
    owned_layer,
    points_in_pixels,
    result_to_layers,
    shown_field_layers,
    snapshot,
    to_registered_pixels,
    unwrap,
    warped_name,
)
from ._base import DEVICES, RunWidget, check_pair, layer_picker, source_target_pickers, threads_box
from .register import resolve_device

if TYPE_CHECKING:
    import napari

REFINE = "Refine the last registration"
#: the manual fallbacks: action -> ``points_result`` model
FROM_POINTS = {
    "Affine from points": "affine",
    "Similarity from points": "similarity",
    "Thin-plate spline from points": "tps",
}
ACTIONS = (REFINE, *FROM_POINTS)


def pair_guides(source_ids, target_ids, n_source: int, n_target: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Pair guide points: by id when both layers have ids (``None``: no ``id`` feature) in
    common, else by order (equal counts needed). Returns the source indices, the target indices
    (target order) and how they were paired, for the status line. Bad input raises a
    ``ValueError`` that names the problem."""
    if source_ids is not None and target_ids is not None:
        common = {str(i) for i in source_ids if str(i)} & {str(i) for i in target_ids if str(i)}
        if common:
            for ids, which in ((source_ids, "source"), (target_ids, "target")):
                counts = Counter(map(str, ids))
                repeated = sorted(i for i in common if counts[i] > 1)
                if repeated:
                    raise ValueError(f"id {', '.join(repeated)} repeated in the {which} guide points: "
                                     "give each point its own id")
            where = {str(i): k for k, i in enumerate(source_ids)}
            t_idx = [k for k, i in enumerate(target_ids) if str(i) in common]
            s_idx = [where[str(target_ids[k])] for k in t_idx]
            left = n_source + n_target - 2 * len(t_idx)
            how = "paired by id" + (f"; {left} point{'s' if left != 1 else ''} without a partner left out" if left else "")
            return np.asarray(s_idx, dtype=int), np.asarray(t_idx, dtype=int), how
    if n_source != n_target:
        raise ValueError(f"{n_source} source guide points but {n_target} target guide points and no ids in common: "
                         "click the same number on each (they pair by order) or give them matching ids")
    if n_source < 1:
        raise ValueError("no guide points: click at least one point on the source and its partner on the target")
    order = np.arange(n_source)
    return order, order, "paired by order"


def _ids_of(layer):
    features = getattr(layer, "features", None)
    if features is None or "id" not in getattr(features, "columns", ()):
        return None
    return landmark_ids(features, len(layer.data))


class GuidedWidget(RunWidget):
    """Correct a registration through corresponding points, or align a pair from points alone.

    Click a few points on the source (a Points layer over the source image) and their partners
    on the target (another Points layer; paired by the ``id`` feature, else by order).
    *Refine the last registration* re-runs the correction of the last result of this pair so
    that it passes through the points (restarting from the points' affine when they say the
    automatic one is wrong); the *... from points* actions compute the transform from the
    points alone. The registered image, the deformation arrows and the registered landmarks
    are updated in place, and the result becomes the session's (Transforms, Landmark QC)."""

    run_text = "Run"
    owner = "registration"  # the Register widget's layers: one registration, one set of result layers
    stages = None  # each event fills the bar by its own step/total: the path taken is known only at the end

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:  # noqa: F821
        self.source, self.target = source_target_pickers(napari_viewer)
        self.source_guides = layer_picker(napari_viewer, "source guide points", ("points",), nullable=True, prefer="source guide")
        self.target_guides = layer_picker(napari_viewer, "target guide points", ("points",), nullable=True, prefer="target guide")
        viewer = unwrap(napari_viewer)

        def mapped_before(layers):  # the source landmarks the registration shows mapped already
            for layer in layers:
                if (layer.metadata or {}).get("histreg_owner") != self.owner and owned_layer(
                        viewer, warped_name(layer.name), self.owner) is not None:
                    return layer
            return None

        self.source_points = layer_picker(napari_viewer, "source landmarks to map", ("points",), nullable=True,
                                          prefer="source landmark", choose=mapped_before)
        self.action = ComboBox(value=REFINE, choices=list(ACTIONS), label="action",
                               tooltip="refine: the last registration of this pair made to pass through the points; "
                               "from points: the transform from the points alone (no image used)")
        self.device = ComboBox(value="auto", choices=list(DEVICES), label="device")
        self.threads = threads_box()
        super().__init__(napari_viewer, [self.source, self.target, self.source_guides, self.target_guides,
                                         self.source_points, self.action, self.device, self.threads])

    # ------------------------------------------------------------------ inputs
    def guide_pairs(self):
        """``(source guides, target guides, source indices, target indices, how)``; bad input
        raises a ``ValueError`` naming it."""
        s_layer, t_layer = self.source_guides.value, self.target_guides.value
        if s_layer is None or t_layer is None:
            raise ValueError("choose a source and a target guide Points layer")
        if s_layer is t_layer:
            raise ValueError("the source and target guide points are the same layer: click the source's on one "
                             "Points layer and the target's on another")
        s_idx, t_idx, how = pair_guides(_ids_of(s_layer), _ids_of(t_layer), len(s_layer.data), len(t_layer.data))
        return snapshot(s_layer), snapshot(t_layer), s_idx, t_idx, how

    def _result_to_refine(self, source, target):
        s = self.session
        result = s.result
        if result is None:
            raise ValueError("no registration to refine: run Register on this pair first, or choose an action "
                             "'... from points'")
        if (result.info or {}).get("mode") == "points":
            raise ValueError("the last transform comes from the points alone: register the pair (Register) to "
                             "refine it, or run '... from points' again")
        if s.result_source_name is not None and (s.result_source_name, s.result_target_name) != (source.name, target.name):
            raise ValueError(f"the last registration is of {s.result_source_name!r} onto {s.result_target_name!r}, "
                             f"not of {source.name!r} onto {target.name!r}: register this pair first")
        return result

    def prepare(self):
        source, target = self.source.value, self.target.value
        check_pair(source, target)
        s_ref, t_ref, s_idx, t_idx, how = self.guide_pairs()
        action = self.action.value
        model = FROM_POINTS.get(action)
        if model == "tps" and len(s_idx) < 3:
            raise ValueError(f"a thin-plate spline needs at least 3 point pairs, got {len(s_idx)}")
        base = self._result_to_refine(source, target) if model is None else None
        device = resolve_device(self.device.value) if model is None else None
        threads = int(self.threads.value) or None
        src, tgt = snapshot(source), snapshot(target)
        points = snapshot(self.source_points.value)
        shown = shown_field_layers(self.viewer, src.name, self.owner)

        def job(progress):
            from ...guided import points_result, refine_result

            src_level, tgt_level = image_ref(src), image_ref(tgt)
            source_rc = points_in_pixels(s_ref, src_level)[s_idx]
            target_rc = points_in_pixels(t_ref, tgt_level)[t_idx]
            if model is None:
                source_rc = to_registered_pixels(source_rc, src_level.shape, base.source_shape)
                target_rc = to_registered_pixels(target_rc, tgt_level.shape, base.target_shape)
                report(progress, "guide", 0, 1, f"refining through {len(source_rc)} point pairs")
                held = base.working_source is not None and base.working_target is not None
                result = refine_result(base, source_rc, target_rc, source_image=None if held else src_level.data,
                                       target_image=None if held else tgt_level.data, progress=progress,
                                       device=device, threads=threads)
                result.info["stage"] = "refined with landmarks"
            else:
                report(progress, "guide", 0, 1, f"{action.lower()}: {len(source_rc)} point pairs")
                result = points_result(src_level.shape[:2], tgt_level.shape[:2], source_rc, target_rc, model=model)
            # how far the result leaves each source guide from its target guide, in target pixels
            miss = float(np.linalg.norm(result.map_source_points(source_rc) - target_rc, axis=1).max())
            report(progress, "layers", 0, 1, "warping the source")
            layers = result_to_layers(result, src_level, target_layer=tgt_level, source_points=points, **shown)
            report(progress, "layers", 1, 1, "adding layers")
            return result, layers, src.name, tgt.name, how, miss

        return job

    def apply(self, payload) -> str:
        result, layers, source_name, target_name, how, miss = payload
        add_layers(self.viewer, layers, owner=self.owner)
        self.session.set_result(result, source_name, target_name)
        guide = result.info.get("guide", {})
        n = guide.get("points", 0)
        pairs = f"{n} point pair{'s' if n != 1 else ''} ({how})"
        if result.info.get("mode") == "points":
            model = guide.get("model", "")
            fit = f"guides met within {miss:.2f} px" if model == "tps" else f"largest miss at a guide {miss:.2f} px (least squares)"
            text = (f"{'thin-plate spline' if model == 'tps' else model} of {source_name} onto {target_name} from {pairs} "
                    f"alone: {fit}")
        else:
            text = f"refined {source_name} onto {target_name} through {pairs}: guides met within {miss:.2f} px"
            if guide.get("restarted_from_points"):
                text += "; restarted from the points' affine (the automatic one disagreed with them)"
        confidence = result.confidence or {}
        if confidence.get("score") is not None:
            from ...confidence import describe

            # a flagged result also raised RegistrationNeedsCheck in the worker: a notification
            text += f"; {describe(confidence)}" + (": needs a look" if result.flag == "check" else "")
        return text
