"""Non-rigid stage: two engines on a resolution pyramid.

* :func:`dense_nonrigid`: instance optimisation of a dense displacement field (Adam, local NCC
  + diffusion), the accuracy reference of DeeperHistReg.
* :func:`patch_nonrigid`: DeepHistReg's patch-group engine. Per level and iteration the source
  is warped with the current field, cut into overlapping patches (stride = half the patch),
  pushed through a *predictor* in groups, and the patch fields are blended back into one field
  that is composed with the current one. The predictor is any callable
  ``(source_patches, target_patches) -> fields`` on ``(B, 1, P, P)`` tensors returning
  ``(B, 2, P, P)`` backward fields in patch pixels; :class:`PatchInstanceOptimiser` is the
  optimisation predictor, the learned network drops into the same slot.

All fields here are backward, in pixels, channel 0 = rows (see ``conventions``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import ALIGN_CORNERS, compose, resize_field, to_tensor, warp
from ..progress import ProgressCallback, report
from ..similarity import (
    curvature,
    diffusion,
    fixed_local_stats,
    folding,
    jacobian_determinant,
    landmark_term,
    local_ncc,
    local_ncc_to_fixed,
)
from .preprocess import level_shape as _level_shape
from .preprocess import resample


def _rescale_field(field: torch.Tensor, shape) -> torch.Tensor:
    """A pixel field resized between pyramid levels, end-point aligned as the levels' images are."""
    return resize_field(field, tuple(shape), align_corners=ALIGN_CORNERS)


# --------------------------------------------------------------------------- dense engine
@dataclasses.dataclass
class DenseConfig:
    """``levels``: longer side per pyramid level, coarse to fine; ``iterations`` per level;
    ``learning_rate`` in level pixels per Adam step; ``regularisation``: weight of diffusion
    (squared strain) on the dense residual; ``window``: local NCC window in level pixels.
    ``regularisation`` and ``control_spacing`` may be one value or one per level; a
    ``control_spacing`` above 1 optimises the dense residual on a coarser grid (bicubic
    upsampling).

    The residual field is a sum of parts optimised together at every level: the dense part
    and one coarse, B-spline-like part per entry of ``coarse_spacings`` (a grid with that
    spacing in level pixels, bicubic upsampling; ``()`` switches them off). The coarse parts
    carry smooth, large warps and extrapolate them along straight edges, where similarity
    cannot place a point (aperture problem). Their diffusion weight is
    ``coarse_regularisation * (1 - NCC)``, NCC being the global correlation of the warped
    source with the target, re-estimated every iteration: the residual dissimilarity stands
    for the noise of the data term. Two renderings of one image match almost perfectly
    (1 - NCC ~ 0.001 once aligned), so their coarse parts are nearly free (weight ~0.1);
    cross-stain pairs leave 0.14-0.3 of the variance unexplained, so the coarse parts are held
    at 14-30 times the dense weight and these pairs end where the dense part alone takes them.
    ``coarse_learning_rate``: Adam step of the coarse parts (level pixels).

    ``fold_weight``: weight of :func:`~napari_histreg.similarity.folding` of the whole field
    (zero where the map keeps a fifth of the local area, growing towards a fold): a section
    does not fold onto itself, yet on noisy greyscale CLAHE pairs the local NCC pulled about 1%
    of the tissue into folds. 0 switches it off."""

    # Chosen on the training and synthetic pairs together, never one of them: the measurements
    # are in benchmarks/README.md, "Settings and how they were chosen".
    levels: tuple[int, ...] = (192, 384, 768)
    iterations: tuple[int, ...] = (60, 40, 20)
    learning_rate: float = 0.3
    regularisation: float = 1.0
    window: int = 7
    control_spacing: int = 1
    coarse_spacings: tuple[int, ...] = (24, 48)
    coarse_regularisation: float = 100.0
    coarse_learning_rate: float = 0.1
    # Chosen on the 17 landmark pairs together (robustness MMrTRE 0.00396 -> 0.00369, training
    # and synthetic within 1e-4, folds 1% -> 0.05% of the tissue) with the validation set unchanged
    # (AMrTRE 0.00187 both): benchmarks/README.md, "fold_weight".
    fold_weight: float = 10.0


