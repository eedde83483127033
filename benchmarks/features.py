"""Which keypoint detector proposes the initial alignment: ORB or SIFT (OpenCV), on the
greyscale CLAHE lung pairs of ``../shared/data`` (status ``robustness``: no outline).

    python benchmarks/features.py

For each detector and detection size, every pair's similarity transform (ratio test 0.8,
RANSAC) is scored on the landmarks (median rTRE, target diagonal); a pair within 0.02 counts
as found. Prints one line per setting: pairs found, and (matches, inliers, rTRE) per pair.
(Landmarks only score the proposals here; the choice among hypotheses never sees them.)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO.parent / "shared" / "data" / "dataset.csv"


def main() -> int:
    import cv2

    from napari_histreg.io import pair_landmarks, read_image, read_landmarks

    if not TABLE.exists():
        print(f"{TABLE}: not found", file=sys.stderr)
        return 2
    root = TABLE.parent
    rows = [r for r in csv.DictReader(open(TABLE)) if r["status"] == "robustness"]
    for detector in ("orb", "sift"):
        for size in (256, 384, 512):
            found, details = 0, []
            for row in rows:
                images = [read_image(root / row[k]).astype(np.float32) for k in ("Source image", "Target image")]
                greys = [im if im.ndim == 2 else im[..., :3].mean(-1) for im in images]
                scale = size / max(greys[1].shape)
                small = [cv2.createCLAHE(2.0, (8, 8)).apply(cv2.normalize(
                    cv2.resize(g, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), None, 0, 255,
                    cv2.NORM_MINMAX).astype(np.uint8)) for g in greys]
                make = cv2.ORB_create(3000) if detector == "orb" else cv2.SIFT_create()
                (ks, ds), (kt, dt) = (make.detectAndCompute(im, None) for im in small)
                norm = cv2.NORM_HAMMING if detector == "orb" else cv2.NORM_L2
                good = [m[0] for m in cv2.BFMatcher(norm).knnMatch(ds, dt, k=2)
                        if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
                error, inliers = 9.0, 0
                if len(good) >= 3:
                    a = np.float32([ks[m.queryIdx].pt for m in good]) / scale
                    b = np.float32([kt[m.trainIdx].pt for m in good]) / scale
                    fitted, mask = cv2.estimateAffinePartial2D(a, b, method=cv2.RANSAC,
                                                               ransacReprojThreshold=0.02 * max(greys[1].shape))
                    if fitted is not None:
                        ids_s, pts_s = read_landmarks(root / row["Source landmarks"])
                        ids_t, pts_t = read_landmarks(root / row["Target landmarks"])
                        _, pts_s, pts_t = pair_landmarks(ids_s, pts_s, ids_t, pts_t, "source", "target")
                        mapped = pts_s[:, ::-1] @ fitted[:, :2].T + fitted[:, 2]
                        error = float(np.median(np.linalg.norm(mapped - pts_t[:, ::-1], axis=1)) / np.hypot(*greys[1].shape))
                        inliers = int(mask.sum())
                found += error < 0.02
                details.append((len(good), inliers, round(error, 4)))
            print(f"{detector} {size}: {found} of {len(rows)} found  {details}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
