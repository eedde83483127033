"""The registration pipeline: named, replaceable stages composed in order.

``Pipeline`` holds one callable per stage. Replace any of them with a function of the same
signature to change the method (the notebook in ``examples/`` does this)::

    preprocess(source, target)            -> PreparedPair
    mask(image)                           -> bool array (or None: keep everything)
    initial(source, target, progress)     -> 2x3 backward affine (working pixels), or an
                                             InitialAlignment (its .matrix and hypotheses)
    affine(source, target, matrix, progress) -> 2x3 backward affine
    nonrigid(source, target, field, progress) -> (2, H, W) backward field

``register`` is the one-call entry point.

Modes (``RegistrationConfig.mode``) choose what fills the affine and non-rigid slots:

* ``optimise``: instance optimisation only (affine: Adam on 6 parameters; non-rigid: the dense
  field or the patch engine with per-patch optimisation);
* ``learned``: the networks only (affine network, patch-group network): the fast path;
* ``hybrid`` (the default): the networks first, then the instance optimisation from where they
  stop (a short affine refinement; the dense field started from the network's).

In both ``learned`` and ``hybrid`` a network's proposal is kept unless it is
:func:`clearly_worse` (by global NCC) than what it would replace; ``hybrid`` then runs the
``optimise`` stage from there, ``learned`` keeps what it had. The default was chosen on
measurements (README, "Modes"): ``hybrid`` is at least as accurate as ``optimise`` on the
landmark pairs and more robust on the landmark-free validation set, in about the same time.

The tissue mask is chosen apart from the mode (``use_mask`` + ``mask_method``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import MASK_METHODS, MODES, RegistrationConfig  # noqa: F401 (re-exported: the pipeline's API)
from .confidence import describe, judge, measure
from .conventions import affine_to_field, default_device
from .io import HistRegInputError, check_image, read_image
from .progress import ProgressCallback, ProgressEvent, report
from .result import RegistrationResult
from .similarity import warped_ncc
from .stages.affine import AffineConfig, LearnedAffineConfig, learned_affine, optimise_affine
from .stages.initial import InitialAlignmentConfig, initial_alignment
from .stages.learned_nonrigid import LearnedNonrigidConfig, learned_nonrigid
from .stages.mask import otsu_tissue_mask
from .stages.nonrigid import DenseConfig, PatchConfig, dense_nonrigid, patch_nonrigid
from .stages.preprocess import PreparedPair, preprocess_pair
from .stages.segment import unet_tissue_mask
from .threads import requested_threads, torch_threads

STAGES = ("preprocess", "mask", "initial", "affine", "nonrigid")


#: ``hybrid`` and ``learned`` modes reject a network's proposal when its global NCC is lower than
#: that of the alignment it would replace by more than this. A margin, not a strict comparison: global
#: NCC is a coarse judge, whose small differences are noise (the learned affine of the
#: CC10 -> H&E pair scores 0.703 against the rigid start's 0.704 yet ends better aligned after
#: the non-rigid stage; near-perfect same-image pairs differ in the fourth decimal), so only a
#: clear loss, as from an image unlike the networks' training data, counts as a failure.
REJECT_NCC_DROP = 0.01


#: The affine stage's result is dropped for its start when it lowers the initial alignment's
#: choice criterion (content-aware local NCC, :func:`~napari_histreg.stages.initial._local_scores`)
#: by more than this share of the start's value.
AFFINE_LOCAL_DROP = 0.1


def affine_or_start(source, target, start, matrix, device=None) -> tuple[np.ndarray, dict]:
    """The affine stage's ``matrix``, or its ``start`` where ``matrix`` explains the target clearly
    worse by the criterion that chose the start (:data:`AFFINE_LOCAL_DROP`). Global NCC, which the
    affine stage follows, can drift from a right start on a crop cut inside the tissue (a
    feature match with hundreds of inliers, 0.004 from the landmarks, driven to 0.08), where
    local NCC falls with it. Returns the matrix kept and what was measured (``info["affine_check"]``)."""
    from .stages.initial import _local_scores

    with torch.no_grad():
        before, after = _local_scores(source, target, np.stack([start, matrix]), InitialAlignmentConfig(), device)
    keep_start = bool(after < before * (1.0 - AFFINE_LOCAL_DROP))
    measured = {"start_local_ncc": round(float(before), 5), "affine_local_ncc": round(float(after), 5),
                "kept": "start" if keep_start else "affine"}
    if keep_start:
        warnings.warn(f"the affine stage lowered the local NCC from {before:.4f} to {after:.4f}: keeping its start",
                      AffineResultRejected, stacklevel=3)
    return (np.asarray(start, dtype=np.float64) if keep_start else matrix), measured


def clearly_worse(proposal_ncc: float, reference_ncc: float) -> bool:
    """Whether a proposal with global NCC ``proposal_ncc`` is clearly worse than the
    alignment it would replace (see :data:`REJECT_NCC_DROP`)."""
    return proposal_ncc < reference_ncc - REJECT_NCC_DROP


def _ncc_of_affine(source, target, matrix, device) -> float:
    return warped_ncc(source, target, affine_to_field(matrix, target.shape, device=device)[0], device)


#: The counterstain retry (:meth:`Pipeline.run`) replaces a flagged result only when it scores at
#: least this: a clear answer, not merely a better score than a flagged one. Chosen on validation
#: seeds 0 and 1 (README, "Confidence"): every retry of a pair the grey run got wrong scored 1.0;
#: the one retry that made a result worse (a turned kidney H&E, 0.012 -> 0.025) scored 0.63.
RETRY_KEEPS_AT = 0.9


class RegistrationNeedsCheck(UserWarning):
    """The result's confidence (:mod:`napari_histreg.confidence`) is below its threshold: the
    registration may be wrong and needs a look (``result.confidence`` says which measure)."""


class NetworkProposalRejected(UserWarning):
    """A network's proposal aligned the pair clearly worse (global NCC, :func:`clearly_worse`)
    than what it would have replaced, and the pipeline fell back (the message says to what)."""


@contextlib.contextmanager
def _held_rejections(hold: bool):
    """Within the block, :class:`NetworkProposalRejected` warnings are held back (when ``hold``)
    and collected in the list it yields, for :func:`_release` once the run is known to be kept;
    every other warning passes on as it comes."""
    held: list = []
    if not hold:
        yield held
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always", NetworkProposalRejected)  # the filters apply on release
        passing_on = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, NetworkProposalRejected):
                held.append((message, category, filename, lineno))
            else:
                passing_on(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield held


def _release(notices) -> None:
    """Emit warnings held by :func:`_held_rejections`, attributed to where they were raised."""
    for message, category, filename, lineno in notices:
        warnings.warn_explicit(message, category, filename, lineno)


class AffineResultRejected(NetworkProposalRejected):
    """The affine stage's result explained the target clearly worse than its start (local NCC,
    :func:`affine_or_start`), and the start was kept."""


def _rejected(what: str, proposal_ncc: float, start: str, start_ncc: float, fallback: str) -> bool:
    """:func:`clearly_worse`, telling the user (a :class:`NetworkProposalRejected` warning:
    stderr on the command line, a notification in napari) when it is."""
    if not clearly_worse(proposal_ncc, start_ncc):
        return False
    warnings.warn(
        f"{what} aligns the pair clearly worse than {start} (NCC {proposal_ncc:.3f} vs {start_ncc:.3f}): {fallback}",
        NetworkProposalRejected, stacklevel=3,
    )
    return True


def checked_learned_affine(source, target, matrix, learned: LearnedAffineConfig, device=None, progress: ProgressCallback = None) -> np.ndarray:
    """``learned`` mode's affine stage: the affine network from ``matrix``, unless its
    result aligns clearly worse than ``matrix`` (:func:`clearly_worse`), which is then kept.
    (On scikit-image's IHC image, all tissue and no glass, unlike the training sections, the
    network lowers NCC from 0.76 to 0.70 and would triple the error of the rotation search.)"""
    proposal = learned_affine(source, target, matrix, learned, device, progress)
    if _rejected("the affine network's result", _ncc_of_affine(source, target, proposal, device),
                 "its start", _ncc_of_affine(source, target, matrix, device), "keeping the start"):
        return np.asarray(matrix, dtype=np.float64)
    return proposal


def checked_learned_nonrigid(source, target, field, learned: LearnedNonrigidConfig, device=None, progress: ProgressCallback = None,
                             fallback: str = "keeping the affine alignment") -> np.ndarray:
    """``learned`` mode's non-rigid stage: the patch-group network from the affine ``field``,
    unless its field aligns clearly worse than ``field`` (:func:`clearly_worse`)."""
    proposal = learned_nonrigid(source, target, field, learned, device, progress)
    if _rejected("the non-rigid network's field", warped_ncc(source, target, proposal, device),
                 "the affine alignment", warped_ncc(source, target, field, device), fallback):
        return field
    return proposal


def hybrid_affine(source, target, matrix, learned: LearnedAffineConfig, refine: AffineConfig, fallback: AffineConfig,
                  device=None, progress: ProgressCallback = None) -> np.ndarray:
    """``hybrid`` mode's affine stage: the affine network (``learned``) from ``matrix``, then a
    short optimisation (``refine``: the pipeline's ``hybrid_affine``). If even refined the
    network's start aligns clearly worse than ``matrix`` (:func:`clearly_worse`: an image unlike
    the network's training data), the optimise mode's stage (``fallback``: the pipeline's
    ``affine``) from ``matrix`` instead."""
    proposal = learned_affine(source, target, matrix, learned, device, progress)
    refined = optimise_affine(source, target, proposal, refine, device, progress)
    if _rejected("the affine network's result, even refined,", _ncc_of_affine(source, target, refined, device),
                 "its start", _ncc_of_affine(source, target, matrix, device), "optimising the affine from the start instead"):
        return optimise_affine(source, target, matrix, fallback, device, progress)
    return refined


def hybrid_nonrigid(source, target, field, learned: LearnedNonrigidConfig, refine: DenseConfig | PatchConfig, device=None,
                    progress: ProgressCallback = None) -> np.ndarray:
    """``hybrid`` mode's non-rigid stage: the patch-group network (``learned``) from the affine
    ``field``, then the optimisation from the network's field: the dense engine (``refine`` a
    :class:`DenseConfig`, the pipeline's ``hybrid_dense``) or the patch engine (a
    :class:`PatchConfig`). A network field clearly worse than ``field`` (:func:`clearly_worse`)
    is dropped and the optimisation starts from ``field`` alone."""
    proposal = checked_learned_nonrigid(source, target, field, learned, device, progress,
                                        fallback="optimising the non-rigid field from the affine alignment alone")
    if isinstance(refine, PatchConfig):
        return patch_nonrigid(source, target, proposal, None, refine, device, progress)
    # The network's part starts the optimised residual rather than being frozen into the
    # fixed initial field: regularised with the rest, it can be smoothed or undone where the
    # network was wrong.
    return dense_nonrigid(source, target, field, refine, device, progress,
                          initial_residual=np.asarray(proposal) - np.asarray(field))


class Pipeline:
    """Stages bound to a configuration and a device; any stage attribute may be replaced."""

    def __init__(self, config: RegistrationConfig | None = None, device=None, threads=None):
        self.config = config or RegistrationConfig()
        # torch threads per run: a number, or None / "auto" for napari_histreg.threads.choose_threads
        self.threads = threads
        requested_threads(threads)  # a bad value fails here, once
        c = self.config.check()
        self.device = default_device(device)
        self.preprocess: Callable[..., PreparedPair] = self._preprocessing(c.preprocess)
        self._shipped_preprocess = self.preprocess
        self.mask = self._mask_stage() if c.use_mask else None
        self.initial = (
            (lambda s, t, progress=None: initial_alignment(s, t, c.initial, self.device, progress))
            if c.use_initial
            else None
        )
        self.affine = self._affine_stage() if c.use_affine else None
        self.nonrigid = self._nonrigid_stage() if c.nonrigid_method != "none" else None

    def _preprocessing(self, settings) -> Callable[..., PreparedPair]:
        """The shipped preprocess stage with ``settings`` (a :class:`PreprocessConfig`)."""
        return lambda s, t: preprocess_pair(s, t, settings, self.device)

    def _mask_stage(self):
        c = self.config
        if c.mask_method == "unet":
            return lambda image: unet_tissue_mask(image, c.segmentation, self.device)
        return lambda image: otsu_tissue_mask(image, c.mask)

    def _affine_stage(self):
        c, device = self.config, self.device
        if c.mode == "optimise":
            return lambda s, t, m, progress=None: optimise_affine(s, t, m, c.affine, device, progress)
        if c.mode == "hybrid":
            return lambda s, t, m, progress=None: hybrid_affine(s, t, m, c.learned_affine, c.hybrid_affine, c.affine, device, progress)
        return lambda s, t, m, progress=None: checked_learned_affine(s, t, m, c.learned_affine, device, progress)

    def _nonrigid_stage(self):
        c, device = self.config, self.device

        def optimised(s, t, f, progress=None):
            if c.nonrigid_method == "patches":
                return patch_nonrigid(s, t, f, None, c.patches, device, progress)
            return dense_nonrigid(s, t, f, c.dense, device, progress)

        if c.mode == "optimise":
            return optimised
        if c.mode == "hybrid":
            refine = c.patches if c.nonrigid_method == "patches" else c.hybrid_dense
            return lambda s, t, f, progress=None: hybrid_nonrigid(s, t, f, c.learned_nonrigid, refine, device, progress)
        return lambda s, t, f, progress=None: checked_learned_nonrigid(s, t, f, c.learned_nonrigid, device, progress)

    def masked(self, pair: PreparedPair) -> PreparedPair:
        """``pair`` with the background outside each image's tissue mask set to 0 (``pair``
        itself when the mask stage is off)."""
        if self.mask is None:
            return pair
        return dataclasses.replace(pair, source=pair.source * np.asarray(self.mask(pair.source), bool),
                                   target=pair.target * np.asarray(self.mask(pair.target), bool))

    def prepare(self, source: np.ndarray, target: np.ndarray, progress: ProgressCallback = None) -> PreparedPair:
        """The working pair the registration stages run on: preprocessed, then masked."""
        report(progress, "preprocess", 0, 1, "working pair")
        pair = self.masked(self.preprocess(source, target))
        report(progress, "preprocess", 1, 1, "working pair")
        return pair

    @staticmethod
    def result(pair: PreparedPair, matrix, field=None, info: dict | None = None,
               timings: dict | None = None) -> RegistrationResult:
        """The result of registering ``pair`` (as :meth:`prepare` made it) to ``matrix``
        (2x3 backward affine, working pixels) and, when given, the non-rigid ``field`` that
        includes it; without ``field`` the affine alone."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if field is None:
            field = affine_to_field(matrix, pair.target.shape)[0].numpy()
        return RegistrationResult(np.asarray(field, dtype=np.float32), pair.source_frame, pair.target_frame, matrix,
                                  timings if timings is not None else {}, info if info is not None else {},
                                  pair.source, pair.target)

    def run(self, source: np.ndarray, target: np.ndarray, progress: ProgressCallback = None,
            name: str | None = None) -> RegistrationResult:
        """Register ``source`` onto ``target`` (arrays already validated), on the torch threads
        of :func:`~napari_histreg.threads.choose_threads` (restored afterwards)."""
        from .stages.preprocess import level_cache

        with torch_threads(self.threads) as threads:
            # a run the counterstain retry may replace keeps its proposal warnings until it is kept:
            # a notice about a result the user never gets only misleads
            may_retry = self._retries_on_counterstain(source, target)
            with level_cache(), _held_rejections(may_retry) as first_notices:
                result = self._run(source, target, progress)
            kept_notices = first_notices
            if may_retry and result.flag == "check" and "blank" not in result.info:
                with level_cache(), _held_rejections(True) as retry_notices:
                    retry = self._run(source, target, _labelled(progress, "haematoxylin retry"),
                                      representation="haematoxylin")
                result = self.more_confident(result, retry)
                kept_notices = retry_notices if result is retry else first_notices
            _release(kept_notices)
        result.info["threads"] = threads
        warn_if_needs_check(result.info.get("confidence"), name, stacklevel=3)
        return result

    def _retries_on_counterstain(self, source, target) -> bool:
        """Whether a result flagged ``check`` (not for a blank image) is registered once more on
        the haematoxylin channel: ``counterstain_retry`` on, both images in colour, the grey
        representation used and the shipped preprocessing (a replaced stage is the user's to keep)."""
        from .stages.preprocess import is_colour

        c = self.config
        return bool(c.counterstain_retry and c.preprocess.representation == "grey"
                    and self.preprocess is self._shipped_preprocess and is_colour(source) and is_colour(target))

    @staticmethod
    def more_confident(first: RegistrationResult, retry: RegistrationResult) -> RegistrationResult:
        """Of a result and its counterstain retry, the retry when it scores at least
        :data:`RETRY_KEEPS_AT` and more than the first, else the first; both are described in
        ``info["counterstain_retry"]`` and the time of both is in ``timings["total"]``."""
        retry_score = retry.confidence.get("score", 0.0)
        kept = retry if retry_score >= RETRY_KEEPS_AT and retry_score > first.confidence.get("score", 0.0) else first
        kept.info["counterstain_retry"] = {
            "kept": "haematoxylin" if kept is retry else "grey",
            **{label: {k: r.confidence.get(k) for k in ("score", "flag", "weakest")}
               for label, r in (("grey", first), ("haematoxylin", retry))},
        }
        kept.timings["total"] = round(first.timings.get("total", 0.0) + retry.timings.get("total", 0.0), 4)
        return kept

    def _run(self, source: np.ndarray, target: np.ndarray, progress: ProgressCallback = None,
             representation: str | None = None) -> RegistrationResult:
        """One registration, silent about its confidence (the caller warns once, on the result it
        keeps); ``representation`` (a :data:`~napari_histreg.stages.preprocess.REPRESENTATIONS`
        value) overrides the configuration's for the shipped preprocessing."""
        timings: dict[str, float] = {}
        info: dict = {"device": str(self.device), "mode": self.config.mode, "config": self.config.to_dict()}
        pc = self.config.preprocess
        preprocess = self.preprocess
        if representation is not None and representation != pc.representation:
            pc = dataclasses.replace(pc, representation=representation)
            info["config"]["preprocess"]["representation"] = representation
            preprocess = self._preprocessing(pc)

        def timed(name, fn, *args):
            report(progress, name, 0, 1, "start")
            start = time.perf_counter()
            out = fn(*args)
            timings[name] = round(time.perf_counter() - start, 4)
            report(progress, name, 1, 1, "done")
            return out

        pair = timed("preprocess", preprocess, source, target)
        src, tgt = pair.source, pair.target
        if pc.equalise or pc.clahe or pc.representation != "grey":  # not 1 - grey: fingerprint the original instead
            from .result import encode_fingerprint, fingerprint
            from .stages.preprocess import to_grey

            info["source_fingerprint"] = encode_fingerprint(fingerprint(to_grey(source)))
        else:
            info["source_fingerprint"] = working_fingerprint(src, pair.source_frame, pc.invert)
        blank = [
            n for n, img, raw in (("source", src, source), ("target", tgt, target))
            if float(img.max() - img.min()) < 1e-6 or is_constant(raw)  # padding hides a constant input
        ]
        identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if blank:
            warnings.warn(
                f"{' and '.join(blank)} image is blank (constant after preprocessing): returning the identity transform",
                stacklevel=3,
            )
            info["blank"] = blank
            info["confidence"] = {"score": 0.0, "flag": "check", "weakest": "blank", "measures": {}}
            return self.result(pair, identity, np.zeros((2,) + tgt.shape, dtype=np.float32), info, timings)
        if self.mask is not None:
            pair = timed("mask", self.masked, pair)
            src, tgt = pair.source, pair.target
        matrix = identity
        with torch.no_grad():
            if self.initial is not None:
                found = timed("initial", lambda: self.initial(src, tgt, progress))
                # a replaced stage may return the matrix alone; the shipped one its hypotheses too
                if hasattr(found, "matrix"):
                    info["initial"] = found.summary() if hasattr(found, "summary") else {}
                    found = found.matrix
                matrix = np.asarray(found, dtype=np.float64)
        if self.affine is not None:
            start_matrix = matrix
            matrix = timed("affine", lambda: np.asarray(self.affine(src, tgt, matrix, progress), dtype=np.float64))
            if self.config.affine_check and self.config.use_initial:
                matrix, info["affine_check"] = affine_or_start(src, tgt, start_matrix, matrix, self.device)
        field = affine_to_field(matrix, tgt.shape)[0].numpy()
        if self.nonrigid is not None:
            field = timed("nonrigid", lambda: np.asarray(self.nonrigid(src, tgt, field, progress), dtype=np.float32))
        start = time.perf_counter()
        info["confidence"] = judge(measure(src, tgt, field, matrix, info.get("initial"), self.device, info.get("affine_check")))
        timings["confidence"] = round(time.perf_counter() - start, 4)
        timings["total"] = round(sum(timings.values()), 4)
        info["matrix"] = matrix
        return self.result(pair, matrix, field, info, timings)


