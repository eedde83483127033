"""Preprocessing: grey, inversion, anti-aliased resampling, centred padding, normalisation, and
entropy-guided histogram equalisation (Pucci et al. 2024)."""

from __future__ import annotations

import contextlib
import contextvars

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import Frame, to_tensor


@dataclasses.dataclass
class PreprocessConfig:
    """``working_size``: the longer side of the working grid (never upsampled above the
    originals). ``pad_multiple``: the padded grid is a multiple of this (pyramids, patches).
    ``equalise``: histogram-match the lower-entropy image to the higher-entropy one (off by
    default: on the development pairs it lowered no error and raised the synthetic elastic
    pair's from 0.0033 to 0.0054, because matching amplifies the JPEG noise of white glass).
    ``clahe``: also apply adaptive equalisation (CLAHE) to both. ``representation``:
    ``"grey"`` (luminance, inverted when ``invert``) or ``"haematoxylin"`` (the haematoxylin
    optical density of colour images by colour deconvolution, :func:`haematoxylin_density`;
    tissue is bright already, so ``invert`` does not apply; a grey image stays grey). The
    pipeline uses the second as its retry for colour pairs flagged ``check``
    (``RegistrationConfig.counterstain_retry``)."""

    working_size: int = 768
    invert: bool = True
    equalise: bool = False
    clahe: bool = False
    pad_multiple: int = 32
    representation: str = "grey"


@dataclasses.dataclass
class PreparedPair:
    """Both images on one working grid, as float32 in ``[0, 1]`` with tissue bright."""

    source: np.ndarray
    target: np.ndarray
    source_frame: Frame
    target_frame: Frame


#: pixels converted at a time by :func:`to_grey` (its float temporaries stay near 50 MB)
GREY_BAND_PIXELS = 1 << 22


