"""ANHIR landmark metrics (Borovec et al., IEEE TMI 2020); summaries over pairs live in ``evaluate``."""

from __future__ import annotations

import numpy as np


def rtre(mapped_rc, target_rc, target_shape) -> np.ndarray:
    """Relative target registration error per landmark: distance / target image diagonal."""
    mapped = np.asarray(mapped_rc, dtype=np.float64).reshape(-1, 2)
    target = np.asarray(target_rc, dtype=np.float64).reshape(-1, 2)
    if mapped.shape != target.shape:
        raise ValueError(f"landmark sets differ in size: {mapped.shape[0]} vs {target.shape[0]}")
    diagonal = float(np.hypot(*target_shape[:2]))
    return np.linalg.norm(mapped - target, axis=1) / diagonal


def pair_metrics(initial_source_rc, mapped_source_rc, target_rc, target_shape) -> dict:
    """Initial and final rTRE statistics and robustness for one pair, in the ANHIR names every
    output uses: ``initial_MrTRE`` / ``MrTRE`` (median rTRE before / after), ``mean_rTRE``,
    ``max_rTRE``, ``robustness`` (share of landmarks that moved closer), ``n_landmarks``.

    ``initial_source_rc`` are the source landmarks before registration (the "no registration"
    baseline compares them with the target landmarks directly, as ANHIR does).
    """
    before = rtre(initial_source_rc, target_rc, target_shape)
    after = rtre(mapped_source_rc, target_rc, target_shape)
    return {
        "initial_MrTRE": float(np.median(before)),
        "MrTRE": float(np.median(after)),
        "mean_rTRE": float(np.mean(after)),
        "max_rTRE": float(np.max(after)),
        "robustness": float(np.mean(after < before)),
        "n_landmarks": int(len(after)),
    }
