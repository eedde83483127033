"""A bundled sample pair with a known ground truth, built only from scikit-image's data.

scikit-image ships an immunohistochemistry image (``skimage.data.immunohistochemistry()``,
512x512 RGB, haematoxylin counterstain + DAB). Colour deconvolution
(:func:`skimage.color.rgb2hed`) splits it into its stains, which are rendered back as two
brightfield "sections" of the same tissue:

* the **target** (fixed image) shows the haematoxylin stain alone (nuclei, blue);
* the **source** (moving image) shows the DAB immunostain with its haematoxylin counterstain,
  warped by a known smooth transform: a small rotation + translation composed with a smooth
  elastic field (a sum of Gaussian bumps), all drawn from ``seed``.

Both sections are cut out by the same irregular tissue outline on a white background, as a
slide would show them. The transform is stored as the backward field the registration should
recover (``warp(source, true_field)`` shows the target's tissue, see :mod:`.conventions`), and
~20 landmarks picked on distinctive corners of the target are mapped exactly into the source
with it: ``source_landmark = p + true_field(p)``.

Importing this module does not import napari or Qt; :func:`sample_layer_data` returns plain
napari ``LayerDataTuple``\\ s.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .conventions import (
    affine_to_field,
    compose,
    invert_field,
    map_target_to_source,
    rotation_about,
    warp,
)
from .threads import on_one_thread

__all__ = ["SamplePair", "make_sample_pair", "sample_layer_data"]

#: Names of the layers :func:`sample_layer_data` returns.
TARGET_NAME = "sample target (H-stain)"
SOURCE_NAME = "sample source (DAB-stain)"
TARGET_POINTS_NAME = "sample target landmarks"
SOURCE_POINTS_NAME = "sample source landmarks"


@dataclasses.dataclass(frozen=True)
class SamplePair:
    """A synthetic two-stain pair with its ground truth.

    ``source``: ``(H, W, 3)`` uint8, the moving image (DAB-stain, warped);
    ``target``: ``(H, W, 3)`` uint8, the fixed image (H-stain);
    ``source_landmarks`` / ``target_landmarks``: ``(N, 2)`` float64 ``(row, col)`` pixels,
    paired by row and by ``ids`` (``(N,)`` str);
    ``true_field``: ``(2, H, W)`` float32 backward field on the target grid, channel 0 = d-row:
    ``warp(source, true_field)`` gives the target's tissue and
    ``source_landmarks == target_landmarks + true_field(target_landmarks)``;
    ``matrix``: the 2x3 backward affine (pixels, ``(row, col)``) of the rigid part;
    ``info``: the parameters drawn from the seed.

    The pair is built once per seed and cached; every call of :func:`make_sample_pair` gets
    its own writable copies of the arrays, so changing them does not change the cache.
    """

    source: np.ndarray
    target: np.ndarray
    source_landmarks: np.ndarray
    target_landmarks: np.ndarray
    ids: np.ndarray
    true_field: np.ndarray
    matrix: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(2, 3))
    info: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- building blocks
def _stains() -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and DAB concentrations of scikit-image's IHC image (``(H, W)`` each)."""
    from skimage import data
    from skimage.color import rgb2hed

    hed = rgb2hed(data.immunohistochemistry())
    return hed[..., 0], hed[..., 2]


def _render(mask: np.ndarray, h=0.0, e=0.0, d=0.0) -> np.ndarray:
    """uint8 RGB brightfield image of stain concentrations (Ruifrok-Johnston model), zero
    (white glass) outside ``mask``."""
    from skimage.color import hed2rgb

    shape = mask.shape
    conc = np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), shape) for c in (h, e, d)], axis=-1)
    rgb = hed2rgb(conc * mask[..., None])
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _tissue_outline(shape, rng: np.random.Generator) -> np.ndarray:
    """Soft ``[0, 1]`` mask of an irregular tissue section centred in the image, clear of the
    border by about 8% of the size so that the transform never pushes tissue out."""
    from scipy.ndimage import gaussian_filter

    h, w = shape
    rows, cols = np.mgrid[:h, :w].astype(np.float64)
    cr, cc = (h - 1) / 2 + rng.uniform(-0.02, 0.02) * h, (w - 1) / 2 + rng.uniform(-0.02, 0.02) * w
    theta = np.arctan2(rows - cr, cols - cc)
    radius = np.hypot((rows - cr) / (0.40 * h), (cols - cc) / (0.40 * w))
    boundary = np.ones_like(theta)
    for k, amp in ((2, 0.07), (3, 0.05), (5, 0.025)):
        boundary += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return gaussian_filter((radius < boundary).astype(np.float64), 1.5)


def _elastic_field(shape, rng: np.random.Generator, bumps: int = 5) -> np.ndarray:
    """``(2, H, W)`` smooth displacement: a sum of Gaussian bumps (pixels)."""
    h, w = shape
    rows, cols = np.mgrid[:h, :w].astype(np.float64)
    field = np.zeros((2, h, w))
    size = min(h, w)
    for _ in range(bumps):
        centre = rng.uniform(0.2, 0.8, 2) * np.array([h, w])
        sigma = rng.uniform(0.10, 0.20) * size
        amplitude = np.clip(rng.normal(0.0, 5.0, 2), -9.0, 9.0)
        bump = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
        field += amplitude[:, None, None] * bump
    return field


