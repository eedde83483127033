"""A feature-based proposal for the initial alignment: keypoints and descriptors matched
across the two sections, a similarity transform fitted by RANSAC.

It needs no outline: vessels, bronchi and alveoli carry it, which is what the rotation
search (scored on the whole image at a coarse size) lacks on a crop cut inside the tissue.
It is one hypothesis among the others of :func:`~napari_histreg.stages.initial.initial_alignment`,
never trusted alone: the short affine and the local-NCC choice decide.

OpenCV does the detection, description, matching and RANSAC (a well-kept C++ library, 50 ms
for a pair here, where scikit-image's SIFT takes seconds). ORB was chosen over SIFT by
measurement (``benchmarks/features.py``): on the ten greyscale CLAHE lung pairs, ORB at 512 px
put 7 of 10 within 0.02 of the landmarks, SIFT at its best setting 5 of 10; on cross-stain
images, SIFT's gradient histograms differ more than ORB's intensity tests. The images are the
working images (grey, inverted, equalised), resized, with CLAHE so that a pale and a dark
stain have the same local contrast.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FeatureConfig:
    """``size``: longer side the keypoints are detected on; ``keypoints``: at most this many per
    image; ``ratio``: Lowe's ratio test; ``min_inliers``: fewer RANSAC inliers give no
    proposal; ``ransac_threshold``: inlier distance as a share of the longer side."""

    size: int = 512
    keypoints: int = 3000
    ratio: float = 0.8
    min_inliers: int = 5
    ransac_threshold: float = 0.02


def available() -> bool:
    """Whether OpenCV can be imported (an optional dependency in principle; installed with the package)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _detection_image(image: np.ndarray, size: int):
    import cv2

    image = np.asarray(image, dtype=np.float32)
    scale = min(1.0, size / max(image.shape))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    low, high = float(small.min()), float(small.max())
    grey = np.zeros(small.shape, np.uint8) if high - low < 1e-9 else ((small - low) / (high - low) * 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey), scale


def _keypoints(image: np.ndarray, config: FeatureConfig):
    """ORB keypoints and descriptors of ``image`` and the detection image's scale, kept for the
    run (:func:`~napari_histreg.stages.preprocess.per_run`): the target's serve both the plain
    and the mirrored proposal."""
    import cv2

    from .preprocess import per_run

    def detect(im):
        small, scale = _detection_image(im, config.size)
        keys, desc = cv2.ORB_create(nfeatures=config.keypoints).detectAndCompute(small, None)
        return keys, desc, scale

    return per_run(image, ("orb", config.size, config.keypoints), detect)


def feature_proposal(source: np.ndarray, target: np.ndarray, config: FeatureConfig | None = None) -> dict | None:
    """A similarity transform of ``source`` onto ``target`` (same working grid) from matched
    ORB keypoints: ``{"matrix": 2x3 backward (row, col) affine in working pixels, "inliers": n,
    "matches": m}``, or ``None`` when too few matches agree."""
    import cv2

    config = config or FeatureConfig()
    keys_s, desc_s, scale = _keypoints(source, config)
    keys_t, desc_t, _ = _keypoints(target, config)
    if desc_s is None or desc_t is None or len(keys_s) < 2 or len(keys_t) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc_t, desc_s, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < config.ratio * m[1].distance]
    if len(good) < config.min_inliers:
        return None
    # (x, y) in the detection image -> (row, col) working pixels (pixel centres kept)
    target_xy = (np.float32([keys_t[m.queryIdx].pt for m in good]) + 0.5) / scale - 0.5
    source_xy = (np.float32([keys_s[m.trainIdx].pt for m in good]) + 0.5) / scale - 0.5
    # target -> source: the backward map the pipeline's matrices are
    fitted, inliers = cv2.estimateAffinePartial2D(
        target_xy, source_xy, method=cv2.RANSAC, ransacReprojThreshold=config.ransac_threshold * max(source.shape),
        maxIters=5000, confidence=0.999, refineIters=10,
    )
    if fitted is None or inliers is None or int(inliers.sum()) < config.min_inliers:
        return None
    # (x, y) affine -> (row, col) affine: swap both the inputs and the outputs
    matrix = np.asarray(fitted, dtype=np.float64)[::-1][:, [1, 0, 2]]
    return {"matrix": matrix, "inliers": int(inliers.sum()), "matches": len(good)}
