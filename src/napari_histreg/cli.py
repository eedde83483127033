"""The ``histreg`` command line: register a pair, evaluate a cover table, convert images, demo.

Exit codes (also in the README):

* 0: success;
* 2: bad input (a missing or unreadable file, a constant image, an output that would replace
  an input or data that is not an earlier histreg output, an unavailable device, a slide that
  is not the one a transform was made for, ...): one line ``histreg: error: <file>: <problem>``
  on stderr, no traceback, nothing written;
* 3: ``evaluate`` / ``register-batch`` ran every pair but some failed (the count is printed;
  each failure is in ``pairs.csv`` / ``batch.csv``);
* 130: interrupted (no partial outputs are left, except a resumable ``OUT.partial`` of ``warp``);
* 1: anything else (a bug: ``--debug`` shows the traceback).

Where outputs may go is one rule for every command: :mod:`napari_histreg.outputs`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PAIRS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


DESCRIPTION = """\
Register consecutive histology sections stained with different dyes (napari-histreg).

commands:
  register   register a SOURCE image onto a TARGET image and write the warped source,
             the transform, the warped landmarks, an overlay picture and ANHIR metrics
  evaluate   register every pair of an ANHIR cover table and report rTRE statistics
  convert    convert images to .mha (colour kept as vector pixels)
  demo       register the bundled sample pair and print the landmark error before/after
  warp       apply a transform to a whole slide at full resolution, tile by tile, into an
             OME-Zarr pyramid (and optionally a pyramidal OME-TIFF)
  register-batch
             register every pair of a CSV (images or whole slides) on a dask cluster
  train      train one of the networks (segmentation, affine, nonrigid) from images,
             without landmarks

