"""Benchmark every pipeline mode of napari-histreg against elastix on an ANHIR cover table.

The documented command (from the repository root)::

    python benchmarks/compare.py --threads 2 --publish

runs, on the same pairs in the same run, every entry of :data:`METHODS` (this project's modes
and the elastix peers of ``benchmarks/elastix_peer.py``), scores them with the ANHIR metrics
and writes into ``--out`` (default ``bench-out/``, git-ignored):

* ``results.csv``   one row per pair per method: MrTRE, mean and max rTRE, robustness, seconds
* ``landmarks.csv`` the rTRE of every landmark (before and after), per pair per method
* ``stages.csv``    seconds per stage per pair per method (``result.timings``)
* ``summary.json``  the summaries, the machine and the settings
* ``benchmark.md``  per status: AMrTRE, MMrTRE, robustness, median seconds per pair and the
  ratio of each to elastix; the stage profile; the environment
* ``rtre.png``      rTRE of every landmark, per pair per method (log scale)
* ``stages.png``    time per stage per pair (stacked bars): the slowest stage stands out
* ``overlay.png``   one pair before and after registration (ours and elastix)

``--publish`` then copies ``benchmark.md`` and the PNGs to ``docs/benchmarks/`` (all or
nothing). Where ``torch.cuda.is_available()``, this project's modes also run on ``cuda``
(rows ``NAME@cuda``); a GPU is never required. elastix is optional
(``pip install -e .[bench]``): without it the peer rows are left out, with a warning.

Adding a method is adding one entry to :data:`METHODS` (the learned and hybrid modes are
``config={"mode": ...}`` entries).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # the peer module sits beside this script
    sys.path.insert(0, str(HERE))

import elastix_peer  # noqa: E402

DEFAULT_TABLE = REPO.parent / "shared" / "data" / "dataset.csv"
DEFAULT_OUT = REPO / "bench-out"
DEFAULT_PUBLISH = REPO / "docs" / "benchmarks"
DEFAULT_STATUSES = ("training", "synthetic")
REFERENCE = "elastix"  # the ratios are to this method
PUBLISHED = ("benchmark.md", "rtre.png", "stages.png", "overlay.png")


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    ``kind``: ``"histreg"`` (this project: ``config`` holds
    :class:`~napari_histreg.RegistrationConfig` overrides, nested by stage as in
    ``histreg --config``, and ``register_kwargs`` extra keyword arguments of
    :func:`napari_histreg.register`) or ``"elastix"`` (``config`` holds
    :class:`elastix_peer.ElastixConfig` overrides).
    """

    name: str
    kind: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    register_kwargs: dict = dataclasses.field(default_factory=dict)


#: Every method the benchmark runs, in table order. This project's modes first.
METHODS: list[Method] = [
    Method("histreg-hybrid", "histreg", "default: networks, then the affine and dense instance optimisation from "
           "their result (each network proposal kept only if it does not lower NCC)", config={"mode": "hybrid"}),
    Method("histreg-dense", "histreg", "optimise mode: initial rotation search + affine + dense instance optimisation "
           "(LNCC + diffusion)", config={"mode": "optimise", "nonrigid_method": "dense"}),
    Method("histreg-patches", "histreg", "optimise mode: initial rotation search + affine + patch-group non-rigid engine",
           config={"mode": "optimise", "nonrigid_method": "patches"}),
    Method("histreg-affine", "histreg", "optimise mode: initial rotation search + affine only (no non-rigid stage)",
           config={"mode": "optimise", "nonrigid_method": "none"}),
    Method("histreg-learned", "histreg", "initial rotation search + affine network + patch-group non-rigid network",
           config={"mode": "learned"}),
    Method("histreg-learned-affine", "histreg", "initial rotation search + affine network only (no non-rigid stage)",
           config={"mode": "learned", "nonrigid_method": "none"}),
    Method(REFERENCE, "elastix", "elastix default parameter maps: affine, then B-spline (no initial transform)"),
    Method("elastix-cog", "elastix", "elastix default maps, affine started from the centres of gravity "
           "(AutomaticTransformInitialization CenterOfGravity; the one setting added)",
           config={"initialisation": "CenterOfGravity"}),
]

STAGE_ORDER = ("preprocess", "mask", "initial", "affine", "nonrigid", "registration", "field", "landmarks", "other")