def _per_level(value, n: int) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"expected one value per pyramid level ({n}), got {values}")
    return values


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D bicubic upsampling with end-point alignment, exactly
    what ``F.interpolate(..., mode="bicubic", align_corners=True)`` does along one axis."""
    eye = torch.eye(n_in, device=device)[None, :, :, None]
    out = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=True)
    return out[0, :, :, 0].T.contiguous()


def _upsample_params(params: torch.Tensor, shape) -> torch.Tensor:
    """Bicubic upsampling (``align_corners=True``) of a ``(B, C, h, w)`` grid to ``shape``, as
    two small matrix products: separable and about 10x cheaper than ``F.interpolate`` forward
    and backward on the CPU, which matters because it runs every iteration."""
    h, w = params.shape[-2:]
    if (h, w) == tuple(shape):
        return params
    rows = _bicubic_matrix(h, shape[0], params.device).to(params.dtype)
    cols = _bicubic_matrix(w, shape[1], params.device).to(params.dtype)
    return torch.matmul(torch.matmul(rows, params), cols.T)


@functools.lru_cache(maxsize=64)
def _strain_matrices(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^T M, (D M)^T (D M))`` for the bicubic upsampling ``M`` of :func:`_bicubic_matrix`
    and the first difference ``D`` along the upsampled axis, both ``(n_in, n_in)``."""
    m = _bicubic_matrix(n_in, n_out, device)
    d = m[1:] - m[:-1]
    return (m.T @ m).contiguous(), (d.T @ d).contiguous()


def _grid_diffusion(params: torch.Tensor, shape) -> torch.Tensor:
    """:func:`~napari_histreg.similarity.diffusion` of ``_upsample_params(params, shape)``
    (per batch item), from quadratic forms on the small grid: the squared differences of the
    upsampled field summed exactly, without forming it (and without its backward pass)."""
    h, w = params.shape[-2:]
    rows_mm, rows_dd = (t.to(params.dtype) for t in _strain_matrices(h, shape[0], params.device))
    cols_mm, cols_dd = (t.to(params.dtype) for t in _strain_matrices(w, shape[1], params.device))
    c = params.shape[1]
    along_rows = (params * (rows_dd @ params @ cols_mm)).sum(dim=(1, 2, 3)) / (c * (shape[0] - 1) * shape[1])
    along_cols = (params * (rows_mm @ params @ cols_dd)).sum(dim=(1, 2, 3)) / (c * shape[0] * (shape[1] - 1))
    return along_rows + along_cols


def _carry(params: torch.Tensor | None, prev_shape, lshape, pshape, device) -> torch.Tensor:
    """Parameters of the previous level (a grid that upsamples to ``prev_shape``) on the grid
    ``pshape`` of the level ``lshape``; zeros at the first level."""
    if params is None:
        return torch.zeros((1, 2) + tuple(pshape), device=device)
    dense = _rescale_field(_upsample_params(params.detach(), prev_shape), lshape)
    if tuple(pshape) != tuple(lshape):
        dense = F.interpolate(dense, size=tuple(pshape), mode="bilinear", align_corners=True)
    return dense


def _coarse_spacings(value) -> tuple[int, ...]:
    """``DenseConfig.coarse_spacings`` as a tuple of positive spacings (one value, a list from a
    JSON config, or ``None`` / ``0`` / ``()`` for no coarse part)."""
    if not value:
        return ()
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if any(v <= 0 for v in values):
        raise ValueError(f"coarse_spacings must be positive level pixels, got {values}")
    return values


