"""Tests of the coordinate conventions (``napari_histreg.conventions``) against analytic cases.

Written in the manner of kornia's geometry tests: every function is checked against a case
whose answer is known in closed form, parametrised over dtype and device (``cuda`` / ``mps``
are skipped where absent, never required), plus a ``gradcheck`` of :func:`warp`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_histreg import conventions as cv
from napari_histreg.conventions import Frame

# --------------------------------------------------------------------------- parametrisation
_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
    pytest.param("mps", id="mps", marks=pytest.mark.skipif(not _MPS, reason="MPS not available")),
]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request, device):
    if device.type == "mps" and request.param == torch.float64:
        pytest.skip("MPS has no float64")
    return request.param


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-9


def _sinusoidal_field(shape, amplitude=(3.0, -2.5), period=(96.0, 80.0), dtype=torch.float64, device="cpu"):
    """Smooth analytic backward field (rows, cols) and the function that evaluates it anywhere."""
    a_r, a_c = amplitude
    l_r, l_c = period

    def u(points):  # (N, 2) numpy -> (N, 2)
        r, c = points[:, 0], points[:, 1]
        return np.stack(
            (a_r * np.sin(2 * np.pi * c / l_c) * np.cos(2 * np.pi * r / l_r), a_c * np.cos(2 * np.pi * r / l_r + 0.3)),
            axis=1,
        )

    h, w = shape
    rr, cc = np.mgrid[:h, :w].astype(np.float64)
    values = u(np.stack((rr.ravel(), cc.ravel()), axis=1)).T.reshape(2, h, w)
    return torch.as_tensor(values, dtype=dtype, device=device), u


def _random_affine(rng, shape, scale=0.06, shift=4.0):
    h, w = shape
    lin = np.eye(2) + rng.uniform(-scale, scale, (2, 2))
    centre = (np.array([h, w]) - 1) / 2
    b = centre - lin @ centre + rng.uniform(-shift, shift, 2)
    return np.hstack([lin, b[:, None]])


# --------------------------------------------------------------------------- points and grids
def test_xy_rc_round_trip():
    rng = np.random.default_rng(0)
    rc = rng.uniform(0, 500, (17, 2))
    xy = cv.rc_to_xy(rc)
    np.testing.assert_array_equal(xy[:, 0], rc[:, 1])  # X is the column
    np.testing.assert_array_equal(xy[:, 1], rc[:, 0])  # Y is the row
    np.testing.assert_array_equal(cv.xy_to_rc(xy), rc)
    np.testing.assert_array_equal(cv.xy_to_rc([3.0, 7.0]), [[7.0, 3.0]])  # a single point
    assert cv.xy_to_rc(np.zeros((0, 2))).shape == (0, 2)


def test_pixels_to_normalised_align_corners(device, dtype):
    h, w = 7, 11
    corners = torch.tensor([[0.0, 0.0], [h - 1, w - 1], [(h - 1) / 2, 0.0]], dtype=dtype, device=device)
    xy = cv.pixels_to_normalised(corners, (h, w))
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=dtype, device=device)  # (x, y) order
    torch.testing.assert_close(xy, expected)
    assert xy.device.type == device.type and xy.dtype == dtype


@pytest.mark.parametrize("align_corners", [True, False])
def test_pixels_to_normalised_samples_pixel_centres_in_either_convention(align_corners):
    """Sampling an image at its own pixel coordinates, converted either way, returns the image."""
    image = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    coords = cv.identity_grid((5, 7)).permute(1, 2, 0)  # (H, W, 2) row, col
    grid = cv.pixels_to_normalised(coords, (5, 7), align_corners=align_corners)[None]
    torch.testing.assert_close(cv.sample(image, grid, align_corners=align_corners), image)


def test_warp_affine_xy_is_the_row_col_affine_after_the_swap():
    """torch's (x, y) affine convention (the networks') and this module's (row, col) one describe
    the same backward map once swapped by swap_theta_axes."""
    shape = (24, 32)
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    matrix_rc = cv.rotation_about(((shape[0] - 1) / 2, (shape[1] - 1) / 2), 9.0, (1.5, -2.0))
    theta_rc = cv.affine_pixels_to_normalised(matrix_rc, shape)
    theta_xy = torch.tensor(cv.swap_theta_axes(theta_rc), dtype=torch.float32)[None]
    by_field = cv.warp(image, cv.affine_to_field(matrix_rc, shape))
    torch.testing.assert_close(cv.warp_affine_xy(image, theta_xy), by_field, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cv.swap_theta_axes(cv.swap_theta_axes(theta_rc)), theta_rc)


def test_identity_grid(device, dtype):
    grid = cv.identity_grid((3, 4), device=device, dtype=dtype)
    assert grid.shape == (2, 3, 4) and grid.dtype == dtype and grid.device.type == device.type
    assert grid[0, 2, 1] == 2 and grid[1, 2, 1] == 1  # channel 0 = row, channel 1 = col


# --------------------------------------------------------------------------- warp
def test_warp_zero_field_is_identity(device, dtype):
    image = torch.rand(2, 3, 9, 13, dtype=dtype, device=device)
    out = cv.warp(image, torch.zeros(2, 2, 9, 13, dtype=dtype, device=device))
    torch.testing.assert_close(out, image, atol=_tol(dtype), rtol=0)


@pytest.mark.parametrize("shift", [(3, -5), (-2, 4), (0, 7)])
def test_warp_translation_direction(device, dtype, shift):
    """A constant field u moves content by -u: warped(p) = source(p + u), exactly, for integer u."""
    dr, dc = shift
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 2, 20, 24, generator=g, dtype=dtype).to(device)
    field = torch.zeros(1, 2, 20, 24, dtype=dtype, device=device)
    field[:, 0], field[:, 1] = dr, dc
    out = cv.warp(image, field)
    rows = slice(max(0, -dr), 20 - max(0, dr))
    cols = slice(max(0, -dc), 24 - max(0, dc))
    src_rows = slice(rows.start + dr, rows.stop + dr)
    src_cols = slice(cols.start + dc, cols.stop + dc)
    torch.testing.assert_close(out[..., rows, cols], image[..., src_rows, src_cols], atol=_tol(dtype), rtol=0)
    # Outside the source the zero padding comes in.
    if dr > 0:
        assert torch.all(out[..., 20 - dr :, :] == 0)


def test_warp_half_pixel_is_bilinear(device, dtype):
    image = torch.arange(30, dtype=dtype, device=device).reshape(1, 1, 5, 6)
    field = torch.zeros(1, 2, 5, 6, dtype=dtype, device=device)
    field[:, 1] = 0.5
    out = cv.warp(image, field)
    torch.testing.assert_close(out[..., :, :-1], (image[..., :, :-1] + image[..., :, 1:]) / 2, atol=_tol(dtype), rtol=0)


def test_warp_source_of_another_size(device, dtype):
    """The field lives on the target grid; the source is sampled in its own pixels."""
    image = torch.rand(1, 1, 12, 15, dtype=dtype, device=device)
    field = torch.zeros(1, 2, 5, 6, dtype=dtype, device=device)
    field[:, 0] = 2.0
    out = cv.warp(image, field)
    assert out.shape == (1, 1, 5, 6)
    torch.testing.assert_close(out, image[..., 2:7, 0:6], atol=_tol(dtype), rtol=0)


def test_warp_broadcasts_batch_of_one(device, dtype):
    image = torch.rand(1, 1, 8, 8, dtype=dtype, device=device)
    field = torch.zeros(3, 2, 8, 8, dtype=dtype, device=device)
    field[1, 1] = 1.0
    out = cv.warp(image, field)
    assert out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out[0], image[0], atol=_tol(dtype), rtol=0)
    torch.testing.assert_close(out[1, :, :, :-1], image[0, :, :, 1:], atol=_tol(dtype), rtol=0)


def test_warp_gradcheck():
    """Gradients of warp w.r.t. the field (and the image) match finite differences (float64)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    # Fractional displacements (|u| in 0.2..0.8) keep every sample point off the integer grid,
    # where bilinear interpolation has its kinks; beyond the border zero padding is still linear.
    magnitude = 0.2 + 0.6 * torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(1, 2, 5, 6, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    field = magnitude * sign
    field.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: cv.warp(image.detach(), f), (field,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda i: cv.warp(i, field.detach()), (image,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- affine fields
def test_rotation_about_fixed_point_and_direction():
    m = cv.rotation_about((10.0, 20.0), 90.0)
    np.testing.assert_allclose(m @ [10.0, 20.0, 1.0], [10.0, 20.0], atol=1e-12)
    # R = [[c, -s], [s, c]] on (row, col): at +90 degrees one column right samples one row up.
    np.testing.assert_allclose(m @ [10.0, 21.0, 1.0], [9.0, 20.0], atol=1e-12)
    m = cv.rotation_about((0.0, 0.0), 0.0, (2.5, -1.0))
    np.testing.assert_allclose(m, [[1, 0, 2.5], [0, 1, -1.0]])


def test_rotation_angle_turns_content_clockwise_on_screen():
    """``rotation_about(c, a)`` is the *backward* map, so warping with it turns the content by
    ``a`` clockwise as displayed (rows down): the opposite of ``skimage.transform.rotate(img, a)``,
    which turns it counter-clockwise. Initial alignment angles follow this convention too."""
    from skimage.transform import rotate

    rows, cols = np.mgrid[:65, :65].astype(np.float64)
    image = np.exp(-((rows - 20) ** 2 + (cols - 45) ** 2) / 30.0) + 0.5 * np.exp(-((rows - 40) ** 2 + (cols - 25) ** 2) / 15.0)
    field = cv.affine_to_field(cv.rotation_about((32.0, 32.0), 30.0), image.shape)
    ours = cv.warp(torch.as_tensor(image, dtype=torch.float32)[None, None], field)[0, 0].numpy()
    np.testing.assert_allclose(ours, rotate(image, -30.0, order=1), atol=2e-3)
    assert np.abs(ours - rotate(image, 30.0, order=1)).max() > 0.3


def test_affine_to_field_is_the_affine(device):
    rng = np.random.default_rng(3)
    shape = (31, 40)
    a = _random_affine(rng, shape)
    field = cv.affine_to_field(a, shape, device=device)
    assert field.shape == (1, 2, *shape) and field.device.type == device.type
    grid = cv.identity_grid(shape, dtype=torch.float64).numpy()
    expected = np.einsum("ij,jhw->ihw", a[:, :2], grid) + a[:, 2, None, None] - grid
    np.testing.assert_allclose(field[0].cpu().numpy(), expected, atol=1e-4)
    # Off the grid too: bilinear interpolation of a linear field is exact.
    points = rng.uniform([0, 0], [30, 39], (25, 2))
    np.testing.assert_allclose(cv.map_target_to_source(points, field[0]), points @ a[:, :2].T + a[:, 2], atol=1e-3)


def test_compose_two_affines_is_their_product(device, dtype):
    """compose(v, u) of affine fields = the field of A_u o A_v (apply v's map, then u's)."""
    rng = np.random.default_rng(0)
    shape = (48, 56)
    a_u = _random_affine(rng, shape, shift=2.0)  # earlier
    a_v = _random_affine(rng, shape, shift=2.0)  # later
    u = cv.affine_to_field(a_u, shape, device=device).to(dtype)
    v = cv.affine_to_field(a_v, shape, device=device).to(dtype)
    total = cv.compose(v, u)
    product = np.hstack([a_u[:, :2] @ a_v[:, :2], (a_u[:, :2] @ a_v[:, 2] + a_u[:, 2])[:, None]])
    expected = cv.affine_to_field(product, shape)[0].double().numpy()
    # Where v's sample point falls inside the grid, u is interpolated (exactly: it is linear);
    # outside, compose clamps u at the border, which no longer is the affine.
    grid = cv.identity_grid(shape, dtype=torch.float64).numpy()
    mid = grid + v[0].cpu().double().numpy()
    inside = (mid[0] >= 0) & (mid[0] <= shape[0] - 1) & (mid[1] >= 0) & (mid[1] <= shape[1] - 1)
    assert inside.mean() > 0.7
    assert total.dtype == dtype and total.device.type == device.type
    got = total[0].cpu().double().numpy()
    np.testing.assert_allclose(got[:, inside], expected[:, inside], atol=2e-3)
    # Warping twice equals warping once with the composed field (on smooth content, since
    # bilinear resampling twice blurs a little more than once).
    rows = torch.arange(shape[0], dtype=dtype, device=device).view(-1, 1)
    cols = torch.arange(shape[1], dtype=dtype, device=device).view(1, -1)
    smooth = (torch.sin(rows / 5.0) + torch.cos(cols / 7.0))[None, None]
    twice = cv.warp(cv.warp(smooth, u), v)[0, 0]
    once = cv.warp(smooth, total)[0, 0]
    # Compare where both sample points stay well inside the grid.
    src = mid + u[0].cpu().double().numpy()  # not exact (u sampled at mid), only used to choose pixels
    keep = inside & (src[0] > 1) & (src[0] < shape[0] - 2) & (src[1] > 1) & (src[1] < shape[1] - 2)
    keep &= (mid[0] > 1) & (mid[0] < shape[0] - 2) & (mid[1] > 1) & (mid[1] < shape[1] - 2)
    diff = (twice - once).abs().cpu().numpy()[keep]
    assert diff.max() < 0.02


def test_affine_normalised_round_trip_and_grid_agree(device, dtype):
    rng = np.random.default_rng(5)
    shape = (33, 47)
    a = _random_affine(rng, shape, scale=0.1, shift=3.0)
    n = cv.affine_pixels_to_normalised(a, shape)
    np.testing.assert_allclose(cv.affine_normalised_to_pixels(n, shape), a, atol=1e-12)
    # The identity is the identity in both spaces.
    np.testing.assert_allclose(cv.affine_pixels_to_normalised(np.eye(2, 3), shape), np.eye(2, 3), atol=1e-15)
    # Sampling through the normalised grid = warping with the pixel field.
    image = torch.rand(1, 1, *shape, dtype=dtype, device=device)
    grid = cv.normalised_affine_grid(torch.as_tensor(n, dtype=dtype, device=device)[None], shape)
    via_grid = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=cv.ALIGN_CORNERS)
    via_field = cv.warp(image, cv.affine_to_field(a, shape, device=device).to(dtype))
    torch.testing.assert_close(via_grid, via_field, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- point mapping and inversion
def test_map_target_to_source_on_analytic_field(dtype):
    shape = (120, 140)
    field, u = _sinusoidal_field(shape, dtype=dtype)
    rng = np.random.default_rng(0)
    on_grid = rng.integers(0, [shape[0], shape[1]], (40, 2)).astype(np.float64)
    np.testing.assert_allclose(cv.map_target_to_source(on_grid, field), on_grid + u(on_grid), atol=1e-4)
    # Between pixel centres: bilinear interpolation error only (~a (2 pi / L)^2 / 8 < 0.01 px).
    points = rng.uniform([0, 0], [shape[0] - 1, shape[1] - 1], (200, 2))
    np.testing.assert_allclose(cv.map_target_to_source(points, field), points + u(points), atol=0.01)


def test_map_source_to_target_inverts_analytic_field(dtype):
    shape = (120, 140)
    field, u = _sinusoidal_field(shape, dtype=dtype)
    rng = np.random.default_rng(1)
    target = rng.uniform([10, 10], [shape[0] - 11, shape[1] - 11], (200, 2))
    source = target + u(target)  # exact, analytic
    recovered = cv.map_source_to_target(source, field)
    assert np.abs(recovered - target).max() < 0.05
    # And the two mappings are inverse of each other.
    np.testing.assert_allclose(cv.map_target_to_source(recovered, field), source, atol=1e-3)
    assert cv.map_source_to_target(np.zeros((0, 2)), field).shape == (0, 2)


def _swirl(shape=(160, 200), centre=(80.0, 100.0), angle_deg=110.0, radius=30.0) -> np.ndarray:
    """A backward field that turns a Gaussian-windowed disc by up to ``angle_deg`` about ``centre``
    (a smooth, invertible swirl): its Jacobian departs from its (identity) affine part by more
    than 1, where a fixed-point iteration alone stalls."""
    rows, cols = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    dr, dc = rows - centre[0], cols - centre[1]
    theta = np.deg2rad(angle_deg) * np.exp(-(dr**2 + dc**2) / (2 * radius**2))
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c * dr - s * dc - dr, s * dr + c * dc - dc]).astype(np.float32)


def test_map_source_to_target_inverts_a_strong_swirl_and_beyond_the_grid():
    field = _swirl()
    rng = np.random.default_rng(0)
    inside = rng.uniform([40, 60], [120, 140], (400, 2))  # the swirl's core
    outside = rng.uniform([-30, -30], [190, 230], (400, 2))  # the grid and around it
    for points in (inside, outside):
        mapped = cv.map_source_to_target(points, field)
        back = cv.map_target_to_source(mapped, field)  # the exact direction
        assert np.abs(back - points).max() < 0.01


def test_invert_field_round_trip(device, dtype):
    shape = (96, 112)
    field, _ = _sinusoidal_field(shape, dtype=dtype, device=device)
    field = field[None]
    inverse = cv.invert_field(field)
    assert inverse.shape == field.shape and inverse.dtype == dtype
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from border clamping
    assert cv.compose(field, inverse)[interior].abs().max() < 0.05
    assert cv.compose(inverse, field)[interior].abs().max() < 0.05
    # The dense inverse agrees with the point-wise one: source grid point s -> s + w(s).
    s = np.array([[40.0, 50.0], [60.5, 33.25], [20.0, 90.0]])
    np.testing.assert_allclose(
        s + cv.sample_field_at_points(inverse[0].cpu().double(), torch.as_tensor(s)).numpy(),
        cv.map_source_to_target(s, field[0].cpu()),
        atol=0.02,
    )


def test_sample_field_at_points_clamps_at_border():
    field = torch.zeros(2, 4, 5)
    field[0] = torch.arange(5.0)
    values = cv.sample_field_at_points(field, torch.tensor([[1.0, 2.5], [0.0, -3.0], [3.0, 9.0]]))
    torch.testing.assert_close(values[:, 0], torch.tensor([2.5, 0.0, 4.0]))


# --------------------------------------------------------------------------- frames and resolution
def test_frame_round_trip_and_skimage_resize_agree():
    from skimage.transform import resize

    original = (90, 130)
    working = (36, 52)
    frame = Frame(original_shape=original, shape=(40, 64), scale=(working[0] / original[0], working[1] / original[1]), offset=(2.0, 6.0))
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.5, 129, (50, 2))
    np.testing.assert_allclose(frame.to_original(frame.to_working(points)), points, atol=1e-10)
    # skimage.transform.resize uses the same pixel-centre mapping: resize a ramp and read back
    # the original coordinate of each working pixel (offset 0: no padding).
    plain = Frame(original, working, frame.scale, (0.0, 0.0))
    rows, cols = np.mgrid[: original[0], : original[1]].astype(np.float64)
    ramp_r = resize(rows, working, order=1, mode="edge", anti_aliasing=False)
    ramp_c = resize(cols, working, order=1, mode="edge", anti_aliasing=False)
    wr, wc = np.mgrid[: working[0], : working[1]].astype(np.float64)
    back = plain.to_original(np.stack((wr.ravel(), wc.ravel()), axis=1))
    inner = (back[:, 0] >= 0) & (back[:, 0] <= original[0] - 1) & (back[:, 1] >= 0) & (back[:, 1] <= original[1] - 1)
    np.testing.assert_allclose(ramp_r.ravel()[inner], back[inner, 0], atol=1e-6)
    np.testing.assert_allclose(ramp_c.ravel()[inner], back[inner, 1], atol=1e-6)
    # The original image's outer pixel edges land on the working grid's edges.
    np.testing.assert_allclose(plain.to_working([[-0.5, -0.5], [original[0] - 0.5, original[1] - 0.5]]), [[-0.5, -0.5], [working[0] - 0.5, working[1] - 0.5]])


