"""Tissue masks. A classical Otsu baseline; the learned U-Net plugs into the same slot."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi


@dataclasses.dataclass
class OtsuMaskConfig:
    """``smoothing``: Gaussian sigma (working pixels) before thresholding; ``closing``: radius of
    the morphological closing; ``min_fraction``: connected components smaller than this share
    of the image are dropped; ``dilation``: grow the mask so tissue borders are kept."""

    smoothing: float = 2.0
    closing: int = 5
    min_fraction: float = 0.001
    dilation: int = 3


def otsu_tissue_mask(image: np.ndarray, config: OtsuMaskConfig | None = None) -> np.ndarray:
    """Boolean tissue mask of a preprocessed (tissue bright) working image."""
    from skimage.filters import threshold_otsu

    config = config or OtsuMaskConfig()
    smooth = ndi.gaussian_filter(image.astype(np.float32), config.smoothing)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(image.shape, dtype=bool)
    mask = smooth > threshold_otsu(smooth)
    if config.closing:
        mask = binary_closing(mask, config.closing)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= config.min_fraction * mask.size
        if not keep.any():
            keep[1 + int(np.argmax(sizes))] = True
        mask = keep[labels]
    if config.dilation:
        mask = binary_dilation(mask, config.dilation)
    return mask


# OpenCV's morphology is about 40x faster than scipy.ndimage's binary operations on a working
# image (closing 1 ms against 40 ms at 768 px) and gives the same masks: dilation ignores the
# border in both, and the closing's erosion treats the outside as background, as scipy does.
def binary_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, structure=_disk(radius))``, by OpenCV."""
    import cv2

    return cv2.dilate(np.ascontiguousarray(mask, dtype=np.uint8), _disk(radius).astype(np.uint8)).astype(bool)


def binary_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, structure=_disk(radius))`` (outside = background), by OpenCV."""
    import cv2

    disk = _disk(radius).astype(np.uint8)
    grown = cv2.dilate(np.ascontiguousarray(mask, dtype=np.uint8), disk)
    return cv2.erode(grown, disk, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
