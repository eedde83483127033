"""``histreg warp``, ``register-batch`` and ``evaluate --scheduler/--workers``: whole slides and dask."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    StageProgress,
    _add_overwrite_option,
    _add_run_options,
    _add_threads_option,
    _config,
    _device,
    _pairs_exit_code,
    _positive_int,
    _say,
)
from .pairs import cmd_evaluate


# --------------------------------------------------------------------------- whole slides and dask
# `histreg warp`, `histreg register-batch` and `histreg evaluate --scheduler/--workers`
# (napari_histreg.slides, .tiled and .batch). Kept apart from the commands above.
def _add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` / ``--workers`` on ``histreg evaluate``: run the pairs on dask."""
    group = parser.add_argument_group("parallel run (dask.distributed)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of a running dask scheduler (e.g. tcp://10.0.0.5:8786); the pairs are "
                            "registered on its workers, which must see the input files")
    group.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="without --scheduler: run on a local dask cluster of N worker processes; "
                            "with it: wait for N workers before starting")
    parser.set_defaults(func=cmd_evaluate_parallel)


def _add_slide_commands(sub) -> None:
    p = sub.add_parser(
        "warp",
        help="warp a whole slide at full resolution, tile by tile",
        description="Apply TRANSFORM (transform.json + .mha written by `histreg register`, `histreg register-batch` "
        "or RegistrationResult.save) to SLIDE (pyramidal or flat TIFF/OME-TIFF/SVS, OME-Zarr, or any image) at full "
        "resolution, tile by tile: only the source region each tile needs is read. Writes an OME-Zarr (NGFF 0.4) "
        "pyramid OUT.zarr, built in OUT.zarr.partial and renamed only when complete; an interrupted run leaves "
        "OUT.zarr.partial, which --resume continues. SLIDE must be the slide the transform was computed for (at any "
        "resolution): its proportions and its thumbnail are checked against the transform (--force skips that).",
        epilog="example: histreg warp ihc.ome.tif out/pairs/001-ihc__he/transform.json -o ihc_on_he.ome.zarr "
        "--tiff ihc_on_he.ome.tif",
    )
    p.add_argument("slide", metavar="SLIDE", help="the source (moving) slide the transform was computed for")
    p.add_argument("transform", metavar="TRANSFORM", help="transform .json (or its .mha)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.zarr", help="output OME-Zarr folder")
    p.add_argument("--tiff", default=None, metavar="OUT.ome.tif", help="also write a tiled pyramidal OME-TIFF")
    p.add_argument("--tile", type=_positive_int, default=2048, metavar="N",
                   help="output tile size in pixels; a multiple of 1024 or at most 1024 (default: 2048)")
    p.add_argument("--level", type=int, default=0, metavar="K",
                   help="source pyramid level to warp (default: 0, full resolution)")
    p.add_argument("--order", type=int, default=1, choices=(0, 1), help="0 nearest, 1 bilinear (default: 1)")
    p.add_argument("--fill", type=float, default=0.0, metavar="V",
                   help="value outside the source, e.g. 255 for a white brightfield background (default: 0)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="tiles in parallel (default: the thread count of --threads)")
    p.add_argument("--tiff-compression", default="zlib", choices=("zlib", "zstd", "jpeg", "lzw", "none"),
                   help="compression of the OME-TIFF tiles (default: zlib)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to compute the fields (default: cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.zarr.partial)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier histreg output at OUT.zarr / OUT.ome.tif, or discard an interrupted run's "
                   "OUT.zarr.partial (never anything histreg did not write, nor a path holding an input)")
    p.add_argument("--force", action="store_true",
                   help="warp even when SLIDE does not look like the transform's source (a warning instead of an error)")
    _add_threads_option(p, "threads in all, shared by the tile workers")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_warp)

    p = sub.add_parser(
        "register-batch",
        help="register every pair of a CSV on a dask cluster",
        description="Register every pair of CSV (columns 'Source image', 'Target image', optional 'Source landmarks', "
        "'Target landmarks', 'status'; paths relative to the CSV's folder) in parallel on dask.distributed: a local "
        "cluster by default, --scheduler for a running one. Slides are read lazily at the pyramid level closest to "
        "the working size. Writes OUT/pairs/NNN-SOURCE__TARGET/ (transform.mha + transform.json in level-0 pixels, "
        "warped_source_landmarks.csv, metrics.json, and warped.ome.zarr with --warp), OUT/batch.csv and "
        "OUT/summary.json. A failing pair is recorded with its error and the others finish.",
    )
    p.add_argument("table", metavar="CSV", help="table of pairs")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="address of a running dask scheduler")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="local cluster size (default: the usable cores other processes leave free, at most 4; one torch "
                   "thread per worker unless --threads); with --scheduler: workers to wait for")
    p.add_argument("--warp", action="store_true", help="also warp each source at full resolution (OME-Zarr)")
    p.add_argument("--tile", type=_positive_int, default=2048, metavar="N", help="tile size for --warp (default: 2048)")
    p.add_argument("--status", default=None, metavar="S[,S...]", help="only pairs with these status values")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="at most N pairs")
    _add_overwrite_option(p, "batch output (OUT and its pair folders)")
    _add_run_options(p)
    p.set_defaults(func=cmd_register_batch)


