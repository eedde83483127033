"""ANHIR-style evaluation of a cover table, without napari.

A cover table is a CSV with the columns ``Source image``, ``Source landmarks``,
``Target image``, ``Target landmarks`` and optionally ``status``; relative paths are relative
to the CSV's folder. :func:`evaluate_table` registers every pair, maps the source landmarks
into the target frame and scores them with the ANHIR metrics (:mod:`napari_histreg.metrics`).
A pair that fails is recorded with its error message and the run goes on.

Used by ``histreg evaluate`` and ``benchmarks/compare.py``::

    rows, summary = evaluate_table("data/dataset.csv", "results/", statuses=["training"])
"""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from .io import HistRegInputError, atomic_path, atomic_write_json, read_image
from .outputs import check_not_inputs, check_output_folder, staged_outputs  # noqa: F401  (re-exported)
from .progress import ProgressCallback, RegistrationCancelled, report
from .scoring import METRIC_COLUMNS, RESULT_COLUMNS

REQUIRED_COLUMNS = ("Source image", "Source landmarks", "Target image", "Target landmarks")

#: Columns of ``pairs.csv`` (and keys of each row returned by :func:`evaluate_table`).
PAIR_COLUMNS = ("source", "target", "status", *METRIC_COLUMNS, "seconds", *RESULT_COLUMNS, "error")


@dataclasses.dataclass
class CoverPair:
    """One row of a cover table: the strings as written, and the resolved paths."""

    row: int  # line number in the CSV (header is line 1)
    source: str
    source_landmarks: str
    target: str
    target_landmarks: str
    status: str
    folder: Path

    def path(self, value: str) -> Path | None:
        return (self.folder / value) if value else None

    def input_paths(self) -> list[Path]:
        """Every file this pair names (images and landmarks): inputs, never outputs."""
        return [p for p in (self.path(v) for v in (self.source, self.source_landmarks, self.target, self.target_landmarks)) if p]


