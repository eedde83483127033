"""Registration guided by a few corresponding points a user clicked: the automatic result
corrected through them, and the manual fallbacks (an affine or a thin-plate spline from the
points alone).

Guide points are pairs ``(source_rc, target_rc)`` in the original pixels of each image (the
napari layers' data coordinates, ANHIR landmarks after ``xy_to_rc``), paired by order.

* :func:`guided_run`: what ``register(..., guide_points=...)`` does: the pipeline's stages, then
  (1) when the points say the automatic affine is wrong (:data:`AFFINE_DISAGREEMENT`), the
  points' own affine as a new start, refined by the affine stage and the dense non-rigid
  optimisation with a landmark term; (2) a last local, smooth correction that makes the field
  pass through the guides (:func:`exact_correction`).
* :func:`refine_result`: the same from an existing result (napari's *Refine with landmarks*).
* :func:`points_result`: the manual fallback, no image needed.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .conventions import Frame, affine_to_field, apply_homogeneous, identity_grid, map_target_to_source
from .io import HistRegInputError
from .result import RegistrationResult

#: The points' own affine replaces the automatic one as the start of the affine and non-rigid
#: stages when the automatic affine misses the guides by more than this share of the working
#: grid's diagonal (median over the guides) *and* by three times what the points' affine misses
#: them by (its least-squares residual: the non-affine part of the tissue's deformation plus the
#: clicking error). A right registration misses ANHIR landmarks by ~0.3% of the diagonal in its
#: affine part; a pair turned by 90 degrees by half the diagonal.
AFFINE_DISAGREEMENT = 0.02

MODELS = ("translation", "rigid", "similarity", "affine")


@dataclasses.dataclass
class GuideConfig:
    """How guide points correct a registration.

    ``exact``: finish with :func:`exact_correction`, so that the field passes through the guides;
    ``correction_sigma``: that correction's Gaussian radius, a share of the working grid's longer
    side; ``weight``: the landmark term's weight in the dense optimisation (per squared working
    pixel of the mean guide miss), run when the points restart the registration from their own
    affine (``model``; ``"affine"`` needs 3 points, fewer fall back to similarity (2) or
    translation (1)) or always with ``reoptimise``.

    Chosen on the 17 real landmark pairs together, leave-6-out (``benchmarks/guided.py``,
    README "Human-guided correction"): where the automatic result is right its misses at the
    guides are the landmarks' own clicking noise, uncorrelated from one landmark to the next, so
    a wide correction (0.1 of the side: held-out MrTRE x1.16; a thin-plate spline x1.76) or the
    dense optimisation run again with the landmark term (x1.015; without it x1.028) makes the
    other landmarks worse; a local one (0.02-0.04) leaves them as they were (x1.000)."""

    exact: bool = True
    correction_sigma: float = 0.03
    weight: float = 0.02
    model: str = "affine"
    reoptimise: bool = False


# --------------------------------------------------------------------------- point transforms
def check_guide_points(source_rc, target_rc, name: str = "guide points") -> tuple[np.ndarray, np.ndarray]:
    """Two ``(N, 2)`` float arrays of equal length, finite, at least one point."""
    source = np.asarray(source_rc, dtype=np.float64)
    target = np.asarray(target_rc, dtype=np.float64)
    if source.ndim != 2 or source.shape[-1] != 2 or target.ndim != 2 or target.shape[-1] != 2:
        raise HistRegInputError(f"{name}: expected two (N, 2) arrays of (row, col) points, got {source.shape} and {target.shape}")
    if len(source) != len(target):
        raise HistRegInputError(f"{name}: {len(source)} source points but {len(target)} target points; pair them one to one")
    if not len(source):
        raise HistRegInputError(f"{name}: no points")
    if not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise HistRegInputError(f"{name}: a point is NaN or infinite")
    return source, target


def model_for(n_points: int, model: str = "affine") -> str:
    """The richest of ``model`` and what ``n_points`` points determine."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, not {model!r}")
    possible = "affine" if n_points >= 3 else "similarity" if n_points == 2 else "translation"
    return MODELS[min(MODELS.index(model), MODELS.index(possible))]