#: ``results.csv``: the pair and method, then napari_histreg.scoring's columns (one vocabulary).
ROW_COLUMNS = (
    "status", "pair", "source", "target", "method", "device", "initial_MrTRE", "MrTRE", "mean_rTRE", "max_rTRE",
    "robustness", "n_landmarks", "seconds", "wrong_direction_MrTRE", "confidence", "flag", "weakest", "initial_choice",
    "compared", "error",
)


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(threads: int, devices: list[str], command: str) -> dict:
    import torch

    import napari_histreg

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "napari_histreg": napari_histreg.__version__,
        "git_commit": git_commit(),
        "itk_elastix": elastix_peer.version() if elastix_peer.available() else None,
        "devices": devices,
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
    }
    return env


# --------------------------------------------------------------------------- pairs
def pair_label(pair) -> str:
    """Short name: ``rat-kidney: PanCytokeratin->HE``."""
    source, target = Path(pair.source), Path(pair.target)
    a, b = source.stem, target.stem
    common = os.path.commonprefix([a, b])
    cut = max(common.rfind("_"), common.rfind("-")) + 1 if common else 0
    folder = source.parent.name if source.is_absolute() else (source.parts[0] if len(source.parts) > 1 else "")
    return f"{folder + ': ' if folder else ''}{a[cut:]}->{b[cut:]}"


@dataclasses.dataclass
class LoadedPair:
    index: int
    label: str
    status: str
    source_name: str
    target_name: str
    source: np.ndarray
    target: np.ndarray
    landmarks: object  # napari_histreg.scoring.LandmarkPair: the pair's landmarks, paired by id


VALIDATION = "validation"  # the pseudo-status of benchmarks/validation.py's landmark-free pairs


def validation_pairs(table: Path, variants: str, warps: int, size: int, seed: int) -> list[LoadedPair]:
    """The landmark-free validation set of ``benchmarks/validation.py`` (every image of the
    cover table, each variant, known warps) as :class:`LoadedPair` records whose "landmarks" are
    the known grid points, so the same scoring serves both benchmarks."""
    import validation  # beside this script
    from napari_histreg.scoring import LandmarkPair

    chosen = validation.VARIANTS if variants == "all" else tuple(v.strip() for v in variants.split(",") if v.strip())
    unknown = [v for v in chosen if v not in validation.VARIANTS]
    if unknown:
        raise ValueError(f"--validation-variants: unknown {unknown}; choose from {list(validation.VARIANTS)}")
    made = validation.make_variant_pairs(validation.table_images(table, size), chosen, warps, seed)
    return [LoadedPair(k, p["name"], VALIDATION, p["name"], p["name"], p["source"], p["target"],
                       LandmarkPair.from_points(p["source_rc"], p["target_rc"], p["target"].shape))
            for k, p in enumerate(made)]


def load_pair(index: int, pair) -> LoadedPair:
    """A cover-table pair read and its landmarks paired by id (:class:`napari_histreg.scoring.LandmarkPair`)."""
    from napari_histreg.io import HistRegInputError, read_image
    from napari_histreg.scoring import LandmarkPair

    for label, value in (("Source image", pair.source), ("Target image", pair.target),
                         ("Source landmarks", pair.source_landmarks), ("Target landmarks", pair.target_landmarks)):
        if not value:
            raise HistRegInputError(f"cover table line {pair.row}: no {label!r} given")
    source, target = read_image(pair.path(pair.source)), read_image(pair.path(pair.target))
    landmarks = LandmarkPair.read(pair.path(pair.source_landmarks), pair.path(pair.target_landmarks), target.shape, source.shape)
    return LoadedPair(index, pair_label(pair), pair.status, pair.source, pair.target, source, target, landmarks)


# --------------------------------------------------------------------------- runners
@dataclasses.dataclass
class Runner:
    """A method bound to its configuration and device: ``run(source, target) -> result``."""

    method: Method
    device: str
    histreg_config: object = None
    elastix_config: object = None

    @property
    def label(self) -> str:
        return self.method.name if self.device == "cpu" else f"{self.method.name}@{self.device}"

    def run(self, source: np.ndarray, target: np.ndarray):
        if self.method.kind == "elastix":
            return elastix_peer.register(source, target, self.elastix_config)
        from napari_histreg import register

        return register(source, target, copy.deepcopy(self.histreg_config), device=self.device,
                        **self.method.register_kwargs)