Run `histreg COMMAND --help` for the options of a command.
"""


# --------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _threads(text: str) -> str | int:
    if text.strip().lower() == "auto":
        return "auto"
    return _positive_int(text)


def _add_threads_option(parser: argparse.ArgumentParser, what: str = "torch threads") -> None:
    parser.add_argument(
        "--threads", type=_threads, default=None, metavar="N|auto",
        help=f"{what} (default: auto = the usable cores that other processes leave free, at least 1; "
        "$HISTREG_THREADS sets the default too)",
    )


def _add_overwrite_option(parser: argparse.ArgumentParser, what: str = "output") -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace an earlier histreg {what} at the output path (never anything else: a folder or file that "
        "histreg did not write, or one holding an input, is refused either way)",
    )


def _working_size(text: str) -> int:
    value = _positive_int(text)
    if value < 64:
        raise argparse.ArgumentTypeError(f"working size must be at least 64 px, not {value}")
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registration options")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                       help="where to compute: auto picks cuda, then mps, then cpu (default: auto)")
    group.add_argument("--mode", default=None, choices=("hybrid", "optimise", "learned"),
                       help="hybrid: the shipped networks, then the instance optimisation from their result (the "
                            "most accurate); optimise: instance optimisation only; learned: the networks only "
                            "(fastest) (default: the configuration's default, hybrid)")
    group.add_argument("--mask", default=None, choices=("none", "otsu", "unet"),
                       help="set the background outside a tissue mask to 0 before aligning: none, Otsu threshold, "
                            "or the tissue U-Net (default: the configuration's default, none)")
    group.add_argument("--method", default=None, choices=("dense", "patches", "none"),
                       help="non-rigid stage: dense instance optimisation, the patch-group engine, or none "
                            "(initial + affine only) (default: the configuration's default, dense)")
    group.add_argument("--working-size", type=_working_size, default=None, metavar="N",
                       help="longer side in pixels of the grid the registration runs on; smaller is faster "
                            "and coarser (default: the configuration's default)")
    group.add_argument("--config", default=None, metavar="JSON",
                       help="JSON file of RegistrationConfig overrides, nested by stage, e.g. "
                            '{"use_mask": true, "affine": {"iterations": [50, 30, 20]}}; '
                            "--method and --working-size apply on top of it")
    _add_threads_option(group)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="histreg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"histreg (napari-histreg) {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "register",
        help="register SOURCE onto TARGET",
        description="Register SOURCE (moving) onto TARGET (fixed) and write into the folder OUT: "
        "warped_source.png (8-bit input) or warped_source.tif (other), transform.mha + transform.json, "
        "warped_source_landmarks.csv (source landmarks mapped into the target frame, ANHIR X,Y), "
        "overlay.png (target in magenta, source in green, before and after) and metrics.json "
        "(ANHIR rTRE, when both landmark files are given). Inputs are never modified.",
        epilog="example: histreg register ihc.jpg he.jpg -o out --source-landmarks ihc.csv --target-landmarks he.csv",
    )
    p.add_argument("source", metavar="SOURCE", help="moving image (jpg, png, tif, mha)")
    p.add_argument("target", metavar="TARGET", help="fixed image (jpg, png, tif, mha)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    p.add_argument("--source-landmarks", metavar="CSV", help="ANHIR landmark CSV (,X,Y) of SOURCE")
    p.add_argument("--target-landmarks", metavar="CSV", help="ANHIR landmark CSV (,X,Y) of TARGET")
    _add_overwrite_option(p, "output folder")
    _add_run_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "evaluate",
        help="register and score every pair of an ANHIR cover table",
        description="Register every pair of an ANHIR cover table (columns 'Source image', 'Source landmarks', "
        "'Target image', 'Target landmarks', optional 'status'; paths relative to the CSV's folder) and write "
        "OUT/pairs.csv (one line per pair) and OUT/summary.json (AMrTRE, MMrTRE, AArTRE, robustness, "
        "median seconds, per status). A failing pair is recorded with its error and the run goes on.",
    )
    p.add_argument("table", metavar="DATASET.csv", help="ANHIR cover table")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    p.add_argument("--status", default=None, metavar="S[,S...]",
                   help="only pairs with these status values, comma-separated (e.g. training,synthetic)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="at most N pairs")
    _add_overwrite_option(p, "evaluation folder")
    _add_run_options(p)
    p.set_defaults(func=cmd_evaluate)
    _add_scheduler_options(p)  # whole-slide / dask additions (see the end of this module)

    p = sub.add_parser(
        "convert",
        help="convert images to .mha",
        description="Convert images (jpg, png, tif, mha) to .mha files named after the inputs, colour kept as "
        "vector pixels (as the DeepHistReg reference pipeline stores them).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    _add_overwrite_option(p, "conversion folder")
    _add_threads_option(p, "threads (conversion runs on one; accepted for a uniform command line)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo",
        help="register the bundled sample pair",
        description="Register the bundled sample pair and print the median rTRE of its landmarks before and "
        "after registration. With -o, also write the outputs of `histreg register` into OUT.",
    )
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="also write the outputs into this folder")
    _add_overwrite_option(p, "output folder")
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)
    _add_slide_commands(sub)  # whole-slide / dask additions (see the end of this module)
    _add_train_command(sub)  # `histreg train` (see the end of this module)
    return parser


# --------------------------------------------------------------------------- helpers
class _ClosingBars:
    """``with`` support: the bars are closed when the block ends, however it ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageProgress(_ClosingBars):
    """A ProgressEvent callback drawing one tqdm bar per stage on stderr."""

    def __init__(self, disable: bool = False, position: int = 0, leave: bool = True, stages=None, exclude=()):
        self.disable, self.position, self.leave = disable, position, leave
        self.exclude = set(exclude)
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        if event.stage in self.exclude:
            return
        from tqdm import tqdm

        if self.bar is None or event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=max(int(event.total), 1), desc=f"{event.stage:<10}", file=sys.stderr,
                            disable=self.disable, position=self.position, leave=self.leave, dynamic_ncols=True)
        # The pipeline wraps each stage in (0/1 "start", 1/1 "done") events around the stage's own
        # step events: keep the stage's own total, and "done" fills the bar.
        wrapper = event.total == 1 and event.message in ("start", "done")
        if wrapper:
            step = self.bar.total if event.message == "done" else 0
        else:
            if int(event.total) != self.bar.total:
                self.bar.total = max(int(event.total), 1)
            step = int(event.step)
            if event.message:
                self.bar.set_postfix_str(event.message, refresh=False)
        self.bar.n = min(step, self.bar.total)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PairProgress(_ClosingBars):
    """Outer bar for ``stage="pair"`` events, inner per-stage bars for the rest."""

    def __init__(self, disable: bool = False):
        self.stages = StageProgress(disable, position=1, leave=False)
        self.pairs = StageProgress(disable, position=0, leave=True)

    def __call__(self, event) -> None:
        if event.stage == "pair":
            self.stages.close()
            self.pairs(event)
        else:
            self.stages(event)

    def close(self) -> None:
        self.stages.close()
        self.pairs.close()