# --------------------------------------------------------------------------- cover tables
def read_cover_table(csv_path: str | os.PathLike) -> list[CoverPair]:
    """The pairs of an ANHIR cover table, paths resolved against the table's folder."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise HistRegInputError(f"{csv_path}: cover table not found")
    if csv_path.is_dir():
        raise HistRegInputError(f"{csv_path}: is a folder, not a cover table CSV")
    return read_pair_rows(csv_path, REQUIRED_COLUMNS, "cover table", "CSV cover table")


def read_pair_rows(csv_path: Path, required: Iterable[str], kind: str, csv_kind: str) -> list[CoverPair]:
    """The non-empty rows of a pair table (cover or batch table) as :class:`CoverPair` s.
    ``kind`` / ``csv_kind`` name the table in the messages about missing columns / a bad CSV."""
    try:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            records = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise HistRegInputError(f"{csv_path}: not a {csv_kind} ({err})") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise HistRegInputError(f"{csv_path}: {kind} lacks the column(s) {', '.join(map(repr, missing))}; it has {fields}")
    folder = csv_path.resolve().parent
    pairs = []
    for line, record in enumerate(records, start=2):
        record = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k is not None}
        if not any(record.values()):
            continue
        pairs.append(
            CoverPair(
                row=line,
                source=record.get("Source image", ""),
                source_landmarks=record.get("Source landmarks", ""),
                target=record.get("Target image", ""),
                target_landmarks=record.get("Target landmarks", ""),
                status=record.get("status", ""),
                folder=folder,
            )
        )
    return pairs


def select_pairs(pairs: list[CoverPair], statuses: Iterable[str] | str | None = None, limit: int | None = None, name: str = "cover table") -> list[CoverPair]:
    """Keep the pairs whose status is in ``statuses`` (comma-separated string or list), then
    the first ``limit`` of them."""
    if isinstance(statuses, str):
        statuses = statuses.split(",")
    wanted = [s.strip() for s in statuses or [] if s.strip()]
    if wanted:
        available = sorted({p.status for p in pairs})
        unknown = [s for s in wanted if s not in available]
        if len(unknown) == len(wanted):
            raise HistRegInputError(f"{name}: no pair has status {', '.join(map(repr, wanted))}; statuses present: {available}")
        pairs = [p for p in pairs if p.status in wanted]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        pairs = pairs[:limit]
    return pairs


# --------------------------------------------------------------------------- one pair
def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if not isinstance(err, HistRegInputError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text[:500]


def evaluate_pair(pair: CoverPair, pipeline, progress: ProgressCallback = None) -> dict:
    """Register one cover-table pair with ``pipeline`` and score it (:func:`~napari_histreg.scoring.score`);
    raises on failure."""
    from .pipeline import register
    from .scoring import LandmarkPair, score

    for label, value in (("Source image", pair.source), ("Target image", pair.target),
                         ("Source landmarks", pair.source_landmarks), ("Target landmarks", pair.target_landmarks)):
        if not value:
            raise HistRegInputError(f"cover table line {pair.row}: no {label!r} given")
    for path in (pair.path(pair.source), pair.path(pair.target)):
        if not path.exists():
            raise HistRegInputError(f"{path}: file not found")
    source_image = read_image(pair.path(pair.source))
    target_image = read_image(pair.path(pair.target))
    landmarks = LandmarkPair.read(pair.path(pair.source_landmarks), pair.path(pair.target_landmarks),
                                  target_image.shape, source_image.shape)
    start = time.perf_counter()
    result = register(source_image, target_image, pipeline=pipeline, progress=progress, name=f"{pair.source} -> {pair.target}")
    row = score(result, landmarks)
    row["seconds"] = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------- summaries
def summarise_rows(rows: list[dict]) -> dict:
    """ANHIR summary over rows: AMrTRE, MMrTRE, AArTRE, mean robustness, median seconds."""
    ok = [r for r in rows if not r.get("error") and r.get("MrTRE") is not None]
    out: dict = {"count": len(rows), "failed": len(rows) - len(ok), "flagged": sum(1 for r in ok if r.get("flag") == "check")}
    if not ok:
        out.update({k: None for k in ("AMrTRE", "MMrTRE", "AArTRE", "robustness", "initial_AMrTRE", "median_seconds")})
        return out
    mr = np.array([r["MrTRE"] for r in ok], dtype=float)
    out.update(
        {
            "AMrTRE": float(mr.mean()),
            "MMrTRE": float(np.median(mr)),
            "AArTRE": float(np.mean([r["mean_rTRE"] for r in ok])),
            "robustness": float(np.mean([r["robustness"] for r in ok])),
            "initial_AMrTRE": float(np.mean([r["initial_MrTRE"] for r in ok])),
            "median_seconds": float(statistics.median(r["seconds"] for r in ok)),
        }
    )
    return out


def summarise_by_status(rows: list[dict]) -> dict:
    summary = summarise_rows(rows)
    statuses = sorted({r.get("status", "") for r in rows})
    summary["per_status"] = {s: summarise_rows([r for r in rows if r.get("status", "") == s]) for s in statuses}
    return summary


def _fmt(value, digits: int = 5) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_pairs_csv(path, rows: list[dict], columns: Iterable[str] = PAIR_COLUMNS) -> Path:
    """``pairs.csv`` (columns :data:`PAIR_COLUMNS`, or ``columns``), written atomically."""
    columns = tuple(columns)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_fmt(row.get(c), 6) if c != "seconds" else _fmt_seconds(row.get(c)) for c in columns])
    return Path(path)


def _fmt_seconds(value) -> str:
    return "" if value is None else f"{value:.2f}"


def format_table(rows: list[dict], summary: dict | None = None) -> str:
    """A plain-text table of the rows (and the summary) for a terminal."""
    headers = ["#", "status", "source -> target", "init MrTRE", "MrTRE", "robust", "sec", "flag", "error"]
    lines = []
    for k, row in enumerate(rows, start=1):
        pair = f"{Path(row['source']).name} -> {Path(row['target']).name}"
        error = row.get("error") or ""
        lines.append(
            [str(k), row.get("status", ""), pair, _fmt(row.get("initial_MrTRE"), 4), _fmt(row.get("MrTRE"), 4),
             _fmt(row.get("robustness"), 3), _fmt_seconds(row.get("seconds")),
             (f"{row['flag']} {row['confidence']:.2f}" if row.get("flag") and row.get("confidence") is not None else ""), ("..." + error[-67:]) if len(error) > 70 else error]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    if summary is not None:
        out.append("")
        out.append(_summary_line("all", summary))
        per_status = summary.get("per_status", {})
        if len(per_status) > 1:
            out += [_summary_line(status or "(no status)", sub) for status, sub in per_status.items()]
    return "\n".join(out)


def _summary_line(label: str, s: dict) -> str:
    return (
        f"{label}: {s['count']} pairs, {s['failed']} failed, {s.get('flagged', 0)} flagged check; AMrTRE {_fmt(s.get('AMrTRE'), 4) or '-'}, "
        f"MMrTRE {_fmt(s.get('MMrTRE'), 4) or '-'}, AArTRE {_fmt(s.get('AArTRE'), 4) or '-'}, "
        f"robustness {_fmt(s.get('robustness'), 3) or '-'}, median {_fmt_seconds(s.get('median_seconds')) or '-'} s/pair "
        f"(initial AMrTRE {_fmt(s.get('initial_AMrTRE'), 4) or '-'})"
    )


# --------------------------------------------------------------------------- the table
def evaluate_table(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    statuses: Iterable[str] | str | None = None,
    config=None,
    device=None,
    progress: ProgressCallback = None,
    limit: int | None = None,
    *,
    overwrite: bool = False,
    threads=None,
) -> tuple[list[dict], dict]:
    """Register and score every pair of an ANHIR cover table.

    ``statuses``: keep only pairs with these ``status`` values (list or ``"a,b"``);
    ``limit``: at most this many pairs (after the status filter); ``config``: a
    :class:`~napari_histreg.RegistrationConfig`; ``device``: ``"auto"``/``None``, ``"cpu"``,
    ``"cuda"``, ``"mps"``.

    ``progress`` receives :class:`~napari_histreg.ProgressEvent` s: ``stage="pair"`` events
    (``step`` pairs done of ``total``, ``message`` names the next pair) and the stage events of
    the registration under way. Raise :class:`~napari_histreg.RegistrationCancelled` from it to
    stop; nothing is written then.

    Returns ``(rows, summary)``: one dict per pair with the keys :data:`PAIR_COLUMNS`
    (``error`` is ``""`` on success, the message otherwise), and the summary of
    :func:`summarise_rows` plus ``per_status`` and the run settings. With ``out_dir``,
    ``out_dir/pairs.csv`` and ``out_dir/summary.json`` are written (both or neither), under the
    output rule of :mod:`napari_histreg.outputs` (``overwrite`` replaces an earlier evaluation
    only). ``threads``: torch threads per registration (default: chosen from the free cores).
    """
    from .conventions import default_device
    from .pipeline import Pipeline, RegistrationConfig

    csv_path, pairs = open_table(csv_path, out_dir, statuses, limit, overwrite)
    config = config or RegistrationConfig()
    pipeline = Pipeline(config, device=default_device(device), threads=threads)  # a bad device fails here, once

    total = len(pairs)
    rows: list[dict] = []
    for k, pair in enumerate(pairs):
        report(progress, "pair", k, total, f"{Path(pair.source).name} -> {Path(pair.target).name}")
        rows.append(evaluate_row(pair, pipeline, progress))
    report(progress, "pair", total, total, "done")

    summary = table_summary(rows, csv_path, statuses, pipeline.device, config)
    write_table_outputs(out_dir, rows, summary, overwrite=overwrite, inputs=table_inputs(csv_path, pairs))
    return rows, summary


def table_inputs(csv_path, pairs: list[CoverPair]) -> list[Path]:
    """The table and every file its pairs name."""
    return [Path(csv_path)] + [p for pair in pairs for p in pair.input_paths()]


def open_table(csv_path, out_dir, statuses, limit, overwrite: bool = False) -> tuple[Path, list[CoverPair]]:
    """The selected pairs of a cover table, after checking that ``out_dir`` can take the outputs
    (the output rule of :mod:`napari_histreg.outputs`, against every file the table names)."""
    csv_path = Path(csv_path)
    every = read_cover_table(csv_path)
    pairs = select_pairs(every, statuses, limit, name=str(csv_path))
    if out_dir is not None:
        check_output_folder(out_dir, inputs=table_inputs(csv_path, every), overwrite=overwrite)
    return csv_path, pairs


def empty_row(pair: CoverPair, error: str = "") -> dict:
    row = {c: None for c in PAIR_COLUMNS}
    row.update(source=pair.source, target=pair.target, status=pair.status, error=error)
    return row


def evaluate_row(pair: CoverPair, pipeline, progress: ProgressCallback = None) -> dict:
    """One row of the table: the pair's metrics, or its error (recorded; the run goes on)."""
    row = empty_row(pair)
    start = time.perf_counter()
    try:
        row.update(evaluate_pair(pair, pipeline, progress))
    except RegistrationCancelled:
        raise
    except Exception as err:  # recorded, the run goes on
        row["error"] = _one_line(err)
        row["seconds"] = time.perf_counter() - start
    return row


def table_summary(rows, csv_path, statuses, device, config, **extra) -> dict:
    """:func:`summarise_by_status` plus the settings of the run."""
    from . import __version__

    summary = summarise_by_status(rows)
    summary.update(
        {
            "table": str(csv_path),
            "statuses": [s.strip() for s in (statuses.split(",") if isinstance(statuses, str) else statuses or [])],
            "device": str(device),
            "version": __version__,
            "config": _jsonable(config.to_dict()),
            **extra,
        }
    )
    return summary


def write_table_outputs(out_dir, rows, summary, *, overwrite: bool = False, inputs=(), command: str = "evaluate") -> None:
    """``out_dir/pairs.csv`` and ``out_dir/summary.json``, both or neither."""
    if out_dir is None:
        return
    with staged_outputs(Path(out_dir), inputs=inputs, overwrite=overwrite, command=command) as stage:
        write_pairs_csv(stage / "pairs.csv", rows)
        atomic_write_json(stage / "summary.json", summary)


def _jsonable(value):
    from .result import _jsonable as convert

    return convert(value)