def to_grey(image: np.ndarray) -> np.ndarray:
    """Float32 grey in ``[0, 1]`` from grey/RGB/RGBA of any integer or float dtype.

    Colour is converted in bands of rows (:data:`GREY_BAND_PIXELS`), each pixel exactly as a
    whole-image conversion would, so a large slide needs one float plane, not four."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        weights = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
        grey = _by_colour_bands(image, lambda rgb: rgb @ weights)
    elif image.ndim == 2:
        grey = image.astype(np.float32) / _dtype_scale(image)
    else:
        raise ValueError(f"expected a (H, W) grey or (H, W, 3|4) colour image, got shape {image.shape}")
    return np.clip(grey, 0.0, 1.0) if np.issubdtype(image.dtype, np.integer) else _minmax(grey)


#: REPRESENTATIONS of an image the registration can work on (``PreprocessConfig.representation``)
REPRESENTATIONS = ("grey", "haematoxylin")


def is_colour(image: np.ndarray, tolerance: float = 0.02) -> bool:
    """Whether ``image`` is RGB(A) with colour in it: a mean channel spread above ``tolerance``
    (of the dtype's range) on a subsample. A grey section saved as RGB is not colour."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        return False
    step = max(1, max(image.shape[:2]) // 256)
    rgb = image[::step, ::step, :3].astype(np.float32) / _dtype_scale(image[..., :3])
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean()) > tolerance


def haematoxylin_density(image: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (Ruifrok-Johnston colour deconvolution, scikit-image's
    stain vectors), tissue bright, scaled by its 99.5th percentile into ``[0, 1]``."""
    from skimage.color import hed_from_rgb

    column = np.asarray(hed_from_rgb, dtype=np.float32)[:, 0]
    log_floor = np.float32(np.log(1e-6))
    out = _by_colour_bands(np.asarray(image), lambda rgb: np.maximum((np.log(np.clip(rgb, 1e-6, 1.0)) / log_floor) @ column, 0.0))
    top = float(np.percentile(out[:: max(1, out.shape[0] // 512), :: max(1, out.shape[1] // 512)], 99.5))
    return np.clip(out / max(top, 1e-6), 0.0, 1.0)


def _by_colour_bands(image: np.ndarray, convert) -> np.ndarray:
    """``convert`` (float32 RGB in ``[0, 1]`` of shape ``(h, w, 3)`` -> ``(h, w)``) over an RGB(A)
    image, in bands of rows (:data:`GREY_BAND_PIXELS`) so that a large slide needs one float
    plane, not four; transparent pixels are background, so colour is composited on white."""
    scale = _dtype_scale(image[..., :3])
    out = np.empty(image.shape[:2], dtype=np.float32)
    band = max(1, GREY_BAND_PIXELS // max(1, image.shape[1]))
    for r0 in range(0, image.shape[0], band):
        part = image[r0 : r0 + band]
        rgb = part[..., :3].astype(np.float32) / scale
        if image.shape[-1] == 4:
            alpha = part[..., 3].astype(np.float32) / scale
            rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
        out[r0 : r0 + band] = convert(rgb)
    return out


def _dtype_scale(image: np.ndarray) -> float:
    if image.dtype == np.uint8:
        return 255.0
    if image.dtype == np.uint16:
        return 65535.0
    if np.issubdtype(image.dtype, np.integer):
        return float(max(image.max(), 1))
    return 1.0


def _minmax(image: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(image)), float(np.max(image))
    if hi - lo < 1e-12:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def gaussian_kernel1d(sigma: float, device=None) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``, reflect padding."""
    if sigma <= 0:
        return image
    k = gaussian_kernel1d(sigma, device=image.device).to(image.dtype)
    c = image.shape[1]
    r = (k.numel() - 1) // 2
    pad_r = min(r, image.shape[-2] - 1)
    pad_c = min(r, image.shape[-1] - 1)
    out = F.pad(image, (0, 0, pad_r, pad_r), mode="reflect") if pad_r > 0 else image
    out = _banded_conv(out, k[r - pad_r : r + pad_r + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1), c, axis=-1)
    out = F.pad(out, (pad_c, pad_c, 0, 0), mode="reflect") if pad_c > 0 else out
    return _banded_conv(out, k[r - pad_c : r + pad_c + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1), c, axis=-2)


#: elements of the unfolded input one convolution call may need (about 64 MB of float32)
CONV_BAND_ELEMENTS = 1 << 24


def _banded_conv(image: torch.Tensor, kernel: torch.Tensor, groups: int, axis: int) -> torch.Tensor:
    """``F.conv2d(image, kernel, groups=groups)`` for a 1-D kernel, computed in bands across
    ``axis`` (the axis the kernel does not run along) when the image is large. The CPU
    convolution unfolds its input, which for a 6000 px slide and a 39-tap kernel took 2.3 GB;
    bands of columns (vertical kernel) or rows (horizontal kernel) give the same values."""
    taps = kernel.shape[-2] * kernel.shape[-1]
    if image.numel() * taps <= CONV_BAND_ELEMENTS:
        return F.conv2d(image, kernel, groups=groups)
    other = image.shape[-2] if axis == -1 else image.shape[-1]
    band = max(1, CONV_BAND_ELEMENTS // (image.shape[0] * image.shape[1] * other * taps))
    out_shape = list(image.shape)
    out_shape[-2] -= kernel.shape[-2] - 1
    out_shape[-1] -= kernel.shape[-1] - 1
    out = image.new_empty(out_shape)
    length = image.shape[axis]
    for start in range(0, length, band):
        index = [slice(None)] * 4
        index[axis] = slice(start, min(start + band, length))
        out[tuple(index)] = F.conv2d(image[tuple(index)], kernel, groups=groups)
    return out


def level_shape(shape, size: int) -> tuple[int, int]:
    """``shape`` scaled so that its longer side is at most ``size`` (each side at least 8): the
    grid of one pyramid level, search or scoring size."""
    h, w = shape
    scale = min(1.0, size / max(h, w))
    return (max(8, round(h * scale)), max(8, round(w * scale)))


#: the resampled levels of one registration (see :func:`level_cache`); None outside one
_LEVELS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("histreg_levels", default=None)


@contextlib.contextmanager
def level_cache():
    """Within the block, :func:`resample` keeps what it computes from numpy images, so a level
    that several stages ask for (the rotation search, the hypotheses' polish, the choice, the
    affine stage, the affine check and the confidence all resample the same two working images
    to the same few sizes) is computed once. Keyed by the image object (kept alive by the cache,
    so its ``id`` cannot be reused), shape, alignment and device: the working images are never
    modified during a run. :meth:`napari_histreg.Pipeline.run` opens one per registration."""
    token = _LEVELS.set({})
    try:
        yield
    finally:
        _LEVELS.reset(token)


def resample(
    image: np.ndarray | torch.Tensor, shape: tuple[int, int], device=None, align_corners: bool = False
) -> torch.Tensor:
    """Anti-aliased resampling of a ``(H, W)`` or ``(B, C, H, W)`` image to ``shape``.

    Gaussian smoothing with ``sigma = ratio / 1.25`` before a bilinear resize. The default
    pixel-centre alignment (``align_corners=False``) matches :class:`Frame`; pyramid levels
    inside a stage use ``conventions.ALIGN_CORNERS`` so that normalised coordinates agree
    across levels. Inside :func:`level_cache` a numpy image's levels are computed once; the
    returned tensor is then shared, so callers never write into it.
    """
    if not isinstance(image, np.ndarray):
        return _resample(image, shape, device, align_corners)
    return per_run(image, ("level", tuple(shape), bool(align_corners), str(device)),
                   lambda im: _resample(im, shape, device, align_corners))


def per_run(image: np.ndarray, name, compute):
    """``compute(image)``, kept for the rest of the run inside :func:`level_cache` (by the image
    object and ``name``, any hashable): for what several stages derive from the same working
    image (its levels, its content box)."""
    cache = _LEVELS.get()
    if cache is None:
        return compute(image)
    key = (id(image), name)
    hit = cache.get(key)
    if hit is not None and hit[0] is image:
        return hit[1]
    out = compute(image)
    cache[key] = (image, out)
    return out


def _resample(image, shape, device, align_corners) -> torch.Tensor:
    x = to_tensor(image, device=device)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None, None]
    ratio = max(x.shape[-2] / shape[0], x.shape[-1] / shape[1])
    if ratio > 1:
        x = gaussian_blur(x, ratio / 1.25)
    if tuple(x.shape[-2:]) != tuple(shape):
        x = F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=align_corners)
    return x[0, 0] if squeeze else x


def entropy(image: np.ndarray, bins: int = 256) -> float:
    """Shannon entropy (bits) of the grey-level histogram of an image in ``[0, 1]``."""
    hist, _ = np.histogram(image, bins=bins, range=(0.0, 1.0))
    p = hist[hist > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log2(p)).sum())


