"""Serial sections: register a whole stack into the frame of one reference section.

:func:`register_stack` registers each section to its neighbour towards the reference (or, with
``direct=True``, straight to the reference) and composes the pair transforms into one transform
per section (:func:`~napari_histreg.conventions.compose_between_frames`: the fields are chained
through the frames of the section they share, never resampled on a common grid). Neighbours
look alike more than distant sections do, so each pair is an easier registration; the price is
that errors add up along the chain (drift), which ``refine`` measures and corrects where a
direct registration to the reference explains it better.

Each section's pair registration carries its confidence (:mod:`napari_histreg.confidence`). A
section whose registration is flagged ``check`` is reported (``StackResult.flagged``, the
``flag`` column, a :class:`~napari_histreg.pipeline.RegistrationNeedsCheck` warning) and, with
``skip_failed=True``, left out of the composition: the next section out from the reference is
registered across the gap to the last section that was kept. A skipped section has no
transform; it is never silently included.

The result, :class:`StackResult`, maps points from any section to any other (through the
reference), warps any section (any resolution of it) onto the reference grid, builds the aligned
``(Z, Y, X[, C])`` stack, and saves to / loads from one folder (``stack.json`` plus the pair
transform files :meth:`~napari_histreg.RegistrationResult.save` writes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .conventions import Frame, compose_affines_between_frames, compose_between_frames, to_tensor
from .io import HistRegInputError
from .progress import ProgressCallback, report
from .result import RegistrationResult, background_value

__all__ = ["StackResult", "StackSection", "register_stack", "identity_result", "chain"]

STACK_FORMAT = "napari-histreg stack"
STACK_VERSION = 1
#: longer side of the grid of the reference's own (identity) transform
IDENTITY_GRID = 256


@dataclasses.dataclass
class StackSection:
    """One section of a stack.

    ``index``: its place in the stack (z); ``name``: a label (the file name for paths);
    ``shape``: its ``(H, W)`` (level 0 for slides); ``registered_to``: the section its pair
    registration targeted (None for the reference and for sections not registered);
    ``pair``: that registration; ``transform``: this section onto the reference (composed);
    ``flag``: ``"reference"``, ``"ok"``, ``"check"`` (registered, may be wrong: look at it),
    ``"skipped"`` (flagged and left out with ``skip_failed``) or ``"failed"`` (an error, in
    ``error``); ``confidence``: the pair registration's score."""

    index: int
    name: str
    shape: tuple[int, int]
    registered_to: int | None = None
    pair: RegistrationResult | None = None
    transform: RegistrationResult | None = None
    flag: str = ""
    confidence: float | None = None
    error: str = ""
    seconds: float = 0.0