def test_frame_at_shape_and_dict_round_trip():
    frame = Frame((200, 300), (64, 96), (0.3, 0.3), (2.0, 1.0))
    half = frame.at_shape((100, 150))
    p_full = np.array([[10.0, 20.0], [150.0, 299.0]])
    p_half = (p_full + 0.5) / 2 - 0.5  # the same physical position at half resolution
    np.testing.assert_allclose(half.to_working(p_half), frame.to_working(p_full), atol=1e-10)
    assert Frame.from_dict(frame.to_dict()) == frame


def test_field_between_frames_identity(device):
    """An identity working field is the physical identity, whatever the sizes and scales."""
    target = Frame((300, 400), (128, 160), (0.32, 0.32), (16.0, 16.0))
    source = Frame((350, 380), (128, 160), (0.32, 0.32), (8.0, 19.2))
    zero = torch.zeros(2, 128, 160, device=device)
    field = cv.field_between_frames(zero, target, source)
    assert field.shape == (2, 300, 400) and field.device.type == device.type
    # Same grid, same frame: exactly zero.
    torch.testing.assert_close(cv.field_between_frames(zero, target, target), torch.zeros(2, 300, 400, device=device), atol=1e-4, rtol=0)
    # Different frames: the centring shift between them, s = T_s^-1(T_t(p)).
    p = np.array([[0.0, 0.0], [123.0, 45.0], [299.0, 399.0]])
    expected = source.to_original(target.to_working(p)) - p
    got = field[:, p[:, 0].astype(int), p[:, 1].astype(int)].T.cpu().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # A source at half the resolution of the target: the same physical point, s = (p + 0.5) / 2 - 0.5.
    half = target.at_shape((150, 200))
    field = cv.field_between_frames(zero, target, half).cpu().numpy()
    rows, cols = np.mgrid[:300, :400].astype(np.float64)
    np.testing.assert_allclose(field[0] + rows, (rows + 0.5) / 2 - 0.5, atol=2e-3)
    np.testing.assert_allclose(field[1] + cols, (cols + 0.5) / 2 - 0.5, atol=2e-3)