def describe_representation(result: RegistrationResult) -> str:
    """What a result compared, for a status line ("" for grey without a retry): the haematoxylin
    channel (from the start, or kept by the counterstain retry) or a retry that was not kept."""
    retry = result.info.get("counterstain_retry") or {}
    if retry.get("kept") == "haematoxylin":
        return f"compared on the haematoxylin channel (the grey run needed a look: confidence {retry['grey']['score']:.2f})"
    if retry:
        return f"a retry on the haematoxylin channel was not clearer (confidence {retry['haematoxylin']['score']:.2f}): grey result kept"
    return "compared on the haematoxylin channel" if result.compared == "haematoxylin" else ""


def _labelled(progress: ProgressCallback, label: str) -> ProgressCallback:
    """``progress`` with ``label`` before every event's message: a second run's stages start again
    from the first, and the status line says why."""
    if progress is None:
        return None

    def labelled(event: ProgressEvent) -> None:
        progress(dataclasses.replace(event, message=f"{label}: {event.message}" if event.message else label))

    return labelled


def warn_if_needs_check(confidence: dict, name: str | None = None, stacklevel: int = 3) -> None:
    """A :class:`RegistrationNeedsCheck` warning naming the pair when ``confidence`` (a result's
    ``info["confidence"]``) is flagged: stderr on the command line, a notification in napari."""
    if (confidence or {}).get("flag", "ok") != "ok":
        warnings.warn(f"{name or 'this registration'} needs a look: {describe(confidence)}", RegistrationNeedsCheck,
                      stacklevel=stacklevel)


