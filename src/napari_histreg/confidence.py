"""A confidence on every result, computed without landmarks, and the flag ``ok | check``.

A registration that may be wrong must say so. The measures, all on the working images:

* ``margin``: local NCC of the chosen initial hypothesis minus that of the best hypothesis
  that ended clearly elsewhere (more than 5% of the diagonal away) after the same short affine.
  Near 0 the initial alignment could not tell two placements apart (a round lesion, two
  unrelated images).
* ``gain``: local NCC under the result's affine part over the best such rival's: how much
  better the result explains the target than the runner-up placement did.
* ``disputed``: 1 when the affine stage (global NCC) moved away from the initial choice (local
  NCC) and was overruled (:func:`napari_histreg.pipeline.affine_or_start`): two criteria
  disagree on where the optimum is, so the choice needs a clearer lead (the ``gain_disputed``
  ramp instead of ``gain``).
* ``folded``: share of the target's tissue where the deformation folds (Jacobian determinant
  <= 0, against the affine part's orientation).
* ``overlap``: Dice of the two tissue masks (Otsu) after registration.
* ``affine_local_ncc`` / ``final_local_ncc`` (kept, not judged): local NCC (9 px windows, at
  192 px) under the affine part / the whole field. Neither separates right from wrong: crops
  cut inside the tissue score 0.002-0.05 when right, and a deformable field raises local NCC
  even between unrelated images.

:func:`judge` reduces them to a score in ``[0, 1]`` (the smallest of the per-measure scores,
each a linear ramp between a "fails" and a "passes" value) and the flag: ``check`` below
:data:`CHECK_BELOW`. The ramps were chosen on the landmark-free validation set of
``benchmarks/validation.py`` (every variant, seeds 0 and 1: no failure left ``ok``, the fewest
successes flagged), then tested on seed 2 and on the landmark pairs (README, "Confidence").
"""

from __future__ import annotations

import numpy as np
import torch

#: measure -> (value at which it scores 0, value at which it scores 1)
RAMPS = {
    "margin": (0.0, 0.01),
    "gain": (1.2, 1.8),
    "gain_disputed": (1.8, 2.2),  # the gain's ramp when ``disputed``
    "folded": (0.02, 0.002),
    "overlap": (0.25, 0.55),
}
#: results scoring below this are flagged ``check``
CHECK_BELOW = 0.5
CHOICE_SIZE = 192
CHOICE_WINDOW = 9


def _small(image: np.ndarray, size: int, device) -> torch.Tensor:
    from .stages.preprocess import level_shape, resample

    return resample(image, level_shape(image.shape, size), device=device)[None, None]


def folded_share(field: np.ndarray, orientation: float = 1.0, where: np.ndarray | None = None) -> float:
    """Share of the grid (or of ``where``) where the backward map ``p -> p + field(p)`` folds:
    its Jacobian determinant (central differences) is <= 0 times ``orientation``, the sign of
    the affine part's determinant (a mirrored section is turned over everywhere, not folded)."""
    u = np.asarray(field, dtype=np.float64)
    if u.shape[1] < 3 or u.shape[2] < 3:
        return 0.0
    dr_dr = np.gradient(u[0], axis=0) + 1.0
    dr_dc = np.gradient(u[0], axis=1)
    dc_dr = np.gradient(u[1], axis=0)
    dc_dc = np.gradient(u[1], axis=1) + 1.0
    folded = (dr_dr * dc_dc - dr_dc * dc_dr) * np.sign(orientation or 1.0) <= 0
    if where is not None and where.any():
        return float(folded[where].mean())
    return float(folded.mean())


