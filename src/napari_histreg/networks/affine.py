"""The learned affine stage's network: a ResNet-like regressor of a 2x3 affine matrix.

``AffineNet(source, target)`` takes two ``(B, 1, H, W)`` working grey images (tissue bright) and
returns ``(B, 2, 3)``: the normalised **backward** affine in torch ``affine_grid`` convention
(``(x, y)`` order, ``align_corners = conventions.ALIGN_CORNERS``) that warps ``source`` onto
``target``: ``F.grid_sample(source, F.affine_grid(theta, ...))`` ~ ``target``.

Inside, both images are zero-padded (centred) to a square and resampled anti-aliased to
``input_size`` x ``input_size``. The square matters: the normalised coordinates of a non-square
image are anisotropic (one unit is ``(W - 1) / 2`` pixels across and ``(H - 1) / 2`` down), so
a rotation would not be a rotation matrix there, and the same tissue would need different
matrices at different aspect ratios. The network works in the square's coordinates and the
result is converted to the input's own (:func:`square_to_image_theta`).

The network is a shared (Siamese) ResNet-like encoder, a local correlation between the two
images' features on its two coarsest maps, and a confidence-weighted least-squares affine fit
of the matches (coarse level first, the fine one on the re-warped source). Each level's
output is ``I + gate * (fit - I)`` with zero-initialised gates, so an untrained network returns
exactly the identity. Why not the plain early-fusion regressor (2-channel ResNet -> flatten
-> 6 numbers, tried first): trained the same way (-NCC, 1000 steps), it had only reduced a
known affine's error on real sections from 14 to 10 working pixels; the matching + fit
structure reached 2.7 px in 600 steps, because it only has to learn stain-invariant features
and where to trust them, not the geometry.

Applied recurrently (warp, predict the residual, compose), it refines its own estimate: see
:func:`napari_histreg.stages.affine.learned_affine`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..conventions import warp_affine_xy
from ..stages.preprocess import gaussian_kernel1d
from .layers import ConvNormAct, ResidualBlock

__all__ = [
    "AffineNet",
    "fast_resample",
    "resample_operator",
    "compose_theta",
    "correlation",
    "fit_affine",
    "pad_to_square",
    "square_padding",
    "square_to_image_theta",
    "image_to_square_theta",
    "to_homogeneous",
]


def square_padding(shape) -> tuple[int, int, int]:
    """``(side, top, left)`` of the centred square canvas that holds an image of ``shape``."""
    h, w = int(shape[0]), int(shape[1])
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(B, C, H, W)`` to a centred ``(B, C, S, S)``, ``S = max(H, W)``."""
    h, w = image.shape[-2:]
    side, top, left = square_padding((h, w))
    if side == h == w:
        return image
    return F.pad(image, (left, side - w - left, top, side - h - top))


_OPERATORS: dict = {}