def _config(args):
    """The run's configuration from the shared options (``--config``, ``--mode``, ``--mask``, ...)."""
    from .config import build_config

    return build_config(config_file=getattr(args, "config", None), mode=getattr(args, "mode", None),
                        mask=getattr(args, "mask", None), nonrigid_method=getattr(args, "method", None),
                        working_size=getattr(args, "working_size", None))


def _device(args):
    from .conventions import default_device

    return default_device(None if args.device == "auto" else args.device)


def _say(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _print_metrics(metrics: dict | None) -> None:
    if metrics is None:
        return
    _say(
        f"median rTRE: before {metrics['initial_MrTRE']:.5f}, after {metrics['MrTRE']:.5f} "
        f"(mean {metrics['mean_rTRE']:.5f}, max {metrics['max_rTRE']:.5f}, robustness {metrics['robustness']:.3f}, "
        f"{metrics['n_landmarks']} landmarks)"
    )


# --------------------------------------------------------------------------- commands
def cmd_register(args) -> int:
    from .io import read_image
    from .pair_outputs import register_pair
    from .scoring import Landmarks

    source_image = read_image(args.source)
    target_image = read_image(args.target)
    source_lm = Landmarks.read(args.source_landmarks) if args.source_landmarks else None
    target_lm = Landmarks.read(args.target_landmarks) if args.target_landmarks else None
    with StageProgress(disable=args.quiet) as progress:
        report = register_pair(
            source_image, target_image, out=args.output, source_landmarks=source_lm, target_landmarks=target_lm,
            inputs=[args.source, args.target, args.source_landmarks, args.target_landmarks],
            config=_config(args), device=_device(args), progress=progress, names=(args.source, args.target),
            overwrite=args.overwrite, threads=args.threads,
        )
    result = report["result"]
    _say(f"registered {args.source} onto {args.target} in {result.timings.get('total', 0):.1f} s on "
         f"{result.info.get('device')} ({result.info.get('threads')} thread(s))")
    if result.confidence:
        from .confidence import describe

        _say(describe(result.confidence))
    _print_metrics(report["metrics"])
    _say(f"outputs in {args.output}: {', '.join(p.name for p in report['outputs'])}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_table, format_table

    with PairProgress(disable=args.quiet) as progress:
        rows, summary = evaluate_table(
            args.table, args.output, statuses=args.status, config=_config(args), device=_device(args),
            progress=progress, limit=args.limit, overwrite=args.overwrite, threads=args.threads,
        )
    _say(format_table(rows, summary))
    _say(f"\nwritten {Path(args.output) / 'pairs.csv'} and {Path(args.output) / 'summary.json'}")
    return _pairs_exit_code(rows)


def _pairs_exit_code(rows) -> int:
    """:data:`EXIT_PAIRS_FAILED` with a message when any pair failed, after the run completed."""
    failed = sum(1 for r in rows if r.get("error"))
    if failed:
        print(f"histreg: error: {failed} of {len(rows)} pairs failed (see the 'error' column)", file=sys.stderr)
        return EXIT_PAIRS_FAILED
    return EXIT_OK


def cmd_convert(args) -> int:
    from .io import HistRegInputError, read_image, write_mha
    from .outputs import check_output_folder, staged_outputs

    out = Path(args.output)
    targets = {}
    for name in args.inputs:
        dest = out / (Path(name).stem + ".mha")
        if dest in targets.values():
            raise HistRegInputError(f"{name}: another input also converts to {dest.name}; convert them into separate folders")
        targets[name] = dest
    check_output_folder(out, inputs=args.inputs, overwrite=args.overwrite)
    images = {name: read_image(name) for name in args.inputs}  # every input is checked before anything is written
    with staged_outputs(out, inputs=args.inputs, overwrite=args.overwrite, command="convert") as stage:
        for name, image in images.items():
            write_mha(stage / targets[name].name, image, vector=image.ndim == 3)
    for name, dest in targets.items():
        image = images[name]
        kind = f"{image.shape[-1]}-component vector" if image.ndim == 3 else "scalar"
        _say(f"{name} -> {dest} ({image.shape[1]}x{image.shape[0]}, {image.dtype}, {kind})")
    return EXIT_OK


def cmd_demo(args) -> int:
    import numpy as np

    from .io import HistRegInputError

    try:
        from .sample import make_sample_pair
    except ImportError as err:
        raise HistRegInputError(f"napari_histreg.sample: the bundled sample pair is not available ({err})") from None
    from .pair_outputs import register_pair
    from .scoring import Landmarks

    pair = make_sample_pair()
    ids = getattr(pair, "ids", None)
    ids = np.asarray(list(ids if ids is not None else range(len(pair.source_landmarks))), dtype=object)
    with StageProgress(disable=args.quiet) as progress:
        report = register_pair(
            pair.source, pair.target, out=args.output,
            source_landmarks=Landmarks("sample source landmarks", ids, pair.source_landmarks),
            target_landmarks=Landmarks("sample target landmarks", ids, pair.target_landmarks),
            config=_config(args), device=_device(args), progress=progress,
            names=("sample source", "sample target"), overwrite=args.overwrite, threads=args.threads, command="demo",
        )
    m = report["metrics"]
    info = report["result"].info
    _say(f"sample pair {pair.source.shape[1]}x{pair.source.shape[0]} -> {pair.target.shape[1]}x{pair.target.shape[0]}, "
         f"registered in {report['result'].timings.get('total', 0):.1f} s on {info.get('device')} "
         f"({info.get('threads')} thread(s))")
    _say(f"median rTRE before: {m['initial_MrTRE']:.5f}")
    _say(f"median rTRE after:  {m['MrTRE']:.5f}")
    if args.output:
        _say(f"outputs in {args.output}: {', '.join(p.name for p in report['outputs'])}")
    return EXIT_OK


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
    from .batch import evaluate_table_distributed
    from .evaluate import format_table

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
    from .progress import RegistrationCancelled
    from .slides import partial_path
    from .tiled import warp_slide

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
    from .slides import open_slide

    with open_slide(out) as slide:
        sizes = ", ".join(f"{w}x{h}" for h, w in (slide.level_shape(k) for k in range(len(slide.levels))))
        _say(f"warped {args.slide} -> {out} ({slide.channels or 1} channel(s), {slide.dtype}; levels w x h: {sizes})")
    if args.tiff:
        _say(f"pyramidal OME-TIFF: {args.tiff}")
    return EXIT_OK


def cmd_register_batch(args) -> int:
    from .batch import register_batch
    from .evaluate import _fmt, _fmt_seconds

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


# --------------------------------------------------------------------------- entry point
def _error_message(err: BaseException) -> str:
    if isinstance(err, OSError) and getattr(err, "filename", None):
        problem = err.strerror or type(err).__name__
        if isinstance(err, FileNotFoundError):
            problem = "file not found"
        text = f"{err.filename}: {problem}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"histreg: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Argument errors exit through argparse (``SystemExit(2)``)."""
    from .io import HistRegInputError
    from .progress import RegistrationCancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # restored when the block ends
        warnings.filterwarnings("always", module=r"napari_histreg(\.|$)")  # ours, every time
        try:
            return int(args.func(args) or 0)
        except (KeyboardInterrupt, RegistrationCancelled):
            print("\nhistreg: interrupted; no partial outputs were left", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (HistRegInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                ValueError) as err:
            if args.debug:
                raise
            print(f"histreg: error: {_error_message(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as err:
            if args.debug:
                raise
            print(f"histreg: error: {_error_message(err)}", file=sys.stderr)
            return EXIT_FAILED


# --------------------------------------------------------------------------- training
TRAIN_KINDS = ("segmentation", "affine", "nonrigid")


def _add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network from images (no landmarks)",
        description="Train one network of the learned pipeline and write its weights file (a small torch file that "
        "rebuilds the network; pass it with --config or copy it over the shipped one). Training reads only images: "
        "every image under DIR (or named by a cover table's 'Source image'/'Target image' columns; landmark columns "
        "are never read), grouped by folder (images in one folder are sections of one tissue block and are paired "
        "across stains), plus scikit-image's immunohistochemistry image split into two stains, and synthetic pairs "
        "(random affine + smooth elastic warps, stain and intensity jitter). Seeded; every few steps a resumable "
        "state WEIGHTS.state is saved, which --resume continues.",
        epilog="example: histreg train nonrigid --data ../shared/data -o nonrigid.pt",
    )
    p.add_argument("kind", choices=TRAIN_KINDS, help="which network")
    p.add_argument("--data", default=None, metavar="DIR_OR_CSV",
                   help="folder of images or ANHIR cover table (default: scikit-image's images only)")
    p.add_argument("-o", "--output", required=True, metavar="WEIGHTS", help="weights file to write (.pt)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="optimiser steps (default: per network)")
    p.add_argument("--lr", type=float, default=None, metavar="X", help="Adam learning rate at the start (default: per network)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from WEIGHTS.state if it exists")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to train: auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--no-skimage", action="store_true", help="do not add scikit-image's images to the data")
    p.add_argument("--renderings", choices=("basic", "wide"), default=None,
                   help="affine and nonrigid: self-pair renderings; wide adds CLAHE, pale and dark stainings "
                        "(and for affine stretched residuals and inner-crop views) (default: the network's)")
    _add_overwrite_option(p, "weights file")
    _add_threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import dataclasses
    import importlib
    import time

    from .io import HistRegInputError

    from .networks.checkpoint import is_checkpoint
    from .outputs import check_output_file
    from .threads import choose_threads

    out = Path(args.output)
    if args.data is not None and not Path(args.data).exists():
        raise HistRegInputError(f"{args.data}: training data not found")
    if args.lr is not None and not args.lr > 0:
        raise HistRegInputError(f"--lr must be positive, not {args.lr}")
    check_output_file(out, inputs=[args.data], overwrite=args.overwrite, is_ours=is_checkpoint, what="weights file")
    import torch

    torch.set_num_threads(choose_threads(args.threads))
    module = importlib.import_module(f".training.{args.kind}", __package__)
    trainer = getattr(module, f"train_{args.kind}")
    options = dataclasses.replace(module.DEFAULT_OPTIONS, seed=args.seed, resume=args.resume, progress=not args.quiet)
    if args.steps is not None:
        options.steps = args.steps
    if args.lr is not None:
        options.learning_rate = args.lr
    if args.data is None and args.no_skimage:
        raise HistRegInputError("no training data: give --data or drop --no-skimage")
    started = time.perf_counter()
    extra = {}
    if args.renderings is not None:
        if args.kind == "segmentation":
            raise HistRegInputError("--renderings applies to the affine and nonrigid networks, not segmentation")
        extra["renderings"] = args.renderings
    report = trainer(args.data, out, options, _device(args), include_skimage=not args.no_skimage, **extra)
    _say(f"trained {args.kind} network: {report.steps} steps in {time.perf_counter() - started:.0f} s, "
         f"final loss {report.final_loss:.4f}; weights in {out}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
