"""A landmark-free validation set: cross-stain pairs with an exactly known deformation.

Every image of the cover table (and scikit-image's immunohistochemistry image) is split by
colour deconvolution (haematoxylin-eosin-DAB) into two renderings of the *same* section:
haematoxylin alone, and the other stains over a faint haematoxylin counterstain. The two differ
in appearance as consecutive sections in two stains do, yet are aligned by construction. One
rendering is then warped by a known random affine plus a smooth elastic field, and every
method registers it back onto the other.

The error is the ANHIR one with dense synthetic landmarks: target tissue points on a regular
grid, their true source positions from the known field, those mapped back through the
registration (``RegistrationResult.map_source_points``, as ``histreg evaluate`` maps
landmarks), distance over the target diagonal. Per pair: the median (MrTRE) and mean; over
pairs: their mean (AMrTRE) and median (MMrTRE).

This is where design choices are made without looking at the expert landmarks (the issue
forbids tuning on them): the landmarks of ``histreg evaluate`` stay a held-out test. The
networks were trained on random warps of these same images, so the learned and hybrid modes
have a home advantage here; between two variants of one mode, and between the optimisation
schedules, it is a fair referee.

    python benchmarks/validation.py --threads 2                   # every mode, 16 pairs
    python benchmarks/validation.py --method fast-hybrid='{"mode": "hybrid", "hybrid_dense": {"iterations": [20, 15, 10]}}'

Prints one line per pair and method, then a summary table; ``--out`` writes ``validation.csv``
and ``validation.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TABLE = REPO.parent / "shared" / "data" / "dataset.csv"
DEFAULT_METHODS = {
    "optimise": {"mode": "optimise"},
    "hybrid": {"mode": "hybrid"},
    "learned": {"mode": "learned"},
}


def stain_renderings(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two renderings of one RGB section in ``[0, 1]``: haematoxylin alone, and eosin + DAB
    over half the haematoxylin (a counterstain)."""
    from skimage.color import rgb2hed

    from napari_histreg.training.data import render_stains

    hed = rgb2hed(np.clip(rgb, 1e-4, 1.0))
    return render_stains(hed, (1.0, 0.0, 0.0)), render_stains(hed, (0.5, 1.0, 1.0))


def known_field(rng: np.random.Generator, shape, rotation=20.0, scale=0.1, shear=0.05, translation=0.05,
                elastic=0.025) -> np.ndarray:
    """``(2, H, W)`` backward pixel field: a random affine about the centre (``rotation`` in
    degrees, the rest relative) plus a smooth field whose largest displacement is ``elastic``
    times the longer side."""
    from napari_histreg.conventions import affine_to_field, affine_normalised_to_pixels
    from napari_histreg.conventions import swap_theta_axes  # the same swap both ways
    from napari_histreg.training.data import random_affine, random_smooth_field

    theta_rc = swap_theta_axes(random_affine(rng, rotation, scale, shear, translation))
    matrix = affine_normalised_to_pixels(theta_rc, shape)
    field = affine_to_field(matrix, shape)[0].numpy()
    return field + random_smooth_field(rng, shape, elastic * max(shape))


def table_images(table: Path, size: int) -> list[tuple[str, np.ndarray]]:
    """``(name, rgb)`` of every image of the cover table (not the ``synthetic`` folder: one
    image, warped) and scikit-image's IHC image, longer side ``size``, RGB in ``[0, 1]``."""
    import skimage.data

    from napari_histreg.io import read_image
    from napari_histreg.training.data import _rgb_float, find_images, resize_rgb

    images = [(path.name, resize_rgb(_rgb_float(read_image(path)), size)) for path, _ in find_images(table)
              if "synthetic" not in path.parts]
    images.append(("skimage-ihc", resize_rgb(_rgb_float(skimage.data.immunohistochemistry()), size)))
    return images