def resample_operator(n_in: int, n_out: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D anti-aliased resampling along one axis: exactly
    :func:`~napari_histreg.stages.preprocess.resample`'s Gaussian blur (``sigma``, reflect
    padding, the same truncated kernel) followed by its corner-aligned linear interpolation.
    Cached per arguments."""
    key = (n_in, n_out, round(float(sigma), 6), str(device), dtype)
    if key in _OPERATORS:
        return _OPERATORS[key]
    blur = torch.eye(n_in, dtype=torch.float64)
    if sigma > 0:
        k = gaussian_kernel1d(sigma).to(torch.float64)
        r = (k.numel() - 1) // 2
        pad = min(r, n_in - 1)
        taps = k[r - pad : r + pad + 1]
        blur = torch.zeros(n_in, n_in, dtype=torch.float64)
        for i in range(n_in):
            for j, weight in enumerate(taps.tolist()):
                src = i + j - pad
                if src < 0:
                    src = -src
                elif src >= n_in:
                    src = 2 * (n_in - 1) - src
                blur[i, src] += weight
    if n_out == n_in:
        interp = torch.eye(n_in, dtype=torch.float64)
    else:
        interp = torch.zeros(n_out, n_in, dtype=torch.float64)
        pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
        low = pos.floor().long().clamp(0, n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        frac = pos - low
        interp[torch.arange(n_out), low] += 1 - frac
        interp[torch.arange(n_out), high] += frac
    op = (interp @ blur).to(device=device, dtype=dtype)
    if len(_OPERATORS) > 64:
        _OPERATORS.clear()
    _OPERATORS[key] = op
    return op


def fast_resample(image: torch.Tensor, shape) -> torch.Tensor:
    """``resample(image, shape, align_corners=True)`` for ``(B, C, H, W)`` as two matrix
    products with cached separable operators: the same numbers (to float precision), several
    times faster on a CPU than the 1-channel convolutions of the Gaussian blur."""
    h, w = image.shape[-2:]
    ratio = max(h / shape[0], w / shape[1])
    sigma = ratio / 1.25 if ratio > 1 else 0.0
    rows = resample_operator(h, shape[0], sigma, image.device, image.dtype)
    cols = resample_operator(w, shape[1], sigma, image.device, image.dtype)
    return rows @ image @ cols.T


def to_homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` -> ``(B, 3, 3)`` with ``[0, 0, 1]`` as the last row."""
    last = torch.zeros(theta.shape[0], 1, 3, device=theta.device, dtype=theta.dtype)
    last[:, 0, 2] = 1.0
    return torch.cat((theta, last), dim=1)


