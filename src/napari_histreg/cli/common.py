"""What every command shares: exit codes, option types and groups, progress bars, the
configuration and device from the options, printing."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PAIRS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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
    group.add_argument("--representation", default=None, choices=("grey", "haematoxylin"),
                       help="what the registration compares: grey (a colour pair flagged 'check' is then registered "
                            "once more on the haematoxylin channel and the clearly more confident result kept), or "
                            "the haematoxylin channel from the start (default: the configuration's default, grey)")
    group.add_argument("--config", default=None, metavar="JSON",
                       help="JSON file of RegistrationConfig overrides, nested by stage, e.g. "
                            '{"use_mask": true, "affine": {"iterations": [50, 30, 20]}}; '
                            "--method and --working-size apply on top of it")
    _add_threads_option(group)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


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
    from ..config import build_config

    return build_config(config_file=getattr(args, "config", None), mode=getattr(args, "mode", None),
                        mask=getattr(args, "mask", None), nonrigid_method=getattr(args, "method", None),
                        working_size=getattr(args, "working_size", None),
                        representation=getattr(args, "representation", None))


def _device(args):
    from ..conventions import default_device

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


def _pairs_exit_code(rows) -> int:
    """:data:`EXIT_PAIRS_FAILED` with a message when any pair failed, after the run completed."""
    failed = sum(1 for r in rows if r.get("error"))
    if failed:
        print(f"histreg: error: {failed} of {len(rows)} pairs failed (see the 'error' column)", file=sys.stderr)
        return EXIT_PAIRS_FAILED
    return EXIT_OK


def pixel_size_arg(text: str) -> tuple[float, float]:
    """``--pixel-size`` and its kin: ``0.25`` (both axes) or ``0.25,0.26`` (row = y, col = x), in
    µm (or any physical unit) per pixel, as ``(row, col)``."""
    try:
        values = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel size: {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"a pixel size is one or two positive numbers (µm per pixel, row,col), not {text!r}")
    return values[0], values[1]


def add_pixel_size_options(parser, option: str, whose: str, size_help: str) -> None:
    """``--OPTION UM[,UM]`` (``size_help``) and ``--OPTION-from SLIDE`` (read from ``whose`` slide's
    metadata), the pair :func:`pixel_size_option` resolves."""
    parser.add_argument(f"--{option}", type=pixel_size_arg, default=None, metavar="UM[,UM]", help=size_help)
    parser.add_argument(f"--{option}-from", default=None, metavar="SLIDE",
                        help=f"read the {whose} pixel size from this slide's metadata (OME-TIFF, TIFF resolution, OME-Zarr)")


def pixel_size_option(given, slide, option: str, default=None):
    """The pixel size a command was given: ``given`` (an option's value), else read from
    ``slide``'s metadata (its ``...-from SLIDE`` option), else ``default``."""
    if given:
        return given
    return slide_pixel_size(slide, option) if slide else default


def slide_pixel_size(path, option: str = "--pixel-size") -> tuple[float, float]:
    """A slide's ``(row, col)`` pixel size from its metadata, or a bad-input error saying which
    option gives it instead."""
    from ..io import HistRegInputError
    from ..slides.pixel_size import read_pixel_size

    found = read_pixel_size(path)
    if found is None:
        raise HistRegInputError(f"{path}: no pixel size in its metadata (OME PhysicalSizeX/Y, Aperio MPP, TIFF resolution, "
                                f"OME-Zarr scale); give it with {option}")
    return found