def make_pairs(images: list[tuple[str, np.ndarray]], warps: int, seed: int) -> list[dict]:
    """The validation pairs: ``warps`` known deformations of each image's two renderings
    (alternately the one and the other moving). Each pair holds the images and matching
    ``source_rc`` / ``target_rc`` points (original pixels) on the moving image's tissue."""
    from napari_histreg.conventions import map_target_to_source, to_tensor, warp
    from napari_histreg.stages.mask import otsu_tissue_mask
    from napari_histreg.training.data import working_grey

    pairs = []
    for index, (name, rgb) in enumerate(images):
        haematoxylin, others = stain_renderings(rgb)
        for k in range(warps):
            rng = np.random.default_rng([seed, index, k])
            moving, fixed = (others, haematoxylin) if k % 2 == 0 else (haematoxylin, others)
            field = known_field(rng, fixed.shape[:2])
            image = torch.from_numpy(np.ascontiguousarray(moving.transpose(2, 0, 1)))[None]
            # Glass is white: warp 1 - rgb with zero fill so that outside the section is glass too.
            source = 1.0 - warp(1.0 - image, to_tensor(field)[None])[0].numpy().transpose(1, 2, 0)
            source = np.clip(source, 0, 1).astype(np.float32)
            # source(p) shows moving(p + field(p)), and moving is aligned with fixed: the source
            # point p is the target point p + field(p), exactly.
            tissue = otsu_tissue_mask(working_grey(source))
            rows, cols = np.mgrid[8:fixed.shape[0] - 8:16, 8:fixed.shape[1] - 8:16]
            keep = tissue[rows, cols]
            source_rc = np.stack([rows[keep], cols[keep]], axis=1).astype(np.float64)
            target_rc = map_target_to_source(source_rc, field)  # p + field(p): the same formula
            inside = ((target_rc >= 0) & (target_rc <= np.array(fixed.shape[:2]) - 1)).all(axis=1)
            pairs.append({
                "name": f"{name}#{k}", "source": source, "target": fixed,
                "source_rc": source_rc[inside], "target_rc": target_rc[inside],
            })
    return pairs


#: The harder variants (issue 12): what consecutive sections not among the development pairs look
#: like. Each is one geometry and one rendering; ``standard`` is the set above.
VARIANTS = ("standard", "rotated", "inner-crop", "mirrored", "grey", "clahe", "stretched", "pale")


