"""Learned tissue mask: the U-Net of :mod:`napari_histreg.networks.segmentation` in the
pipeline's ``mask`` slot (``mask(image) -> bool array``).

The working image (tissue bright, glass and padding near 0) is resampled so that its
*shorter* side is ``size`` (the whole image, never cropped), the network predicts a tissue
probability, the probability is resampled back to the working grid and thresholded::

    pipeline = Pipeline(RegistrationConfig(use_mask=True))
    pipeline.mask = lambda image: unet_tissue_mask(image)

The loaded network is cached per ``(weights, device, file modification time)`` so that
evaluating many pairs loads it once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..conventions import default_device, to_tensor
from .preprocess import resample


@dataclasses.dataclass
class UNetMaskConfig:
    """``weights``: ``"segmentation"`` (the shipped file) or a path to a weights file;
    ``size``: the shorter side the network sees (it was trained at 512); ``threshold``: on the
    tissue probability; ``dilation``: grow the mask by this many working pixels so that the
    tissue border itself stays in the image (a hard cut exactly at the border adds an edge of
    its own: on the rat kidney pair the default pipeline's MrTRE was 0.0035 with no dilation,
    0.0027 with 3 px, 0.0022 with 8 px, as without a mask)."""

    weights: str = "segmentation"
    size: int = 512
    threshold: float = 0.5
    dilation: int = 8


def load_segmentation_network(weights="segmentation", device=None):
    """The (cached) segmentation network of ``weights`` on ``device``, in eval mode."""
    from ..networks.checkpoint import cached_network

    return cached_network(weights, "segmentation", default_device(device))


def _network_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    scale = size / max(1, min(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def tissue_probability(
    image: np.ndarray | torch.Tensor, config: UNetMaskConfig | None = None, device=None, model=None
) -> np.ndarray:
    """``(H, W)`` float32 tissue probability of a working grey ``(H, W)`` image.

    ``model``: an already loaded :class:`~napari_histreg.networks.segmentation.TissueUNet`
    (otherwise ``config.weights`` is loaded, cached).
    """
    config = config or UNetMaskConfig()
    if model is None:
        model = load_segmentation_network(config.weights, device)
    device = next(model.parameters()).device
    x = to_tensor(image, device=device)
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) working grey image, got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    if min(shape) == 0:
        return np.zeros(shape, dtype=np.float32)
    x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)
    small = resample(x, _network_shape(shape, config.size))[None, None]
    with torch.no_grad():
        probability = torch.sigmoid(model(small))
        if tuple(probability.shape[-2:]) != shape:
            probability = F.interpolate(probability, size=shape, mode="bilinear", align_corners=False)
    return probability[0, 0].float().cpu().numpy()


def unet_tissue_mask(image: np.ndarray, config: UNetMaskConfig | None = None, device=None) -> np.ndarray:
    """Boolean ``(H, W)`` tissue mask of a working grey image (tissue bright, zero padding)."""
    config = config or UNetMaskConfig()
    mask = tissue_probability(image, config, device) > config.threshold
    if config.dilation > 0 and mask.any() and not mask.all():
        mask = ndi.distance_transform_edt(~mask) <= config.dilation
    return mask
