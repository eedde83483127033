"""Register one pair, score it, write its folder: what ``histreg register`` and ``histreg demo``
run, and the folder layout ``register-batch`` shares.

A pair's folder holds (:data:`OUTPUT_NAMES`) the warped source (PNG for 8-bit input, TIFF
otherwise), the transform (``transform.mha`` + ``transform.json``), an overlay, the source
landmarks mapped into the target frame and, when both landmark sets are given, ``metrics.json``
(:func:`napari_histreg.scoring.score`'s row plus the run's settings). Written under the output
rule of :mod:`napari_histreg.outputs`: staged, then renamed in place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .io import HistRegInputError, atomic_write_json, write_image, write_landmarks
from .outputs import check_output_folder, staged_outputs
from .scoring import METRIC_COLUMNS, LandmarkPair, Landmarks, finite_points, score

OUTPUT_NAMES = {
    "warped_png": "warped_source.png",
    "warped_tif": "warped_source.tif",
    "transform": "transform",  # transform.mha + transform.json
    "landmarks": "warped_source_landmarks.csv",
    "overlay": "overlay.png",
    "metrics": "metrics.json",
}


def warped_name(dtype) -> str:
    """The warped source's file name: PNG for 8-bit images, TIFF otherwise (no rounding)."""
    return OUTPUT_NAMES["warped_png" if np.dtype(dtype) == np.uint8 else "warped_tif"]


def planned_outputs(dtype, source_landmarks: bool, metrics: bool) -> list[str]:
    """The file names the folder of a pair whose source has ``dtype`` will hold."""
    names = [warped_name(dtype), "transform.mha", "transform.json", OUTPUT_NAMES["overlay"]]
    if source_landmarks:
        names.append(OUTPUT_NAMES["landmarks"])
    if metrics:
        names.append(OUTPUT_NAMES["metrics"])
    return names


def write_pair_outputs(stage: Path, result, *, source_image=None, target_image=None, source_landmarks: Landmarks | None = None,
                       metrics: dict | None = None, title: str = "") -> None:
    """Write a pair's outputs into ``stage`` (a staging folder: see :func:`~napari_histreg.outputs.staged_outputs`).
    Without images (whole slides, warped apart) only the transform, landmarks and metrics."""
    stage = Path(stage)
    if source_image is not None:
        warped = result.warp(source_image)
        write_image(stage / warped_name(source_image.dtype), warped)
    result.save(stage / OUTPUT_NAMES["transform"])
    if source_landmarks is not None:
        mapped = finite_points(result.map_source_points(source_landmarks.points), source_landmarks.name)
        write_landmarks(stage / OUTPUT_NAMES["landmarks"], source_landmarks.ids, mapped)
    if metrics is not None:
        atomic_write_json(stage / OUTPUT_NAMES["metrics"], metrics)
    if source_image is not None and target_image is not None:
        from .overlay import save_overlay

        save_overlay(stage / OUTPUT_NAMES["overlay"], target_image, source_image, warped, title=title)


def register_pair(
    source_image,
    target_image,
    *,
    out=None,
    source_landmarks: Landmarks | None = None,
    target_landmarks: Landmarks | None = None,
    inputs=(),
    config=None,
    device=None,
    progress=None,
    names=("source", "target"),
    overwrite=False,
    threads=None,
    command="register",
    guide: LandmarkPair | None = None,
) -> dict:
    """Register two arrays, score them when both landmark sets are given, and write the pair's
    folder ``out`` (if given; ``inputs``: the files read, which it may never replace).
    ``guide``: corresponding points the result is corrected through
    (:mod:`napari_histreg.guided`); the metrics then also give the landmarks' error without the
    guides' ids (``held_out``).

    Returns ``{"result", "metrics" (None without both landmark sets), "outputs" (paths)}``.
    Every input is checked before any work: shapes, constant images, landmarks outside their
    image, the output folder.
    """
    from . import __version__
    from .pipeline import check_pair_shapes, is_constant, register

    check_pair_shapes(source_image.shape, target_image.shape, *names)
    for name, image in zip(names, (source_image, target_image)):
        if is_constant(image):
            raise HistRegInputError(f"{name}: image is constant (every pixel has the same value); there is nothing to register")
    landmarks = None
    if source_landmarks is not None:
        source_landmarks.check_inside(source_image.shape)
    if target_landmarks is not None:
        if source_landmarks is None:
            target_landmarks.check_inside(target_image.shape)
            warnings.warn("target landmarks given without source landmarks: no metrics can be computed", stacklevel=2)
        else:
            landmarks = LandmarkPair.from_landmarks(source_landmarks, target_landmarks, target_image.shape)

    planned = []
    if out is not None:
        out = Path(out)
        check_output_folder(out, inputs=inputs, overwrite=overwrite)  # before any work
        planned = planned_outputs(source_image.dtype, source_landmarks is not None, landmarks is not None)

    guide_points = None if guide is None else (guide.source_rc, guide.target_rc)
    result = register(source_image, target_image, config, device=device, progress=progress, threads=threads,
                      name=f"{names[0]} -> {names[1]}", guide_points=guide_points)
    metrics = None
    if landmarks is not None:
        metrics = score(result, landmarks)
        if guide is not None:
            metrics["guide_ids"] = [str(i) for i in guide.ids]
            others = ~np.isin(landmarks.ids.astype(str), np.asarray(guide.ids).astype(str))
            if others.any():
                held_out = LandmarkPair(landmarks.ids[others], landmarks.source_rc[others], landmarks.target_rc[others],
                                        landmarks.target_shape)
                metrics["held_out"] = {k: v for k, v in score(result, held_out).items() if k in METRIC_COLUMNS}
        metrics.update(
            source=names[0], target=names[1], source_landmarks=source_landmarks.name, target_landmarks=target_landmarks.name,
            landmark_ids=[str(i) for i in landmarks.ids], seconds=result.timings.get("total"), timings=result.timings,
            device=str(result.info.get("device")), threads=result.info.get("threads"), version=__version__,
            confidence_measures=result.confidence.get("measures"),
        )
    if out is not None:
        with staged_outputs(out, inputs=inputs, overwrite=overwrite, command=command) as stage:
            write_pair_outputs(stage, result, source_image=source_image, target_image=target_image,
                               source_landmarks=source_landmarks, metrics=metrics,
                               title=f"{Path(names[0]).name} -> {Path(names[1]).name}")
    return {"result": result, "metrics": metrics, "outputs": [out / name for name in planned] if out is not None else []}