def cmd_evaluate_parallel(args) -> int:
    """``histreg evaluate``: serial unless ``--scheduler`` or ``--workers`` is given."""
    if not (args.scheduler or args.workers):
        return cmd_evaluate(args)
    from ..batch import evaluate_table_distributed
    from ..evaluate import format_table

    with StageProgress(disable=args.quiet) as progress:
        rows, summary = evaluate_table_distributed(
            args.table, args.output, statuses=args.status, config=_config(args), device=args.device,
            progress=progress, limit=args.limit, scheduler=args.scheduler, workers=args.workers,
            overwrite=args.overwrite, threads=args.threads,
        )
    _say(format_table(rows, summary))
    cluster = summary.get("cluster", {})
    _say(f"\nran on {cluster.get('workers', '?')} dask workers ({cluster.get('scheduler', '?')})")
    _say(f"written {Path(args.output) / 'pairs.csv'} and {Path(args.output) / 'summary.json'}")
    return _pairs_exit_code(rows)


def cmd_warp(args) -> int:
    from ..progress import RegistrationCancelled
    from ..tiled import warp_slide
    from ..slides import partial_path

    progress = StageProgress(disable=args.quiet)
    try:
        out = warp_slide(
            args.transform, args.slide, args.output, tiff=args.tiff, level=args.level, tile=args.tile,
            order=args.order, cval=args.fill, workers=args.workers, threads=args.threads, resume=args.resume,
            overwrite=args.overwrite, force=args.force, progress=progress, device=_device(args),
            tiff_compression=None if args.tiff_compression == "none" else args.tiff_compression,
        )
    except (KeyboardInterrupt, RegistrationCancelled):
        progress.close()
        partial = partial_path(args.output)
        if partial.exists():
            print(f"\nhistreg: interrupted; the unfinished output is {partial} (not a valid image): "
                  "run the same command with --resume to continue it, or remove it", file=sys.stderr)
        else:
            print("\nhistreg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    from ..slides import open_slide

    with open_slide(out) as slide:
        sizes = ", ".join(f"{w}x{h}" for h, w in (slide.level_shape(k) for k in range(len(slide.levels))))
        _say(f"warped {args.slide} -> {out} ({slide.channels or 1} channel(s), {slide.dtype}; levels w x h: {sizes})")
    if args.tiff:
        _say(f"pyramidal OME-TIFF: {args.tiff}")
    return EXIT_OK


def cmd_register_batch(args) -> int:
    from ..batch import register_batch
    from ..evaluate import _fmt, _fmt_seconds

    with StageProgress(disable=args.quiet) as progress:
        rows, summary = register_batch(
            args.table, args.output, _config(args), device=args.device, scheduler=args.scheduler,
            workers=args.workers, warp=args.warp, tile=args.tile, statuses=args.status, limit=args.limit,
            overwrite=args.overwrite, progress=progress, threads=args.threads,
        )
    for row in rows:
        levels = "" if row.get("source_level") is None else f" levels {row['source_level']}/{row['target_level']}"
        score = f" MrTRE {_fmt(row['MrTRE'], 4)}" if row.get("MrTRE") is not None else ""
        error = f" ERROR {row['error']}" if row.get("error") else ""
        _say(f"{row['index']:>3}  {Path(row['source']).name} -> {Path(row['target']).name}{levels}{score} "
             f"{_fmt_seconds(row.get('seconds'))} s{error}")
    cluster = summary.get("cluster", {})
    _say(f"\n{summary['registered']} of {summary['pairs']} pairs registered, {summary['failed']} failed, on "
         f"{cluster.get('workers', '?')} dask workers; written {Path(args.output) / 'batch.csv'}, "
         f"{Path(args.output) / 'summary.json'} and {Path(args.output) / 'pairs'}/")
    return _pairs_exit_code(rows)


