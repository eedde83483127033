"""Similarity measures and regularisers on ``(B, C, H, W)`` tensors.

Each returns one value per batch item (shape ``(B,)``) so that a batch of independent problems
(patches, angles) can be optimised together: the sum of per-item losses has independent
gradients per item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conventions import sample_field_at_points, to_tensor, warp

_EPS = 1e-6


def warped_ncc(source, target, field, device=None) -> float:
    """Global NCC of ``source`` warped by the backward pixel ``field`` ``(2, H, W)`` with
    ``target`` ``(H, W)`` (arrays or tensors, one working grid): how well a transform aligns
    the pair, the score by which ``hybrid`` and ``learned`` modes accept a network's proposal."""
    device = torch.device(device or "cpu")
    src = to_tensor(source, device=device)[None, None]
    tgt = to_tensor(target, device=device)[None, None]
    with torch.no_grad():
        return float(ncc(warp(src, to_tensor(field, device=device)[None]), tgt)[0])


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Global normalised cross-correlation per batch item, in ``[-1, 1]``.

    ``mask`` (broadcastable to ``a``) weights the pixels; ``None`` means all pixels count.
    """
    dims = tuple(range(1, a.ndim))
    shape = (-1,) + (1,) * (a.ndim - 1)
    if mask is None:  # the same numbers as an all-ones mask, without its four full-size products
        count = a[0].numel()
        da = a - (a.sum(dim=dims) / count).view(shape)
        db = b - (b.sum(dim=dims) / count).view(shape)
    else:
        mask = mask.expand_as(a)
        weight = mask.sum(dim=dims).clamp_min(_EPS)
        mean_a = (a * mask).sum(dim=dims) / weight
        mean_b = (b * mask).sum(dim=dims) / weight
        da = (a - mean_a.view(shape)) * mask
        db = (b - mean_b.view(shape)) * mask
    num = (da * db).sum(dim=dims)
    den = torch.sqrt((da * da).sum(dim=dims) * (db * db).sum(dim=dims)).clamp_min(_EPS)
    return num / den


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    # Separable box filter; zero padding is fine because every statistic is divided by the
    # same window mean, and the borders are background anyway.
    c = x.shape[1]
    pad = window // 2
    k_row = torch.full((c, 1, window, 1), 1.0 / window, device=x.device, dtype=x.dtype)
    k_col = torch.full((c, 1, 1, window), 1.0 / window, device=x.device, dtype=x.dtype)
    x = F.conv2d(x, k_row, padding=(pad, 0), groups=c)
    return F.conv2d(x, k_col, padding=(0, pad), groups=c)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, box=None) -> torch.Tensor:
    """Mean squared local NCC over ``window x window`` neighbourhoods, per batch item, in ``[0, 1]``.

    The statistics of ``a``, ``b``, ``a*a``, ``b*b`` and ``a*b`` go through one batched box
    filter (5 channels in one conv) because that is the hot path of the non-rigid stage.
    ``box``: the box filter ``(x, window) -> means`` (default: convolutions).
    """
    cc = local_ncc_map(a, b, window, box)
    return cc.mean(dim=tuple(range(1, cc.ndim)))


def local_ncc_map(a: torch.Tensor, b: torch.Tensor, window: int = 9, box=None) -> torch.Tensor:
    """The squared local NCC at every pixel (what :func:`local_ncc` averages), shaped like ``a``."""
    stacked = torch.cat((a, b, a * a, b * b, a * b), dim=1)
    means = (box or _box_mean)(stacked, window)
    c = a.shape[1]
    mu_a, mu_b, mu_aa, mu_bb, mu_ab = torch.split(means, c, dim=1)
    cov = mu_ab - mu_a * mu_b
    var_a = (mu_aa - mu_a * mu_a).clamp_min(0)
    var_b = (mu_bb - mu_b * mu_b).clamp_min(0)
    return cov * cov / (var_a * var_b + 1e-5)


def diffusion(field: torch.Tensor) -> torch.Tensor:
    """Mean squared first differences of a ``(B, 2, H, W)`` field, per batch item (its gradient
    written out: :class:`_Diffusion`)."""
    return _Diffusion.apply(field)


class _Diffusion(torch.autograd.Function):
    # The gradient of a sum of squared differences is the differences themselves, scattered
    # back with opposite signs: one zero tensor and four slice updates instead of autograd's
    # chain (a zero tensor and a copy per slice and difference), a fifth of the dense
    # optimisation's time at its finest level went to this and the fold term.
    @staticmethod
    def forward(ctx, field):
        d_row = field[:, :, 1:, :] - field[:, :, :-1, :]
        d_col = field[:, :, :, 1:] - field[:, :, :, :-1]
        ctx.save_for_backward(d_row, d_col)
        return d_row.pow(2).mean(dim=(1, 2, 3)) + d_col.pow(2).mean(dim=(1, 2, 3))

    @staticmethod
    def backward(ctx, grad):
        d_row, d_col = ctx.saved_tensors
        scale = grad.view(-1, 1, 1, 1) * 2.0
        g_row = d_row * (scale / d_row[0].numel())
        g_col = d_col * (scale / d_col[0].numel())
        out = torch.zeros(d_row.shape[:2] + (d_row.shape[2] + 1, d_row.shape[3]), dtype=d_row.dtype, device=d_row.device)
        out[:, :, 1:, :] += g_row
        out[:, :, :-1, :] -= g_row
        out[:, :, :, 1:] += g_col
        out[:, :, :, :-1] -= g_col
        return out


def jacobian_determinant(field: torch.Tensor) -> torch.Tensor:
    """``(B, H-1, W-1)`` Jacobian determinant of the map ``p -> p + field(p)`` of a ``(B, 2, H, W)``
    pixel field (channel 0 = rows), from forward differences.

    Convention: fields are backward and in pixels (:mod:`napari_histreg.conventions`)."""
    d_row = field[:, :, 1:, :-1] - field[:, :, :-1, :-1]  # d(u_r, u_c) / d row
    d_col = field[:, :, :-1, 1:] - field[:, :, :-1, :-1]  # d(u_r, u_c) / d col
    return (1.0 + d_row[:, 0]) * (1.0 + d_col[:, 1]) - d_col[:, 0] * d_row[:, 1]


def folding(field: torch.Tensor, orientation: float = 1.0, floor: float = 0.2) -> torch.Tensor:
    """Per batch item, the mean of ``relu(floor - det J)^2`` over the grid, ``det J`` the
    :func:`jacobian_determinant` times ``orientation`` (the sign of the affine part's
    determinant: a mirrored section is turned over everywhere, not folded). Zero wherever the
    map keeps at least ``floor`` of the local area; grows as it nears a fold (``det J <= 0``)."""
    return _Folding.apply(field, 1.0 if orientation >= 0 else -1.0, float(floor))


class _Folding(torch.autograd.Function):
    # Almost everywhere the map keeps more than ``floor`` of the area and the term is zero: the
    # gradient, written out, is computed only where it is not (autograd ran the determinant's
    # whole chain backwards over the grid every iteration).
    @staticmethod
    def forward(ctx, field, sign, floor):
        det = jacobian_determinant(field) * sign
        short = torch.relu(floor - det)  # (B, H-1, W-1)
        ctx.sign, ctx.shape = sign, field.shape
        ctx.save_for_backward(field, short)
        return short.pow(2).mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad):
        field, short = ctx.saved_tensors
        out = torch.zeros(ctx.shape, dtype=field.dtype, device=field.device)
        if not bool((short > 0).any()):
            return out, None, None
        # d(mean short^2)/d det = -2 short / n (times sign); det = (1 + a)(1 + d) - c b with
        # a = d_row[0], b = d_row[1], c = d_col[0], d = d_col[1] (jacobian_determinant)
        g_det = -2.0 * short * (grad.view(-1, 1, 1) / short[0].numel()) * ctx.sign
        d_row = field[:, :, 1:, :-1] - field[:, :, :-1, :-1]
        d_col = field[:, :, :-1, 1:] - field[:, :, :-1, :-1]
        g_a, g_b = g_det * (1.0 + d_col[:, 1]), -g_det * d_col[:, 0]
        g_c, g_d = -g_det * d_row[:, 1], g_det * (1.0 + d_row[:, 0])
        # d_row = f[1:, :-1] - f[:-1, :-1]; d_col = f[:-1, 1:] - f[:-1, :-1]
        g_row = torch.stack((g_a, g_b), dim=1)
        g_col = torch.stack((g_c, g_d), dim=1)
        out[:, :, 1:, :-1] += g_row
        out[:, :, :-1, 1:] += g_col
        out[:, :, :-1, :-1] -= g_row + g_col
        return out, None, None


def curvature(field: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian of a ``(B, 2, H, W)`` field, per batch item (curvature regulariser)."""
    lap = (
        field[:, :, 2:, 1:-1] + field[:, :, :-2, 1:-1] + field[:, :, 1:-1, 2:] + field[:, :, 1:-1, :-2]
        - 4 * field[:, :, 1:-1, 1:-1]
    )
    return lap.pow(2).mean(dim=(1, 2, 3))