def working_fingerprint(working_source: np.ndarray, frame, inverted: bool) -> dict:
    """:func:`~napari_histreg.result.fingerprint` of the source from its working image (the
    padding cropped, the inversion undone), encoded for the sidecar: ``histreg warp`` compares
    it with the slide it is given."""
    from .result import encode_fingerprint, fingerprint

    (h, w), (r0, c0) = frame.original_shape, (int(round(frame.offset[0])), int(round(frame.offset[1])))
    rows, cols = max(1, round(h * frame.scale[0])), max(1, round(w * frame.scale[1]))
    crop = np.asarray(working_source)[r0 : r0 + rows, c0 : c0 + cols]
    if inverted:
        crop = 1.0 - crop
    return encode_fingerprint(fingerprint(crop))


MAX_SIZE_RATIO = 4.0


def check_pair_shapes(source_shape, target_shape, source_name: str = "source", target_name: str = "target") -> None:
    """Raise :class:`HistRegInputError` when the two images differ in size by more than
    :data:`MAX_SIZE_RATIO` along either axis (they are then not at the same pixel size)."""
    (hs, ws), (ht, wt) = source_shape[:2], target_shape[:2]
    ratio = max(hs / ht, ht / hs, ws / wt, wt / ws)
    if ratio > MAX_SIZE_RATIO:
        raise HistRegInputError(
            f"{source_name} ({ws}x{hs}, w x h) and {target_name} ({wt}x{ht}): sizes differ by {ratio:.1f}x "
            f"(more than {MAX_SIZE_RATIO:g}x); resample one of them to the other's pixel size first"
        )


