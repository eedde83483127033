"""Many registrations in parallel on a dask.distributed cluster.

* :func:`evaluate_table_distributed` is :func:`napari_histreg.evaluate.evaluate_table` with the
  pairs spread over dask workers: the same rows (each pair is registered by the same per-pair
  function, :func:`napari_histreg.evaluate.evaluate_pair`), the same summary
  (plus a ``cluster`` entry), the same ``pairs.csv`` / ``summary.json``.
* :func:`register_batch` registers every pair of a CSV (``Source image``, ``Target image``,
  optional ``Source landmarks``, ``Target landmarks``, ``status``; paths relative to the CSV),
  slides included (each is read lazily at the level closest to the working size, see
  :func:`napari_histreg.slides.register_slides`), and writes per pair a folder with the
  transform (level-0 pixels), the warped source landmarks, the metrics, and optionally the
  warped source as an OME-Zarr pyramid (tile-wise, :func:`napari_histreg.tiled.warp_slide`).

The cluster is a ``LocalCluster`` (worker processes, one thread each; as many as the usable
cores other processes leave free, at most 4) unless ``scheduler`` gives the address of a
running one (``tcp://host:8786``) or ``client`` an existing ``distributed.Client``. Workers
must see the input paths (a shared file system) and have napari-histreg installed. A failing
pair (a bad file, an exception, a worker that died) is recorded with its error and the others
finish. Each registration runs on one torch thread per worker process (``threads`` changes it):
several processes with several threads each on the same cores spin against each other
(:mod:`napari_histreg.threads`).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable

from .evaluate import (
    CoverPair,
    _one_line,
    empty_row,
    evaluate_row,
    open_table,
    read_pair_rows,
    select_pairs,
    summarise_by_status,
    table_inputs,
    table_summary,
    write_pairs_csv,
    write_table_outputs,
)
from .io import HistRegInputError, atomic_write_json
from .outputs import check_output_folder, staged_outputs
from .progress import ProgressCallback, RegistrationCancelled, report
from .scoring import METRIC_COLUMNS, RESULT_COLUMNS

__all__ = [
    "BATCH_COLUMNS",
    "dask_client",
    "evaluate_pair_task",
    "evaluate_table_distributed",
    "read_batch_table",
    "register_batch",
    "register_pair_task",
]

#: Columns of ``batch.csv`` written by :func:`register_batch`.
BATCH_COLUMNS = (
    "index", "source", "target", "status", "output", "source_level", "target_level",
    *METRIC_COLUMNS, "seconds", *RESULT_COLUMNS, "error",
)


# --------------------------------------------------------------------------- the cluster
@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
                timeout: float = 60.0, client=None):
    """A ``distributed.Client``: ``client`` as given, a connection to ``scheduler`` (an address
    such as ``tcp://127.0.0.1:8786``), or a new ``LocalCluster`` of ``workers`` processes
    (default: the usable cores that other processes leave free, at most 4; see
    :func:`napari_histreg.threads.default_workers`) with ``threads_per_worker`` threads each.
    What this function started is closed on exit."""
    if client is not None:
        yield client
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - distributed is a dependency of this module
        raise HistRegInputError(f"dask.distributed is needed for parallel runs: pip install distributed ({err})") from None
    if scheduler:
        try:
            own = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise HistRegInputError(f"{scheduler}: cannot connect to the dask scheduler ({type(err).__name__}: {err})") from None
        try:
            if workers:
                own.wait_for_workers(workers, timeout=timeout)
            yield own
        finally:
            own.close()
        return
    from .threads import default_workers

    n = workers or default_workers()
    with LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as own:
        yield own


def _describe(client) -> dict:
    with contextlib.suppress(Exception):
        info = client.scheduler_info()
        return {"scheduler": client.scheduler.address, "workers": len(info.get("workers", {}))}
    return {"scheduler": str(getattr(client.scheduler, "address", "?"))}


def _run(client, fn: Callable, calls: list[tuple], on_error: Callable, progress: ProgressCallback, names: list[str]) -> list:
    """Submit ``fn(*args)`` for each ``args`` in ``calls``; results in call order. A future that
    fails (an exception not caught by ``fn``, a dead worker) gives ``on_error(index, error)``."""
    from distributed import as_completed

    total = len(calls)
    report(progress, "pair", 0, total, f"{total} pairs on {_describe(client).get('workers', '?')} workers")
    futures = [client.submit(fn, *args, pure=False, key=f"histreg-pair-{k}-{os.getpid()}-{time.time_ns()}") for k, args in enumerate(calls)]
    index = {f.key: k for k, f in enumerate(futures)}
    results: list = [None] * total
    done = 0
    try:
        for future in as_completed(futures):
            k = index[future.key]
            try:
                results[k] = future.result()
            except Exception as err:  # a worker died, or the task could not run
                results[k] = on_error(k, err)
            done += 1
            report(progress, "pair", done, total, names[k])
    except BaseException:
        client.cancel(futures)
        raise
    return results


# --------------------------------------------------------------------------- evaluation
def evaluate_pair_task(pair: CoverPair, config, device, threads=1) -> dict:
    """One row of :func:`evaluate_table` for ``pair``, computed where it runs (a dask worker)."""
    from .conventions import default_device
    from .pipeline import Pipeline

    try:
        pipeline = Pipeline(config, device=default_device(device), threads=threads)
    except Exception as err:  # recorded, the batch goes on
        return empty_row(pair, _one_line(err))
    return evaluate_row(pair, pipeline, None)


def evaluate_table_distributed(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    statuses: Iterable[str] | str | None = None,
    config=None,
    device=None,
    progress: ProgressCallback = None,
    limit: int | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    timeout: float = 60.0,
    overwrite: bool = False,
    threads=None,
) -> tuple[list[dict], dict]:
    """:func:`napari_histreg.evaluate.evaluate_table` on a dask cluster (see the module doc).

    Same arguments and results; ``progress`` gets ``stage="pair"`` events as pairs finish (raise
    :class:`~napari_histreg.RegistrationCancelled` to cancel the rest; nothing is written).
    The summary has an extra ``cluster`` entry (scheduler address, worker count). ``timeout``:
    seconds to wait for the scheduler (and for ``workers`` workers on it)."""
    from .conventions import default_device
    from .pipeline import RegistrationConfig

    from .threads import requested_threads

    csv_path, pairs = open_table(csv_path, out_dir, statuses, limit, overwrite)
    config = config or RegistrationConfig()
    local_device = default_device(device)  # a bad device fails here, once
    device_arg = None if device in (None, "auto") else str(device)
    per_worker = requested_threads(threads) or 1

    def failed(k, err):
        return empty_row(pairs[k], f"worker failed: {_one_line(err)}")

    names = [f"{Path(p.source).name} -> {Path(p.target).name}" for p in pairs]
    with dask_client(scheduler, workers, client=client, timeout=timeout) as dc:
        cluster = _describe(dc)
        calls = [(p, config, device_arg, per_worker) for p in pairs]
        rows = _run(dc, evaluate_pair_task, calls, failed, progress, names)

    summary = table_summary(rows, csv_path, statuses, local_device, config, cluster=cluster, threads_per_worker=per_worker)
    write_table_outputs(out_dir, rows, summary, overwrite=overwrite, inputs=table_inputs(csv_path, pairs))
    return rows, summary


# --------------------------------------------------------------------------- register-batch
def read_batch_table(csv_path: str | os.PathLike) -> list[CoverPair]:
    """Pairs of a batch CSV: ``Source image`` and ``Target image`` are required, ``Source
    landmarks``, ``Target landmarks`` and ``status`` optional; paths relative to the CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise HistRegInputError(f"{csv_path}: batch table not found" if not csv_path.exists() else f"{csv_path}: is not a CSV file")
    return read_pair_rows(csv_path, ("Source image", "Target image"), "batch table", "CSV table")


def _stem(name: str) -> str:
    stem = Path(name).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "image"


def pair_folder_name(index: int, pair: CoverPair) -> str:
    return f"{index:03d}-{_stem(pair.source)}__{_stem(pair.target)}"


def _batch_row(pair: CoverPair, folder, error: str = "") -> dict:
    row = {c: None for c in BATCH_COLUMNS}
    row.update(source=pair.source, target=pair.target, status=pair.status, output=str(folder), error=error)
    return row


def register_pair_task(pair: CoverPair, folder: str, config, device, warp: bool = False, tile: int = 2048,
                       overwrite: bool = False, threads=1) -> dict:
    """Register one batch pair (slides read lazily) and write its folder; returns its row."""
    from .pair_outputs import write_pair_outputs
    from .scoring import LandmarkPair, Landmarks, result_columns, score
    from .slides import open_slide, register_slides

    folder = Path(folder)
    row = _batch_row(pair, folder)
    start = time.perf_counter()
    try:
        for label, value in (("Source image", pair.source), ("Target image", pair.target)):
            if not value:
                raise HistRegInputError(f"batch table line {pair.row}: no {label!r} given")
        source_path, target_path = pair.path(pair.source), pair.path(pair.target)
        source_lm = Landmarks.read(pair.path(pair.source_landmarks)) if pair.source_landmarks else None
        target_lm = Landmarks.read(pair.path(pair.target_landmarks)) if pair.target_landmarks else None
        with open_slide(source_path) as source, open_slide(target_path) as target:
            landmarks = None
            if source_lm is not None and target_lm is not None:
                landmarks = LandmarkPair.from_landmarks(source_lm, target_lm, target.shape, source.shape)
            result = register_slides(source, target, config, device=device, threads=threads)
            row.update(source_level=result.info["slide"]["source_level"], target_level=result.info["slide"]["target_level"])
            row.update(result_columns(result))
            metrics = None
            if landmarks is not None:
                metrics = score(result, landmarks)
                row.update({k: metrics[k] for k in METRIC_COLUMNS})
            with staged_outputs(folder, inputs=pair.input_paths(), overwrite=overwrite, command="register-batch") as stage:
                write_pair_outputs(stage, result, source_landmarks=source_lm,
                                   metrics=None if metrics is None else {**metrics, "source": pair.source, "target": pair.target})
            if warp:
                from .tiled import warp_slide

                warp_slide(result, source, folder / "warped.ome.zarr", tile=tile, workers=1, threads=threads,
                           overwrite=overwrite)
                from .outputs import read_marker, write_marker

                listed = (read_marker(folder) or {}).get("files", [])
                write_marker(folder, [*listed, "warped.ome.zarr"], "register-batch")
    except Exception as err:  # recorded, the batch goes on
        row["error"] = _one_line(err)
    row["seconds"] = time.perf_counter() - start
    return row


def write_batch_csv(path, rows: list[dict]) -> Path:
    """``batch.csv`` (columns :data:`BATCH_COLUMNS`), written atomically."""
    return write_pairs_csv(path, rows, BATCH_COLUMNS)


def register_batch(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config=None,
    device=None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    warp: bool = False,
    tile: int = 2048,
    statuses: Iterable[str] | str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback = None,
    timeout: float = 60.0,
    threads=None,
) -> tuple[list[dict], dict]:
    """Register every pair of the batch table ``csv_path`` on a dask cluster (see the module doc)
    and write ``out_dir/pairs/NNN-SOURCE__TARGET/`` (``transform.mha`` + ``transform.json`` in
    level-0 pixels, ``warped_source_landmarks.csv``, ``metrics.json``, ``warped.ome.zarr`` with
    ``warp``) per pair, then ``out_dir/batch.csv`` (one row per pair, :data:`BATCH_COLUMNS`) and
    ``out_dir/summary.json``. ``timeout``: seconds to wait for the scheduler. Returns
    ``(rows, summary)``."""
    from . import __version__
    from .conventions import default_device
    from .evaluate import _jsonable
    from .pipeline import RegistrationConfig

    from .threads import requested_threads

    csv_path = Path(csv_path)
    out_dir = Path(out_dir)
    every = read_batch_table(csv_path)
    pairs = select_pairs(every, statuses, limit, name=str(csv_path))
    if not pairs:
        raise HistRegInputError(f"{csv_path}: no pairs to register")
    inputs = table_inputs(csv_path, every)
    check_output_folder(out_dir, inputs=inputs, overwrite=overwrite)  # the output rule, before any work
    config = config or RegistrationConfig()
    default_device(device)  # a bad device fails here, once
    device_arg = None if device in (None, "auto") else str(device)
    per_worker = requested_threads(threads) or 1
    folders = [out_dir / "pairs" / pair_folder_name(k, p) for k, p in enumerate(pairs, start=1)]
    for folder in folders:
        check_output_folder(folder, inputs=inputs, overwrite=overwrite)

    def failed(k, err):
        return _batch_row(pairs[k], folders[k], f"worker failed: {_one_line(err)}")

    names = [f"{Path(p.source).name} -> {Path(p.target).name}" for p in pairs]
    calls = [(p, str(f), config, device_arg, warp, tile, overwrite, per_worker) for p, f in zip(pairs, folders)]
    with dask_client(scheduler, workers, client=client, timeout=timeout) as dc:
        cluster = _describe(dc)
        rows = _run(dc, register_pair_task, calls, failed, progress, names)
    for k, row in enumerate(rows, start=1):
        row["index"] = k
    summary = summarise_by_status([r for r in rows if r.get("MrTRE") is not None or r.get("error")])
    summary.update(
        {
            "pairs": len(rows),
            "registered": sum(1 for r in rows if not r.get("error")),
            "failed": sum(1 for r in rows if r.get("error")),
            "table": str(csv_path),
            "version": __version__,
            "config": _jsonable(config.to_dict()),
            "cluster": cluster,
            "threads_per_worker": per_worker,
            "warp": warp,
        }
    )
    # the pair folders the workers wrote are listed in OUT's marker, so that a later --overwrite
    # replaces them and removes those a run does not write again
    pair_names = [f"pairs/{f.name}" for f in folders if f.exists()]
    with staged_outputs(out_dir, inputs=inputs, overwrite=True, command="register-batch", check=False,
                        extra_files=pair_names) as stage:
        write_batch_csv(stage / "batch.csv", rows)
        atomic_write_json(stage / "summary.json", summary)
    return rows, summary


__all__ += ["RegistrationCancelled"]  # re-exported: raise it from ``progress`` to cancel a batch