def test_field_between_frames_matches_point_mapping():
    target = Frame((100, 120), (64, 64), (0.5, 0.5), (7.0, 2.0))
    source = Frame((110, 100), (64, 64), (0.5, 0.5), (4.5, 7.0))
    working, _ = _sinusoidal_field((64, 64), amplitude=(1.5, -1.0), period=(40.0, 30.0), dtype=torch.float32)
    field = cv.field_between_frames(working, target, source)
    rows, cols = slice(20, 30), slice(40, 55)
    block = cv.field_between_frames(working, target, source, rows=rows, cols=cols)
    torch.testing.assert_close(block, field[:, rows, cols])
    rng = np.random.default_rng(2)
    p = rng.integers(0, [100, 120], (30, 2)).astype(np.float64)
    expected = source.to_original(cv.map_target_to_source(target.to_working(p), working))
    got = p + field[:, p[:, 0].astype(int), p[:, 1].astype(int)].T.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_field_between_frames_keeps_float64(dtype):
    """A float64 working field (e.g. from an optimiser run in double) must be accepted."""
    frame = Frame((100, 120), (64, 64), (0.5, 0.5), (7.0, 2.0))
    zero = torch.zeros(2, 64, 64, dtype=dtype)
    field = cv.field_between_frames(zero, frame, frame)
    assert field.abs().max() < 1e-4


