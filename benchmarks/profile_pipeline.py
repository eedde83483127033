"""Where the time of one registration goes: a stage profile with the functions inside each stage.

    python benchmarks/profile_pipeline.py --threads 2 [--status training,robustness] [--mode hybrid]

Registers every pair of the chosen statuses of the cover table once (after one warm-up run),
under :mod:`cProfile`, and prints

* the median seconds of each pipeline stage (``result.timings``), and
* the median seconds spent inside each napari_histreg function that takes at least
  ``--min-share`` of a pair's time (cumulative: a function's callees are included), so the
  costs inside a stage (the rotation search, the short affine of every hypothesis, the
  feature match, the networks, each optimisation) stand apart.

torch operators are C calls: their time is charged to the Python function that issued them,
which is the level at which the pipeline can be changed. ``--markdown FILE`` also writes the
tables (``docs/benchmarks/profile.md`` is this output for the 14 training and robustness pairs).
Timings are only comparable within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (the cover table's pairs, loaded and labelled as the benchmark does)


def function_times(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds per napari_histreg function (``module:function``) in ``profile``."""
    stats = pstats.Stats(profile)
    out: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        if "napari_histreg" not in filename or name.startswith("<"):
            continue
        module = filename.split("napari_histreg/")[-1].removesuffix(".py").replace("/", ".")
        key = f"{module}:{name}"
        out[key] = out.get(key, 0.0) + cumulative
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(compare.DEFAULT_TABLE), metavar="CSV", help="ANHIR cover table")
    parser.add_argument("--status", default="training,robustness", help="comma-separated statuses (default: training,robustness)")
    parser.add_argument("--mode", default="hybrid", help="registration mode (default: hybrid)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--limit", type=int, default=None, help="at most N pairs")
    parser.add_argument("--min-share", type=float, default=0.02, help="list functions above this share of a pair's time")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the tables as markdown")
    parser.add_argument("--title", default="", help="heading of the markdown tables")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from napari_histreg import RegistrationConfig, register
    from napari_histreg.evaluate import read_cover_table

    statuses = {s.strip() for s in args.status.split(",") if s.strip()}
    table = [p for p in read_cover_table(args.data) if p.status in statuses][: args.limit]
    pairs = [compare.load_pair(k, p) for k, p in enumerate(table)]
    config = RegistrationConfig(mode=args.mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register(pairs[0].source, pairs[0].target, config, threads=args.threads)  # warm-up: imports, weights
        stage_rows, function_rows, totals = [], [], []
        for pair in pairs:
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            result = register(pair.source, pair.target, config, threads=args.threads)
            profile.disable()
            totals.append(time.perf_counter() - start)
            stage_rows.append({k: v for k, v in result.timings.items() if k != "total"})
            function_rows.append(function_times(profile))
            print(f"{pair.label:45s} {totals[-1]:6.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in stage_rows[-1].items()),
                  flush=True)
    median_total = statistics.median(totals)
    stages = list(dict.fromkeys(k for row in stage_rows for k in row))
    lines = [f"## {args.title or 'Stage profile'}", "",
             f"`{' '.join(['python', 'benchmarks/profile_pipeline.py'] + (argv if argv is not None else sys.argv[1:]))}`: "
             f"mode {args.mode}, {len(pairs)} pairs ({', '.join(sorted(statuses))}), {args.threads} threads, median of pairs "
             f"(the profiler's own overhead included: a few percent).", "",
             "| stage | median s | share |", "|---|--:|--:|"]
    for stage in stages:
        value = statistics.median(row.get(stage, 0.0) for row in stage_rows)
        lines.append(f"| {stage} | {value:.3f} | {value / median_total:.0%} |")
    lines.append(f"| **total (wall)** | **{median_total:.3f}** | |")
    names = {name for row in function_rows for name in row}
    medians = {name: statistics.median(row.get(name, 0.0) for row in function_rows) for name in names}
    shown = sorted((n for n in names if medians[n] >= args.min_share * median_total), key=lambda n: -medians[n])
    lines += ["", "| function (cumulative, callees included) | median s | share |", "|---|--:|--:|"]
    lines += [f"| `{name}` | {medians[name]:.3f} | {medians[name] / median_total:.0%} |" for name in shown]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
