"""Coordinate conventions of napari-histreg. This is the one module that owns them.

Everything else imports from here instead of re-deriving an index order or a normalisation.

* **Sizes** are ``(H, W)``. Images in the core are ``(H, W)`` grey or ``(H, W, C)`` colour numpy
  arrays; torch tensors are ``(B, C, H, W)``.
* **Points** in the core are ``(N, 2)`` float arrays in ``(row, col)`` order, pixel units, origin at
  the centre of the top-left pixel (integers are pixel centres). This is napari's order.
  ANHIR landmark files store ``X, Y`` = ``(col, row)``: convert with :func:`xy_to_rc` and
  :func:`rc_to_xy` at the file edge only.
* **Displacement fields are backward and in pixels**: on the target grid,
  ``warped(p) = source(p + u(p))``; ``u`` has shape ``(2, H, W)`` (torch: ``(B, 2, H, W)``),
  channel 0 = d-row, channel 1 = d-col, float32.
* **Composition**: if ``u`` is applied first (it warps the source to an intermediate image) and
  ``v`` second (it warps the intermediate onto the target), the total is
  ``compose(v, u)(p) = v(p) + u(p + v(p))``.
* **grid_sample** wants normalised ``(x, y)`` in ``[-1, 1]``. We use ``ALIGN_CORNERS = True``:
  ``-1`` is the centre of pixel ``0`` and ``+1`` the centre of pixel ``n - 1``, so a pixel
  coordinate ``c`` maps to ``2 c / (n - 1) - 1``. Conversions happen only in
  :func:`pixels_to_normalised` and :func:`field_to_grid`.
* **Angles** are degrees at the API, radians inside.
* **Frames**: an image resampled to a working resolution and padded sits in a :class:`Frame`:
  ``working = (original + 0.5) * scale - 0.5 + offset`` (pixel-centre alignment, the same
  mapping as ``skimage.transform.resize``).
* **Other software** (:mod:`napari_histreg.export`): ITK / SimpleITK use physical ``(x, y)`` =
  ``origin + spacing * (col, row)`` (:func:`physical_matrix`; spacing and origin in ITK's
  ``(x, y)`` order); napari's layer ``affine`` and affinder's CSV are 3x3 homogeneous matrices on
  ``(row, col)`` (:func:`homogeneous`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ALIGN_CORNERS = True

__all__ = [
    "ALIGN_CORNERS",
    "Frame",
    "affine_normalised_to_pixels",
    "affine_pixels_to_normalised",
    "affine_to_field",
    "apply_homogeneous",
    "frame_matrix",
    "homogeneous",
    "physical_matrix",
    "physical_to_rc",
    "rc_to_physical",
    "rescale_matrix",
    "xy_pair",
    "normalised_affine_grid",
    "compose",
    "default_device",
    "field_between_frames",
    "compose_between_frames",
    "compose_affines_between_frames",
    "field_to_grid",
    "identity_grid",
    "invert_field",
    "map_source_to_target",
    "map_target_to_source",
    "pixels_to_normalised",
    "resize_field",
    "rc_to_xy",
    "rotation_about",
    "sample",
    "sample_field_at_points",
    "to_tensor",
    "warp",
    "warp_affine_xy",
    "swap_theta_axes",
    "xy_to_rc",
]


# --------------------------------------------------------------------------- devices, seeds
def default_device(preferred: str | torch.device | None = None) -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``; ``preferred`` wins when given.

    ``preferred`` may be ``"auto"`` (same as ``None``). An unavailable explicit device raises a
    ``ValueError`` naming it, rather than failing later inside torch.
    """
    if preferred is not None and str(preferred) != "auto":
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(preferred)!r} was asked for but CUDA is not available")
        if device.type == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ):
            raise ValueError(f"device {str(preferred)!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_tensor(array, device=None, dtype=torch.float32) -> torch.Tensor:
    """A float tensor view of a numpy array or tensor, on ``device`` (default: its own / cpu)."""
    if isinstance(array, torch.Tensor):
        return array.to(device=device or array.device, dtype=dtype)
    return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)