def fit_backward_affine(source_rc, target_rc, model: str = "affine") -> np.ndarray:
    """The 2x3 backward affine ``s = A t + b`` (target ``(row, col)`` -> source) that fits the
    pairs best in least squares, of ``model`` (:data:`MODELS`; reduced to what the number of
    points determines, :func:`model_for`). Rigid and similarity: Umeyama's closed form; a
    mirrored pair (determinant < 0) is allowed for ``affine`` only."""
    source, target = check_guide_points(source_rc, target_rc)
    model = model_for(len(source), model)
    if model == "translation":
        shift = (source - target).mean(axis=0)
        return np.hstack([np.eye(2), shift[:, None]])
    if model == "affine":
        design = np.hstack([target, np.ones((len(target), 1))])
        solution, *_ = np.linalg.lstsq(design, source, rcond=None)
        return solution.T
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    ds, dt = source - mu_s, target - mu_t
    u, sv, vt = np.linalg.svd(ds.T @ dt / len(source))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(sv) @ d) / max((dt**2).sum() / len(source), 1e-12)) if model == "similarity" else 1.0
    linear = scale * rotation
    return np.hstack([linear, (mu_s - linear @ mu_t)[:, None]])


# --------------------------------------------------------------------------- the field through the guides
def guide_misses(field, source_w, target_w, source_frame: Frame | None = None) -> np.ndarray:
    """Distance between where ``field`` sends each target guide and its source guide: working
    pixels, or the source's original pixels when its ``source_frame`` is given."""
    mapped, source_w = map_target_to_source(target_w, field), np.asarray(source_w)
    if source_frame is not None:
        mapped, source_w = source_frame.to_original(mapped), source_frame.to_original(source_w)
    return np.linalg.norm(mapped - source_w, axis=1)


def exact_correction(field: np.ndarray, source_w, target_w, sigma: float) -> np.ndarray:
    """``field`` plus the smallest smooth correction that makes it send each target guide
    exactly onto its source guide: Gaussian radial basis functions of radius ``sigma`` (working
    pixels) centred on the target guides, their weights solved so that the correction at each
    guide is its miss. The correction is local (it fades within ~3 sigma) and, because a field
    is added to in source coordinates, leaves the rest of the field as it is."""
    field = np.asarray(field, dtype=np.float32)
    target_w = np.asarray(target_w, dtype=np.float64)
    misses = np.asarray(source_w, dtype=np.float64) - map_target_to_source(target_w, field)
    # the grid points nearest the guides are where bilinear sampling reads the field: solve on
    # the guides themselves, a small ridge keeps nearly coincident guides well posed
    d2 = ((target_w[:, None, :] - target_w[None, :, :]) ** 2).sum(-1)
    kernel = np.exp(-d2 / (2 * sigma**2)) + 1e-6 * np.eye(len(target_w))
    weights = np.linalg.solve(kernel, misses)  # (N, 2)
    grid = identity_grid(field.shape[-2:], dtype=torch.float64).numpy().reshape(2, -1).T  # (HW, 2)
    correction = np.zeros((grid.shape[0], 2))
    for centre, weight in zip(target_w, weights):  # a few guides: a loop of whole-grid numpy ops
        correction += np.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))[:, None] * weight
    corrected = field + correction.T.reshape(field.shape).astype(np.float32)
    return corrected


# --------------------------------------------------------------------------- guided registration
def guides_in_working(pair_or_result, source_rc, target_rc) -> tuple[np.ndarray, np.ndarray]:
    """Guide points in the working grid of a prepared pair or a result (their two frames)."""
    return pair_or_result.source_frame.to_working(source_rc), pair_or_result.target_frame.to_working(target_rc)


def guided_run(pipeline, source: np.ndarray, target: np.ndarray, guide_points, guide: GuideConfig | None = None,
               progress=None, name: str | None = None) -> RegistrationResult:
    """``pipeline``'s registration of ``source`` onto ``target`` guided by ``guide_points``
    (``(source_rc, target_rc)``, original pixels): see the module docstring."""
    from .pipeline import warn_if_needs_check
    from .stages.preprocess import level_cache
    from .threads import torch_threads

    source_rc, target_rc = check_guide_points(*guide_points)
    guide = guide or GuideConfig()
    with torch_threads(pipeline.threads) as threads, level_cache():
        automatic = pipeline._run(source, target, progress)
        source_w, target_w = guides_in_working(automatic, source_rc, target_rc)
        result = _guided_from(pipeline, automatic, source_w, target_w, guide, progress)
    result.info["threads"] = threads
    warn_if_needs_check(result.confidence, name)
    return result