def build_runners(methods: list[Method], devices: list[str], base_config, args) -> list[Runner]:
    from napari_histreg.config import apply_overrides

    runners = []
    for method in methods:
        if method.kind == "histreg":
            config = copy.deepcopy(base_config)
            apply_overrides(config, copy.deepcopy(method.config), method.name)
            for device in devices:
                runners.append(Runner(method, device, histreg_config=config))
        elif method.kind == "elastix":
            config = elastix_peer.ElastixConfig(
                preprocess=copy.deepcopy(base_config.preprocess),
                working_size=None if args.elastix_size == "full" else "same",
                max_iterations=args.elastix_iterations, threads=args.threads, seed=args.seed,
            )
            for key, value in method.config.items():
                setattr(config, key, value)
            runners.append(Runner(method, "cpu", elastix_config=config))
        else:
            raise ValueError(f"{method.name}: unknown kind {method.kind!r}")
    return runners


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def warm_up(runners: list[Runner], pair: LoadedPair) -> None:
    """Run each method once on a small copy of ``pair`` so that lazy imports (itk loads for
    seconds), kernel selection and CUDA start-up are not charged to the first timed pair."""
    from skimage.transform import rescale

    factor = min(1.0, 160 / max(*pair.source.shape[:2], *pair.target.shape[:2]))
    small = [rescale(img, factor, channel_axis=-1 if img.ndim == 3 else None, anti_aliasing=True, preserve_range=True)
             .astype(img.dtype) for img in (pair.source, pair.target)]
    for runner in runners:
        quick = copy.deepcopy(runner)
        if quick.histreg_config is not None:
            quick.histreg_config.preprocess.working_size = 128
        if quick.elastix_config is not None:
            quick.elastix_config.max_iterations = 4
            quick.elastix_config.working_size = 128
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quick.run(*small)
            _sync(quick.device)
        except Exception:  # a warm-up failure is not a result; the timed run will report it
            pass


def run_one(runner: Runner, pair: LoadedPair) -> tuple[dict, dict, np.ndarray | None, object]:
    """Register and score one pair; returns (row, stage seconds, rTRE per landmark, result)."""
    from napari_histreg.metrics import rtre
    from napari_histreg.scoring import result_columns, score_mapped

    row = {c: None for c in ROW_COLUMNS}
    row.update(status=pair.status, pair=pair.label, source=pair.source_name, target=pair.target_name,
               method=runner.label, device=runner.device, error="")
    stages: dict[str, float] = {}
    errors = None
    result = None
    start = time.perf_counter()
    try:
        result = runner.run(pair.source, pair.target)
        mark = time.perf_counter()
        landmarks = pair.landmarks
        mapped = result.map_source_points(landmarks.source_rc)
        _sync(runner.device)
        end = time.perf_counter()
        row.update(score_mapped(mapped, landmarks), **result_columns(result), seconds=end - start)
        errors = rtre(mapped, landmarks.target_rc, landmarks.target_shape)
        stages = {k: float(v) for k, v in result.timings.items() if k != "total"}
        stages["landmarks"] = end - mark
        stages["other"] = max(0.0, (end - start) - sum(stages.values()))
        if runner.method.kind == "elastix":  # the direction check, for free: T applied the wrong way
            wrong = elastix_peer.wrong_direction_points(result, landmarks.source_rc)
            row["wrong_direction_MrTRE"] = float(np.median(rtre(wrong, landmarks.target_rc, landmarks.target_shape)))
    except Exception as err:  # recorded; the run goes on
        text = " ".join(str(err).split()) or type(err).__name__
        row["error"] = f"{type(err).__name__}: {text}"[:300]
        row["seconds"] = time.perf_counter() - start
    return row, stages, errors, result


# --------------------------------------------------------------------------- summaries
def summarise(rows: list[dict]) -> dict:
    from napari_histreg.evaluate import summarise_rows

    return summarise_rows(rows)


