"""Guided registration, measured leave-k-out on the real landmark pairs (issue 16, item 3).

For each pair of the cover table (``--status``, default the real ``training`` and
``robustness`` pairs): register it once automatically; then ``--repeats`` times draw
``--points`` of its landmarks as guides (seeded), correct the automatic result through them
(:func:`napari_histreg.guided.refine_result`, what napari's *Refine with landmarks* runs) and
score the *other* landmarks against the automatic result's error on the same landmarks. Then
the same with the automatic result turned by 90 degrees (a pair made to fail). Also how far
the field misses the guides (original source pixels) and the manual fallbacks (affine and
thin-plate spline from the guides alone) on the same held-out landmarks. Last, per pair, the
automatic result moved by the mean miss of all its landmarks (:func:`shift_oracle`): whether even
an exactly known common shift would lower the pair's MrTRE, i.e. whether the automatic result's
remaining error is a bias guides could remove or the landmarks' own placement noise.

    python benchmarks/guided.py --threads 2 [--repeats 3] [--points 6] [--out guided.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from napari_histreg import register
from napari_histreg.evaluate import read_cover_table, select_pairs
from napari_histreg.guided import points_result, refine_result, turned_result
from napari_histreg.io import read_image
from napari_histreg.metrics import pair_metrics
from napari_histreg.scoring import LandmarkPair

#: "near a guide": within this share of the target's diagonal, where the automatic result's
#: landmark errors are correlated (0.70 between landmarks closer than 0.02 of the diagonal, 0.13
#: at 0.02-0.05, none beyond: measured on the 14 pairs' automatic results)
NEAR = 0.02

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dataset.csv"


def held_out_mrtre(result, landmarks: LandmarkPair, keep: np.ndarray) -> float:
    mapped = result.map_source_points(landmarks.source_rc[keep])
    return pair_metrics(landmarks.source_rc[keep], mapped, landmarks.target_rc[keep], landmarks.target_shape)["MrTRE"]


def near_guides(landmarks: LandmarkPair, guides: np.ndarray, keep: np.ndarray, share: float = NEAR) -> np.ndarray:
    """The held-out landmarks within ``share`` of the target's diagonal of a guide."""
    diagonal = float(np.hypot(*landmarks.target_shape[:2]))
    d = np.linalg.norm(landmarks.target_rc[keep][:, None] - landmarks.target_rc[guides][None], axis=-1).min(axis=1)
    return keep[d < share * diagonal]


def errors_px(result, landmarks: LandmarkPair, which: np.ndarray) -> np.ndarray:
    mapped = result.map_source_points(landmarks.source_rc[which])
    return np.linalg.norm(mapped - landmarks.target_rc[which], axis=1)