def measure(source: np.ndarray, target: np.ndarray, field: np.ndarray, matrix: np.ndarray, initial: dict | None,
            device=None, affine_check: dict | None = None) -> dict:
    """The measures of the module docstring for ``source`` registered onto ``target`` by the
    backward working ``field`` ``(2, H, W)`` whose affine part is ``matrix``; ``initial``:
    ``info["initial"]`` (may be None); ``affine_check``: ``info["affine_check"]`` (may be None)."""
    from .conventions import resize_field, to_tensor, warp
    from .similarity import local_ncc
    from .stages.mask import otsu_tissue_mask

    from .stages.initial import InitialAlignmentConfig, _local_scores

    device = torch.device(device or "cpu")
    # the very measure that chose among the initial hypotheses (same sizes, same smoothing)
    choice = InitialAlignmentConfig(choice_size=CHOICE_SIZE, choice_window=CHOICE_WINDOW)
    affine_local = float(_local_scores(source, target, np.asarray(matrix, dtype=np.float64)[None], choice, device)[0])
    tgt = _small(target, CHOICE_SIZE, device)
    with torch.no_grad():
        small_field = resize_field(to_tensor(field, device=device)[None], tgt.shape[-2:])
        final = float(local_ncc(warp(_small(source, CHOICE_SIZE, device), small_field), tgt, CHOICE_WINDOW)[0])
        warped_full = warp(to_tensor(source, device=device)[None, None], to_tensor(field, device=device)[None])
    moved = warped_full[0, 0].cpu().numpy()
    a, b = otsu_tissue_mask(moved), otsu_tissue_mask(np.asarray(target))
    orientation = float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:, :2]))
    values = {"affine_local_ncc": round(affine_local, 5), "final_local_ncc": round(final, 5),
              "folded": round(folded_share(field, orientation, b), 6)}
    total = int(a.sum()) + int(b.sum())
    values["overlap"] = round(2.0 * int((a & b).sum()) / total, 5) if total else 0.0
    hypotheses = (initial or {}).get("hypotheses") or []
    # rivals: the hypotheses that ended clearly elsewhere (results saved before that key: every
    # hypothesis that did not agree)
    rejected = [h["local_ncc"] for h in hypotheses if h.get("local_ncc") is not None
                and h.get("elsewhere", not h.get("agrees", True))]
    if initial and initial.get("margin") is not None:
        values["margin"] = float(initial["margin"])
    if rejected:
        values["gain"] = round(affine_local / max(max(rejected), 1e-6), 5)
    values["agreeing"] = int((initial or {}).get("agreeing", 0))
    # the affine stage (global NCC) and the initial choice (local NCC) disagreed on where the
    # optimum is, and the choice was kept (napari_histreg.pipeline.affine_or_start)
    values["disputed"] = int((affine_check or {}).get("kept") == "start")
    return values


def _ramp(value: float, fails: float, passes: float) -> float:
    return float(np.clip((value - fails) / (passes - fails), 0.0, 1.0))


def judge(values: dict) -> dict:
    """``{"score", "flag", "measures", "weakest"}`` from :func:`measure`'s values: the score is
    the smallest per-measure ramp (a measure that is absent does not count)."""
    parts = {name: _ramp(values[name], *RAMPS[name]) for name in RAMPS
             if name != "gain_disputed" and values.get(name) is not None}
    if parts.get("gain") is not None and values.get("disputed"):
        parts["gain_disputed"] = _ramp(values["gain"], *RAMPS["gain_disputed"])
        del parts["gain"]
    weakest = min(parts, key=parts.get) if parts else ""
    score = round(parts[weakest], 4) if parts else 1.0
    return {"score": score, "flag": "ok" if score >= CHECK_BELOW else "check", "weakest": weakest, "measures": values}


def describe(confidence: dict) -> str:
    """One line for a warning: the flag, the score and the weakest measure."""
    weakest = confidence.get("weakest") or ""
    value = confidence.get("measures", {}).get("gain" if weakest == "gain_disputed" else weakest)
    why = f"; weakest: {weakest} {value:.4g}" if weakest and value is not None else ""
    return f"confidence {confidence.get('score', float('nan')):.2f} ({confidence.get('flag', '?')}{why})"