def refine_result(result: RegistrationResult, source_points, target_points, *, pipeline=None, config=None,
                  source_image=None, target_image=None, guide: GuideConfig | None = None, progress=None,
                  device=None, threads=None) -> RegistrationResult:
    """``result`` corrected through guide points (original pixels of each image): napari's
    *Refine with landmarks*. The result's working images are used when it holds them (a result
    of this session); otherwise ``source_image`` / ``target_image`` are preprocessed again with
    ``config`` (a loaded transform: its working grid must come out the same)."""
    from .pipeline import Pipeline, warn_if_needs_check
    from .stages.preprocess import level_cache
    from .threads import torch_threads

    source_rc, target_rc = check_guide_points(source_points, target_points)
    guide = guide or GuideConfig()
    if pipeline is None:
        from .config import RegistrationConfig

        if config is None and isinstance(result.info.get("config"), dict):
            config = RegistrationConfig.from_dict(result.info["config"])
        pipeline = Pipeline(config, device=device, threads=threads)
    with torch_threads(pipeline.threads), level_cache():
        if result.working_source is None or result.working_target is None:
            if source_image is None or target_image is None:
                raise HistRegInputError("refining a loaded transform needs the source and target images it was computed from")
            pair = pipeline.prepare(np.asarray(source_image), np.asarray(target_image))
            if tuple(pair.target.shape) != tuple(result.working_field.shape[1:]):
                raise HistRegInputError(
                    f"the images give a working grid of {pair.target.shape}, the transform's is "
                    f"{tuple(result.working_field.shape[1:])}: they are not the images (or settings) it was computed with")
            result = dataclasses.replace(result, working_source=pair.source, working_target=pair.target)
        source_w, target_w = guides_in_working(result, source_rc, target_rc)
        refined = _guided_from(pipeline, result, source_w, target_w, guide, progress)
    warn_if_needs_check(refined.confidence)
    return refined