def is_constant(image: np.ndarray) -> bool:
    """True when every pixel of ``image`` (``(H, W)`` or ``(H, W, C)``) has the same value."""
    image = np.asarray(image)
    flat = image.reshape(-1, image.shape[-1]) if image.ndim == 3 else image.reshape(-1, 1)
    return bool(flat.size == 0 or (flat == flat[0]).all())


def _as_image(value, name: str) -> np.ndarray:
    if isinstance(value, (str, Path)):
        return read_image(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if hasattr(value, "compute") and not isinstance(value, np.ndarray):  # dask array
        value = value.compute()
    try:
        array = np.asarray(value)
    except Exception as err:
        raise HistRegInputError(f"{name}: cannot be turned into an array ({err})") from None
    return check_image(array, name)


def register(
    source,
    target,
    config: RegistrationConfig | None = None,
    *,
    device=None,
    progress: ProgressCallback = None,
    pipeline: Pipeline | None = None,
    mode: str | None = None,
    threads=None,
    name: str | None = None,
    guide_points=None,
    guide=None,
) -> RegistrationResult:
    """Register ``source`` onto ``target`` and return a :class:`RegistrationResult`.

    ``source`` / ``target``: numpy arrays (grey or RGB/RGBA, any dtype), dask arrays, or paths.
    ``progress``: called with :class:`~napari_histreg.progress.ProgressEvent`; raise
    :class:`~napari_histreg.progress.RegistrationCancelled` from it to stop.
    ``mode``: ``"optimise"``, ``"learned"`` or ``"hybrid"`` (overrides ``config.mode``; see
    :class:`RegistrationConfig`). ``threads``: torch threads for this run (default: the free
    cores, see :func:`napari_histreg.threads.choose_threads`; ``$HISTREG_THREADS`` sets it too);
    torch's setting is restored afterwards. ``name``: how the :class:`RegistrationNeedsCheck`
    warning of a flagged result names the pair (default: "SOURCE -> TARGET" for paths).
    ``guide_points``: ``(source_rc, target_rc)``, a few corresponding ``(N, 2)`` ``(row, col)``
    points in each image's pixels, paired by order: the result is corrected through them
    (:func:`napari_histreg.guided.guided_run`; ``guide``: its :class:`~napari_histreg.guided.GuideConfig`).
    """
    source_name = str(source) if isinstance(source, (str, Path)) else "source"
    target_name = str(target) if isinstance(target, (str, Path)) else "target"
    source_image = _as_image(source, source_name)
    target_image = _as_image(target, target_name)
    check_pair_shapes(source_image.shape, target_image.shape, source_name, target_name)
    if name is None and isinstance(source, (str, Path)) and isinstance(target, (str, Path)):
        name = f"{source_name} -> {target_name}"
    if mode is not None:
        if pipeline is not None:
            raise ValueError("give either mode or pipeline, not both (a pipeline's mode is its config's)")
        config = dataclasses.replace(config or RegistrationConfig(), mode=mode)
    if pipeline is not None and threads is not None:
        pipeline = _with_threads(pipeline, threads)
    pipeline = pipeline or Pipeline(config, device=device, threads=threads)
    if guide_points is not None:
        from .guided import guided_run

        return guided_run(pipeline, source_image, target_image, guide_points, guide, progress, name)
    return pipeline.run(source_image, target_image, progress, name=name)


def _with_threads(pipeline: Pipeline, threads) -> Pipeline:
    import copy

    requested_threads(threads)
    pipeline = copy.copy(pipeline)
    pipeline.threads = threads
    return pipeline