def summaries(rows: list[dict], labels: list[str], statuses: list[str]) -> dict:
    out = {}
    for status in statuses:
        chosen = [r for r in rows if r["status"] == status]
        if not chosen:
            continue
        per = {label: summarise([r for r in chosen if r["method"] == label]) for label in labels}
        reference = per.get(REFERENCE)
        for label, s in per.items():
            s["ratio_to_" + REFERENCE] = {
                key: (s[key] / reference[key]) if (reference and s.get(key) is not None and reference.get(key)) else None
                for key in ("AMrTRE", "MMrTRE", "robustness", "median_seconds")
            }
        initial = [r for r in chosen if r["initial_MrTRE"] is not None]
        first = {}
        for r in initial:
            first.setdefault(r["pair"], r["initial_MrTRE"])
        values = list(first.values())
        out[status] = {
            "pairs": len({r["pair"] for r in chosen}),
            "initial": {"AMrTRE": float(np.mean(values)) if values else None,
                        "MMrTRE": float(np.median(values)) if values else None},
            "methods": per,
        }
    return out


def stage_profile(stage_rows: list[dict], labels: list[str]) -> dict:
    """Median seconds per stage per method (over the pairs where the method ran)."""
    profile = {}
    for label in labels:
        mine = [s for s in stage_rows if s["method"] == label]
        if not mine:
            continue
        pairs = sorted({s["pair"] for s in mine})
        per_stage = {}
        for stage in STAGE_ORDER:
            values = [sum(s["seconds"] for s in mine if s["pair"] == p and s["stage"] == stage) for p in pairs]
            if any(s["stage"] == stage for s in mine):
                per_stage[stage] = float(statistics.median(values))
        totals = [sum(s["seconds"] for s in mine if s["pair"] == p) for p in pairs]
        profile[label] = {"stages": per_stage, "total": float(statistics.median(totals)),
                          "slowest": max(per_stage, key=per_stage.get) if per_stage else None}
    return profile


# --------------------------------------------------------------------------- writers
def _fmt(value, digits: int = 4) -> str:
    from napari_histreg.evaluate import _fmt as fmt

    return fmt(value, digits)


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    from napari_histreg.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                                 for c in columns])