def _guided_from(pipeline, automatic: RegistrationResult, source_w, target_w, guide: GuideConfig,
                 progress) -> RegistrationResult:
    """The guided result, starting from an automatic one on the same working grid."""
    from .confidence import judge, measure
    from .stages.affine import optimise_affine
    from .stages.nonrigid import dense_nonrigid

    c = pipeline.config
    src, tgt = automatic.working_source, automatic.working_target
    device = pipeline.device
    timings = dict(automatic.timings)
    info = dict(automatic.info)
    matrix = np.asarray(automatic.matrix, dtype=np.float64)
    diagonal = float(np.hypot(*tgt.shape))
    model = model_for(len(source_w), guide.model)
    points_matrix = fit_backward_affine(source_w, target_w, model)
    points_miss = _median_miss(points_matrix, source_w, target_w)
    auto_miss = _median_miss(matrix, source_w, target_w)
    field_before = float(np.median(guide_misses(automatic.working_field, source_w, target_w)))
    restart = auto_miss > max(AFFINE_DISAGREEMENT * diagonal, 3.0 * points_miss)
    start = time.perf_counter()
    if restart:
        # the points say the automatic affine is wrong: start from theirs; the affine stage's
        # NCC optimisation may improve it, but may not take it away from the guides again
        refined = optimise_affine(src, tgt, points_matrix, c.affine, device, progress) if model == "affine" else points_matrix
        matrix = refined if _median_miss(refined, source_w, target_w) <= max(1.5 * points_miss, points_miss + 2.0) else points_matrix
        initial_field = affine_to_field(matrix, tgt.shape)[0].numpy()
    else:
        initial_field = np.asarray(automatic.working_field, dtype=np.float32)
    if restart or guide.reoptimise:
        field = dense_nonrigid(src, tgt, initial_field, c.dense, device, progress,
                               guides=(np.asarray(source_w), np.asarray(target_w), guide.weight))
    else:
        field = initial_field
    misses_optimised = guide_misses(field, source_w, target_w)
    if guide.exact:
        sigma = guide.correction_sigma * max(tgt.shape)
        for _ in range(2):  # bilinear sampling between grid nodes leaves a remainder: a second pass takes it out
            field = exact_correction(field, source_w, target_w, sigma)
    timings["guided"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(timings.get("total", 0.0) + timings["guided"], 4)
    misses = guide_misses(field, source_w, target_w, automatic.source_frame)
    info["guide"] = {
        "points": len(source_w),
        "model": model,
        "restarted_from_points": bool(restart),
        "automatic_affine_median_miss_working_px": round(auto_miss, 3),
        "points_affine_median_miss_working_px": round(points_miss, 3),
        "automatic_field_median_miss_working_px": round(field_before, 3),
        "reoptimised": bool(restart or guide.reoptimise),
        "before_correction_median_miss_working_px": round(float(np.median(misses_optimised)), 3),
        "final_max_miss_source_px": round(float(misses.max()), 4),
        "weight": guide.weight,
        "exact": guide.exact,
    }
    with torch.no_grad():
        info["confidence"] = judge(measure(src, tgt, field, matrix, info.get("initial") if not restart else None, device,
                                           info.get("affine_check") if not restart else None))
    info["matrix"] = matrix
    return RegistrationResult(np.asarray(field, dtype=np.float32), automatic.source_frame, automatic.target_frame, matrix,
                              timings, info, src, tgt)


def _median_miss(matrix, source_w, target_w) -> float:
    """Median distance (working pixels) between where a 2x3 backward affine sends the target
    guides and their source guides."""
    return float(np.median(np.linalg.norm(apply_homogeneous(matrix, target_w) - source_w, axis=1)))


def turned_result(result: RegistrationResult, angle: float = 90.0) -> RegistrationResult:
    """``result`` made to fail, for tests and benchmarks: its map preceded by a turn of ``angle``
    degrees about the working grid's centre (``s = M(R p)``; the field composed the same way)."""
    from .conventions import compose, rotation_about, to_tensor
    from .stages.initial import compose_affine

    h, w = result.working_field.shape[1:]
    turn = rotation_about(((h - 1) / 2, (w - 1) / 2), angle)
    with torch.no_grad():
        field = compose(affine_to_field(turn, (h, w)), to_tensor(result.working_field)[None])[0].numpy()
    matrix = compose_affine(result.matrix, turn)
    return dataclasses.replace(result, working_field=field.astype(np.float32), matrix=matrix, info=dict(result.info))


# --------------------------------------------------------------------------- manual fallback
def points_result(source_shape, target_shape, source_rc, target_rc, model: str = "affine", working_size: int = 1024) -> RegistrationResult:
    """The manual fallback: a transform from the points alone (no image), ``model`` one of
    :data:`MODELS` or ``"tps"`` (a thin-plate spline through the points, needs 3; its affine part
    is the least-squares affine, so it extrapolates affinely away from the points). The field
    lives on a grid whose longer side is ``working_size``; frames as a registration's."""
    from scipy.interpolate import RBFInterpolator

    source, target = check_guide_points(source_rc, target_rc)
    (hs, ws), (ht, wt) = tuple(int(v) for v in source_shape[:2]), tuple(int(v) for v in target_shape[:2])
    scale = min(1.0, working_size / max(hs, ws, ht, wt))
    shape = (max(2, round(max(hs, ht) * scale)), max(2, round(max(ws, wt) * scale)))
    source_frame = Frame((hs, ws), shape, (scale, scale), (0.0, 0.0))
    target_frame = Frame((ht, wt), shape, (scale, scale), (0.0, 0.0))
    source_w, target_w = source_frame.to_working(source), target_frame.to_working(target)
    if model == "tps":
        if len(source) < 3:
            raise HistRegInputError(f"a thin-plate spline needs at least 3 point pairs, got {len(source)}")
        grid = identity_grid(shape, dtype=torch.float64).numpy().reshape(2, -1).T
        mapped = RBFInterpolator(target_w, source_w, kernel="thin_plate_spline", degree=1)(grid)
        field = (mapped - grid).T.reshape((2,) + shape).astype(np.float32)
        matrix = fit_backward_affine(source_w, target_w, "affine")
        used = "tps"
    else:
        used = model_for(len(source), model)
        matrix = fit_backward_affine(source_w, target_w, used)
        field = affine_to_field(matrix, shape)[0].numpy()
    misses = guide_misses(field, source_w, target_w, source_frame)
    info = {"stage": f"points ({used})", "mode": "points", "guide": {"points": len(source), "model": used,
                                                                      "final_max_miss_source_px": round(float(misses.max()), 4)},
            "confidence": {"score": None, "flag": "ok", "weakest": "", "measures": {}, "note": "from points only: no image checked"}}
    return RegistrationResult(field, source_frame, target_frame, matrix, {}, info)