def match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map the grey levels of ``image`` so that its histogram matches ``reference``'s."""
    from skimage.exposure import match_histograms

    return match_histograms(image, reference).astype(np.float32)


def equalise_by_entropy(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histogram-match the lower-entropy image of the pair towards the higher-entropy one.

    The richer histogram carries more structure; matching the poorer one to it brings the two
    stains onto comparable grey levels without inventing detail in either.
    """
    if entropy(source) < entropy(target):
        return match_histogram(source, target), target
    return source, match_histogram(target, source)


def working_scale(shapes: list[tuple[int, int]], working_size: int) -> float:
    """One scale for all images (they share a pixel size), never above 1."""
    longest = max(max(s) for s in shapes)
    return min(1.0, working_size / longest)


def prepare_image(image: np.ndarray, scale: float, config: PreprocessConfig, device=None) -> np.ndarray:
    """Grey, inverted (tissue bright), or haematoxylin density (``config.representation``),
    resampled by ``scale``, min-max normalised."""
    deconvolved = config.representation == "haematoxylin" and is_colour(image)
    grey = haematoxylin_density(image) if deconvolved else to_grey(image)
    if config.invert and not deconvolved:
        grey = np.subtract(1.0, grey, out=grey if grey is not image else None)  # in place: one plane
    shape = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
    small = resample(grey, shape, device=device).cpu().numpy()
    return _minmax(small)


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre ``image`` in a zero canvas of ``shape``; returns the canvas and the offset."""
    off_r = (shape[0] - image.shape[0]) // 2
    off_c = (shape[1] - image.shape[1]) // 2
    canvas = np.zeros(shape, dtype=np.float32)
    canvas[off_r : off_r + image.shape[0], off_c : off_c + image.shape[1]] = image
    return canvas, (off_r, off_c)


def preprocess_pair(
    source: np.ndarray, target: np.ndarray, config: PreprocessConfig | None = None, device=None
) -> PreparedPair:
    """Both images on one centred working grid, tissue bright, intensities comparable."""
    config = config or PreprocessConfig()
    shapes = [tuple(source.shape[:2]), tuple(target.shape[:2])]
    scale = working_scale(shapes, config.working_size)
    src = prepare_image(source, scale, config, device)
    tgt = prepare_image(target, scale, config, device)
    if config.equalise:
        src, tgt = equalise_by_entropy(src, tgt)
    if config.clahe:
        from skimage.exposure import equalize_adapthist

        src = equalize_adapthist(src).astype(np.float32)
        tgt = equalize_adapthist(tgt).astype(np.float32)
    m = config.pad_multiple
    common = (
        int(math.ceil(max(src.shape[0], tgt.shape[0]) / m) * m),
        int(math.ceil(max(src.shape[1], tgt.shape[1]) / m) * m),
    )
    frames = []
    padded = []
    for original_shape, small in zip(shapes, (src, tgt)):
        canvas, offset = pad_to(small, common)
        padded.append(canvas)
        frames.append(
            Frame(
                original_shape=(int(original_shape[0]), int(original_shape[1])),
                shape=common,
                scale=(small.shape[0] / original_shape[0], small.shape[1] / original_shape[1]),
                offset=(float(offset[0]), float(offset[1])),
            )
        )
    return PreparedPair(padded[0], padded[1], frames[0], frames[1])