def markdown(summary: dict, profile: dict, env: dict, methods: list[Method], runners: list[Runner], rows: list[dict],
             notes: list[str]) -> str:
    lines = ["# napari-histreg against elastix", ""]
    lines.append(f"Produced by `{env['command']}` on {env['date']}.")
    lines.append("")
    lines.append(
        f"Machine: {env['cpu']} ({env['cpu_count']} logical cores), threads for torch and ITK: {env['torch_threads']}, "
        f"torch {env['torch']}, itk-elastix {env['itk_elastix'] or 'not installed'}, napari-histreg {env['napari_histreg']} "
        f"(git {env['git_commit']}), devices: {', '.join(env['devices'])}" + (f" ({env['gpu']})" if env.get("gpu") else "") + "."
    )
    lines.append("")
    lines.extend(notes)
    ratio = f"÷ {REFERENCE}"
    for status, block in summary.items():
        lines += ["", f"## `{status}` pairs ({block['pairs']})", ""]
        lines.append(f"| method | device | pairs | failed | AMrTRE | MMrTRE | robustness | median s/pair | "
                     f"AMrTRE {ratio} | MMrTRE {ratio} | robustness {ratio} | s/pair {ratio} |")
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        init = block["initial"]
        lines.append(f"| no registration | | {block['pairs']} | | {_fmt(init['AMrTRE'])} | {_fmt(init['MMrTRE'])} | | | | | | |")
        for runner in runners:
            s = block["methods"].get(runner.label)
            if s is None:
                continue
            r = s.get("ratio_to_" + REFERENCE, {})
            name = f"**{runner.label}**" if runner.method.kind == "histreg" else runner.label
            lines.append(
                f"| {name} | {runner.device} | {s['count']} | {s['failed']} | {_fmt(s.get('AMrTRE'))} | {_fmt(s.get('MMrTRE'))} | "
                f"{_fmt(s.get('robustness'), 3)} | {_fmt(s.get('median_seconds'), 3)} | {_fmt(r.get('AMrTRE'), 3)} | "
                f"{_fmt(r.get('MMrTRE'), 3)} | {_fmt(r.get('robustness'), 3)} | {_fmt(r.get('median_seconds'), 3)} |"
            )
    lines += ["", "AMrTRE / MMrTRE: mean / median over pairs of the median relative target registration error "
              "(lower is better); robustness: share of landmarks closer than before registration (higher is better); "
              f"ratios below 1 mean lower than {REFERENCE} (better for errors and time, worse for robustness)."]
    stages = [s for s in STAGE_ORDER if any(s in p["stages"] for p in profile.values())]
    if profile:
        lines += ["", "## Stage profile (median seconds per pair)", ""]
        lines.append("| method | " + " | ".join(stages) + " | total | slowest |")
        lines.append("|---|" + "--:|" * (len(stages) + 1) + "---|")
        for label, p in profile.items():
            cells = []
            for stage in stages:
                value = p["stages"].get(stage)
                text = _fmt(value, 3) if value is not None else ""
                cells.append(f"**{text}**" if stage == p["slowest"] else text)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(p['total'], 3)} | {p['slowest'] or ''} |")
        lines += ["", "`registration` and `field` are elastix's (affine + B-spline, then transformix's deformation "
                  "field); `landmarks` maps the source landmarks into the target frame; `other` is the rest "
                  "(input checks, copies)."]
    direction = [r for r in rows if r.get("wrong_direction_MrTRE") is not None and r["status"] == "synthetic"]
    if direction:
        lines += ["", "## elastix landmark direction (synthetic pairs)", "",
                  "elastix's transform maps fixed (target) points to moving (source) points; source landmarks are "
                  "mapped by inverting it. The wrong direction (the transform applied to the source landmarks) "
                  "gives:", "",
                  "| method | pair | initial MrTRE | MrTRE (inverse, used) | MrTRE (wrong direction) |", "|---|---|--:|--:|--:|"]
        for r in direction:
            lines.append(f"| {r['method']} | {r['pair']} | {_fmt(r['initial_MrTRE'])} | {_fmt(r['MrTRE'])} | "
                         f"{_fmt(r['wrong_direction_MrTRE'])} |")
    lines += ["", "## Methods", ""]
    for method in methods:
        lines.append(f"- `{method.name}`: {method.description}")
    lines += ["", "## Plots", "", "![rTRE per landmark, per pair and method](rtre.png)", "",
              "![time per stage per pair](stages.png)", "", "![one pair before and after](overlay.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    from napari_histreg.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_rtre(path: Path, landmark_rows: list[dict], labels: list[str], statuses: list[str]) -> None:
    """Box (and points) of the landmark rTREs per pair per method, log scale, one panel per status."""
    import matplotlib
    from matplotlib.patches import Patch

    shown = [s for s in statuses if any(r["status"] == s for r in landmark_rows)]
    series = ["no registration"] + labels
    colours = {name: matplotlib.colormaps["tab10"](k % 10) for k, name in enumerate(series)}
    colours["no registration"] = (0.6, 0.6, 0.6, 1.0)
    fig = _figure(max(8.0, 1.6 * max(1, max((len({r['pair'] for r in landmark_rows if r['status'] == s}) for s in shown), default=1)) * len(series) / 3), 4.2 * max(1, len(shown)))
    axes = fig.subplots(max(1, len(shown)), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)
    for ax, status in zip(axes, shown):
        pairs = list(dict.fromkeys(r["pair"] for r in landmark_rows if r["status"] == status))
        width = 0.8 / len(series)
        for i, pair in enumerate(pairs):
            for j, name in enumerate(series):
                if name == "no registration":
                    first = next((r["method"] for r in landmark_rows if r["pair"] == pair), None)
                    values = [r["initial_rTRE"] for r in landmark_rows if r["pair"] == pair and r["method"] == first]
                else:
                    values = [r["rTRE"] for r in landmark_rows if r["pair"] == pair and r["method"] == name]
                if not values:
                    continue
                values = np.maximum(np.asarray(values, dtype=float), 1e-5)
                x = i + (j - (len(series) - 1) / 2) * width
                box = ax.boxplot([values], positions=[x], widths=width * 0.85, patch_artist=True, showfliers=False,
                                 manage_ticks=False)
                for patch in box["boxes"]:
                    patch.set_facecolor(colours[name])
                    patch.set_alpha(0.55)
                for median in box["medians"]:
                    median.set_color("black")
                ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=4, color=colours[name],
                           alpha=0.8, linewidths=0, zorder=3)
        ax.set_yscale("log")
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(pairs, fontsize=8, rotation=12)
        ax.set_ylabel("rTRE per landmark")
        ax.set_title(f"{status} pairs", fontsize=11)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles = [Patch(color=colours[n], alpha=0.7, label=n) for n in series]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(series), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save(fig, path)


