"""The ``histreg`` command line: register a pair, evaluate a cover table, convert images, demo.

Exit codes (also in the README):

* 0: success;
* 2: bad input (a missing or unreadable file, a constant image, an output that would replace
  an input or data that is not an earlier histreg output, an unavailable device, a slide that
  is not the one a transform was made for, ...): one line ``histreg: error: <file>: <problem>``
  on stderr, no traceback, nothing written;
* 3: ``evaluate`` / ``register-batch`` / ``register-stack`` ran every pair (section) but some failed (the count is printed;
  each failure is in ``pairs.csv`` / ``batch.csv``);
* 130: interrupted (no partial outputs are left, except a resumable ``OUT.partial`` of ``warp``);
* 1: anything else (a bug: ``--debug`` shows the traceback).

Where outputs may go is one rule for every command: :mod:`napari_histreg.outputs`.
"""

from __future__ import annotations

import argparse
import sys
import warnings

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
  register-stack
             register a stack of serial sections (a CSV, in stack order) into the frame of
             one reference section, composing neighbour registrations
  train      train one of the networks (segmentation, affine, nonrigid) from images,
             without landmarks
  transform-annotations
             map GeoJSON annotations (QuPath) through a transform, either direction
  export-transform
             write a saved transform as an ITK transform file (SimpleITK applies it) and
             its affine part as a 3x3 matrix CSV (napari layer affine, affinder)

Run `histreg COMMAND --help` for the options of a command.
"""


from .common import (  # noqa: F401 (the exit codes)
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    _add_overwrite_option,
    _add_run_options,
    _add_threads_option,
    _positive_int,
)
from .pairs import cmd_convert, cmd_demo, cmd_evaluate, cmd_register
from .whole_slides import _add_scheduler_options, _add_slide_commands
from .train import _add_train_command
from .stack import _add_stack_command
from .annotations import _add_annotations_command
from .export import _add_export_command


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    p.add_argument("--guide-source", metavar="CSV", help="a few points of SOURCE (ANHIR CSV, ,X,Y) that the result must "
                   "bring onto their partners in --guide-target (paired by id): a human-guided correction")
    p.add_argument("--guide-target", metavar="CSV", help="the partners of --guide-source in TARGET (ANHIR CSV)")
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
    _add_stack_command(sub)  # `histreg register-stack` (cli/stack.py)
    _add_annotations_command(sub)  # `histreg transform-annotations` (cli/annotations.py)
    _add_export_command(sub)  # `histreg export-transform` (cli/export.py)
    return parser


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
    from ..io import HistRegInputError
    from ..progress import RegistrationCancelled

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