def guide_miss_px(result, landmarks: LandmarkPair, guides: np.ndarray) -> float:
    """Largest distance (original source pixels) between where the result sends a target guide
    and its source guide."""
    mapped = result.map_target_points(landmarks.target_rc[guides])
    return float(np.linalg.norm(mapped - landmarks.source_rc[guides], axis=1).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(DATA))
    parser.add_argument("--status", default="training,robustness")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not Path(args.table).exists():
        print(f"{args.table}: not found (the shared data folder is needed)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    pairs = select_pairs(read_cover_table(args.table), args.status, args.limit)
    rng = np.random.default_rng(args.seed)
    rows = []
    shifts = []  # per pair: (automatic MrTRE, MrTRE with the oracle's shift), all landmarks
    print(f"{'pair':58s} {'auto':>8s} {'guided':>8s} {'turned':>8s} {'fixed':>8s} {'affine':>8s} {'tps':>8s} {'miss px':>7s} {'s':>5s}")
    for pair in pairs:
        source = read_image(pair.path(pair.source))
        target = read_image(pair.path(pair.target))
        landmarks = LandmarkPair.read(pair.path(pair.source_landmarks), pair.path(pair.target_landmarks), target.shape, source.shape)
        if len(landmarks) < args.points + 3:
            continue
        automatic = register(source, target, threads=args.threads)
        failing = turned_result(automatic)
        shifts.append(shift_oracle(automatic, landmarks))
        for repeat in range(args.repeats):
            guides = rng.choice(len(landmarks), size=args.points, replace=False)
            keep = np.setdiff1d(np.arange(len(landmarks)), guides)
            g_src, g_tgt = landmarks.source_rc[guides], landmarks.target_rc[guides]
            start = time.perf_counter()
            guided = refine_result(automatic, g_src, g_tgt, threads=args.threads)
            seconds = time.perf_counter() - start
            fixed = refine_result(failing, g_src, g_tgt, threads=args.threads)
            manual = {model: points_result(source.shape, target.shape, g_src, g_tgt, model) for model in ("affine", "tps")}
            row = {
                "pair": f"{pair.source} -> {pair.target}", "status": pair.status, "repeat": repeat,
                "guides": guides.tolist(),
                "automatic": held_out_mrtre(automatic, landmarks, keep),
                "guided": held_out_mrtre(guided, landmarks, keep),
                "turned": held_out_mrtre(failing, landmarks, keep),
                "turned_guided": held_out_mrtre(fixed, landmarks, keep),
                "affine_from_points": held_out_mrtre(manual["affine"], landmarks, keep),
                "tps_from_points": held_out_mrtre(manual["tps"], landmarks, keep),
                "near_count": int(len(near := near_guides(landmarks, guides, keep))),
                "near_automatic_px": errors_px(automatic, landmarks, near).tolist(),
                "near_guided_px": errors_px(guided, landmarks, near).tolist(),
                "guide_miss_px": max(guide_miss_px(guided, landmarks, guides), guide_miss_px(fixed, landmarks, guides)),
                "restarted": [guided.info["guide"]["restarted_from_points"], fixed.info["guide"]["restarted_from_points"]],
                "flag": [guided.flag, fixed.flag],
                "seconds": seconds,
            }
            rows.append(row)
            name = Path(pair.source).stem[-22:] + " -> " + Path(pair.target).stem[-22:]
            print(f"{name:58s} {row['automatic']:8.5f} {row['guided']:8.5f} {row['turned']:8.5f} {row['turned_guided']:8.5f} "
                  f"{row['affine_from_points']:8.5f} {row['tps_from_points']:8.5f} {row['guide_miss_px']:7.3f} {seconds:5.1f}", flush=True)
    if not rows:
        print("no pair with enough landmarks")
        return 1
    auto = np.array([r["automatic"] for r in rows])
    guided = np.array([r["guided"] for r in rows])
    fixed = np.array([r["turned_guided"] for r in rows])
    print(f"\n{len(rows)} draws on {len(pairs)} pairs, {args.points} guides each:")
    print(f"  held-out MrTRE, automatic: median {np.median(auto):.5f}; guided: median {np.median(guided):.5f}; "
          f"guided lower in {int((guided < auto).sum())} of {len(rows)} draws "
          f"(pair medians lower in {_pairs_lower(rows)})")
    near_a = np.concatenate([r["near_automatic_px"] for r in rows])
    near_g = np.concatenate([r["near_guided_px"] for r in rows])
    if len(near_a):
        print(f"  held-out landmarks within {NEAR} of the diagonal of a guide ({len(near_a)} over all draws): "
              f"error median {np.median(near_a):.2f} -> {np.median(near_g):.2f} px, mean {near_a.mean():.2f} -> {near_g.mean():.2f} px")
    print(f"  turned by 90 degrees then guided: max {fixed.max():.5f}, {int((fixed < 0.01).sum())} of {len(rows)} below 0.01")
    print(f"  guides met within {max(r['guide_miss_px'] for r in rows):.3f} px (largest miss, original source pixels)")
    print(f"  manual fallback from the guides alone: affine median {np.median([r['affine_from_points'] for r in rows]):.5f}, "
          f"thin-plate spline median {np.median([r['tps_from_points'] for r in rows]):.5f}")
    print(f"  median seconds of a refine: {np.median([r['seconds'] for r in rows]):.2f}")
    print(f"  the automatic result moved by the mean miss of all its landmarks (the shift known exactly, "
          f"not estimated from guides): pair MrTRE lower in {sum(o < a for a, o in shifts)} of {len(shifts)} pairs, "
          f"median ratio {np.median([o / a for a, o in shifts]):.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def shift_oracle(result, landmarks: LandmarkPair) -> tuple[float, float]:
    """The pair's MrTRE over all its landmarks, and the same once every mapped landmark is moved
    by their mean miss: what removing a shift common to the whole pair gains when the shift is
    taken from the landmarks themselves rather than estimated from a few guides."""
    mapped = result.map_source_points(landmarks.source_rc)
    shifted = mapped - (mapped - landmarks.target_rc).mean(axis=0)
    return tuple(pair_metrics(landmarks.source_rc, m, landmarks.target_rc, landmarks.target_shape)["MrTRE"]
                 for m in (mapped, shifted))


def _pairs_lower(rows) -> str:
    by_pair: dict = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append((r["automatic"], r["guided"]))
    lower = sum(1 for v in by_pair.values() if np.median([g for _, g in v]) < np.median([a for a, _ in v]))
    return f"{lower} of {len(by_pair)} pairs"


if __name__ == "__main__":
    sys.exit(main())