def plot_stages(path: Path, stage_rows: list[dict], labels: list[str]) -> None:
    """Stacked bars: seconds per stage per pair, one panel per method."""
    import matplotlib
    from matplotlib.patches import Patch

    shown = [label for label in labels if any(s["method"] == label for s in stage_rows)]
    present = [s for s in STAGE_ORDER if any(r["stage"] == s for r in stage_rows)]
    colours = {s: matplotlib.colormaps["tab10"](k % 10) for k, s in enumerate(STAGE_ORDER)}
    pairs = list(dict.fromkeys(s["pair"] for s in stage_rows))
    fig = _figure(max(8.0, 1.3 * len(pairs) + 2), 2.4 * max(1, len(shown)) + 0.8)
    axes = fig.subplots(max(1, len(shown)), 1, squeeze=False)[:, 0]
    for ax, label in zip(axes, shown):
        bottom = np.zeros(len(pairs))
        for stage in present:
            values = np.array([sum(s["seconds"] for s in stage_rows if s["method"] == label and s["pair"] == p and s["stage"] == stage)
                               for p in pairs])
            if not values.any():
                continue
            ax.bar(range(len(pairs)), values, bottom=bottom, color=colours[stage], label=stage, width=0.7)
            bottom += values
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel("seconds")
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(pairs if ax is axes[-1] else [""] * len(pairs), fontsize=8, rotation=12)
        ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color=colours[s], label=s) for s in present]
    fig.legend(handles=handles, loc="upper center", ncol=len(present), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    _save(fig, path)


def plot_overlay(path: Path, pair: LoadedPair, results: dict) -> None:
    """Target (magenta) against the source before and against each method's warped source (green)."""
    from napari_histreg.overlay import _display_shape, overlay_rgb

    shape = _display_shape(pair.target.shape, 640)
    panels = [("before registration", overlay_rgb(pair.target, pair.source, shape))]
    for label, result in results.items():
        try:
            white = float(np.iinfo(pair.source.dtype).max) if np.issubdtype(pair.source.dtype, np.integer) else 1.0
            warped = result.warp(pair.source, cval=white)  # outside the source: white glass, like the slide
            panels.append((f"after: {label}", overlay_rgb(pair.target, warped, shape)))
        except Exception as err:  # pragma: no cover - a broken transform shows as a missing panel
            warnings.warn(f"overlay of {label}: {err}", stacklevel=2)
    aspect = shape[0] / shape[1]
    fig = _figure(4.2 * len(panels), 4.2 * aspect + 0.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"{pair.label} ({pair.status}); magenta: target, green: source", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    names = [m.name for m in METHODS]
    parser = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description="Benchmark every napari-histreg mode against elastix on an ANHIR cover table; writes CSVs, "
                    "a Markdown table and PNG plots.",
    )
    parser.add_argument("--data", default=str(DEFAULT_TABLE), metavar="CSV",
                        help=f"ANHIR cover table (default: {DEFAULT_TABLE})")
    parser.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help="output folder (default: bench-out/)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy benchmark.md and the PNGs to docs/benchmarks/ (all or nothing)")
    parser.add_argument("--publish-dir", default=str(DEFAULT_PUBLISH), metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--status", default=",".join(DEFAULT_STATUSES),
                        help="statuses to run, comma-separated (default: training,synthetic); 'validation' adds "
                             "the landmark-free pairs of benchmarks/validation.py")
    parser.add_argument("--include-large", action="store_true", help="also run the 'large' pairs")
    parser.add_argument("--validation-variants", default="all", metavar="LIST",
                        help="with --status validation: the variants of benchmarks/validation.py (default: all)")
    parser.add_argument("--validation-warps", type=int, default=1, metavar="N",
                        help="with --status validation: known warps per image and variant (default: 1)")
    parser.add_argument("--validation-size", type=int, default=1024, metavar="PX",
                        help="with --status validation: longer side of every image (default: 1024)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N pairs (after the status filter)")
    parser.add_argument("--methods", default=None, metavar="LIST",
                        help=f"comma-separated subset of {', '.join(names)} (default: all)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch and ITK (elastix) threads (default: torch's default)")
    parser.add_argument("--devices", default="auto",
                        help="devices for this project's modes: auto (cpu, plus cuda when available) or a list, e.g. cpu")
    parser.add_argument("--working-size", type=int, default=None, metavar="N",
                        help="working grid longer side for every method (default: the configuration's)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="RegistrationConfig overrides (as for `histreg --config`), applied to every mode")
    parser.add_argument("--elastix-size", choices=("same", "full"), default="same",
                        help="elastix on the same working grid as ours (default) or on the full-resolution images")
    parser.add_argument("--elastix-iterations", type=int, default=None, metavar="N",
                        help="override elastix's MaximumNumberOfIterations (fast tests only; default: its maps' 256)")
    parser.add_argument("--overlay-pair", type=int, default=None, metavar="K",
                        help="index (0-based, among the run pairs) of the pair shown in overlay.png (default: first training pair)")
    parser.add_argument("--no-warmup", action="store_true", help="do not run each method once before timing")
    parser.add_argument("--seed", type=int, default=0, help="elastix RandomSeed and the validation pairs' warps (default: 0)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/compare.py", *argv])
    return args


