"""``histreg register-stack``: serial sections into the frame of one reference section."""

from __future__ import annotations

from pathlib import Path

from .common import (
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    StageProgress,
    _add_overwrite_option,
    _add_run_options,
    _config,
    _positive_int,
    _say,
)


def _add_stack_command(sub) -> None:
    p = sub.add_parser(
        "register-stack",
        help="register a stack of serial sections into one reference frame",
        description="Register the sections listed in STACK.csv (one per row, in stack order: column 'Image', optional "
        "'Landmarks'; paths relative to the CSV's folder; images or whole slides) into the frame of a reference "
        "section (default: the middle one). Each section is registered to its neighbour towards the reference and "
        "the transforms are composed (--direct: every section straight to the reference). Writes OUT/sections.csv "
        "(flag, confidence and, with landmarks, the rTRE of each section's landmarks mapped into the reference), "
        "OUT/summary.json, OUT/stack/ (the transforms), OUT/landmarks/ and OUT/aligned.ome.tif (a preview stack). "
        "A section flagged 'check' is reported (with --skip-failed it is left out and its neighbours are registered "
        "across the gap); a section that fails is recorded and the run goes on.",
        epilog="example: histreg register-stack sections.csv -o stack_out --skip-failed",
    )
    p.add_argument("table", metavar="STACK.csv", help="the sections in stack order (columns Image, optional Landmarks)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    p.add_argument("--reference", type=int, default=None, metavar="K",
                   help="index (0-based row) of the reference section (default: the middle one)")
    p.add_argument("--direct", action="store_true", help="register every section straight to the reference")
    p.add_argument("--skip-failed", action="store_true",
                   help="leave sections flagged 'check' out of the composition (their neighbours are registered across the gap)")
    p.add_argument("--refine", action="store_true",
                   help="refine each section not next to the reference by a direct non-rigid registration to it "
                   "(against drift along the chain; it did not help on the development stacks, see the README)")
    p.add_argument("--auto-order", action="store_true",
                   help="the rows are not in stack order: estimate the order from the sections' similarity (reported)")
    p.add_argument("--preview-size", type=_positive_int, default=1024, metavar="PX",
                   help="longer side of the aligned preview stack (default: 1024)")
    p.add_argument("--warp", action="store_true",
                   help="also warp every section at full resolution into OUT/aligned.ome.zarr (z = section), tile by tile")
    p.add_argument("--tile", type=_positive_int, default=2048, metavar="N", help="tile size for --warp (default: 2048)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="address of a running dask scheduler")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="register the section pairs on a local dask cluster of N worker processes")
    _add_overwrite_option(p, "stack output folder")
    _add_run_options(p)
    p.set_defaults(func=cmd_register_stack)


def cmd_register_stack(args) -> int:
    from ..evaluate import _fmt, _fmt_seconds
    from ..stack_table import register_stack_table

    with StageProgress(disable=args.quiet) as progress:
        stack, rows, summary = register_stack_table(
            args.table, args.output, _config(args), reference=args.reference, direct=args.direct,
            skip_failed=args.skip_failed, refine=args.refine, order="auto" if args.auto_order else None, device=args.device,
            threads=args.threads, workers=args.workers or 1, scheduler=args.scheduler, preview_size=args.preview_size,
            warp=args.warp, tile=args.tile, overwrite=args.overwrite, progress=progress,
        )
    if "order" in stack.info:
        _say(f"estimated order (rows of {Path(args.table).name}): {stack.info['order']}")
    for row in rows:
        target = "reference" if row["flag"] == "reference" else f"-> {row['registered_to']}"
        score = "" if row.get("MrTRE") is None else f"  MrTRE {_fmt(row['initial_MrTRE'], 4)} -> {_fmt(row['MrTRE'], 4)}"
        confidence = "" if row.get("confidence") is None else f" {float(row['confidence']):.2f}"
        error = f"  ERROR {row['error']}" if row.get("error") else ""
        _say(f"{row['index']:>3}  {Path(row['image']).name:32s} {target:10s} {row['flag']}{confidence}{score}"
             f"  {_fmt_seconds(row.get('seconds'))} s{error}")
    if summary.get("MMrTRE") is not None:
        _say(f"\nstack: {summary['scored']} sections scored, AMrTRE {_fmt(summary['AMrTRE'])}, MMrTRE {_fmt(summary['MMrTRE'])}, "
             f"robustness {_fmt(summary['robustness'], 3)}; {summary['flagged']} flagged; {summary['seconds']:.1f} s")
    else:
        _say(f"\nstack: {len(rows)} sections, {summary['flagged']} flagged; {summary['seconds']:.1f} s")
    _say(f"written {Path(args.output) / 'sections.csv'}, {Path(args.output) / 'summary.json'}, "
         f"{Path(args.output) / 'stack'}/ and {Path(args.output) / 'aligned.ome.tif'}")
    failed = sum(1 for r in rows if r["flag"] == "failed")
    if failed:
        import sys

        print(f"histreg: error: {failed} of {len(rows)} sections failed (see {Path(args.output) / 'sections.csv'})",
              file=sys.stderr)
        return EXIT_PAIRS_FAILED
    return EXIT_OK
