"""Initial alignment: several hypotheses, each polished by a short affine, one chosen.

The hypotheses: the best few *distinct* peaks of an exhaustive rotation search about the
tissue centroids (global NCC at a coarse size; all angles of a batch warped by one
``grid_sample`` call), the same for the source mirrored (a section mounted face down), the
unrotated start, and a feature-based proposal (:mod:`.features`). All of them go through one
batched short affine optimisation, then the one with the highest local NCC at a finer size is
chosen.

Why not the search's argmax: on sections cut inside the tissue (no outline) or round lesions,
global NCC at 192 px scores the blob's shape, not what is inside it; on the greyscale CLAHE
lung pairs it preferred 161 degrees (NCC 0.65) to the right 0 degrees (0.58). Local NCC
(9 px windows) after the short affine weighs the inner structure: on the 14 real pairs of
``../shared/data`` (training and robustness) it ranked the right hypothesis first on every
pair, global NCC on 12 and normalised gradient fields on 11. The candidates, their scores and
the margin of the chosen one over the best *different* one are kept (``InitialAlignment``,
and ``info["initial"]`` of a result): the margin is part of the result's confidence.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import ALIGN_CORNERS, affine_to_field, identity_grid, rotation_about, warp
from ..conventions import sample as sample_grid
from ..progress import ProgressCallback, report
from ..similarity import ncc
from .preprocess import level_shape, per_run, resample


@dataclasses.dataclass
class InitialAlignmentConfig:
    """``angle_step`` in degrees over the full circle; ``search_size``: longer side of the grid
    the search runs on; ``refine_step``: a finer search around the best angle (0 disables it).
    ``search_method`` of the coarse search: ``"polar"`` scores every angle at once from the two
    images resampled to polar coordinates about their centres (:func:`polar_angle_scores`, the
    default: 30-60x faster than warping, the same peaks, scores within about 0.02 in NCC);
    ``"grid"`` warps the source once per angle, ``batch_size`` angles per ``grid_sample`` call.
    The fine search around each peak (a few angles) always warps."""

    angle_step: float = 1.0
    search_size: int = 192
    search_method: str = "polar"
    batch_size: int = 120
    refine_step: float = 0.25
    use_centroid: bool = True
    #: distinct rotation peaks kept as hypotheses (1: the search's argmax alone, no choice)
    peaks: int = 4
    #: two peaks closer than this (degrees) are one
    peak_separation: float = 20.0
    #: search the mirrored source too (``mirrored_peaks`` hypotheses)
    mirrored: bool = True
    mirrored_peaks: int = 2
    #: a feature-based proposal (OpenCV ORB + RANSAC), and its mirrored twin when ``mirrored``
    features: bool = True
    #: the short affine every hypothesis goes through (batched)
    #: a feature proposal with at least this many RANSAC inliers is chosen whatever the scores
    trust_inliers: int = 40
    polish_levels: tuple[int, ...] = (128, 256)
    polish_iterations: tuple[int, ...] = (40, 20)
    #: the short affine's NCC over the overlap of the images' content only (``AffineConfig.overlap_only``)
    polish_overlap_only: bool = True
    #: longer side and window of the local NCC that chooses
    choice_size: int = 192
    choice_window: int = 9


@dataclasses.dataclass
class InitialAlignment:
    matrix: np.ndarray  # 2x3 backward affine in working pixels (row, col): the start handed to the affine stage
    angle: float  # degrees: the chosen hypothesis' rotation (of the mirrored source when ``mirrored``)
    score: float  # global NCC of the rotation search at that angle (nan for the feature proposal)
    angles: np.ndarray  # the unmirrored search
    scores: np.ndarray
    mirrored: bool = False
    #: every hypothesis: label, angle, mirrored, search score, local NCC after the short affine
    hypotheses: list = dataclasses.field(default_factory=list)
    chosen: str = ""  # the label of the hypothesis whose start is handed on
    #: local NCC of the chosen hypothesis minus that of the best one that ends clearly elsewhere
    #: (:data:`ELSEWHERE`; nan: none)
    margin: float = float("nan")
    #: how many hypotheses ended where the chosen one did (itself included)
    agreeing: int = 1

    def summary(self) -> dict:
        """What ``info["initial"]`` of a result keeps (JSON-ready)."""
        return {
            "chosen": self.chosen, "angle": round(float(self.angle), 3), "mirrored": bool(self.mirrored),
            "margin": None if not np.isfinite(self.margin) else round(float(self.margin), 5),
            "agreeing": int(self.agreeing), "hypotheses": self.hypotheses,
        }


def centroid(image: np.ndarray) -> np.ndarray:
    """``(row, col)`` centre of mass of the tissue (Otsu foreground); the grid centre for a blank image.

    The binary foreground, not the intensities, is weighted: two stains of one section share
    its outline but not its intensity distribution, so intensity weighting shifts the centres
    apart and the rotation search then turns about the wrong point.
    """
    image = np.asarray(image, dtype=np.float64)
    if float(image.max() - image.min()) > 1e-9:
        from skimage.filters import threshold_otsu

        image = (image > threshold_otsu(image)).astype(np.float64)
    total = image.sum()
    if total <= 0:
        return (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    rows = np.arange(image.shape[0])
    cols = np.arange(image.shape[1])
    return np.array([(image.sum(1) * rows).sum() / total, (image.sum(0) * cols).sum() / total])


def _score_angles(source, target, angles_deg, center_t, center_s, config, device, progress, stage_total, done,
                  method=None):
    """Global NCC of ``target`` with ``source`` rotated by each angle about the centres (by
    ``method``, default ``config.search_method``), and the progress count."""
    method = method or config.search_method
    if method == "polar":
        scores = polar_angle_scores(source, target, angles_deg, center_t, center_s)
        done += len(angles_deg)
        report(progress, "initial", done, stage_total, "rotation search")
        return scores, done
    if method != "grid":
        raise ValueError(f"search_method must be 'polar' or 'grid', not {method!r}")
    return _grid_angle_scores(source, target, angles_deg, center_t, center_s, config.batch_size, device, progress,
                              stage_total, done)


#: angular samples of the polar grid come in multiples of this (0.25 degrees: the refine step)
POLAR_ANGLE_QUANTUM = 1440


def polar_angle_scores(source: torch.Tensor, target: torch.Tensor, angles_deg, center_t, center_s) -> np.ndarray:
    """Global NCC over the target grid of ``target`` with ``source`` rotated by each of
    ``angles_deg`` about the centres (``s = R (p - c_t) + c_s``, zeros outside the source), all
    angles at once: the criterion of the grid search without warping once per angle.

    Both images are resampled on a polar grid about their centres (radius out to the target's
    farthest corner, one-pixel rings, about one sample per pixel on the outer ring). A rotation
    about the centres is then a circular shift along the angle axis, so each sum the NCC needs
    (source x target, source x target-grid indicator, source squared x indicator) is a circular
    cross-correlation per ring, weighted by the ring's area and summed over rings before one
    inverse FFT. Angles between samples are read by linear interpolation of those sums."""
    device = target.device
    exact = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    h, w = target.shape[-2:]
    corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], dtype=np.float64)
    radius = float(np.linalg.norm(corners - np.asarray(center_t, dtype=np.float64), axis=1).max()) + 1.0
    n_rings = int(np.ceil(radius))
    n_angles = POLAR_ANGLE_QUANTUM * int(np.ceil(2 * np.pi * radius / POLAR_ANGLE_QUANTUM))
    rings = (torch.arange(n_rings, device=device, dtype=exact) + 0.5) * (radius / n_rings)
    phi = torch.arange(n_angles, device=device, dtype=exact) * (2 * np.pi / n_angles)
    unit_r, unit_c = torch.cos(phi), torch.sin(phi)

    def polar(image, centre):
        ih, iw = image.shape[-2:]
        rows = float(centre[0]) + rings[:, None] * unit_r[None, :]
        cols = float(centre[1]) + rings[:, None] * unit_c[None, :]
        grid = torch.stack((2.0 * cols / max(iw - 1, 1) - 1.0, 2.0 * rows / max(ih - 1, 1) - 1.0), dim=-1)
        return sample_grid(image, grid[None].float())[0]  # (C, rings, angles)

    inside = torch.ones((1, 1, h, w), device=device, dtype=target.dtype)
    tgt_polar = polar(torch.cat([target, inside], dim=1), center_t).to(exact)  # target, its grid's indicator
    src_polar = polar(source, center_s)[0].to(exact)
    weights = (rings * (radius / n_rings) * (2 * np.pi / n_angles))[:, None]  # ring area per sample
    b, m = tgt_polar[0], tgt_polar[1]
    f_a, f_aa = torch.fft.rfft(src_polar, dim=-1), torch.fft.rfft(src_polar * src_polar, dim=-1)
    f_b, f_m = torch.fft.rfft(b * weights, dim=-1), torch.fft.rfft(m * weights, dim=-1)
    # sum_phi A(phi + theta) B(phi) for every theta: ifft(F(A) conj(F(B))), summed over rings first
    sums = torch.fft.irfft(torch.stack([(f_a * f_b.conj()).sum(0), (f_a * f_m.conj()).sum(0),
                                        (f_aa * f_m.conj()).sum(0)]), n=n_angles, dim=-1)
    count, sum_b, sum_bb = float((m * weights).sum()), float((b * weights).sum()), float((b * b * weights).sum())
    position = (np.asarray(angles_deg, dtype=np.float64) % 360.0) / 360.0 * n_angles
    low = np.floor(position).astype(np.int64)
    frac = torch.as_tensor(position - low, device=device, dtype=exact)
    low_t = torch.as_tensor(low % n_angles, device=device)
    at = sums[:, low_t] * (1 - frac) + sums[:, (low_t + 1) % n_angles] * frac
    s_ab, s_a, s_aa = at[0], at[1], at[2]
    num = s_ab - s_a * sum_b / count
    den = torch.sqrt(((s_aa - s_a * s_a / count) * (sum_bb - sum_b * sum_b / count)).clamp_min(0)).clamp_min(1e-6)
    return (num / den).float().cpu().numpy()


def _grid_angle_scores(source, target, angles_deg, center_t, center_s, batch_size, device, progress, stage_total, done):
    """NCC of ``target`` against ``source`` rotated by each angle, warped in batches on ``device``."""
    h, w = target.shape[-2:]
    grid = identity_grid((h, w), device=device)  # (2, H, W)
    rel = grid - torch.as_tensor(center_t, dtype=torch.float32, device=device).view(2, 1, 1)
    scores = []
    for start in range(0, len(angles_deg), batch_size):
        chunk = torch.as_tensor(np.deg2rad(angles_deg[start : start + batch_size]), dtype=torch.float32, device=device)
        cos, sin = torch.cos(chunk).view(-1, 1, 1), torch.sin(chunk).view(-1, 1, 1)
        # s = R (p - c_t) + c_s with R = [[cos, -sin], [sin, cos]] on (row, col)
        rows = cos * rel[0] - sin * rel[1] + float(center_s[0])
        cols = sin * rel[0] + cos * rel[1] + float(center_s[1])
        # pixels_to_normalised's formula, applied to each component before one stack
        grid = torch.stack((2.0 * cols / max(w - 1, 1) - 1.0, 2.0 * rows / max(h - 1, 1) - 1.0), dim=-1)
        warped = sample_grid(source.expand(len(chunk), -1, -1, -1), grid)
        scores.append(ncc(warped, target.expand_as(warped)))
        done += len(chunk)
        report(progress, "initial", done, stage_total, "rotation search")
    return torch.cat(scores).cpu().numpy(), done


def _recentre(source, target, angle, center_t, center_s) -> np.ndarray:
    """Source centre corrected by the residual shift (phase correlation) at ``angle``."""
    from skimage.registration import phase_cross_correlation

    h, w = target.shape[-2:]
    matrix = rotation_about(center_t, angle, translation_rc=np.asarray(center_s) - np.asarray(center_t))
    field = affine_to_field(matrix, (h, w), device=source.device)
    warped = warp(source, field)[0, 0].cpu().numpy()
    shift, _, _ = phase_cross_correlation(target[0, 0].cpu().numpy(), warped, upsample_factor=4, normalization=None)
    # tgt(p) ~ warped(p - shift) = src(R (p - c_t) + c_s - R shift)
    return np.asarray(center_s) - matrix[:, :2] @ np.asarray(shift)


@dataclasses.dataclass
class _Hypothesis:
    label: str
    angle: float
    mirrored: bool
    search_ncc: float  # the rotation search's score (nan for a feature proposal)
    matrix: np.ndarray  # 2x3 backward affine, working pixels
    inliers: int = 0  # RANSAC inliers of a feature proposal


def distinct_peaks(angles: np.ndarray, scores: np.ndarray, count: int, separation: float) -> list[int]:
    """Indices of the ``count`` best scores whose angles are at least ``separation`` degrees
    apart on the circle (greedy, best first)."""
    chosen: list[int] = []
    for index in np.argsort(-np.asarray(scores), kind="stable"):
        gaps = [abs((angles[index] - angles[j] + 180.0) % 360.0 - 180.0) for j in chosen]
        if all(g >= separation for g in gaps):
            chosen.append(int(index))
        if len(chosen) == count:
            break
    return chosen


def mirror_matrix(width: int) -> np.ndarray:
    """2x3 ``(row, col)`` map of the left-right mirror of a grid ``width`` pixels wide (its own inverse)."""
    return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, width - 1.0]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 affine of ``p -> outer(inner(p))``."""
    outer, inner = np.asarray(outer, dtype=np.float64), np.asarray(inner, dtype=np.float64)
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def _refine_offsets(config: InitialAlignmentConfig) -> np.ndarray:
    """Angle offsets of the fine search around a coarse peak (none when ``refine_step`` is 0
    or not finer than ``angle_step``)."""
    if not config.refine_step or config.refine_step >= config.angle_step:
        return np.zeros(0)
    return np.arange(-2 * config.angle_step, 2 * config.angle_step + 1e-9, config.refine_step)


