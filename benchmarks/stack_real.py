"""Serial-section stacks of ``../shared/data``: composed neighbour registrations against direct ones.

Two real stacks (sections in the order the data README lists them):

* ``grey``: the five greyscale CLAHE sections of ``lung-lesion-1/grey-10pc-clahe/`` (H&E, CD31,
  proSPC, CC10, Ki67; 78 landmark ids shared by all five);
* ``rgb``: the three RGB 5% sections of ``lung-lesion-1/scale-5pc/`` (H&E, proSPC, CC10).

For each, into the middle section: ``register_stack`` (each section to its neighbour, composed)
and ``register_stack(direct=True)`` (each straight to the reference); per section the MrTRE of
its landmarks mapped into the reference against the reference's. Then the **composition
check**: for every ordered pair of sections ``i -> j``, the stack's map through the reference
(``StackResult.map_points``) against a direct registration ``i -> j``: the median distance
between the two mappings (relative to the diagonal) beside the direct registration's own error
(MrTRE of ``i``'s landmarks against ``j``'s).

    python benchmarks/stack_real.py --threads 2 [--stacks grey,rgb] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "lung-lesion-1"
STACKS = {
    "grey": [DATA / "grey-10pc-clahe" / f"lung_lesion_{s}" for s in ("he", "cd31", "prospc", "cc10", "ki67")],
    "rgb": [DATA / "scale-5pc" / f"Izd2-29-041-w35_{s}" for s in ("HE", "proSPC", "CC10")],
}


def section_errors(stack, images, landmarks) -> dict[int, dict]:
    from napari_histreg.scoring import LandmarkPair, score_mapped

    ref = stack.reference
    out = {}
    for k in range(len(images)):
        if k == ref:
            continue
        pair = LandmarkPair.from_landmarks(landmarks[k], landmarks[ref], images[ref].shape, images[k].shape)
        row = score_mapped(stack.to_reference(k).map_source_points(pair.source_rc), pair)
        out[k] = {"initial_MrTRE": row["initial_MrTRE"], "MrTRE": row["MrTRE"], "flag": stack.sections[k].flag}
    return out


def composition_check(stack, images, landmarks, config, threads) -> list[dict]:
    """Every ordered pair i -> j: the stack's map against a direct registration."""
    from napari_histreg import register
    from napari_histreg.scoring import LandmarkPair, score_mapped

    rows = []
    for i in range(len(images)):
        for j in range(len(images)):
            if i == j:
                continue
            pair = LandmarkPair.from_landmarks(landmarks[i], landmarks[j], images[j].shape, images[i].shape)
            direct = register(images[i], images[j], config, threads=threads)
            direct_mapped = direct.map_source_points(pair.source_rc)
            stack_mapped = stack.map_points(pair.source_rc, i, j)
            diagonal = float(np.hypot(*images[j].shape[:2]))
            rows.append({
                "i": i, "j": j,
                "agreement": float(np.median(np.linalg.norm(stack_mapped - direct_mapped, axis=1)) / diagonal),
                "direct_MrTRE": score_mapped(direct_mapped, pair)["MrTRE"],
                "stack_MrTRE": score_mapped(stack_mapped, pair)["MrTRE"],
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", default="grey,rgb")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-composition", action="store_true", help="skip the i -> j composition check")
    parser.add_argument("--refine", action="store_true", help="also the stack with the final direct refinement")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from napari_histreg import RegistrationConfig
    from napari_histreg.io import read_image
    from napari_histreg.scoring import Landmarks
    from napari_histreg.stack import register_stack

    if not DATA.exists():
        print(f"{DATA}: not found (the real data of ../shared/data)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    config = RegistrationConfig()
    report: dict = {}
    for name in args.stacks.split(","):
        paths = STACKS[name]
        images = [read_image(p.with_suffix(".jpg")) for p in paths]
        landmarks = [Landmarks.read(p.with_suffix(".csv")) for p in paths]
        names = [p.name for p in paths]
        entry: dict = {"sections": names}
        methods = (("neighbours", False, False), ("direct", True, False)) + ((("refined", False, True),) if args.refine else ())
        for method, direct, refine in methods:
            start = time.perf_counter()
            stack = register_stack(images, config=config, direct=direct, refine=refine, names=names, threads=args.threads)
            seconds = time.perf_counter() - start
            errors = section_errors(stack, images, landmarks)
            mr = [e["MrTRE"] for e in errors.values()]
            entry[method] = {"reference": names[stack.reference], "per_section": {names[k]: e for k, e in errors.items()},
                             "MMrTRE": float(np.median(mr)), "AMrTRE": float(np.mean(mr)), "seconds": round(seconds, 1),
                             "closer_than_before": sum(e["MrTRE"] < e["initial_MrTRE"] for e in errors.values()),
                             "flagged": len(stack.flagged)}
            print(f"{name} {method:10s} into {names[stack.reference]}: " + ", ".join(
                f"{names[k]} {e['initial_MrTRE']:.4f}->{e['MrTRE']:.5f}" for k, e in errors.items())
                + f"; MMrTRE {entry[method]['MMrTRE']:.5f}, {seconds:.1f} s", flush=True)
            if method == "neighbours":
                neighbours = stack
        entry["ratio_to_direct"] = entry["neighbours"]["MMrTRE"] / entry["direct"]["MMrTRE"]
        print(f"{name}: stack MMrTRE / direct MMrTRE = {entry['ratio_to_direct']:.3f}", flush=True)
        if not args.no_composition:
            rows = composition_check(neighbours, images, landmarks, config, args.threads)
            entry["composition"] = rows
            agreement = np.array([r["agreement"] for r in rows])
            direct = np.array([r["direct_MrTRE"] for r in rows])
            entry["composition_summary"] = {"median_agreement": float(np.median(agreement)),
                                            "max_agreement": float(agreement.max()),
                                            "median_direct_MrTRE": float(np.median(direct)),
                                            "pairs_within_direct_error": int((agreement <= direct).sum()),
                                            "pairs": len(rows)}
            s = entry["composition_summary"]
            print(f"{name}: i -> j through the reference vs direct i -> j: median gap {s['median_agreement']:.5f} "
                  f"(max {s['max_agreement']:.5f}) against the direct pairs' own median MrTRE {s['median_direct_MrTRE']:.5f}; "
                  f"{s['pairs_within_direct_error']} of {s['pairs']} pairs within their direct error", flush=True)
        report[name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