def _grey_rgb(rgb: np.ndarray, clahe: bool = False) -> np.ndarray:
    """A greyscale rendering (three equal channels), contrast-equalised by CLAHE when asked."""
    from napari_histreg.stages.preprocess import to_grey

    grey = to_grey(rgb).astype(np.float32)
    if clahe:
        from skimage.exposure import equalize_adapthist

        grey = equalize_adapthist(grey, clip_limit=0.02).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def _renderings(rgb: np.ndarray, variant: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(moving, fixed)`` renderings of one section for ``variant`` (alternating which stain moves)."""
    from skimage.color import rgb2hed

    from napari_histreg.training.data import render_stains

    if variant == "pale":  # a pale stain against a dark one: optical densities x0.35 and x1.5
        hed = rgb2hed(np.clip(rgb, 1e-4, 1.0))
        pale, dark = render_stains(hed, (0.35, 0.35, 0.35)), render_stains(hed, (1.5, 1.5, 1.5))
        return (pale, dark) if k % 2 == 0 else (dark, pale)
    haematoxylin, others = stain_renderings(rgb)
    moving, fixed = (others, haematoxylin) if k % 2 == 0 else (haematoxylin, others)
    if variant in ("grey", "clahe"):
        moving, fixed = _grey_rgb(moving, variant == "clahe"), _grey_rgb(fixed, variant == "clahe")
    return moving, fixed


def _variant_geometry(rng: np.random.Generator, variant: str, shape) -> dict:
    """The known transform's parameters: rotation (degrees), per-axis scale, mirror, the
    target window (``crop``: a box inside the section, no outline) and the elastic share."""
    h, w = shape
    geometry = {"angle": rng.uniform(-20, 20), "scale": np.exp(rng.uniform(-0.1, 0.1, 2) * [1, 1]), "mirror": False,
                "window": (0, 0, h, w), "shift": rng.uniform(-0.03, 0.03, 2) * [h, w], "elastic": 0.02}
    geometry["scale"][1] = geometry["scale"][0] * np.exp(rng.uniform(-0.03, 0.03))
    if variant in ("rotated", "inner-crop"):
        geometry["angle"] = rng.uniform(0, 360)
    if variant == "inner-crop":  # a crop of 55% of each side about a point near the centre
        ch, cw = round(0.55 * h), round(0.55 * w)
        r0 = int(round((h - ch) / 2 + rng.uniform(-0.05, 0.05) * h))
        c0 = int(round((w - cw) / 2 + rng.uniform(-0.05, 0.05) * w))
        geometry["window"] = (r0, c0, ch, cw)
        geometry["shift"] = rng.uniform(-0.03, 0.03, 2) * [ch, cw]
    if variant == "mirrored":
        geometry["mirror"] = True
    if variant == "stretched":  # anisotropic: up to 1.5x between the axes, either way
        ratio = rng.uniform(1.25, 1.5)
        base = np.exp(rng.uniform(-0.05, 0.05))
        geometry["scale"] = np.array([base * ratio, base]) if rng.uniform() < 0.5 else np.array([base, base * ratio])
    return geometry


def variant_pair(name: str, rgb: np.ndarray, variant: str, rng: np.random.Generator, k: int) -> dict:
    """One validation pair of ``variant``: the target is the fixed rendering inside the
    geometry's window; the source, on a grid of the window's size, shows the moving rendering at
    ``g(p) = c + S R M (p + o - c) + shift + elastic(p)`` (full-image coordinates; ``o`` the
    window's corner, ``c`` its centre, ``M`` the mirror). Source point ``p`` is target point
    ``g(p) - o`` exactly."""
    from napari_histreg.conventions import identity_grid, map_target_to_source, to_tensor, warp
    from napari_histreg.stages.mask import otsu_tissue_mask
    from napari_histreg.training.data import random_smooth_field, working_grey

    moving, fixed = _renderings(rgb, variant, k)
    geometry = _variant_geometry(rng, variant, fixed.shape[:2])
    r0, c0, hh, ww = geometry["window"]
    target = np.ascontiguousarray(fixed[r0 : r0 + hh, c0 : c0 + ww])
    centre = np.array([r0 + (hh - 1) / 2, c0 + (ww - 1) / 2])
    theta = np.deg2rad(geometry["angle"])
    linear = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) * np.asarray(geometry["scale"])[:, None]
    if geometry["mirror"]:
        linear = linear @ np.diag([1.0, -1.0])
    points = identity_grid((hh, ww)).numpy().reshape(2, -1).T.astype(np.float64) + [r0, c0]
    mapped = (points - centre) @ linear.T + centre + geometry["shift"]
    field = (mapped - (points - [r0, c0])).T.reshape(2, hh, ww).astype(np.float32)
    field = field + random_smooth_field(rng, (hh, ww), geometry["elastic"] * max(hh, ww))
    image = torch.from_numpy(np.ascontiguousarray(moving.transpose(2, 0, 1)))[None]
    # Glass is white: warp 1 - rgb with zero fill so that outside the section is glass too.
    source = 1.0 - warp(1.0 - image, to_tensor(field)[None])[0].numpy().transpose(1, 2, 0)
    source = np.clip(source, 0, 1).astype(np.float32)
    tissue = otsu_tissue_mask(working_grey(source)) if variant != "inner-crop" else np.ones((hh, ww), bool)
    rows, cols = np.mgrid[8 : hh - 8 : 16, 8 : ww - 8 : 16]
    keep = tissue[rows, cols]
    source_rc = np.stack([rows[keep], cols[keep]], axis=1).astype(np.float64)
    target_rc = map_target_to_source(source_rc, field) - [r0, c0]
    inside = ((target_rc >= 0) & (target_rc <= np.array([hh, ww]) - 1)).all(axis=1)
    return {"name": f"{name}#{variant}#{k}", "variant": variant, "source": source, "target": target,
            "source_rc": source_rc[inside], "target_rc": target_rc[inside]}


def make_variant_pairs(images: list[tuple[str, np.ndarray]], variants, warps: int, seed: int) -> list[dict]:
    """:func:`make_pairs` for ``standard``, :func:`variant_pair` for the others."""
    pairs = []
    for variant in variants:
        if variant == "standard":
            pairs += [dict(p, variant="standard") for p in make_pairs(images, warps, seed)]
            continue
        for index, (name, rgb) in enumerate(images):
            for k in range(warps):
                rng = np.random.default_rng([seed, index, k, VARIANTS.index(variant)])
                pairs.append(variant_pair(name, rgb, variant, rng, k))
    return pairs


def pairs_named(pairs: list[dict], names) -> list[dict]:
    """The pairs called ``names`` (as a run prints them), in the order given. A pair must be cut
    from the whole set: its geometry is drawn from a generator seeded with its image's index in
    the table, so making the pairs of one image alone would give a different pair of that name.
    ``KeyError`` (naming what exists) for a name the set lacks."""
    by_name = {pair["name"]: pair for pair in pairs}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise KeyError(f"no validation pair named {', '.join(map(repr, missing))} in this set (--seed, --warps, "
                       f"--variants as the run that printed it); it has e.g. {', '.join(list(by_name)[:4])}")
    return [by_name[name] for name in names]


def score(result, pair) -> dict:
    """The ANHIR metrics of one registered pair, as ``histreg evaluate`` records them
    (:func:`napari_histreg.scoring.score`: the known grid points are the landmarks)."""
    from napari_histreg.scoring import LandmarkPair, score as score_pair

    return score_pair(result, LandmarkPair.from_points(pair["source_rc"], pair["target_rc"], pair["target"].shape))


def confidence_measures(result) -> dict:
    """The result's landmark-free confidence measures (``m_<name>`` columns) and whether the
    affine check kept the affine stage's start: what the confidence's ramps are set from."""
    measures = result.confidence.get("measures", {})
    row = {f"m_{name}": measures.get(name) for name in MEASURE_COLUMNS}
    row["m_affine_kept_start"] = int(result.info.get("affine_check", {}).get("kept") == "start")
    return row


#: the measures of :mod:`napari_histreg.confidence` written as ``m_<name>`` columns
MEASURE_COLUMNS = ("margin", "affine_local_ncc", "final_local_ncc", "gain", "folded", "overlap", "agreeing", "disputed")


def run(methods: dict, pairs: list[dict], device: str, quiet: bool = False, threads: int | None = None) -> list[dict]:
    """Every method on every pair. ``threads``: torch threads of every registration (None: each
    run's own choice from the free cores, :func:`napari_histreg.threads.choose_threads`, which
    gives 2 on a quiet 2-core machine and 1 beside a busy process)."""
    from napari_histreg.config import apply_overrides
    from napari_histreg.pipeline import Pipeline, RegistrationConfig

    rows = []
    for name, overrides in methods.items():
        config = apply_overrides(RegistrationConfig(), overrides, name)
        pipeline = Pipeline(config, device=device, threads=threads)
        pipeline.run(pairs[0]["source"], pairs[0]["target"])  # warm-up: network loading, first-call costs
        for pair in pairs:
            start = time.perf_counter()
            result = pipeline.run(pair["source"], pair["target"])
            seconds = time.perf_counter() - start
            row = {"method": name, "pair": pair["name"], "variant": pair.get("variant", "standard"), "seconds": seconds,
                   **score(result, pair), **confidence_measures(result)}
            rows.append(row)
            if not quiet:
                print(f"{name:18s} {pair['name']:42s} MrTRE {row['MrTRE']:.5f}  mean {row['mean_rTRE']:.5f}  "
                      f"{seconds:.2f} s", flush=True)
    return rows


def catastrophic_counts(rows: list[dict]) -> dict:
    """Per method and variant: pairs, pairs that end above their initial error ("worse"), and
    pairs above 0.02 MrTRE (the issue's failure)."""
    out: dict = {}
    for row in rows:
        entry = out.setdefault(row["method"], {}).setdefault(row.get("variant", "standard"), {"pairs": 0, "worse": 0, "failed": 0})
        entry["pairs"] += 1
        entry["worse"] += int(row["MrTRE"] > row["initial_MrTRE"])
        entry["failed"] += int(row["MrTRE"] > row["initial_MrTRE"] or row["MrTRE"] > 0.02)
    return out


def summarise(rows: list[dict]) -> dict:
    """Per method: :func:`napari_histreg.evaluate.summarise_rows` (AMrTRE, MMrTRE, AArTRE, ...)."""
    from napari_histreg.evaluate import summarise_rows

    methods = dict.fromkeys(r["method"] for r in rows)
    return {name: summarise_rows([r for r in rows if r["method"] == name]) for name in methods}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="cover table whose images are used")
    parser.add_argument("--size", type=int, default=1024, help="longer side of every image (px)")
    parser.add_argument("--warps", type=int, default=2, help="known deformations per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="standard",
                        help=f"comma-separated, or 'all': {', '.join(VARIANTS)} (default: standard)")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=JSON",
                        help="a method: a name and RegistrationConfig overrides (as histreg --config); "
                             "repeatable; default: optimise, hybrid, learned")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every registration (default: each run's choice from the free cores)")
    parser.add_argument("--pair", action="append", default=[], metavar="NAME",
                        help="run only this pair (repeatable), by the name the run prints, e.g. "
                             "'Rat-Kidney_HE.jpg#rotated#0': it is built from the whole table as in the full "
                             "run (a pair's random geometry depends on its image's place in the table)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for validation.csv / validation.json")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.table.exists():
        parser.error(f"{args.table}: cover table not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {}
    for item in args.method:
        name, _, text = item.partition("=")
        methods[name] = json.loads(text) if text else DEFAULT_METHODS[name]
    methods = methods or DEFAULT_METHODS
    variants = VARIANTS if args.variants == "all" else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    pairs = make_variant_pairs(table_images(args.table, args.size), variants, args.warps, args.seed)
    if args.pair:
        try:
            pairs = pairs_named(pairs, args.pair)
        except KeyError as err:
            parser.error(err.args[0])
    rows = run(methods, pairs, args.device, args.quiet, threads=args.threads)
    summary = summarise(rows)
    print(f"\n{len(pairs)} pairs, {sum(len(p['target_rc']) for p in pairs)} points")
    print(f"{'method':18s} {'AMrTRE':>9s} {'MMrTRE':>9s} {'AArTRE':>9s} {'s/pair':>7s}")
    for name, s in summary.items():
        print(f"{name:18s} {s['AMrTRE']:9.5f} {s['MMrTRE']:9.5f} {s['AArTRE']:9.5f} {s['median_seconds']:7.2f}")
    counts = catastrophic_counts(rows)
    print("\nper variant: pairs / ended above their initial error / failed (above initial or above 0.02)")
    for name, per_variant in counts.items():
        print(f"{name:18s} " + "  ".join(f"{v} {c['pairs']}/{c['worse']}/{c['failed']}" for v, c in per_variant.items()))
    if args.out:
        from napari_histreg.io import atomic_write_json
        from napari_histreg.outputs import staged_outputs

        # an earlier validation folder is replaced; anything else is refused (napari_histreg.outputs)
        with staged_outputs(args.out, overwrite=True, command="benchmarks/validation.py") as stage:
            with open(stage / "validation.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            atomic_write_json(stage / "validation.json", {"summary": summary, "methods": methods, "size": args.size,
                                                          "warps": args.warps, "seed": args.seed, "variants": list(variants),
                                                          "catastrophic": counts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
