"""A stack from a table: read ``STACK.csv``, register the stack, score it, write one folder.

``STACK.csv`` lists the sections in stack order, one per row: column ``Image`` (a path,
relative to the CSV's folder: any image or whole slide :func:`~napari_histreg.slides.open_slide`
reads) and optional ``Landmarks`` (an ANHIR CSV of that image; the same id marks the same
structure in every section). :func:`register_stack_table` writes into ``OUT``:

* ``sections.csv``: one row per section: ``index``, ``image``, ``flag`` (``reference``, ``ok``,
  ``check``, ``skipped``, ``failed``), ``confidence``, ``registered_to``, ``seconds``, ``error``
  and, where the section and the reference both have landmarks, the ANHIR metrics of the
  section's landmarks mapped into the reference against the reference's own
  (``initial_MrTRE``, ``MrTRE``, ``mean_rTRE``, ``max_rTRE``, ``robustness``, ``n_landmarks``);
* ``summary.json``: ``AMrTRE``, ``MMrTRE``, ``robustness`` (over the scored sections),
  ``seconds``, ``flagged``, ``reference``, the method and the configuration;
* ``stack/``: the stack's transforms (:meth:`~napari_histreg.stack.StackResult.save`);
* ``landmarks/``: each section's landmarks mapped into the reference (ANHIR CSV);
* ``aligned.ome.tif``: a preview of the aligned stack, ``(Z, Y, X[, C])`` with the reference's
  longer side at most ``preview_size`` pixels (each section read at the pyramid level nearest
  that size);
* with ``warp=True``, ``aligned.ome.zarr``: every section at full resolution on the reference's
  level-0 grid, z = section, written tile by tile (:func:`napari_histreg.stack_slides.warp_stack`).

Everything is written in a staging folder and moved in when complete (:mod:`napari_histreg.outputs`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from .io import HistRegInputError
from .progress import ProgressCallback
from .scoring import METRIC_COLUMNS

#: columns of ``sections.csv``
SECTION_COLUMNS = ("index", "image", "flag", "confidence", "registered_to", *METRIC_COLUMNS, "seconds", "error")
PREVIEW_SIZE = 1024


@dataclasses.dataclass
class StackRow:
    """One row of ``STACK.csv``: the image and optional landmarks, as given and resolved."""

    row: int
    image: str
    landmarks: str
    folder: Path

    def path(self, value: str) -> Path | None:
        return (self.folder / value) if value else None


def read_stack_table(csv_path: str | os.PathLike) -> list[StackRow]:
    """The sections of ``STACK.csv`` (columns ``Image``, optional ``Landmarks``), checked: an
    error names the file and the line of a missing column, an empty cell or a missing file."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise HistRegInputError(f"{csv_path}: stack table not found")
    try:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise HistRegInputError(f"{csv_path}: not a CSV table ({err})") from None
    if "Image" not in fields:
        raise HistRegInputError(f"{csv_path}: no 'Image' column (found: {', '.join(fields) or 'none'}); "
                                "a stack table lists one section per row in stack order")
    out = []
    for k, raw in enumerate(rows, start=2):
        row = {str(key).strip(): (value or "").strip() for key, value in raw.items() if key is not None}
        image = row.get("Image", "")
        if not image:
            raise HistRegInputError(f"{csv_path}: line {k}: empty 'Image'")
        entry = StackRow(k, image, row.get("Landmarks", ""), csv_path.parent)
        for value in (entry.image, entry.landmarks):
            if value and not entry.path(value).exists():
                raise HistRegInputError(f"{entry.path(value)}: file not found (line {k} of {csv_path})")
        out.append(entry)
    if len(out) < 2:
        raise HistRegInputError(f"{csv_path}: a stack needs at least two sections, the table lists {len(out)}")
    return out


def _images(rows: list[StackRow]) -> list:
    """Each section as the registration reads it: a path (a whole slide is read lazily, at the
    pyramid level nearest the working size)."""
    return [r.path(r.image) for r in rows]


def read_landmarks_of(rows: list[StackRow]) -> list:
    """Each section's :class:`~napari_histreg.scoring.Landmarks` (None where it has none)."""
    from .scoring import Landmarks

    return [Landmarks.read(r.path(r.landmarks)) if r.landmarks else None for r in rows]


def section_rows(stack, rows: list[StackRow], mapped: list) -> list[dict]:
    """``sections.csv``'s rows: each section's flag and, from
    :func:`~napari_histreg.stack.landmarks_in_reference` (``mapped``), the ANHIR metrics of its
    landmarks in the reference against the reference's."""
    out = []
    for s, r, entry in zip(stack.sections, rows, mapped):
        row = {c: None for c in SECTION_COLUMNS}
        row.update(index=s.index, image=r.image, flag=s.flag, confidence=s.confidence, registered_to=s.registered_to,
                   seconds=round(float(s.seconds), 3), error=s.error)
        if entry is not None and entry["metrics"] is not None:
            row.update(entry["metrics"])
        if entry is not None and entry["error"]:
            row["error"] = (row["error"] + "; " if row["error"] else "") + entry["error"]
        out.append(row)
    return out