def test_resize_field_keeps_a_translation_physical(device, dtype):
    field = torch.zeros(1, 2, 30, 40, dtype=dtype, device=device)
    field[:, 0], field[:, 1] = 1.5, -2.0
    up = cv.resize_field(field, (90, 100))
    assert up.shape == (1, 2, 90, 100) and up.dtype == dtype and up.device.type == device.type
    torch.testing.assert_close(up[:, 0], torch.full_like(up[:, 0], 1.5 * 3.0))
    torch.testing.assert_close(up[:, 1], torch.full_like(up[:, 1], -2.0 * 2.5))
    assert cv.resize_field(field, (30, 40)) is field


def test_resize_field_maps_an_affine_with_pixel_centres():
    """A linear field stays the same physical affine after resizing (Frame's pixel centres)."""
    rng = np.random.default_rng(4)
    small, k = (32, 40), 2
    a = _random_affine(rng, small)
    big = cv.resize_field(cv.affine_to_field(a, small), (small[0] * k, small[1] * k))[0].numpy()
    rr, cc = np.mgrid[: small[0] * k, : small[1] * k].astype(np.float64)
    p_big = np.stack((rr.ravel(), cc.ravel()), axis=1)
    p_small = (p_big + 0.5) / k - 0.5
    s_small = p_small @ a[:, :2].T + a[:, 2]
    s_big = (s_small + 0.5) * k - 0.5
    expected = (s_big - p_big).T.reshape(big.shape)
    # Interpolation clamps in the outer half pixel of the small grid; compare inside it.
    np.testing.assert_allclose(big[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-3)


# --------------------------------------------------------------------------- devices
def test_default_device_choices():
    assert cv.default_device("cpu") == torch.device("cpu")
    auto = cv.default_device("auto")
    assert auto == cv.default_device(None)
    if not torch.cuda.is_available():
        assert auto.type != "cuda"
        with pytest.raises(ValueError, match="cuda"):
            cv.default_device("cuda")


def test_to_tensor_keeps_device_and_casts():
    t = cv.to_tensor(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    assert cv.to_tensor(t, dtype=torch.float64).dtype == torch.float64
    assert math.isclose(float(cv.to_tensor(np.float64(2.5))), 2.5)


def test_cast_to_dtype_rounds_and_clips_to_integer_types():
    from napari_histreg.conventions import cast_to_dtype

    values = np.array([-3.6, 0.4, 1.5, 2.5, 254.6, 300.0], np.float32)
    # to nearest (halves to even), then clipped: a plain cast would give 253 for -3.6 and 44 for 300
    assert cast_to_dtype(values, np.uint8).tolist() == [0, 0, 2, 2, 255, 255]
    assert cast_to_dtype(values, np.int8).tolist() == [-4, 0, 2, 2, 127, 127]
    assert values[0] == np.float32(-3.6)  # not in place unless asked
    cast_to_dtype(values, np.uint16, in_place=True)
    assert values.tolist() == [0.0, 0.0, 2.0, 2.0, 255.0, 300.0]
    floats = cast_to_dtype(np.array([0.25, 1.75]), np.float32)
    assert floats.dtype == np.float32 and floats.tolist() == [0.25, 1.75]


def test_frame_maps_numpy_and_torch_points_alike():
    from napari_histreg.conventions import rescale_pixels

    frame = Frame((300, 400), (128, 128), (0.32, 0.32), (10.0, -4.0))
    points = np.array([[0.0, 0.0], [299.5, 399.25], [12.3, 45.6]])
    working = frame.to_working(points)
    on_torch = frame.to_working(torch.tensor(points, dtype=torch.float64)[None])  # any (..., 2) shape
    assert on_torch.shape == (1, 3, 2)
    np.testing.assert_allclose(on_torch[0].numpy(), working, atol=1e-12)
    np.testing.assert_allclose(frame.to_original(torch.as_tensor(working)).numpy(), points, atol=1e-9)
    # pixel 0's centre of an image is at 0.5 in the image sampled twice as finely
    np.testing.assert_allclose(rescale_pixels([[0.0, 3.0]], 2.0), [[0.5, 6.5]])
    # a frame at an exact pyramid factor keeps the factor where the level's size was rounded
    level = Frame((187, 250), (128, 128), (0.5, 0.5), (0.0, 0.0))
    assert level.at_shape((1500, 2000), (8.0, 8.0)).scale == (0.0625, 0.0625)
    assert level.at_shape((1500, 2000)).scale != (0.0625, 0.0625)
