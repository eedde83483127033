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
    from napari_histreg.stages.affine import _rc_to_xy  # the same swap both ways
    from napari_histreg.training.data import random_affine, random_smooth_field

    theta_rc = _rc_to_xy(random_affine(rng, rotation, scale, shear, translation))
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


def score(result, pair) -> dict:
    """The ANHIR metrics of one registered pair (as ``histreg evaluate`` records them)."""
    from napari_histreg.metrics import pair_metrics

    m = pair_metrics(pair["source_rc"], result.map_source_points(pair["source_rc"]), pair["target_rc"],
                     pair["target"].shape[:2])
    return {"MrTRE": m["median_rtre"], "mean_rTRE": m["mean_rtre"], "max_rTRE": m["max_rtre"],
            "initial_MrTRE": m["initial_median_rtre"], "robustness": m["robustness"], "n_points": m["n_landmarks"]}


def run(methods: dict, pairs: list[dict], device: str, quiet: bool = False) -> list[dict]:
    from napari_histreg.cli import apply_overrides
    from napari_histreg.pipeline import Pipeline, RegistrationConfig

    rows = []
    for name, overrides in methods.items():
        config = apply_overrides(RegistrationConfig(), overrides, name)
        pipeline = Pipeline(config, device=device)
        pipeline.run(pairs[0]["source"], pairs[0]["target"])  # warm-up: network loading, first-call costs
        for pair in pairs:
            start = time.perf_counter()
            result = pipeline.run(pair["source"], pair["target"])
            seconds = time.perf_counter() - start
            row = {"method": name, "pair": pair["name"], "seconds": seconds, **score(result, pair)}
            rows.append(row)
            if not quiet:
                print(f"{name:18s} {pair['name']:42s} MrTRE {row['MrTRE']:.5f}  mean {row['mean_rTRE']:.5f}  "
                      f"{seconds:.2f} s", flush=True)
    return rows


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
    parser.add_argument("--method", action="append", default=[], metavar="NAME=JSON",
                        help="a method: a name and RegistrationConfig overrides (as histreg --config); "
                             "repeatable; default: optimise, hybrid, learned")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
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
    pairs = make_pairs(table_images(args.table, args.size), args.warps, args.seed)
    rows = run(methods, pairs, args.device, args.quiet)
    summary = summarise(rows)
    print(f"\n{len(pairs)} pairs, {sum(len(p['target_rc']) for p in pairs)} points")
    print(f"{'method':18s} {'AMrTRE':>9s} {'MMrTRE':>9s} {'AArTRE':>9s} {'s/pair':>7s}")
    for name, s in summary.items():
        print(f"{name:18s} {s['AMrTRE']:9.5f} {s['MMrTRE']:9.5f} {s['AArTRE']:9.5f} {s['median_seconds']:7.2f}")
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
                                                          "warps": args.warps, "seed": args.seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