def _search(src, tgt, c_t_small, c_s_small, count, config, device, progress, total, done):
    """Coarse rotation search, then each of the best distinct peaks re-centred and refined:
    ``(angles, scores, [(angle, score, source centre (small grid)) per peak], done)``."""
    angles = np.arange(0.0, 360.0, config.angle_step)
    scores, done = _score_angles(src, tgt, angles, c_t_small, c_s_small, config, device, progress, total, done)
    peaks = distinct_peaks(angles, scores, max(1, count), config.peak_separation)
    refine = _refine_offsets(config)
    found = []
    for index in peaks:
        coarse = float(angles[index])
        if len(refine):
            # Centroids of two stains differ by a few pixels, which tilts the best angle by about a
            # degree; re-centre by phase correlation at the coarse angle, then search finely.
            centre = _recentre(src, tgt, coarse, c_t_small, c_s_small)
            fine = coarse + refine
            # The few fine angles are warped (the pixel sums themselves): the polar scores differ
            # from them by up to 0.02, enough to move a fine peak by a quarter degree.
            fine_scores, done = _score_angles(src, tgt, fine, c_t_small, centre, config, device, progress, total, done,
                                              method="grid")
            k = int(np.argmax(fine_scores))
            found.append((float(fine[k] % 360.0), float(fine_scores[k]), centre))
        else:
            found.append((coarse, float(scores[index]), np.asarray(c_s_small, dtype=np.float64)))
    return angles, scores, found, done