def summarise_sections(rows: list[dict], stack) -> dict:
    """``summary.json``: the ANHIR summary over the scored sections
    (:func:`napari_histreg.evaluate.summarise_rows`), the flags, the time."""
    from .evaluate import summarise_rows

    scored = summarise_rows([r for r in rows if r.get("MrTRE") is not None])
    summary = {
        "sections": len(rows),
        "reference": stack.reference,
        "method": stack.info.get("method"),
        "scored": scored["count"],
        **{k: scored[k] for k in ("AMrTRE", "MMrTRE", "AArTRE", "initial_AMrTRE", "robustness")},
        "flagged": len(stack.flagged),
        "flags": {f: sum(1 for r in rows if r["flag"] == f) for f in ("reference", "ok", "check", "skipped", "failed")},
        "seconds": stack.info.get("seconds"),
    }
    if "order" in stack.info:
        summary["order"] = stack.info["order"]
    return summary


def write_preview(stack, rows: list[StackRow], path: Path, size: int = PREVIEW_SIZE, progress: ProgressCallback = None) -> tuple:
    """``aligned.ome.tif``: every section warped onto the reference at a preview resolution (the
    reference's longer side at most ``size``), stacked along z. Returns the stack's shape."""
    import tifffile

    from .slides import open_slide
    from .stack import one_kind

    ref_shape = stack.reference_shape
    scale = min(1.0, size / max(ref_shape))
    out_shape = (max(1, round(ref_shape[0] * scale)), max(1, round(ref_shape[1] * scale)))
    images = []
    for r in rows:
        with open_slide(r.path(r.image)) as slide:
            images.append(np.asarray(slide.read(slide.level_for(int(max(slide.shape) * scale) or 1))))
    aligned = stack.aligned(one_kind(images), shape=out_shape, progress=progress)
    axes = "ZYXS" if aligned.ndim == 4 else "ZYX"
    tifffile.imwrite(path, aligned, photometric="rgb" if aligned.ndim == 4 else "minisblack",
                     metadata={"axes": axes}, compression="zlib", ome=True)
    return aligned.shape


def register_stack_table(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config=None,
    *,
    reference: int | None = None,
    direct: bool = False,
    skip_failed: bool = False,
    refine: bool = False,
    order=None,
    device=None,
    threads=None,
    workers: int = 1,
    scheduler: str | None = None,
    preview_size: int = PREVIEW_SIZE,
    warp: bool = False,
    tile: int = 2048,
    overwrite: bool = False,
    progress: ProgressCallback = None,
):
    """Register the stack of ``STACK.csv`` (:func:`read_stack_table`) and write ``out_dir``
    (module docstring). Returns ``(stack, section rows, summary)``; a failing section is
    recorded in its row and the run goes on."""
    from .config import RegistrationConfig
    from .io import atomic_write_json, write_landmarks
    from .outputs import check_output_folder, staged_outputs
    from .result import _jsonable
    from .stack import landmarks_in_reference, register_stack

    config = config or RegistrationConfig()
    rows = read_stack_table(csv_path)
    inputs = [r.path(r.image) for r in rows] + [r.path(r.landmarks) for r in rows if r.landmarks]
    check_output_folder(out_dir, inputs=inputs, overwrite=overwrite)
    start = time.perf_counter()
    stack = register_stack(_images(rows), reference=reference, order=order, config=config, direct=direct,
                           skip_failed=skip_failed, refine=refine, names=[Path(r.image).name for r in rows], device=device,
                           threads=threads, workers=workers, scheduler=scheduler, progress=progress)
    if stack.info.get("order"):
        rows = [rows[k] for k in stack.info["order"]]
    mapped = landmarks_in_reference(stack, read_landmarks_of(rows))  # each section's landmarks mapped once
    table = section_rows(stack, rows, mapped)
    summary = summarise_sections(table, stack)
    with staged_outputs(out_dir, overwrite=overwrite, inputs=inputs, command="register-stack") as stage:
        stack.write(stage / "stack")
        from .evaluate import write_pairs_csv

        write_pairs_csv(stage / "sections.csv", table, SECTION_COLUMNS)
        (stage / "landmarks").mkdir()
        for s, r, entry in zip(stack.sections, rows, mapped):
            if entry is not None:
                write_landmarks(stage / "landmarks" / f"{s.index:03d}-{Path(r.image).stem}_in_reference.csv",
                                entry["landmarks"].ids, entry["mapped"])
        summary["preview_shape"] = list(write_preview(stack, rows, stage / "aligned.ome.tif", preview_size, progress))
        if warp:
            from .stack_slides import warp_stack

            warp_stack(stack, _images(rows), stage / "aligned.ome.zarr", tile=tile, threads=threads, progress=progress)
        summary["seconds_total"] = round(time.perf_counter() - start, 3)
        summary["config"] = config.to_dict()
        atomic_write_json(stage / "summary.json", _jsonable(summary))
    return stack, table, summary