def identity_result(shape: Sequence[int], grid: int = IDENTITY_GRID) -> RegistrationResult:
    """The identity transform of an image of ``shape`` onto itself, on a small working grid
    (the reference section's own transform)."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, grid / max(h, w))
    small = (max(2, round(h * scale)), max(2, round(w * scale)))
    frame = Frame(original_shape=(h, w), shape=small, scale=(small[0] / h, small[1] / w), offset=(0.0, 0.0))
    field = np.zeros((2,) + small, dtype=np.float32)
    return RegistrationResult(field, frame, frame, info={"confidence": {"score": 1.0, "flag": "ok", "weakest": "", "measures": {}}})


def chain(outer: RegistrationResult, inner: RegistrationResult) -> RegistrationResult:
    """``inner`` (A onto B) followed by ``outer`` (B onto C): A onto C, on ``outer``'s working grid
    (:func:`~napari_histreg.conventions.compose_between_frames`). The affine part is chained the
    same way; ``info`` records the confidences of both parts (the weaker is the chain's)."""
    field = compose_between_frames(to_tensor(outer.working_field), outer.source_frame,
                                   to_tensor(inner.working_field), inner.target_frame)
    matrix = compose_affines_between_frames(outer.matrix, outer.source_frame, inner.matrix, inner.target_frame)
    scores = [r.confidence for r in (outer, inner) if r.confidence]
    weakest = min(scores, key=lambda c: c.get("score", 1.0)) if scores else {}
    info = {"chained": True, "confidence": dict(weakest) if weakest else {}}
    return RegistrationResult(field.cpu().numpy().astype(np.float32), inner.source_frame, outer.target_frame, matrix, {}, info)


# --------------------------------------------------------------------------- inputs
def _section_name(image, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return str(getattr(image, "name", "") or f"section {index}")


def _section_shape(image) -> tuple[int, int]:
    if isinstance(image, (str, os.PathLike)):
        from .io import image_header
        from .slides import TIFF_SUFFIXES, open_slide

        path = Path(image)
        header = None if path.is_dir() or path.suffix.lower() in TIFF_SUFFIXES else image_header(path)
        if header is not None:  # a JPEG / PNG: its size without decoding it (open_slide would)
            return int(header[0][0]), int(header[0][1])
        with open_slide(path) as slide:  # TIFF and OME-Zarr: lazily, metadata only
            return tuple(int(n) for n in slide.shape[:2])
    shape = getattr(image, "shape", None)
    if shape is None:
        raise HistRegInputError(f"a stack section must be an array, a path or a slide, not {type(image).__name__}")
    return int(shape[0]), int(shape[1])


def _is_lazy(image) -> bool:
    from .slides import Slide

    return isinstance(image, (str, os.PathLike, Slide))


def _register_pair(source, target, config, device, threads, name: str, progress: ProgressCallback = None) -> RegistrationResult:
    """One pair of the stack: ``register`` for arrays, ``register_slides`` (a small pyramid level
    of each, frames in level-0 pixels) for paths and slides. The working images are dropped: the
    stack keeps transforms only."""
    from .pipeline import register
    from .slides import register_slides

    if _is_lazy(source) or _is_lazy(target):
        result = register_slides(source, target, config, device=device, threads=threads, progress=progress)
    else:
        result = register(source, target, config, device=device, threads=threads, name=name, progress=progress)
    result.working_source = result.working_target = None
    return result


def _pair_task(source, target, config, device, threads, name, progress: ProgressCallback = None):
    """:func:`_register_pair` where it runs (here, or a dask worker): ``(result, "")``, or
    ``(None, the error's text)``. The pair's own warnings are silenced: :func:`register_stack`
    reports every flagged section once, by its place in the stack. Cancellation (from
    ``progress``) is not an error: it propagates."""
    from .progress import RegistrationCancelled

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _register_pair(source, target, config, device, threads, name, progress), ""
    except RegistrationCancelled:
        raise
    except Exception as err:  # recorded, the stack goes on
        from .evaluate import _one_line

        return None, _one_line(err)


# --------------------------------------------------------------------------- the plan
def neighbour_plan(n: int, reference: int) -> list[list[int]]:
    """The chains out from ``reference``: the sections below it, nearest first, and those above."""
    return [list(range(reference - 1, -1, -1)), list(range(reference + 1, n))]


@dataclasses.dataclass
class StackResult:
    """What :func:`register_stack` returns: the sections (:class:`StackSection`), the
    ``reference`` index and ``info`` (method, order, timings)."""

    sections: list[StackSection]
    reference: int
    info: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sections)

    @property
    def flagged(self) -> list[int]:
        """Indices of the sections flagged ``check``, ``skipped`` or ``failed``."""
        return [s.index for s in self.sections if s.flag in ("check", "skipped", "failed")]

    @property
    def reference_shape(self) -> tuple[int, int]:
        return self.sections[self.reference].shape

    def _section(self, k: int) -> StackSection:
        if not -len(self.sections) <= k < len(self.sections):
            raise IndexError(f"the stack has {len(self.sections)} sections; there is no section {k}")
        return self.sections[k]

    def to_reference(self, k: int) -> RegistrationResult:
        """Section ``k`` onto the reference (a :class:`RegistrationResult`; the identity for the
        reference itself). A section without one (skipped, failed) raises ``ValueError``."""
        section = self._section(k)
        if section.transform is None:
            raise ValueError(f"section {k} ({section.name}) has no transform to the reference: it was {section.flag}"
                             + (f" ({section.error})" if section.error else ""))
        return section.transform

    def map_points(self, points_rc, source: int, target: int) -> np.ndarray:
        """``(N, 2)`` ``(row, col)`` points of section ``source`` (its original pixels) in section
        ``target``'s pixels, through the reference."""
        points = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
        if source == target:
            return points.copy()
        in_reference = points if source == self.reference else self.to_reference(source).map_source_points(points)
        if target == self.reference:
            return in_reference
        return self.to_reference(target).map_target_points(in_reference)

    def warp(self, k: int, image, order: int = 1, cval: float = 0.0, device=None) -> np.ndarray:
        """Section ``k``'s ``image`` (any resolution of it, ``(H, W[, C])``) on the reference grid
        at the same resolution ratio; dtype kept (:meth:`RegistrationResult.warp`)."""
        return self.to_reference(k).warp(np.asarray(image), order=order, cval=cval, device=device)

    def aligned(self, images, order: int = 1, cval: float | None = None, shape: Sequence[int] | None = None,
                progress: ProgressCallback = None) -> np.ndarray:
        """The aligned stack ``(Z, Y, X[, C])`` of ``images`` (one per section, any resolution of
        each), on the reference grid; a section without a transform is a plane of the fill value.
        ``cval``: the value outside each section (default: each image's own background, the
        median of its border: white glass stays white). ``shape``: the ``(Y, X)`` of the output
        (default: the reference grid at the resolution of ``images[reference]``)."""
        from .result import background_value

        images = [np.asarray(im) for im in images]
        if len(images) != len(self.sections):
            raise ValueError(f"expected {len(self.sections)} images (one per section), got {len(images)}")
        ref_image = images[self.reference]
        if shape is None:
            shape = ref_image.shape[:2]
        channels = {im.shape[2] if im.ndim == 3 else None for im in images}
        if len(channels) > 1:
            raise ValueError(f"the sections' images differ in channels ({sorted(map(str, channels))}): "
                             "convert them to one (e.g. all RGB) first")
        c = channels.pop()
        dtype = np.result_type(*[im.dtype for im in images])
        fill = [background_value(im) if cval is None else cval for im in images]
        out = np.empty((len(images), int(shape[0]), int(shape[1])) + ((c,) if c else ()), dtype=dtype)
        for k, image in enumerate(images):
            report(progress, "stack", k, len(images), f"warping section {k}")
            if self.sections[k].transform is None:
                out[k] = fill[k]
                continue
            out[k] = self.sections[k].transform.warp(image, order=order, cval=fill[k], target_shape=shape)
        report(progress, "stack", len(images), len(images), "aligned")
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the stack to ``folder`` (:meth:`write`), staged and moved in when complete; an
        existing folder is replaced only with ``overwrite`` and only if histreg wrote it
        (:mod:`napari_histreg.outputs`). Returns the path of ``stack.json``."""
        from .outputs import staged_outputs

        folder = Path(folder)
        with staged_outputs(folder, overwrite=overwrite, command="register-stack") as stage:
            self.write(stage)
        return folder / "stack.json"

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``stack.json`` (the sections, their flags, which file holds whose transform) and,
        per registered section, ``section_<k>.mha`` / ``.json`` (onto the reference) and
        ``pair_<k>.mha`` / ``.json`` (its pair registration) into ``folder`` (created). Returns
        the path of ``stack.json``."""
        from .io import atomic_write_json
        from .result import _jsonable

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for s in self.sections:
            entry = {"index": s.index, "name": s.name, "shape": list(s.shape), "flag": s.flag,
                     "confidence": s.confidence, "registered_to": s.registered_to, "error": s.error,
                     "seconds": round(float(s.seconds), 3), "transform": None, "pair": None}
            if s.transform is not None and s.index != self.reference:
                entry["transform"] = s.transform.save(folder / f"section_{s.index:03d}").name
            if s.pair is not None:
                entry["pair"] = s.pair.save(folder / f"pair_{s.index:03d}").name
            entries.append(entry)
        return atomic_write_json(folder / "stack.json", {
            "format": STACK_FORMAT, "version": STACK_VERSION, "reference": self.reference, "sections": entries,
            "convention": "section_<k>: section k onto the reference (backward field, as histreg register's "
                          "transform.json); pair_<k>: section k onto the section it was registered to",
            "info": _jsonable(self.info)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StackResult":
        """Read a stack written by :meth:`save` (the folder or its ``stack.json``)."""
        path = Path(path)
        index_path = path / "stack.json" if path.is_dir() else path
        if not index_path.is_file():
            raise HistRegInputError(f"{index_path}: stack index not found")
        try:
            index = json.loads(index_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HistRegInputError(f"{index_path}: not a stack index ({err})") from None
        if not isinstance(index, dict) or index.get("format") != STACK_FORMAT:
            raise HistRegInputError(f"{index_path}: not a napari-histreg stack index (no \"format\": \"{STACK_FORMAT}\")")
        sections = []
        reference = int(index["reference"])
        for entry in index["sections"]:
            s = StackSection(int(entry["index"]), str(entry["name"]), tuple(entry["shape"]), entry.get("registered_to"),
                             flag=entry.get("flag", ""), confidence=entry.get("confidence"), error=entry.get("error", ""),
                             seconds=float(entry.get("seconds", 0.0)))
            if entry.get("pair"):
                s.pair = RegistrationResult.load(index_path.parent / entry["pair"])
            if entry.get("transform"):
                s.transform = RegistrationResult.load(index_path.parent / entry["transform"])
            elif s.index == reference:
                s.transform = identity_result(s.shape)
            sections.append(s)
        return cls(sections, reference, index.get("info", {}))


def one_kind(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The sections' images as one kind, so that one stack holds them: unchanged when they
    share their channels, else each colour image as 8-bit grey (a grey stack)."""
    images = [np.asarray(im) for im in images]
    if len({im.shape[2] if im.ndim == 3 else None for im in images}) <= 1:
        return images
    from .stages.preprocess import to_grey

    return [(to_grey(im) * 255).astype(np.uint8) if im.ndim == 3 else im for im in images]


def landmarks_in_reference(stack: StackResult, landmarks: Sequence) -> list[dict | None]:
    """Per section (None where it has no landmarks or no transform): its
    :class:`~napari_histreg.scoring.Landmarks` mapped into the reference (``"mapped"``, ``(N, 2)``
    ``(row, col)`` reference pixels) and, where the reference has landmarks too, the ANHIR metrics
    of the section's against the reference's, paired by id (``"metrics"``,
    :data:`~napari_histreg.scoring.METRIC_COLUMNS`), or what stopped them (``"error"``)."""
    from .scoring import LandmarkPair, score_mapped

    if len(landmarks) != len(stack.sections):
        raise ValueError(f"expected {len(stack.sections)} landmark sets (one per section, or None), got {len(landmarks)}")
    reference = landmarks[stack.reference]
    out: list[dict | None] = []
    for s, marks in zip(stack.sections, landmarks):
        if marks is None or s.transform is None:
            out.append(None)
            continue
        entry = {"landmarks": marks, "metrics": None, "error": ""}
        if s.index == stack.reference:
            entry["mapped"] = np.asarray(marks.points, dtype=np.float64).reshape(-1, 2)
        else:
            entry["mapped"] = stack.to_reference(s.index).map_source_points(marks.points)
            if reference is not None:
                try:
                    pair = LandmarkPair.from_landmarks(marks, reference, stack.reference_shape, s.shape)
                    lookup = {str(i): k for k, i in enumerate(marks.ids)}
                    mapped = entry["mapped"][[lookup[str(i)] for i in pair.ids]]
                    entry["metrics"] = score_mapped(mapped, pair)
                except (HistRegInputError, ValueError) as err:
                    entry["error"] = f"landmarks: {err}"
        out.append(entry)
    return out


# --------------------------------------------------------------------------- registering
def _flag_of(result: RegistrationResult) -> tuple[str, float | None]:
    confidence = result.confidence
    return (confidence.get("flag") or "ok"), confidence.get("score")


def register_stack(
    images: Sequence,
    reference: int | None = None,
    order: Sequence[int] | None = None,
    config=None,
    *,
    direct: bool = False,
    skip_failed: bool = False,
    refine: bool = False,
    names: Sequence[str] | None = None,
    device=None,
    threads=None,
    workers: int = 1,
    scheduler: str | None = None,
    progress: ProgressCallback = None,
) -> StackResult:
    """Register the sections ``images`` (numpy arrays ``(H, W[, C])``, paths, or
    :class:`~napari_histreg.slides.Slide` s, in stack order) into the frame of section
    ``reference`` (default: the middle one).

    ``order``: the stack order as indices into ``images`` when it differs from the list's
    (``"auto"``: estimated, :func:`napari_histreg.stack_order.estimate_order`); the result's
    sections are in stack order.
    ``direct``: register every section straight to the reference instead of to its neighbour.
    ``skip_failed``: leave sections whose registration is flagged ``check`` out of the
    composition (their neighbours are registered across the gap). ``refine``: a final direct
    refinement of every section not next to the reference (:func:`refine_to_reference`: the
    section as composed, registered onto the reference by the non-rigid stage alone, against
    drift along the chain). ``workers`` > 1 or a dask
    ``scheduler`` address: the independent pair registrations run in parallel (dask worker
    processes, one torch thread each unless ``threads`` says otherwise); with ``skip_failed``
    the chains are followed one section at a time, since each next pair depends on whether the
    last was kept. ``progress`` gets ``"stack"`` events (100 steps per section); raising
    :class:`~napari_histreg.RegistrationCancelled` from it stops the run.
    """
    from .config import RegistrationConfig

    images = list(images)
    if len(images) < 2:
        raise HistRegInputError(f"a stack needs at least two sections, got {len(images)}")
    if names is not None and len(names) != len(images):
        raise ValueError(f"names: expected {len(images)}, got {len(names)}")
    info: dict = {"method": "direct" if direct else "neighbours", "skip_failed": bool(skip_failed), "refine": bool(refine)}
    if order is not None and isinstance(order, str):
        if order != "auto":
            raise ValueError(f"order must be a list of indices or 'auto', not {order!r}")
        from .stack_order import estimate_order

        order, distances = estimate_order(images)
        info["order_estimated"] = True
        info["order_distances"] = np.round(distances, 4).tolist()
    if order is not None:
        order = [int(k) for k in order]
        if sorted(order) != list(range(len(images))):
            raise ValueError(f"order must list each of the {len(images)} sections once, got {order}")
        images = [images[k] for k in order]
        names = [names[k] for k in order] if names is not None else None
        info["order"] = order
    n = len(images)
    reference = n // 2 if reference is None else int(reference)
    if not 0 <= reference < n:
        raise HistRegInputError(f"reference section {reference} is not in the stack (0..{n - 1})")
    config = config or RegistrationConfig()
    start = time.perf_counter()
    sections = [StackSection(k, names[k] if names is not None else _section_name(im, k), _section_shape(im))
                for k, im in enumerate(images)]
    ref = sections[reference]
    ref.flag, ref.confidence, ref.transform = "reference", 1.0, identity_result(ref.shape)
    done = 0
    report(progress, "stack", 0, (n - 1) * 100, f"{n} sections, reference {reference} ({ref.name})")

    def record(k: int, anchor: int, outcome) -> None:
        nonlocal done
        result, error = outcome
        s = sections[k]
        s.registered_to = anchor
        if result is None:
            s.flag, s.error = "failed", error
        else:
            s.pair = result
            s.flag, s.confidence = _flag_of(result)
            s.seconds = float(result.timings.get("total", 0.0))
        done += 1
        report(progress, "stack", done * 100, (n - 1) * 100, f"section {k} ({s.name}) -> {anchor}: {s.flag}")

    def pair_name(k: int, anchor: int) -> str:
        return f"section {k} ({sections[k].name}) -> section {anchor} ({sections[anchor].name})"

    def run_pair(k: int, anchor: int):
        """One pair here, its pipeline's events folded into the stack's progress (a bar that
        moves within a section, and a Cancel that acts between the pair's steps)."""
        from .pipeline import STAGES

        def inner(event):
            stage = STAGES.index(event.stage) if event.stage in STAGES else 0
            fraction = (stage + (event.step / event.total if event.total else 0.0)) / len(STAGES)
            report(progress, "stack", done * 100 + min(99, int(100 * fraction)), (n - 1) * 100,
                   f"section {k} ({sections[k].name}): {event.stage}")

        return _pair_task(images[k], images[anchor], config, device, threads, pair_name(k, anchor),
                          inner if progress is not None else None)

    parallel = (workers and workers > 1) or scheduler
    if direct or not skip_failed:
        # every pair is known up front: run them together
        calls = [(k, reference if direct else (k + 1 if k < reference else k - 1)) for k in range(n) if k != reference]
        outcomes = _run_pairs(images, calls, config, device, threads, workers, scheduler, progress, pair_name) if parallel \
            else None
        for m, (k, anchor) in enumerate(calls):
            record(k, anchor, outcomes[m] if outcomes is not None else run_pair(k, anchor))
    else:
        for chain_indices in neighbour_plan(n, reference):
            anchor = reference
            for k in chain_indices:
                record(k, anchor, run_pair(k, anchor))
                if sections[k].flag == "ok":
                    anchor = k
                elif sections[k].flag == "check":
                    sections[k].flag = "skipped"
    _compose(sections, reference)
    if refine and not direct:
        for s in sections:
            if s.transform is not None and s.index != reference and s.registered_to != reference:
                report(progress, "stack", done * 100, (n - 1) * 100, f"refining section {s.index} ({s.name})")
                s.transform = refine_to_reference(s.transform, _in_memory(images[s.index]), _in_memory(images[reference]),
                                                  config, device, threads)
    for s in sections:
        if s.flag in ("check", "skipped", "failed"):
            from .pipeline import RegistrationNeedsCheck

            what = {"check": "was registered but needs a look", "skipped": "was flagged and left out (skip_failed)",
                    "failed": f"could not be registered: {s.error}"}[s.flag]
            warnings.warn(f"section {s.index} ({s.name}) {what}", RegistrationNeedsCheck, stacklevel=2)
    info["seconds"] = round(time.perf_counter() - start, 3)
    info["reference"] = reference
    return StackResult(sections, reference, info)


def _compose(sections: list[StackSection], reference: int) -> None:
    """Each registered section's transform onto the reference: its pair registration chained
    onto its anchor's transform (anchors first: they lie nearer the reference)."""
    for chain_indices in neighbour_plan(len(sections), reference):
        for k in chain_indices:
            s = sections[k]
            if s.pair is None or s.flag not in ("ok", "check"):
                continue
            anchor = sections[s.registered_to]
            if anchor.transform is None:  # its anchor was left out or failed: nothing to chain onto
                s.flag, s.error = "failed", f"section {anchor.index} it was registered to has no transform"
                continue
            s.transform = s.pair if s.registered_to == reference else chain(anchor.transform, s.pair)


def _run_pairs(images, calls, config, device, threads, workers, scheduler, progress, pair_name) -> list:
    """The pair registrations of ``calls`` on a dask cluster (:func:`napari_histreg.batch.dask_client`)."""
    from .batch import _run, dask_client

    names = [pair_name(k, anchor) for k, anchor in calls]
    device_name = None if device is None else str(device)
    with dask_client(scheduler, workers if not scheduler else None) as client:
        return _run(client, _pair_task,
                    [(images[k], images[anchor], config, device_name, threads or 1, names[m]) for m, (k, anchor) in enumerate(calls)],
                    lambda m, err: (None, f"{type(err).__name__}: {err}"), None, names)


def refine_to_reference(transform: RegistrationResult, section, reference, config=None, device=None,
                        threads=None) -> RegistrationResult:
    """``transform`` (``section`` onto the reference, composed along a chain) refined by a direct
    registration: the section warped onto the reference by ``transform``, at the resolution the
    registration reads it, registered onto ``reference`` by the non-rigid stage alone (no
    initial search, no affine: what is left is drift, small and smooth), and the two chained.
    Arrays only (a whole slide would be read at its working level)."""
    import dataclasses as dc

    from .config import RegistrationConfig
    from .pipeline import register

    config = dc.replace(config or RegistrationConfig(), use_initial=False, use_affine=False)
    section, reference = np.asarray(section), np.asarray(reference)
    warped = transform.warp(section, cval=background_value(section), target_shape=reference.shape[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        residual = register(warped, reference, config, device=device, threads=threads)
    refined = chain(residual, transform)
    refined.info["refined"] = True
    return refined


def _in_memory(image) -> np.ndarray:
    """An array of a section for the refinement: paths are read whole (a slide too large for that
    is refused with a message that names it: refine a whole-slide stack on a pyramid level)."""
    if _is_lazy(image):
        from .io import read_image
        from .slides import Slide

        if isinstance(image, Slide):
            return np.asarray(image.read(0))
        return read_image(image)
    return np.asarray(image)