def content_box(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the bounding box of the non-zero pixels: the image inside the zero
    padding that preprocessing adds to reach the working grid."""
    image = np.asarray(image)
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    box = np.zeros(image.shape, dtype=bool)
    if rows.size and cols.size:
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return box


def _inner_windows(valid: torch.Tensor, window: int) -> torch.Tensor:
    """1 where a ``window`` x ``window`` neighbourhood lies wholly inside ``valid`` (N, 1, H, W)."""
    pad = window // 2
    outside = F.max_pool2d(1.0 - valid, window, stride=1, padding=pad)
    return 1.0 - outside


def _local_scores(source, target, matrices, config, device) -> np.ndarray:
    """Local NCC (``choice_window``) of ``target`` with ``source`` warped by each matrix, all at
    the ``choice_size`` grid in one batch, counted only in windows that lie inside both images
    (the source's content warped, the target's content; the rest scores 0, so a placement that
    overlaps less still scores less). Without that, the step from an image's content to the
    zero padding or to outside the source, which in a crop cut inside the tissue is an edge as
    strong as any, makes every placement that lines the two frames up look good."""
    from ..conventions import affine_pixels_to_normalised, normalised_affine_grid
    from ..similarity import local_ncc_map

    h, w = target.shape
    shape = level_shape((h, w), config.choice_size)
    src = resample(source, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
    tgt = resample(target, shape, device=device, align_corners=ALIGN_CORNERS)[None, None]

    def box(image):
        return per_run(image, "content box", lambda im: content_box(im).astype(np.float32))

    src_box = resample(box(source), shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
    tgt_box = resample(box(target), shape, device=device, align_corners=ALIGN_CORNERS)[None, None]
    theta = torch.tensor(np.stack([affine_pixels_to_normalised(m, (h, w)) for m in matrices]), dtype=torch.float32, device=device)
    grid = normalised_affine_grid(theta, shape)
    n = len(matrices)
    warped = sample_grid(torch.cat([src, src_box], dim=1).expand(n, -1, -1, -1), grid)
    valid = ((warped[:, 1:] > 0.99) & (tgt_box > 0.99)).to(warped.dtype)
    inside = _inner_windows(valid, config.choice_window)
    cc = local_ncc_map(warped[:, :1], tgt.expand(n, -1, -1, -1), config.choice_window)
    return (cc * inside).mean(dim=(1, 2, 3)).cpu().numpy()


#: hypotheses ending further apart than this share of the diagonal are rival placements (the margin's)
ELSEWHERE = 0.05


def same_place(a: np.ndarray, b: np.ndarray, shape, tolerance: float = 0.02) -> bool:
    """Whether two 2x3 backward affines send the grid's points to within ``tolerance`` of the
    diagonal of each other (median over a coarse grid)."""
    h, w = shape
    rows, cols = np.mgrid[0 : h : max(1, h // 16), 0 : w : max(1, w // 16)]
    points = np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size)], axis=1)
    gap = np.linalg.norm(points @ np.asarray(a).T - points @ np.asarray(b).T, axis=1)
    return bool(np.median(gap) <= tolerance * np.hypot(h, w))


def initial_alignment(
    source: np.ndarray,
    target: np.ndarray,
    config: InitialAlignmentConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> InitialAlignment:
    """The hypotheses of the module docstring for ``source`` onto ``target`` (same grid),
    polished together by a short affine, the best by local NCC chosen."""
    from .affine import AffineConfig, optimise_affines

    config = config or InitialAlignmentConfig()
    device = device or torch.device("cpu")
    h, w = target.shape
    small_shape = level_shape((h, w), config.search_size)
    src = resample(source, small_shape, device=device)[None, None]
    tgt = resample(target, small_shape, device=device)[None, None]
    # Centres in working pixels; mapped into the small grid with the same pixel-centre rule.
    c_t = centroid(target) if config.use_centroid else (np.array([h, w]) - 1) / 2
    c_s = centroid(source) if config.use_centroid else (np.array([h, w]) - 1) / 2
    ratio = np.array([small_shape[0] / h, small_shape[1] / w])
    c_t_small = (c_t + 0.5) * ratio - 0.5
    c_s_small = (c_s + 0.5) * ratio - 0.5
    single = config.peaks <= 1 and not config.mirrored and not config.features

    searches = [(False, config.peaks)] + ([(True, config.mirrored_peaks)] if config.mirrored and config.mirrored_peaks > 0 else [])
    n_angles, n_refine = len(np.arange(0.0, 360.0, config.angle_step)), len(_refine_offsets(config))
    total = sum(n_angles + n_refine * max(1, k) for _, k in searches)
    done = 0
    candidates: list[_Hypothesis] = []
    angles = scores = None
    flip = mirror_matrix(w)
    for mirrored, count in searches:
        search_src = torch.flip(src, dims=(-1,)) if mirrored else src
        centre_small = np.array([c_s_small[0], small_shape[1] - 1 - c_s_small[1]]) if mirrored else c_s_small
        a, sc, found, done = _search(search_src, tgt, c_t_small, centre_small, count, config, device, progress, total, done)
        if not mirrored:
            angles, scores = a, sc
        for k, (angle, score, centre) in enumerate(found):
            centre_working = (np.asarray(centre) + 0.5) / ratio - 0.5
            matrix = rotation_about(c_t, angle, translation_rc=centre_working - c_t)
            if mirrored:  # the search ran on the mirrored source: sample it through the mirror
                matrix = compose_affine(flip, matrix)
            candidates.append(_Hypothesis(f"{'mirrored ' if mirrored else ''}rotation peak {k + 1}", angle, mirrored, score, matrix))
    if single:
        only = candidates[0]
        return InitialAlignment(matrix=only.matrix, angle=only.angle, score=only.search_ncc, angles=angles, scores=scores,
                                hypotheses=[{"label": only.label, "angle": round(only.angle, 3), "mirrored": False,
                                             "search_ncc": round(only.search_ncc, 5), "local_ncc": None}], chosen=only.label)
    # the unrotated start: sections are usually mounted the same way up
    candidates.append(_Hypothesis("unrotated", 0.0, False, float(scores[0]), rotation_about(c_t, 0.0, translation_rc=c_s - c_t)))
    if config.features:
        from . import features

        if features.available():
            proposal = features.feature_proposal(source, target)
            if proposal is not None:
                candidates.append(_Hypothesis(f"features ({proposal['inliers']} inliers)", _angle_of(proposal["matrix"]), False,
                                              float("nan"), proposal["matrix"], proposal["inliers"]))
            if config.mirrored:
                proposal = features.feature_proposal(np.ascontiguousarray(source[:, ::-1]), target)
                if proposal is not None:
                    candidates.append(_Hypothesis(f"mirrored features ({proposal['inliers']} inliers)",
                                                  _angle_of(proposal["matrix"]), True, float("nan"),
                                                  compose_affine(flip, proposal["matrix"]), proposal["inliers"]))
    starts = np.stack([c.matrix for c in candidates])
    polish = AffineConfig(levels=config.polish_levels, iterations=config.polish_iterations, overlap_only=config.polish_overlap_only)
    with torch.enable_grad():
        polished = optimise_affines(source, target, starts, polish, device)
    with torch.no_grad():
        local_polished, local_start = np.split(_local_scores(source, target, np.concatenate([polished, starts]), config, device), 2)
    # The short affine follows global NCC, which an inner crop (tissue to every edge, no outline)
    # can pull away from a right start: each hypothesis is judged by the better of its start and
    # its polished matrix, and carries that one on.
    unpolished = local_start > local_polished
    polished = np.where(unpolished[:, None, None], starts, polished)
    local = np.maximum(local_polished, local_start)
    best = int(np.argmax(local))
    # A feature match with many RANSAC inliers is evidence no similarity score can outweigh:
    # chance consensus of that many matches does not happen, while local NCC can still prefer
    # a wrong placement whose tissue outline overlaps better (a crop turned by 137 degrees, 252
    # inliers, lost to a mirrored blob by local NCC 0.08 to 0.14 in benchmarks/validation.py).
    trusted = [k for k, c in enumerate(candidates) if c.inliers >= config.trust_inliers]
    if trusted:
        best = max(trusted, key=lambda k: candidates[k].inliers)
    others = [k for k in range(len(candidates)) if not same_place(polished[k], polished[best], (h, w))]
    # The margin (a confidence measure) is taken over the hypotheses that ended clearly elsewhere:
    # on a stretched pair a rigid peak polished by the short affine ends a few percent of the
    # diagonal from the feature match that found the stretch, a worse fit of the same answer,
    # not a rival placement.
    elsewhere = [k for k in others if not same_place(polished[k], polished[best], (h, w), ELSEWHERE)]
    margin = float(local[best] - max(local[k] for k in elsewhere)) if elsewhere else float("nan")
    # What the affine stage starts from: of the hypotheses that ended where the chosen one did,
    # the rotation search's best-scored start, unpolished (the short affine judges, the affine
    # stage aligns: where the search's argmax was right this is exactly the start it always
    # had); a group without a search score hands a trusted feature match's own matrix, anything
    # else its polished one (a weak match scored well only once polished).
    group = [k for k in range(len(candidates)) if k not in others]
    searched = [k for k in group if np.isfinite(candidates[k].search_ncc)]
    handed = candidates[max(searched, key=lambda k: candidates[k].search_ncc) if searched else best]
    trusted_best = candidates[best].inliers >= config.trust_inliers
    start = handed.matrix if searched or trusted_best else polished[best]
    hypotheses = [
        {"label": c.label, "angle": round(float(c.angle), 3), "mirrored": bool(c.mirrored),
         "search_ncc": None if not np.isfinite(c.search_ncc) else round(float(c.search_ncc), 5),
         "local_ncc": round(float(local[k]), 5),
         "agrees": k in group,  # ended where the decisive one did
         "elsewhere": k in elsewhere,  # ended clearly elsewhere: a rival placement
         "decisive": k == best}  # the highest local NCC, or the trusted feature match
        for k, c in enumerate(candidates)
    ]
    return InitialAlignment(
        matrix=np.asarray(start, dtype=np.float64), angle=float(handed.angle), score=float(handed.search_ncc), angles=angles,
        scores=scores, mirrored=bool(handed.mirrored), hypotheses=hypotheses, chosen=handed.label, margin=margin,
        agreeing=len(candidates) - len(others),
    )


def _angle_of(matrix: np.ndarray) -> float:
    """Rotation (degrees, ``[0, 360)``) of a 2x3 ``(row, col)`` affine in :func:`rotation_about`'s sense."""
    m = np.asarray(matrix, dtype=np.float64)
    return float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])) % 360.0)