def select_methods(args) -> tuple[list[Method], list[str]]:
    from napari_histreg.io import HistRegInputError

    notes = []
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in {x.name for x in METHODS}]
        if unknown:
            raise HistRegInputError(f"--methods: unknown method(s) {unknown}; known: {[m.name for m in METHODS]}")
        methods = [m for m in METHODS if m.name in wanted]
        explicit = True
    else:
        methods, explicit = list(METHODS), False
    if any(m.kind == "elastix" for m in methods) and not elastix_peer.available():
        if explicit:
            raise HistRegInputError("elastix needs itk-elastix: pip install -e .[bench] (or pip install itk-elastix)")
        warnings.warn("itk-elastix is not installed (pip install -e .[bench]): the elastix rows are left out", stacklevel=2)
        methods = [m for m in methods if m.kind != "elastix"]
        notes.append("elastix was not installed for this run: no peer rows, no ratios.")
    return methods, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:
        from napari_histreg.io import HistRegInputError

        if isinstance(err, (HistRegInputError, FileNotFoundError, ValueError)):
            print(f"compare.py: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        raise


def _main(args) -> int:
    import torch

    from napari_histreg import RegistrationConfig
    from napari_histreg.config import apply_overrides
    from napari_histreg.evaluate import read_cover_table, select_pairs
    from napari_histreg.outputs import staged_outputs
    from napari_histreg.io import HistRegInputError, atomic_write_json, atomic_write_text
    from napari_histreg.metrics import rtre

    if args.threads is not None:
        if args.threads < 1:
            raise HistRegInputError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if "cuda" in devices and not torch.cuda.is_available():
            raise HistRegInputError("--devices: cuda requested but torch.cuda.is_available() is False")
    statuses = [s.strip() for s in args.status.split(",") if s.strip()]
    if args.include_large and "large" not in statuses:
        statuses.append("large")

    base = RegistrationConfig()
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise HistRegInputError(f"{path}: configuration file not found")
        apply_overrides(base, json.loads(path.read_text()), str(path))
    if args.working_size:
        base.preprocess.working_size = args.working_size

    methods, notes = select_methods(args)
    runners = build_runners(methods, devices, base, args)
    labels = [r.label for r in runners]
    table = Path(args.data)
    cover_statuses = [s for s in statuses if s != VALIDATION]
    pairs = select_pairs(read_cover_table(table), cover_statuses, None, name=str(table)) if cover_statuses else []
    if VALIDATION in statuses:
        pairs += validation_pairs(table, args.validation_variants, args.validation_warps, args.validation_size, args.seed)
    if args.limit is not None and args.limit < 0:
        raise HistRegInputError(f"--limit must be at least 0, not {args.limit}")
    pairs = pairs[:args.limit] if args.limit is not None else pairs
    if not pairs:
        raise HistRegInputError(f"{table}: no pairs with status {statuses}")
    env = environment(threads, devices, args.command)
    print(f"{len(pairs)} pairs x {len(runners)} methods ({', '.join(labels)}); {threads} threads; {env['cpu']}", flush=True)

    overlay_index = args.overlay_pair
    if overlay_index is None:
        overlay_index = next((k for k, p in enumerate(pairs) if p.status == "training"), 0)

    first_ours = next((r.label for r in runners if r.method.kind == "histreg"), None)
    rows, stage_rows, landmark_rows, overlay_results, overlay_pair = [], [], [], {}, None
    for k in range(len(pairs)):
        cover, pairs[k] = pairs[k], None  # validation pairs are held in memory: let each go once run
        pair = cover if isinstance(cover, LoadedPair) else load_pair(k, cover)
        if k == 0 and not args.no_warmup:
            warm_up(runners, pair)
        before = None  # rTRE of every landmark before registration: the same for every method
        for runner in runners:
            row, stages, errors, result = run_one(runner, pair)
            rows.append(row)
            for stage, seconds in stages.items():
                stage_rows.append({"status": pair.status, "pair": pair.label, "method": runner.label,
                                   "device": runner.device, "stage": stage, "seconds": seconds})
            if errors is not None:
                if before is None:
                    before = rtre(pair.landmarks.source_rc, pair.landmarks.target_rc, pair.landmarks.target_shape)
                for lid, value, initial in zip(pair.landmarks.ids, errors, before):
                    landmark_rows.append({"status": pair.status, "pair": pair.label, "method": runner.label,
                                          "device": runner.device, "landmark": lid, "rTRE": float(value),
                                          "initial_rTRE": float(initial)})
            if k == overlay_index and result is not None and runner.device == "cpu":
                if runner.label in (first_ours, REFERENCE):
                    overlay_results[runner.label] = result
                    overlay_pair = pair
            status = f"MrTRE {row['MrTRE']:.5f} (from {row['initial_MrTRE']:.5f})" if not row["error"] else f"FAILED: {row['error']}"
            print(f"[{k + 1}/{len(pairs)}] {pair.label} ({pair.status}) {runner.label}: {status}, {row['seconds']:.1f} s", flush=True)
        del pair

    summary = summaries(rows, labels, statuses)
    profile = stage_profile(stage_rows, labels)
    notes = notes + [
        f"Every method registers the source onto the target of each pair from the same images, in the same run. "
        f"elastix gets the same preprocessed grey images as napari-histreg (luminance, inverted so tissue is bright, "
        f"anti-aliased to the same working grid of longer side {base.preprocess.working_size} px"
        + (", entropy histogram matching" if base.preprocess.equalise else "")
        + ("" if args.elastix_size == "same" else "; here at full resolution instead")
        + "), and its source landmarks go through the same inverse mapping as ours. Seconds per pair: "
        "preprocessing, registration and landmark mapping (image reading excluded), after one warm-up run of every method.",
    ]
    md = markdown(summary, profile, env, methods, runners, rows, notes)
    report = {"environment": env, "settings": dict(vars(args)), "statuses": statuses,
              "methods": [dataclasses.asdict(m) for m in methods], "summary": summary, "stage_profile": profile}

    out = Path(args.out)
    # a benchmark folder of an earlier run is replaced; anything else is refused (napari_histreg.outputs)
    with staged_outputs(out, overwrite=True, command="benchmarks/compare.py") as stage:
        write_csv(stage / "results.csv", ROW_COLUMNS, rows)
        write_csv(stage / "landmarks.csv", ("status", "pair", "method", "device", "landmark", "initial_rTRE", "rTRE"), landmark_rows)
        write_csv(stage / "stages.csv", ("status", "pair", "method", "device", "stage", "seconds"), stage_rows)
        atomic_write_json(stage / "summary.json", json.loads(json.dumps(report, default=str)))
        atomic_write_text(stage / "benchmark.md", md)
        plot_rtre(stage / "rtre.png", landmark_rows, labels, statuses)
        plot_stages(stage / "stages.png", stage_rows, labels)
        if overlay_pair is not None:
            plot_overlay(stage / "overlay.png", overlay_pair, overlay_results)
    print(f"\nwritten to {out}: results.csv, landmarks.csv, stages.csv, summary.json, benchmark.md, rtre.png, stages.png"
          + (", overlay.png" if overlay_pair is not None else ""))
    print(md.split("## Methods")[0])
    if args.publish:
        publish(out, Path(args.publish_dir))
    return 0


def publish(out: Path, dest: Path) -> None:
    """Copy the Markdown table and the PNGs from ``out`` to ``dest``: all of them or none."""
    from napari_histreg.outputs import staged_outputs

    names = [n for n in PUBLISHED if (out / n).exists()]
    # docs/benchmarks is part of the repository: its published files are replaced, nothing else
    # in it is touched, and no output marker is written there
    with staged_outputs(dest, check=False, marker=False) as stage:
        for name in names:
            shutil.copyfile(out / name, stage / name)
    print(f"published {', '.join(names)} to {dest}")


if __name__ == "__main__":
    sys.exit(main())