def compose_theta(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The backward affine of warping with ``first`` and then warping the result with ``then``.

    ``warped1(p) = src(first p)``; ``warped2(p) = warped1(then p) = src(first then p)``:
    the product ``first @ then`` (both ``(B, 2, 3)``; returns ``(B, 2, 3)``).
    """
    return (to_homogeneous(first) @ to_homogeneous(then))[:, :2]


def _square_map(shape, device, dtype) -> torch.Tensor:
    """``(3, 3)`` map from an image's normalised ``(x, y)`` to its centred square's."""
    h, w = int(shape[0]), int(shape[1])
    side, top, left = square_padding((h, w))
    denom = max(side - 1, 1)
    # pixel c -> normalised 2 c / max(n - 1, 1) - 1 (conventions.pixels_to_normalised)
    ax, ay = max(w - 1, 1) / denom, max(h - 1, 1) / denom
    bx, by = ax + 2 * left / denom - 1.0, ay + 2 * top / denom - 1.0
    return torch.tensor([[ax, 0.0, bx], [0.0, ay, by], [0.0, 0.0, 1.0]], device=device, dtype=dtype)


def square_to_image_theta(theta: torch.Tensor, shape) -> torch.Tensor:
    """A ``(B, 2, 3)`` normalised ``(x, y)`` affine of the centred square canvas of an image of
    ``shape`` ``(H, W)`` as the same map in the image's own normalised coordinates."""
    t = _square_map(shape, theta.device, theta.dtype)
    return (torch.linalg.inv(t) @ to_homogeneous(theta) @ t)[:, :2]


def image_to_square_theta(theta: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`square_to_image_theta`."""
    t = _square_map(shape, theta.device, theta.dtype)
    return (t @ to_homogeneous(theta) @ torch.linalg.inv(t))[:, :2]


def correlation(target: torch.Tensor, source: torch.Tensor, radius: int) -> torch.Tensor:
    """Local cost volume ``(B, (2r+1)^2, H, W)``: channel ``k`` at ``p`` is the mean over
    channels of ``target(p) * source(p + shift_k)``, shifts in row-major order of
    ``(dy, dx)`` in ``[-r, r]^2`` (zeros outside the source)."""
    b, c, h, w = source.shape
    padded = F.pad(source, (radius, radius, radius, radius))
    out = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[:, :, radius + dy : radius + dy + h, radius + dx : radius + dx + w]
            out.append((target * shifted).mean(dim=1))
    return torch.stack(out, dim=1)


def fit_affine(positions: torch.Tensor, matched: torch.Tensor, weights: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Weighted least-squares ``(B, 2, 3)`` affine ``A`` with ``A [p; 1] ~ q``.

    ``positions`` ``(N, 2)`` (shared), ``matched`` ``(B, N, 2)``, ``weights`` ``(B, N)`` >= 0.
    A ridge of ``ridge * sum(weights)`` pulls towards the identity, so that an image with no
    confident match (blank, or all weights 0) gives the identity rather than a singular system.
    """
    bsz = matched.shape[0]
    p = torch.cat((positions, torch.ones_like(positions[:, :1])), dim=1)  # (N, 3)
    pw = p.unsqueeze(0) * weights.unsqueeze(-1)  # (B, N, 3)
    lhs = pw.transpose(1, 2) @ p.unsqueeze(0)  # (B, 3, 3)
    rhs = pw.transpose(1, 2) @ matched  # (B, 3, 2)
    lam = (ridge * weights.sum(dim=1) + 1e-6).view(bsz, 1, 1)
    eye3 = torch.eye(3, device=p.device, dtype=p.dtype).unsqueeze(0)
    lhs = lhs + lam * eye3
    rhs = rhs + lam * eye3[:, :, :2]
    return torch.linalg.solve(lhs, rhs).transpose(1, 2)


class AffineNet(nn.Module):
    """ResNet-like Siamese encoder + local correlation + weighted least-squares affine fit.

    Both images go through one shared encoder of residual stages (``channels``; the stem and
    every stage halve the resolution). On the two coarsest feature maps, coarse first:

    1. a local cost volume (radius ``radius``) between target and source features;
    2. a soft-argmax over it gives each feature cell a displacement, a small convolutional
       head on the cost volume its confidence;
    3. the confidence-weighted least-squares affine of those matches is the estimate; the
       source is re-warped by it and the next (finer) level estimates the residual.

    Each level's estimate is ``I + gate * (fit - I)`` with a learnt ``gate`` initialised to 0,
    so an untrained network returns exactly the identity. The structure (matching, then a
    closed-form fit) is what lets a few tissue blocks teach a general affine regressor: the
    network learns stain-invariant features and where to trust them, not the geometry.
    """

    kind = "affine"
    #: The gates are stored divided by this: Adam moves a parameter by about its learning rate
    #: per step whatever its gradient, and a gate must travel from 0 to about 1 early on.
    GATE_SCALE = 25.0

    def __init__(self, channels=(16, 32, 48), radius: int = 4, input_size: int = 256):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 3:
            raise ValueError("channels needs at least 3 stages (stem + 2 levels)")
        if input_size % (2 ** len(channels)):
            raise ValueError(f"input_size {input_size} must be a multiple of {2 ** len(channels)}")
        self.config = {"channels": list(channels), "radius": int(radius), "input_size": int(input_size)}
        self.input_size = int(input_size)
        self.radius = int(radius)
        self.stem = ConvNormAct(1, channels[0], stride=2)
        self.stages = nn.ModuleList(
            ResidualBlock(c_in, c_out, stride=2) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        shifts = (2 * radius + 1) ** 2
        self.confidence = nn.ModuleList()
        self.temperature = nn.ParameterList()
        for _ in range(2):
            self.confidence.append(
                nn.Sequential(nn.Conv2d(shifts, 16, 1), nn.PReLU(16), nn.Conv2d(16, 1, 3, padding=1))
            )
            self.temperature.append(nn.Parameter(torch.tensor(math.log(10.0))))
        self.gates = nn.Parameter(torch.zeros(2))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        self.register_buffer("shifts", torch.stack((dx.reshape(-1), dy.reshape(-1)), dim=1), persistent=False)
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), persistent=False)

    # -- inputs
    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, 1, input_size, input_size)``: centred zero padding to a
        square, then anti-aliased resampling (corners aligned, so normalised coordinates keep
        their meaning)."""
        square = pad_to_square(image)
        size = (self.input_size, self.input_size)
        if tuple(square.shape[-2:]) == size:
            return square
        return fast_resample(square, size)

    @staticmethod
    def _standardise(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (x - mean) / std

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Unit-length feature maps of the two coarsest stages, finest first."""
        x = self.stem(self._standardise(image))
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return [F.normalize(m, dim=1) * math.sqrt(m.shape[1]) for m in maps[-2:]]

    def _level(self, index: int, f_target: torch.Tensor, f_source: torch.Tensor) -> torch.Tensor:
        """Affine (``(B, 2, 3)``, normalised) of one level from its feature maps."""
        b, _, h, w = f_target.shape
        cost = correlation(f_target, f_source, self.radius)  # (B, K, h, w)
        prob = torch.softmax(cost * self.temperature[index].exp(), dim=1)
        disp = torch.einsum("bkhw,kc->bhwc", prob, self.shifts)  # cells, (x, y)
        weight = F.softplus(self.confidence[index](cost))[:, 0]  # (B, h, w)
        # cell centres of a stride-s map in the input's normalised (align_corners) coordinates
        n = self.input_size
        stride = n / w
        cells_x = ((torch.arange(w, device=cost.device, dtype=cost.dtype) + 0.5) * stride - 0.5) * 2 / (n - 1) - 1
        cells_y = ((torch.arange(h, device=cost.device, dtype=cost.dtype) + 0.5) * stride - 0.5) * 2 / (n - 1) - 1
        yy, xx = torch.meshgrid(cells_y, cells_x, indexing="ij")
        positions = torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1)
        matched = positions.unsqueeze(0) + disp.reshape(b, -1, 2) * (2 * stride / (n - 1))
        fit = fit_affine(positions, matched, weight.reshape(b, -1))
        gate = self.gates[index] * self.GATE_SCALE
        return self.identity + gate * (fit - self.identity)

    # -- prediction
    def predict_square(self, source: torch.Tensor, target: torch.Tensor, target_features=None, source_features=None) -> torch.Tensor:
        """``(B, 2, 3)`` normalised backward affine between two prepared square inputs
        ``(B, 1, input_size, input_size)`` (see :meth:`prepare`). ``target_features`` /
        ``source_features``: ``self.features(...)`` of the inputs when already computed."""
        fine_t, coarse_t = target_features if target_features is not None else self.features(target)
        _, coarse_s = source_features if source_features is not None else self.features(source)
        theta = self._level(1, coarse_t, coarse_s)
        warped = warp_affine_xy(source, theta)
        fine_s, _ = self.features(warped)
        return compose_theta(theta, self._level(0, fine_t, fine_s))

    def predict_symmetric(self, source: torch.Tensor, target: torch.Tensor, target_features=None) -> torch.Tensor:
        """Like :meth:`predict_square`, made symmetric: the mean of the forward estimate and
        the inverse of the backward one (target onto source). A matcher's bias (soft-argmax
        pulled by the image content, about one pixel at the network's grid) enters the two
        with opposite signs and cancels; on identical inputs the result is the identity to
        float precision."""
        source_features = self.features(source)
        target_features = target_features if target_features is not None else self.features(target)
        forward = self.predict_square(source, target, target_features, source_features)
        backward = self.predict_square(target, source, source_features, target_features)
        mean = 0.5 * (to_homogeneous(forward) + torch.linalg.inv(to_homogeneous(backward)))
        return mean[:, :2]

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``source``, ``target``: ``(B, 1, H, W)`` on one grid -> theta ``(B, 2, 3)`` in that
        grid's normalised ``(x, y)`` coordinates (``affine_grid`` convention, backward)."""
        if source.shape != target.shape:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} must have one shape")
        theta = self.predict_square(self.prepare(source), self.prepare(target))
        h, w = source.shape[-2:]
        if h == w:
            return theta
        return square_to_image_theta(theta, (h, w))