def _pick_landmarks(grey: np.ndarray, allowed: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` distinctive, well spread corners of ``grey`` inside ``allowed``."""
    from skimage.feature import corner_harris, corner_peaks

    response = corner_harris(grey, sigma=3)
    response = np.where(allowed, response, 0.0)
    spacing = int(0.07 * min(grey.shape))
    peaks = corner_peaks(response, min_distance=spacing, threshold_rel=0.01, num_peaks=count, exclude_border=spacing // 2)
    order = np.lexsort((peaks[:, 1], peaks[:, 0]))  # top to bottom, then left to right
    return peaks[order].astype(np.float64)


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


# --------------------------------------------------------------------------- the pair
_ARRAYS = ("source", "target", "source_landmarks", "target_landmarks", "ids", "true_field", "matrix")


def make_sample_pair(seed: int = 0) -> SamplePair:
    """The sample pair for ``seed`` (deterministic; built once per seed, then copied).

    The median rTRE of the landmarks before registration is about 0.015-0.03 (0.025 for
    seed 0): a rotation of 4-7 degrees, a shift of 8-15 px and an elastic field of a few
    pixels on a 512x512 image. :func:`napari_histreg.register` brings it below 0.001.
    """
    cached = _build_sample_pair(int(seed))
    copies = {name: np.array(getattr(cached, name)) for name in _ARRAYS}
    return dataclasses.replace(cached, info=dict(cached.info), **copies)


@functools.lru_cache(maxsize=4)
@on_one_thread  # built on napari's GUI thread too; the same arrays on any number of threads
def _build_sample_pair(seed: int) -> SamplePair:
    """The cached pair behind :func:`make_sample_pair` (read-only arrays)."""
    from scipy.ndimage import binary_erosion

    rng = np.random.default_rng(seed)
    haem, dab = _stains()
    shape = haem.shape
    outline = _tissue_outline(shape, rng)
    target = _render(outline, h=1.5 * haem)  # haematoxylin alone, a little stronger than the counterstain
    moving = _render(outline, h=haem, d=dab)  # DAB immunostain with haematoxylin counterstain

    # Ground truth: backward field on the target grid = elastic after the rigid part.
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 7.0))
    direction = rng.uniform(0.0, 2 * np.pi)
    translation = rng.uniform(8.0, 15.0) * np.array([np.sin(direction), np.cos(direction)])
    matrix = rotation_about(centre, angle, translation)
    rigid = affine_to_field(matrix, shape).to(torch.float64)
    elastic = torch.as_tensor(_elastic_field(shape, rng), dtype=torch.float64)[None]
    true_field = compose(elastic, rigid)  # (1, 2, H, W) float64

    # The source is the DAB section moved by the inverse: source(s) = moving(s + w(s)) with
    # w = inverse of true_field, so that source(p + true_field(p)) = moving(p). Warp the
    # optical "darkness" (255 - rgb) so that what comes in from outside is white glass.
    inverse = invert_field(true_field, iterations=15)
    dark = torch.as_tensor(255.0 - moving.transpose(2, 0, 1).astype(np.float64))[None]
    warped = warp(dark, inverse)[0].numpy().transpose(1, 2, 0)
    source = np.clip(np.rint(255.0 - warped), 0, 255).astype(np.uint8)

    # Landmarks: corners of the target inside the tissue whose source position stays inside
    # the tissue too (well clear of the image border).
    field = true_field[0].to(torch.float32).numpy()
    grey = target.astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721]) / 255.0
    inner = binary_erosion(outline > 0.5, iterations=int(0.04 * min(shape)))
    margin = 0.04 * min(shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    src_rows, src_cols = rows + field[0], cols + field[1]
    inside = (
        (src_rows > margin) & (src_rows < shape[0] - 1 - margin) & (src_cols > margin) & (src_cols < shape[1] - 1 - margin)
    )
    target_landmarks = _pick_landmarks(grey, inner & inside, count=20)
    source_landmarks = map_target_to_source(target_landmarks, field)
    ids = np.array([str(i) for i in range(len(target_landmarks))])

    return SamplePair(
        source=_readonly(source),
        target=_readonly(target),
        source_landmarks=_readonly(source_landmarks),
        target_landmarks=_readonly(target_landmarks),
        ids=_readonly(ids),
        true_field=_readonly(field),
        matrix=_readonly(matrix),
        info={
            "seed": seed,
            "image": "skimage.data.immunohistochemistry",
            "angle_deg": angle,
            "translation_rc": [float(t) for t in translation],
            "convention": "true_field is backward on the target grid: warp(source, true_field)(p) = source(p + u(p)) "
            "shows the target's tissue; source landmark = target landmark + u(target landmark)",
        },
    )


make_sample_pair.cache_info = _build_sample_pair.cache_info  # type: ignore[attr-defined]
make_sample_pair.cache_clear = _build_sample_pair.cache_clear  # type: ignore[attr-defined]


def sample_layer_data(seed: int = 0) -> list[tuple]:
    """The sample pair as napari ``LayerDataTuple``\\ s (plain tuples; napari is not imported):
    target image, source image, target landmarks, source landmarks."""
    pair = make_sample_pair(seed)
    ids = pair.ids

    def text():
        return {"string": "{id}", "size": 8, "color": "white", "translation": [-8, 0]}

    from ._napari.layers import LANDMARK_PALETTE  # plain module: no napari, no Qt

    target_colour, source_colour = LANDMARK_PALETTE[:2]  # registered landmarks are magenta
    return [
        (pair.target, {"name": TARGET_NAME, "rgb": True}, "image"),
        (pair.source, {"name": SOURCE_NAME, "rgb": True, "opacity": 0.6}, "image"),
        (
            pair.target_landmarks,
            {"name": TARGET_POINTS_NAME, "features": {"id": ids}, "text": text(), "size": 8, "face_color": target_colour,
             "metadata": {"histreg_colour": target_colour}},
            "points",
        ),
        (
            pair.source_landmarks,
            {"name": SOURCE_POINTS_NAME, "features": {"id": ids.copy()}, "text": text(), "size": 8,
             "face_color": source_colour, "metadata": {"histreg_colour": source_colour}},
            "points",
        ),
    ]