def _centred(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` minus its mean, and the sum of squares of that: the fixed image's part of
    :func:`_dissimilarity`, computed once per level rather than every iteration."""
    with torch.no_grad():
        db = b - b.mean()
        return db, (db * db).sum()


def _dissimilarity(a: torch.Tensor, b: torch.Tensor, b_centred: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """``1 - NCC`` of two images (global), the share of ``b``'s variance that ``a`` leaves
    unexplained by a linear intensity map: the noise estimate that scales the coarse weight.
    ``b_centred``: :func:`_centred` of ``b`` when already computed."""
    db, bb = b_centred if b_centred is not None else _centred(b)
    with torch.no_grad():
        da = a - a.mean()
        num = (da * db).sum()
        den = torch.sqrt((da * da).sum() * bb).clamp_min(1e-6)
        return max(0.0, 1.0 - float(num / den))


def dense_nonrigid(
    source: np.ndarray,
    target: np.ndarray,
    initial_field: np.ndarray,
    config: DenseConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
    initial_residual: np.ndarray | None = None,
    guides: tuple | None = None,
) -> np.ndarray:
    """Refine ``initial_field`` (``(2, H, W)``) by optimising an additive residual: a dense
    part plus a coarse part whose regularisation follows the residual dissimilarity (see
    :class:`DenseConfig`).

    ``initial_residual`` (``(2, H, W)``, optional) is where the dense part starts, e.g. a
    network's non-rigid field minus ``initial_field``: unlike ``initial_field`` it is
    regularised, so the optimisation can smooth or undo it.

    ``guides``: ``(source_points, target_points, weight)``, corresponding ``(N, 2)`` points on
    the working grid that the field should bring together: ``weight`` times their mean squared
    miss in working pixels joins the loss (:func:`~napari_histreg.similarity.landmark_term`)."""
    config = config or DenseConfig()
    device = device or torch.device("cpu")
    shape = target.shape
    init = to_tensor(initial_field, device=device)[None]
    with torch.no_grad():  # the affine part's orientation: a mirror is not a fold
        orientation = float(torch.sign(jacobian_determinant(init).median()))
    residual = None if initial_residual is None else to_tensor(initial_residual, device=device)[None]
    coarse_spacings = _coarse_spacings(config.coarse_spacings)
    coarse: list = [None] * len(coarse_spacings)
    prev_shape = None if residual is None else tuple(shape)
    total = int(sum(config.iterations))
    done = 0
    n_levels = len(config.levels)
    spacings = _per_level(config.control_spacing, n_levels)
    weights = _per_level(config.regularisation, n_levels)
    for size, iterations, spacing, weight in zip(config.levels, config.iterations, spacings, weights):
        lshape = _level_shape(shape, size)
        if guides is not None:
            guide_source, guide_target, guide_weight, to_working = _guides_at_level(guides, shape, lshape, device)
        src = resample(source, lshape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        tgt = resample(target, lshape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        init_l = _rescale_field(init, lshape)
        pshape = tuple(max(2, round(n / spacing)) for n in lshape)
        residual = _carry(residual, prev_shape, lshape, pshape, device).requires_grad_(True)
        for k, grid_spacing in enumerate(coarse_spacings):
            cshape = tuple(max(4, round(n / grid_spacing)) for n in lshape)
            coarse[k] = _carry(coarse[k], prev_shape, lshape, cshape, device).requires_grad_(True)
        prev_shape = lshape
        groups = [{"params": [residual]}]
        if coarse:
            groups.append({"params": coarse, "lr": config.coarse_learning_rate})
            tgt_centred = _centred(tgt)
        optimiser = torch.optim.Adam(groups, lr=config.learning_rate)
        tgt_stats = fixed_local_stats(tgt, config.window)  # the target's half of the local NCC, once per level
        for _ in range(iterations):
            optimiser.zero_grad()
            dense = _upsample_params(residual, lshape)
            field = init_l + dense
            for c in coarse:
                field = field + _upsample_params(c, lshape)
            warped = warp(src, field)
            loss = -local_ncc_to_fixed(warped, tgt_stats, config.window).mean() + weight * diffusion(dense).mean()
            if config.fold_weight:
                loss = loss + config.fold_weight * folding(field, orientation).mean()
            if guides is not None:
                loss = loss + guide_weight * landmark_term(field, guide_source, guide_target, to_working)
            if coarse:
                coarse_weight = config.coarse_regularisation * _dissimilarity(warped, tgt, tgt_centred)
                loss = loss + coarse_weight * sum(_grid_diffusion(c, lshape).mean() for c in coarse)
            loss.backward()
            optimiser.step()
            done += 1
            if done % 10 == 0 or done == total:
                report(progress, "nonrigid", done, total, f"level {lshape[0]}x{lshape[1]}")
    out = _upsample_params(residual.detach(), prev_shape)
    for c in coarse:
        out = out + _upsample_params(c.detach(), prev_shape)
    field = init + _rescale_field(out, shape)
    return field[0].cpu().numpy()


def _guides_at_level(guides, shape, lshape, device):
    """Guide points (working pixels) in a pyramid level's pixels: the levels are resampled
    end-point aligned (``ALIGN_CORNERS``), so a coordinate scales by ``(n_l - 1) / (n - 1)``."""
    source, target, weight = guides
    factor = torch.tensor([(lshape[0] - 1) / max(1, shape[0] - 1), (lshape[1] - 1) / max(1, shape[1] - 1)],
                          dtype=torch.float32, device=device)
    def as_level(points):
        return to_tensor(points, device=device).reshape(-1, 2) * factor

    return as_level(source), as_level(target), float(weight), 1.0 / factor


# --------------------------------------------------------------------------- patch engine
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class PatchConfig:
    """``levels``: longer side per level; ``iterations`` of warp-predict-compose per level;
    ``patch_size`` in level pixels (stride is half of it); ``group_size``: patches per
    predictor call."""

    levels: tuple[int, ...] = (192, 384, 768)
    iterations: tuple[int, ...] = (2, 2, 1)
    patch_size: int = 128
    group_size: int = 32


@dataclasses.dataclass
class PatchInstanceOptimiser:
    """Predictor that optimises one smooth field per patch, all patches of a group at once.

    The field lives on a coarse control grid (``patch_size / control_spacing``) upsampled
    bilinearly, which keeps it smooth; loss = -local NCC + ``regularisation`` * curvature.
    """

    iterations: int = 40
    learning_rate: float = 0.3
    regularisation: float = 10.0
    control_spacing: int = 8
    window: int = 7

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, _, p, _ = source.shape
        n = max(2, p // self.control_spacing)
        params = torch.zeros((b, 2, n, n), device=source.device, requires_grad=True)
        optimiser = torch.optim.Adam([params], lr=self.learning_rate)
        with torch.enable_grad():
            for _ in range(self.iterations):
                optimiser.zero_grad()
                field = F.interpolate(params, size=(p, p), mode="bilinear", align_corners=True)
                warped = warp(source, field)
                loss = (-local_ncc(warped, target, self.window) + self.regularisation * curvature(params)).sum()
                loss.backward()
                optimiser.step()
        return F.interpolate(params.detach(), size=(p, p), mode="bilinear", align_corners=True)


def blending_window(size: int, device=None) -> torch.Tensor:
    """``(size, size)`` weights peaking at the patch centre and vanishing at its border.

    Overlapping patches with stride ``size / 2`` blended by these weights give a seamless
    field: patch borders, where the predictor sees least context, count least.
    """
    ramp = torch.hann_window(size, periodic=False, device=device) + 1e-3
    return ramp[:, None] * ramp[None, :]


def unfold_patches(image: torch.Tensor, patch: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(1, C, H, W)`` to ``(L, C, P, P)`` overlapping patches; the image is padded by
    ``stride / 2`` plus what the stride needs so that every pixel is near some patch centre."""
    _, c, h, w = image.shape
    margin = stride // 2
    pad_h = (-(h + 2 * margin - patch)) % stride
    pad_w = (-(w + 2 * margin - patch)) % stride
    padded = F.pad(image, (margin, margin + pad_w, margin, margin + pad_h))
    cols = F.unfold(padded, kernel_size=patch, stride=stride)  # (1, C*P*P, L)
    n = cols.shape[-1]
    return cols[0].T.reshape(n, c, patch, patch), padded.shape[-2:]


def fold_patches(patches: torch.Tensor, padded_shape, shape, patch: int, stride: int) -> torch.Tensor:
    """Blend ``(L, C, P, P)`` patches back into ``(1, C, H, W)`` with :func:`blending_window`."""
    n, c = patches.shape[:2]
    window = blending_window(patch, device=patches.device).to(patches.dtype)
    weighted = (patches * window).reshape(n, c * patch * patch).T[None]
    total = F.fold(weighted, output_size=tuple(padded_shape), kernel_size=patch, stride=stride)
    weights = F.fold(
        window.reshape(1, patch * patch, 1).expand(1, -1, n), output_size=tuple(padded_shape), kernel_size=patch, stride=stride
    )
    out = total / weights.clamp_min(1e-8)
    margin = stride // 2
    return out[..., margin : margin + shape[0], margin : margin + shape[1]]


def patch_nonrigid(
    source: np.ndarray,
    target: np.ndarray,
    initial_field: np.ndarray,
    predictor: Predictor | None = None,
    config: PatchConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """Patch-group non-rigid registration composed onto ``initial_field`` (``(2, H, W)``)."""
    config = config or PatchConfig()
    predictor = predictor or PatchInstanceOptimiser()
    device = device or torch.device("cpu")
    shape = target.shape
    field = to_tensor(initial_field, device=device)[None]
    patch, stride = config.patch_size, config.patch_size // 2
    plan = []
    for size, iterations in zip(config.levels, config.iterations):
        lshape = _level_shape(shape, size)
        n_patches = unfold_patches(torch.zeros((1, 1) + lshape), patch, stride)[0].shape[0]
        plan.append((lshape, iterations, n_patches))
    total = sum(it * -(-n // config.group_size) for _, it, n in plan)
    done = 0
    for lshape, iterations, _ in plan:
        src = resample(source, lshape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        tgt = resample(target, lshape, device=device, align_corners=ALIGN_CORNERS)[None, None]
        field_l = _rescale_field(field, lshape)
        tgt_patches, padded_shape = unfold_patches(tgt, patch, stride)
        for _ in range(iterations):
            warped = warp(src, field_l)
            src_patches, _ = unfold_patches(warped, patch, stride)
            updates = []
            for start in range(0, src_patches.shape[0], config.group_size):
                stop = start + config.group_size
                updates.append(predictor(src_patches[start:stop], tgt_patches[start:stop]).detach())
                done += 1
                report(progress, "nonrigid", done, total, f"level {lshape[0]}x{lshape[1]}")
            update = fold_patches(torch.cat(updates), padded_shape, lshape, patch, stride)
            field_l = compose(update, field_l)
        field = field_l  # the next level resizes it directly; no round trip through full size
    return _rescale_field(field, shape)[0].cpu().numpy()
