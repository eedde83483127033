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
        structure = _disk(config.closing)
        mask = ndi.binary_closing(mask, structure=structure)
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
        mask = ndi.binary_dilation(mask, structure=_disk(config.dilation))
    return mask


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