# --------------------------------------------------------------------------- points
def xy_to_rc(points_xy) -> np.ndarray:
    """ANHIR ``(X, Y)`` = ``(col, row)`` to core ``(row, col)``."""
    points_xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    return points_xy[:, ::-1].copy()


def rc_to_xy(points_rc) -> np.ndarray:
    """Core ``(row, col)`` to ANHIR ``(X, Y)`` = ``(col, row)``."""
    points_rc = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    return points_rc[:, ::-1].copy()


def pixels_to_normalised(coords_rc: torch.Tensor, shape: Sequence[int], align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """``(..., 2)`` pixel ``(row, col)`` to grid_sample's normalised ``(x, y)``. With
    ``align_corners=False`` (torch's other convention, used where a network was trained with it)
    ``-1`` / ``+1`` are the outer edges of the border pixels: ``c -> (2 c + 1) / n - 1``."""
    h, w = shape
    row = coords_rc[..., 0]
    col = coords_rc[..., 1]
    if align_corners:
        x = 2.0 * col / max(w - 1, 1) - 1.0
        y = 2.0 * row / max(h - 1, 1) - 1.0
    else:
        x = (2.0 * col + 1.0) / w - 1.0
        y = (2.0 * row + 1.0) / h - 1.0
    return torch.stack((x, y), dim=-1)


def sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
           align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """``image`` ``(B, C, H, W)`` at a normalised ``(x, y)`` grid ``(B, h, w, 2)`` (from
    :func:`pixels_to_normalised`, :func:`field_to_grid` or :func:`normalised_affine_grid`): the
    one place torch's ``grid_sample`` is called."""
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def warp_affine_xy(image: torch.Tensor, theta_xy: torch.Tensor) -> torch.Tensor:
    """Warp ``image`` ``(B, C, H, W)`` by ``(B, 2, 3)`` backward affines in torch's
    ``affine_grid`` convention (normalised ``(x, y)``: the networks' and the training's), zeros
    outside. :func:`swap_theta_axes` converts from and to this module's ``(row, col)`` one."""
    grid = F.affine_grid(theta_xy.to(image.dtype), list(image.shape), align_corners=ALIGN_CORNERS)
    return sample(image, grid)


def swap_theta_axes(theta) -> np.ndarray:
    """A 2x3 affine on ``(x, y)`` = ``(col, row)`` as the same map on ``(row, col)``, or the
    other way round: the swap is its own inverse."""
    theta = np.asarray(theta, dtype=np.float64)
    return theta[::-1][:, [1, 0, 2]].copy()


# --------------------------------------------------------------------------- grids and warps
def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``(2, H, W)`` tensor of pixel ``(row, col)`` coordinates."""
    h, w = shape
    rows = torch.arange(h, device=device, dtype=dtype)
    cols = torch.arange(w, device=device, dtype=dtype)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((rr, cc), dim=0)


def field_to_grid(field: torch.Tensor, source_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Backward pixel field ``(B, 2, H, W)`` to a grid_sample grid ``(B, H, W, 2)``.

    ``source_shape`` is the ``(H, W)`` of the image that will be sampled; it defaults to the
    field's own shape (source and target on the same grid).
    """
    b, _, h, w = field.shape
    source_shape = tuple(source_shape) if source_shape is not None else (h, w)
    coords = identity_grid((h, w), device=field.device, dtype=field.dtype).unsqueeze(0) + field
    return pixels_to_normalised(coords.permute(0, 2, 3, 1), source_shape)


def warp(
    image: torch.Tensor,
    field: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Warp ``image`` ``(B, C, Hs, Ws)`` with the backward field ``(B, 2, H, W)``.

    Returns ``(B, C, H, W)``: ``out(p) = image(p + field(p))``. A batch of 1 in either argument
    broadcasts against the other.
    """
    if image.shape[0] != field.shape[0]:
        if image.shape[0] == 1:
            image = image.expand(field.shape[0], -1, -1, -1)
        elif field.shape[0] == 1:
            field = field.expand(image.shape[0], -1, -1, -1)
    grid = field_to_grid(field, image.shape[-2:])
    return sample(image, grid, mode=mode, padding_mode=padding_mode)


def sample_field_at_points(field: torch.Tensor, points_rc: torch.Tensor) -> torch.Tensor:
    """Bilinear value of a ``(2, H, W)`` field at ``(N, 2)`` points; clamped at the border."""
    grid = pixels_to_normalised(points_rc, field.shape[-2:]).view(1, 1, -1, 2)
    values = sample(field.unsqueeze(0), grid, padding_mode="border")
    return values[0, :, 0, :].T  # (N, 2)


def compose(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """Total backward field of warping first with ``earlier`` then with ``later``.

    ``compose(v, u)(p) = v(p) + u(p + v(p))``; both ``(B, 2, H, W)`` on the same grid.
    """
    return later + warp(earlier, later, padding_mode="border")


def map_target_to_source(points_rc, field) -> np.ndarray:
    """Target-frame points to source-frame points: ``s = p + u(p)`` (exact, no inversion)."""
    field_t = to_tensor(field)
    points = to_tensor(points_rc, device=field_t.device).reshape(-1, 2)
    mapped = points + sample_field_at_points(field_t, points)
    return mapped.cpu().numpy().astype(np.float64)


def affine_part(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine ``(A (2x2), b (2,))`` of the backward map ``p -> p + u(p)`` of a
    ``(2, H, W)`` field (fitted on a grid of at most 64 x 64 points)."""
    h, w = field.shape[-2:]
    rows = torch.linspace(0, h - 1, min(h, 64), dtype=field.dtype, device=field.device)
    cols = torch.linspace(0, w - 1, min(w, 64), dtype=field.dtype, device=field.device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    points = torch.stack((rr.reshape(-1), cc.reshape(-1)), dim=1)
    mapped = points + sample_field_at_points(field, points)
    design = torch.cat((points, torch.ones_like(points[:, :1])), dim=1)  # (N, 3)
    solution = torch.linalg.lstsq(design, mapped).solution  # (3, 2)
    return solution[:2].T, solution[2]


def map_source_to_target(
    points_rc, field, iterations: int = 100, tolerance: float = 1e-3
) -> np.ndarray:
    """Source-frame points to the target frame, inverting the backward field point-wise.

    Solves ``p + u(p) = s``. The map is split into its least-squares affine part ``A p + b``
    (:func:`affine_part`) and a residual ``r``; the fixed-point iteration
    ``p <- A^-1 (s - b - r(p))`` then converges whenever the residual is a contraction, whatever
    the affine part: the plain ``p <- s - u(p)`` diverges for rotations beyond 60 degrees and
    for mirrored sections (``u``'s Jacobian then exceeds 1). ``tolerance`` is in pixels.
    """
    field_t = to_tensor(field, dtype=torch.float64)
    source = to_tensor(points_rc, device=field_t.device, dtype=torch.float64).reshape(-1, 2)
    if not len(source):
        return source.cpu().numpy()
    linear, offset = affine_part(field_t)
    inverse = torch.linalg.inv(linear)

    upper = torch.tensor(field_t.shape[-2:], dtype=field_t.dtype, device=field_t.device) - 1

    def residual(points):
        # beyond the grid the residual is held at its border value (the map goes on affinely)
        inside = torch.minimum(torch.clamp(points, min=0), upper)
        return inside + sample_field_at_points(field_t, inside) - (inside @ linear.T + offset)

    p = (source - offset) @ inverse.T
    for _ in range(iterations):
        p_next = (source - offset - residual(p)) @ inverse.T
        step = (p_next - p).abs().max()
        p = p_next
        if step < tolerance:
            break
    return _newton_polish(p, source, field_t, tolerance).cpu().numpy().astype(np.float64)


def _newton_polish(p: torch.Tensor, source: torch.Tensor, field: torch.Tensor, tolerance: float,
                   iterations: int = 20, step: float = 0.1) -> torch.Tensor:
    """``p`` refined so that ``p + u(p) = source`` holds for the map :func:`map_target_to_source`
    applies (the field held at its border value beyond the grid), by damped Newton steps on the
    points that miss by more than ``tolerance`` pixels (Jacobian by central differences of
    ``step`` pixels). The fixed-point iteration before it stalls where the field shears more
    than its affine part (a residual that is no contraction: a real pair's landmark came back
    0.73 px from where it started); there, and beyond the grid, where the fixed point assumes
    the affine part goes on, Newton makes the two directions each other's inverse."""

    def forward(points):
        return points + sample_field_at_points(field, points)

    eye = torch.eye(2, dtype=p.dtype, device=p.device)
    miss = forward(p) - source
    for _ in range(iterations):
        error = miss.norm(dim=1)
        bad = error > tolerance
        if not bad.any():
            break
        q, r = p[bad], miss[bad]
        columns = [(forward(q + step * eye[k]) - forward(q - step * eye[k])) / (2 * step) for k in (0, 1)]
        jacobian = torch.stack(columns, dim=-1)  # (n, 2, 2): d(map) / d(row, col)
        usable = torch.linalg.det(jacobian).abs() > 1e-6  # a fold's edge: leave the point where it is
        delta = torch.zeros_like(q)
        if usable.any():
            delta[usable] = torch.linalg.solve(jacobian[usable], r[usable].unsqueeze(-1)).squeeze(-1)
        # damped: halve a step that does not lower the miss (bilinear maps are only piecewise smooth)
        scale = torch.ones(len(q), 1, dtype=p.dtype, device=p.device)
        new_q, new_r = q, r
        for _ in range(6):
            candidate = q - scale * delta
            candidate_miss = forward(candidate) - source[bad]
            better = candidate_miss.norm(dim=1) < r.norm(dim=1)
            new_q = torch.where(better[:, None], candidate, new_q)
            new_r = torch.where(better[:, None], candidate_miss, new_r)
            if better.all():
                break
            scale = torch.where(better[:, None], scale, scale / 2)
        if torch.equal(new_q, q):
            break  # no point moved: what is left cannot be solved (outside the map's range, a fold)
        p = p.clone()
        miss = miss.clone()
        p[bad], miss[bad] = new_q, new_r
    return p


def invert_field(field: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Dense inverse of a backward field ``(B, 2, H, W)``: ``w`` with ``w(s) = -u(s + w(s))``.

    ``w`` is the backward field of the opposite direction (it warps the target onto the
    source grid). Fixed-point iteration on the residual beside the affine part, as in
    :func:`map_source_to_target`.
    """
    inverses = []
    for item in field:
        linear, offset = affine_part(item.double())
        linear, offset = linear.to(item.dtype), offset.to(item.dtype)
        inverse_linear = torch.linalg.inv(linear)
        grid = identity_grid(item.shape[-2:], device=item.device, dtype=item.dtype)
        flat = grid.reshape(2, -1)
        affine_map = (linear @ flat + offset[:, None]).reshape_as(grid)
        residual = (grid + item - affine_map)[None]  # r(p) on the grid
        target = grid - offset.view(2, 1, 1)  # s - b
        points = (inverse_linear @ target.reshape(2, -1)).reshape_as(grid)
        for _ in range(iterations):
            r = warp(residual, (points - grid)[None], padding_mode="border")[0]
            points = (inverse_linear @ (target - r).reshape(2, -1)).reshape_as(grid)
        inverses.append(points - grid)
    return torch.stack(inverses)


# --------------------------------------------------------------------------- affine
def rotation_about(
    center_rc: Sequence[float], angle_deg: float, translation_rc: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """2x3 backward affine (pixel ``(row, col)``): ``s = R (p - center) + center + translation``.

    ``R = [[cos, -sin], [sin, cos]]`` acts on ``(row, col)``. The matrix maps a target pixel
    ``p`` to the source pixel it samples, so it can go straight into :func:`affine_to_field`.
    """
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    center = np.asarray(center_rc, dtype=np.float64)
    offset = center - rot @ center + np.asarray(translation_rc, dtype=np.float64)
    return np.hstack([rot, offset[:, None]])


def affine_to_field(matrix, shape: Sequence[int], device=None) -> torch.Tensor:
    """``(1, 2, H, W)`` backward field of a 2x3 pixel ``(row, col)`` affine ``s = A p + b``."""
    a = to_tensor(matrix, device=device).reshape(2, 3)
    grid = identity_grid(shape, device=a.device)
    source = torch.einsum("ij,jhw->ihw", a[:, :2], grid) + a[:, 2].view(2, 1, 1)
    return (source - grid).unsqueeze(0)


def _normalising(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    return np.diag([2.0 / max(h - 1, 1), 2.0 / max(w - 1, 1)]), np.array([-1.0, -1.0])


def affine_pixels_to_normalised(matrix, shape: Sequence[int]) -> np.ndarray:
    """A 2x3 pixel ``(row, col)`` affine to the same map in normalised ``(row, col)`` coordinates
    of a grid of ``shape`` (source and target on that one grid)."""
    a = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    d, e = _normalising(shape)
    m = d @ a[:, :2] @ np.linalg.inv(d)
    t = d @ a[:, 2] + e - m @ e
    return np.hstack([m, t[:, None]])


def affine_normalised_to_pixels(matrix, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`affine_pixels_to_normalised`."""
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    d, e = _normalising(shape)
    d_inv = np.linalg.inv(d)
    a = d_inv @ m[:, :2] @ d
    b = d_inv @ (m[:, 2] - e + m[:, :2] @ e)
    return np.hstack([a, b[:, None]])


def normalised_affine_grid(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """grid_sample grid ``(B, H, W, 2)`` of a batch of normalised ``(row, col)`` affines ``(B, 2, 3)``."""
    h, w = shape
    device, dtype = matrix.device, matrix.dtype
    rows = torch.linspace(-1, 1, h, device=device, dtype=dtype) if h > 1 else torch.zeros(1, device=device, dtype=dtype)
    cols = torch.linspace(-1, 1, w, device=device, dtype=dtype) if w > 1 else torch.zeros(1, device=device, dtype=dtype)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    homog = torch.stack((rr, cc, torch.ones_like(rr)), dim=0).reshape(3, -1)
    mapped = (matrix @ homog).reshape(-1, 2, h, w)  # (B, 2=(row, col), H, W)
    return torch.stack((mapped[:, 1], mapped[:, 0]), dim=-1)


# --------------------------------------------------------------------------- resolution
def resize_field(field: torch.Tensor, shape: Sequence[int], mode: str = "bilinear", align_corners: bool = False) -> torch.Tensor:
    """Resample a pixel field ``(B, 2, h, w)`` to ``shape`` and rescale its displacements, so the
    field still means the same geometric displacement on the new grid.

    ``align_corners=False``: the pixel-centre alignment of :class:`Frame` (working grids of one
    image at two resolutions); ``True``: end-point alignment (``ALIGN_CORNERS``), how the
    pyramid levels of the non-rigid engines are resampled (:func:`~napari_histreg.stages.preprocess.resample`).
    """
    h, w = field.shape[-2:]
    new_h, new_w = shape
    if (h, w) == (new_h, new_w):
        return field
    resized = F.interpolate(field, size=(new_h, new_w), mode=mode, align_corners=align_corners)
    if align_corners:
        scale = torch.tensor([(new_h - 1) / max(h - 1, 1), (new_w - 1) / max(w - 1, 1)], device=field.device, dtype=field.dtype)
    else:
        scale = torch.tensor([new_h / h, new_w / w], device=field.device, dtype=field.dtype)
    return resized * scale.view(1, 2, 1, 1)


def cast_to_dtype(values: np.ndarray, dtype, in_place: bool = False) -> np.ndarray:
    """Float ``values`` (resampled, averaged) back as ``dtype``: rounded to the nearest integer
    and clipped to the type's range when it is an integer type (a plain cast would truncate and
    wrap around), a plain cast otherwise. ``in_place``: round and clip in ``values`` itself
    (a large temporary the caller no longer needs)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = values if in_place else None
        values = np.clip(np.rint(values, out=out), info.min, info.max, out=out)
    return values.astype(dtype, copy=False)


def _points(points_rc):
    """numpy points as float64 ``(N, 2)``; torch tensors unchanged (any ``(..., 2)``)."""
    if isinstance(points_rc, torch.Tensor):
        return points_rc
    return np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)


def _per_axis(points, values):
    """``values`` (row, col) as an array / tensor that broadcasts against ``points``."""
    if isinstance(points, torch.Tensor):
        return torch.as_tensor(values, dtype=points.dtype, device=points.device)
    return np.asarray(values, dtype=np.float64)


def rescale_pixels(points_rc, factor):
    """Points ``(row, col)`` in the pixels of an image, in the pixels of the same image sampled
    ``factor`` times as finely (per axis, or one number): pixel centres sit at integer
    coordinates, so ``(p + 0.5) * factor - 0.5``. The one rule of every change of resolution
    (working grid, pyramid level, a layer shown at another resolution); numpy points come back
    as ``(N, 2)``, torch tensors keep their shape and device."""
    points = _points(points_rc)
    return (points + 0.5) * _per_axis(points, factor) - 0.5


@dataclasses.dataclass(frozen=True)
class Frame:
    """Where an original image sits in a working grid.

    ``working = (original + 0.5) * scale - 0.5 + offset`` per axis ``(row, col)``.
    ``original_shape`` is the image's ``(H, W)`` at full resolution; ``shape`` the working grid.
    Both maps take numpy points (``(N, 2)``) or torch tensors (``(..., 2)``).
    """

    original_shape: tuple[int, int]
    shape: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    def to_working(self, points_rc):
        points = _points(points_rc)
        return rescale_pixels(points, self.scale) + _per_axis(points, self.offset)

    def to_original(self, points_rc):
        points = _points(points_rc)
        return (points - _per_axis(points, self.offset) + 0.5) / _per_axis(points, self.scale) - 0.5

    def at_shape(self, image_shape: Sequence[int], factor: Sequence[float] | None = None) -> "Frame":
        """The same frame for a version of the original image at another resolution, of shape
        ``image_shape``.

        Used to apply a transform to any level of a pyramid: the working grid stays, the
        scale changes by ``factor``, the new image's pixels per original pixel (default: the
        ratio of sizes; give a pyramid's exact downsample where a level's size was rounded).
        """
        if factor is None:
            factor = (image_shape[0] / self.original_shape[0], image_shape[1] / self.original_shape[1])
        return Frame(
            original_shape=(int(image_shape[0]), int(image_shape[1])),
            shape=tuple(self.shape),
            scale=(self.scale[0] / float(factor[0]), self.scale[1] / float(factor[1])),
            offset=tuple(self.offset),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Frame":
        return cls(**{k: tuple(v) for k, v in data.items()})


def field_between_frames(
    working_field: torch.Tensor,
    target_frame: Frame,
    source_frame: Frame,
    rows: slice | None = None,
    cols: slice | None = None,
) -> torch.Tensor:
    """The backward field in original pixels from a field on the working grid.

    For each original target pixel ``p`` (optionally only the block ``rows, cols``):
    ``q = T_t(p)``, ``s = T_s^-1(q + u_w(q))`` and the result is ``s - p``, shape
    ``(2, h, w)``. Working outside the field's grid clamps to its border.
    """
    h, w = target_frame.original_shape
    rows = rows or slice(0, h)
    cols = cols or slice(0, w)
    device = working_field.device
    r = torch.arange(rows.start, rows.stop, device=device, dtype=torch.float32)
    c = torch.arange(cols.start, cols.stop, device=device, dtype=torch.float32)
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    p = torch.stack((rr, cc), dim=-1)  # (h, w, 2)
    q = target_frame.to_working(p)
    grid = pixels_to_normalised(q, working_field.shape[-2:]).unsqueeze(0).to(working_field.dtype)
    u = sample(working_field.reshape(1, 2, *working_field.shape[-2:]), grid, padding_mode="border")[0].permute(1, 2, 0)
    s = source_frame.to_original(q + u)
    return (s - p).permute(2, 0, 1).contiguous()


def compose_between_frames(
    outer_field: torch.Tensor,
    outer_source_frame: Frame,
    inner_field: torch.Tensor,
    inner_target_frame: Frame,
) -> torch.Tensor:
    """The backward field of two registrations chained through the image they share.

    ``outer`` registers an image ``B`` onto ``C`` (its working field, ``(2, H, W)`` on its
    grid, maps ``C``'s working pixels to ``B``'s working pixels of that grid, ``outer_source_frame``
    is ``B``'s frame there); ``inner`` registers ``A`` onto ``B`` (``inner_field`` on its own
    grid, ``inner_target_frame`` is ``B``'s frame there). The result, on ``outer``'s grid, maps
    each working pixel ``p`` of ``C`` to ``A``'s working pixels of ``inner``'s grid:

    ``q = p + u_outer(p)`` (``B``, outer grid) -> ``B`` original pixels -> ``q' `` (``B``, inner
    grid) -> ``q' + u_inner(q')``, and the field is that minus ``p``: the rule
    ``u_total(p) = v(p) + u(p + v(p))`` of :func:`compose` with a change of frame in the middle.
    Its target frame is ``outer``'s, its source frame ``inner``'s. Beyond ``inner``'s grid the
    field is held at its border value.

    Convention: backward fields in working pixels, channel 0 = rows (module docstring).
    """
    h, w = outer_field.shape[-2:]
    grid = identity_grid((h, w), device=outer_field.device, dtype=outer_field.dtype)
    q = (grid + outer_field).permute(1, 2, 0)  # (H, W, 2): B in the outer grid's working pixels
    q_inner = inner_target_frame.to_working(outer_source_frame.to_original(q))
    normalised = pixels_to_normalised(q_inner, inner_field.shape[-2:]).unsqueeze(0).to(inner_field.dtype)
    u = sample(inner_field.reshape(1, 2, *inner_field.shape[-2:]), normalised, padding_mode="border")[0].permute(1, 2, 0)
    return (q_inner + u - grid.permute(1, 2, 0)).permute(2, 0, 1).contiguous()


def compose_affines_between_frames(outer_matrix, outer_source_frame: Frame, inner_matrix, inner_target_frame: Frame) -> np.ndarray:
    """The 2x3 backward affine of two affines chained through the image they share, as
    :func:`compose_between_frames` chains their fields: ``p`` (outer working) -> ``outer_matrix``
    -> ``B`` original pixels (``outer_source_frame``) -> ``B`` in the inner grid
    (``inner_target_frame``) -> ``inner_matrix``. Every step is affine, so the chain is read off
    three points.

    Convention: 2x3 backward ``(row, col)`` affines in working pixels."""
    basis = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    on_b = outer_source_frame.to_original(apply_homogeneous(outer_matrix, basis))
    mapped = apply_homogeneous(inner_matrix, inner_target_frame.to_working(on_b))
    return np.column_stack([mapped[1] - mapped[0], mapped[2] - mapped[0], mapped[0]])


# --------------------------------------------------------------------------- homogeneous matrices, physical space
# Other software states transforms as 3x3 homogeneous matrices (napari's layer ``affine``,
# affinder's CSV) or in physical coordinates (ITK / SimpleITK). These helpers are the one
# place where our ``(row, col)`` pixels meet them.
def homogeneous(matrix) -> np.ndarray:
    """A 2x3 affine (or a 3x3 one, returned as a copy) as a 3x3 homogeneous matrix.

    Convention: acts on column vectors ``(a, b, 1)``; the axis order is the matrix's own
    (``(row, col)`` everywhere in this package except the ITK physical ``(x, y)`` below)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        return m.copy()
    out = np.eye(3)
    out[:2, :] = m.reshape(2, 3)
    return out


def apply_homogeneous(matrix, points) -> np.ndarray:
    """``(N, 2)`` points through a 3x3 (or 2x3) affine: ``A p + b``.

    Convention: the points are in the matrix's axis order; returns float64 ``(N, 2)``."""
    m = homogeneous(matrix)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ m[:2, :2].T + m[:2, 2]


def frame_matrix(frame: Frame) -> np.ndarray:
    """3x3 homogeneous matrix of ``frame.to_working``: original ``(row, col)`` pixels to working
    ``(row, col)`` pixels (its inverse is ``frame.to_original``).

    Convention: ``working = (original + 0.5) * scale - 0.5 + offset`` per axis, ``(row, col)``."""
    scale = np.asarray(frame.scale, dtype=np.float64)
    offset = np.asarray(frame.offset, dtype=np.float64)
    out = np.eye(3)
    out[[0, 1], [0, 1]] = scale
    out[:2, 2] = 0.5 * scale - 0.5 + offset
    return out


def rescale_matrix(factor) -> np.ndarray:
    """3x3 homogeneous matrix of :func:`rescale_pixels`: pixels of an image to the pixels of the
    same image sampled ``factor`` (per axis ``(row, col)``, or one number) times as finely.

    Convention: pixel centres at integers, ``(p + 0.5) * factor - 0.5``, ``(row, col)``."""
    f = np.broadcast_to(np.asarray(factor, dtype=np.float64), (2,))
    out = np.eye(3)
    out[[0, 1], [0, 1]] = f
    out[:2, 2] = 0.5 * f - 0.5
    return out


def xy_pair(value, name: str = "value", positive: bool = False) -> tuple[float, float]:
    """One number or an ``(x, y)`` pair as a tuple of two floats (ITK's spacing and origin);
    ``positive``: refuse zero, negative or non-finite values with a ``ValueError`` naming ``name``.

    Convention: ITK order ``(x, y)`` = ``(col, row)``."""
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,)) if np.ndim(value) == 0 else np.asarray(value, dtype=np.float64)
    if values.shape != (2,) or not np.isfinite(values).all():
        raise ValueError(f"{name} must be one number or an (x, y) pair of finite numbers, not {value!r}")
    if positive and (values <= 0).any():
        raise ValueError(f"{name} must be positive, not {value!r}")
    return float(values[0]), float(values[1])


def physical_matrix(spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)) -> np.ndarray:
    """3x3 homogeneous matrix from pixel ``(row, col)`` to ITK physical ``(x, y)`` of an image
    with ``spacing`` and ``origin`` (ITK order ``(x, y)``, identity direction):
    ``x = origin_x + spacing_x * col``, ``y = origin_y + spacing_y * row``.

    Convention: ITK physical point = origin + spacing * index, index = ``(col, row)``; pixel
    centres at integer indices in both (no half-pixel shift between the two)."""
    sx, sy = xy_pair(spacing_xy, "spacing", positive=True)
    ox, oy = xy_pair(origin_xy, "origin")
    return np.array([[0.0, sx, ox], [sy, 0.0, oy], [0.0, 0.0, 1.0]])


def rc_to_physical(points_rc, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)) -> np.ndarray:
    """``(N, 2)`` pixel ``(row, col)`` points as ITK physical ``(x, y)`` points.

    Convention: :func:`physical_matrix` (``x = origin_x + spacing_x * col``)."""
    return apply_homogeneous(physical_matrix(spacing_xy, origin_xy), points_rc)


def physical_to_rc(points_xy, spacing_xy=(1.0, 1.0), origin_xy=(0.0, 0.0)) -> np.ndarray:
    """``(N, 2)`` ITK physical ``(x, y)`` points as pixel ``(row, col)`` points (the inverse of
    :func:`rc_to_physical`).

    Convention: :func:`physical_matrix` (``col = (x - origin_x) / spacing_x``)."""
    return apply_homogeneous(np.linalg.inv(physical_matrix(spacing_xy, origin_xy)), points_xy)