def _box_sum_shifted(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-padded box *sum* over ``window x window`` (odd), separably: each axis padded, cut
    into overlapping windows by ``unfold`` (a strided view, no copy) and summed. No autograd;
    about 10x faster on the CPU than the grouped convolutions of :func:`_box_mean`, and with
    three operators per axis instead of a ``window``-long chain of shifted additions, which is
    what an iteration at a coarse pyramid level (a few thousand pixels) mostly pays for."""
    pad = window // 2
    rows = F.pad(x, (0, 0, pad, pad)).unfold(-2, window, 1).sum(-1)
    return F.pad(rows, (pad, pad)).unfold(-1, window, 1).sum(-1)


class _BoxMean(torch.autograd.Function):
    # The zero-padded box filter with an odd window is a symmetric linear operator, so its
    # backward pass is the same filter applied to the incoming gradient.
    @staticmethod
    def forward(ctx, x, window):
        ctx.window = window
        return _box_sum_shifted(x, window) / (window * window)

    @staticmethod
    def backward(ctx, grad):
        return _box_sum_shifted(grad, ctx.window) / (ctx.window * ctx.window), None


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-padded ``window x window`` mean of each channel of ``(B, C, H, W)``: the output of
    :func:`_box_mean`, computed by shifted additions with a hand-written backward pass (odd
    windows; an even window falls back to the convolutions)."""
    if window % 2 == 0:
        return _box_mean(x, window)
    return _BoxMean.apply(x, window)


def local_ncc_fast(a: torch.Tensor, b: torch.Tensor, window: int = 9) -> torch.Tensor:
    """:func:`local_ncc` with the box filter of :func:`box_mean`: the same values up to float
    rounding, 3-4x cheaper forward and backward on the CPU; the dense non-rigid stage uses it."""
    return local_ncc(a, b, window, box=box_mean)


def fixed_local_stats(b: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b, local mean, local variance)`` of a fixed image over ``window x window``: the
    target's half of :func:`local_ncc`, which does not change while the source is optimised
    against it, so an optimisation computes it once per pyramid level (:func:`local_ncc_to_fixed`)."""
    with torch.no_grad():
        mu_b, mu_bb = torch.split(box_mean(torch.cat((b, b * b), dim=1), window), b.shape[1], dim=1)
        return b, mu_b, (mu_bb - mu_b * mu_b).clamp_min(0)


def local_ncc_to_fixed(a: torch.Tensor, fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], window: int) -> torch.Tensor:
    """:func:`local_ncc_fast` of ``a`` against the fixed image of :func:`fixed_local_stats`
    (the same values up to float rounding): three box-filtered channels per call instead of
    five, forward and backward."""
    b, mu_b, var_b = fixed
    c = a.shape[1]
    mu_a, mu_aa, mu_ab = torch.split(box_mean(torch.cat((a, a * a, a * b.expand_as(a)), dim=1), window), c, dim=1)
    cov = mu_ab - mu_a * mu_b
    var_a = (mu_aa - mu_a * mu_a).clamp_min(0)
    cc = cov * cov / (var_a * var_b + 1e-5)
    return cc.mean(dim=tuple(range(1, cc.ndim)))


def landmark_term(field_level: torch.Tensor, source_l: torch.Tensor, target_l: torch.Tensor, to_working) -> torch.Tensor:
    """Mean squared miss (working pixels) of a ``(1, 2, h, w)`` level field at guide points given
    in that level's pixels: ``|t + u(t) - s|^2`` with ``u`` sampled bilinearly (differentiable);
    ``to_working``: working pixels per level pixel, per axis ``(2,)`` or one number."""
    moved = target_l + sample_field_at_points(field_level[0], target_l)
    return (((moved - source_l) * to_working) ** 2).sum(-1).mean()
