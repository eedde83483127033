"""Training of the tissue segmentation U-Net (``histreg train segmentation``).

**Labels are pseudo-labels** made by a classical method, never drawn by hand: for every
training image (shorter side ``size``), :func:`pseudo_tissue_label` marks as tissue the pixels
that are darker than the slide's glass or more saturated than it (both smoothed; the glass
level is the image's 1st percentile), then cleans the result (opening, closing, hole filling,
removal of small objects). Unlike the Otsu baseline of :mod:`napari_histreg.stages.mask`, which
splits an image into its two brightest classes and so drops pale tissue (lung parenchyma around
a dark lesion, pale stroma), this threshold is set relative to the glass, so faint tissue is
kept and only glass, air spaces open to the border, and padding are background.

The network sees only the working grey image (tissue bright, glass 0), as at inference, under
strong augmentation: random crops (``crop``, default 256 px, half of them centred on the tissue
border), rotation by any angle, flips, scale jitter (x0.6 to x1.8), shear, smooth elastic
warps, stain jitter in HED space before the grey conversion (:func:`~.data.jitter_stain`,
strength 0.15), :func:`~.data.jitter_intensity` (gamma, contrast, brightness, blur, noise),
extra strong blur, and zero bands imitating the preprocess padding. Loss: soft Dice over the
batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..conventions import pixels_to_normalised, sample
from ..networks.segmentation import TissueUNet
from ..stages.mask import _disk
from .data import (
    TrainingImage,
    groups,
    jitter_intensity,
    load_training_images,
    resize_rgb,
    working_grey,
)
from .loop import TrainOptions, TrainReport, reproducing_command, train

#: The shipped weights: 1800 steps of 8 crops of 256 px (about 12 minutes on one busy CPU thread).
DEFAULT_OPTIONS = TrainOptions(steps=1800, learning_rate=3e-3, weight_decay=0.0, seed=0, checkpoint_every=100)

LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)

PSEUDO_LABEL_METHOD = (
    "tissue = smoothed darkness (1 - luminance) > glass + 0.03 OR smoothed saturation > glass + 0.04 "
    "(glass = 1st percentile, Gaussian sigma = shorter side / 256), then binary opening (r = 2 sigma), "
    "closing (r = 4 sigma), hole filling, removal of objects < 0.2% of the image"
)


# --------------------------------------------------------------------------- pseudo-labels
def pseudo_tissue_label(
    rgb: np.ndarray, darkness_margin: float = 0.03, saturation_margin: float = 0.04, min_fraction: float = 0.002
) -> np.ndarray:
    """Boolean ``(H, W)`` tissue mask of an RGB image in ``[0, 1]`` (the cleaned classical
    pseudo-label the U-Net learns; see the module docstring)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    sigma = max(1.0, min(rgb.shape[:2]) / 256)
    darkness = ndi.gaussian_filter(1.0 - rgb @ LUMINANCE, sigma)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = ndi.gaussian_filter((high - low) / np.maximum(high, 1e-3), sigma)
    mask = (darkness > np.percentile(darkness, 1) + darkness_margin) | (
        saturation > np.percentile(saturation, 1) + saturation_margin
    )
    radius = max(1, round(2 * sigma))
    mask = ndi.binary_opening(mask, _disk(radius))
    mask = ndi.binary_closing(mask, _disk(2 * radius), border_value=0)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= min_fraction * mask.size
        mask = keep[labels]
    return mask


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class SegmentationImage:
    """One training image at shorter side ``size``: RGB, its HED stain densities (cached for
    the stain jitter), the pseudo-label and where crops are centred."""

    name: str
    group: str
    rgb: np.ndarray
    hed: np.ndarray
    hed_std: np.ndarray
    label: np.ndarray
    border: np.ndarray  # (H, W) bool: the tissue border band, where half the crops are centred

    def __post_init__(self):
        # (1, 4, H, W): HED + label, sampled together; flat indices of the border band.
        stack = np.concatenate([self.hed, self.label[..., None].astype(np.float32)], axis=-1)
        self.stack = torch.from_numpy(np.ascontiguousarray(stack.transpose(2, 0, 1)))[None]
        self.border_index = np.flatnonzero(self.border)


def shorter_side(rgb: np.ndarray, size: int) -> np.ndarray:
    """``rgb`` resized (anti-aliased, never enlarged) so that its shorter side is ``size``."""
    h, w = rgb.shape[:2]
    return resize_rgb(rgb, max(1, round(size * max(h, w) / min(h, w))))


def prepare_segmentation_images(images: list[TrainingImage], size: int = 512) -> list[SegmentationImage]:
    from skimage.color import rgb2hed

    out = []
    for image in images:
        rgb = shorter_side(image.rgb, size)
        hed = rgb2hed(np.clip(rgb, 1e-4, 1.0)).astype(np.float32)
        label = pseudo_tissue_label(rgb)
        band = ndi.binary_dilation(label, _disk(8)) & ~ndi.binary_erosion(label, _disk(8))
        out.append(
            SegmentationImage(image.name, image.group, rgb, hed, hed.std(axis=(0, 1)), label, band)
        )
    return out


@functools.lru_cache(maxsize=2)
def _cached_images(data: str | None, load_size: int, include_skimage: bool) -> tuple[TrainingImage, ...]:
    return tuple(load_training_images(data, size=load_size, include_skimage=include_skimage))


def segmentation_images(data, size: int = 512, include_skimage: bool = True) -> list[SegmentationImage]:
    """Training images of ``data`` (folder, cover table, None, or a list of
    :class:`~.data.TrainingImage`) at shorter side ``size`` with their pseudo-labels. Loading
    from disk is cached in memory for the session."""
    if isinstance(data, (list, tuple)):
        images = list(data)
    else:
        images = list(_cached_images(None if data is None else str(data), 2 * size, include_skimage))
    return prepare_segmentation_images(images, size)


# --------------------------------------------------------------------------- augmentation
@dataclasses.dataclass
class AugmentConfig:
    crop: int = 256
    scale: tuple[float, float] = (0.6, 1.8)  # input pixels per output pixel (log-uniform)
    shear: float = 0.1
    elastic: float = 12.0  # largest elastic displacement, output pixels
    stain: float = 0.15
    border_fraction: float = 0.5  # share of crops centred on the tissue border band
    padding_probability: float = 0.25
    blur_probability: float = 0.15


def smooth_field(rng: np.random.Generator, size: int, magnitude: float, control_points: int = 5) -> np.ndarray:
    """``(2, size, size)`` smooth random displacement (pixels) whose largest vector has length
    ``magnitude`` (as :func:`~.data.random_smooth_field`, with a cheaper peak computation)."""
    coarse = torch.from_numpy(rng.normal(size=(1, 2, control_points, control_points)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0]
    peak = float((field * field).sum(0).max().sqrt())
    return (field * (magnitude / max(peak, 1e-6))).numpy()


def _hed_to_grey(hed: np.ndarray, alpha: np.ndarray, beta: np.ndarray, std: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb

    rgb = np.clip(hed2rgb(hed * alpha + beta * std), 0.0, 1.0)
    return (1.0 - rgb @ LUMINANCE).astype(np.float32)


def augmented_sample(image: SegmentationImage, rng: np.random.Generator, config: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """One ``(crop, crop)`` working grey crop and its ``{0, 1}`` label, strongly augmented."""
    h, w = image.label.shape
    size = config.crop
    # Geometry: output pixel offset -> input pixel, about a random centre.
    if rng.random() < config.border_fraction and image.border_index.size:
        index = image.border_index[int(rng.integers(image.border_index.size))]
        centre = np.array(np.unravel_index(index, image.border.shape), dtype=np.float64)
    else:
        centre = np.array([rng.uniform(0, h - 1), rng.uniform(0, w - 1)])
    scale = math.exp(rng.uniform(math.log(config.scale[0]), math.log(config.scale[1])))
    angle = rng.uniform(-math.pi, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    linear = scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, rng.uniform(-config.shear, config.shear)], [0.0, 1.0]])
    linear = linear @ np.diag([1.0, rng.choice([-1.0, 1.0])])  # flip
    linear *= np.exp(rng.uniform(-config.shear, config.shear, (2, 1)))  # anisotropy
    offsets = np.stack(np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2, indexing="ij"))
    offsets = offsets + smooth_field(rng, size, rng.uniform(0, config.elastic))
    points = np.einsum("ij,jhw->ihw", linear, offsets) + centre[:, None, None]  # (2, S, S) rows, cols
    # align_corners=False: the convention the shipped U-Net's augmentation was trained with
    grid_t = pixels_to_normalised(torch.from_numpy(np.moveaxis(points, 0, -1)), (h, w), align_corners=False)[None]  # float64, cast once by sample
    grid = grid_t[0].numpy()
    warped = sample(image.stack, grid_t, align_corners=False)[0].numpy()
    hed, label = warped[:3].transpose(1, 2, 0), (warped[3] > 0.5).astype(np.float32)

    # Stain jitter (Tellez et al.; as data.jitter_stain) on the crop; the min-max of the whole
    # jittered image (estimated on a subsample) normalises the crop like the preprocess would.
    alpha = rng.uniform(1 - config.stain, 1 + config.stain, 3).astype(np.float32)
    beta = rng.uniform(-config.stain, config.stain, 3).astype(np.float32)
    step = max(1, min(h, w) // 128)
    whole = _hed_to_grey(image.hed[::step, ::step], alpha, beta, image.hed_std)
    lo, hi = float(whole.min()), float(whole.max())
    grey = (_hed_to_grey(hed, alpha, beta, image.hed_std) - lo) / max(hi - lo, 1e-3)
    outside = (grid[..., 0] < -1) | (grid[..., 0] > 1) | (grid[..., 1] < -1) | (grid[..., 1] > 1)
    grey = np.clip(np.where(outside, 0.0, grey), 0.0, 1.0).astype(np.float32)

    # Intensity: gamma, contrast, brightness, blur, noise; sometimes a strong blur.
    grey_t = torch.from_numpy(grey)
    if rng.random() < config.blur_probability:
        from ..stages.preprocess import gaussian_blur

        grey_t = gaussian_blur(grey_t[None, None], float(rng.uniform(1.5, 3.0)))[0, 0]
    grey = jitter_intensity(grey_t, rng).numpy()

    # Zero bands as the preprocess pads the smaller image of a pair.
    if rng.random() < config.padding_probability:
        width = int(rng.integers(8, size // 3))
        side = int(rng.integers(4))
        band = np.zeros((size, size), dtype=bool)
        if side == 0:
            band[:width] = True
        elif side == 1:
            band[-width:] = True
        elif side == 2:
            band[:, :width] = True
        else:
            band[:, -width:] = True
        grey[band] = 0.0
        label[band] = 0.0
    return grey, label


def make_batch_fn(images: list[SegmentationImage], batch_size: int, config: AugmentConfig, device):
    """``batch_fn(rng, step) -> (x, y)``: group-balanced choice of images (every tissue block
    equally often), then :func:`augmented_sample`."""
    members = list(groups(images).values())

    def batch_fn(rng: np.random.Generator, step: int):
        xs, ys = [], []
        for _ in range(batch_size):
            group = members[int(rng.integers(len(members)))]
            grey, label = augmented_sample(images[group[int(rng.integers(len(group)))]], rng, config)
            xs.append(grey)
            ys.append(label)
        x = torch.from_numpy(np.stack(xs)[:, None]).to(device)
        y = torch.from_numpy(np.stack(ys)[:, None]).to(device)
        return x, y

    return batch_fn


# --------------------------------------------------------------------------- loss and scores
def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of ``sigmoid(logits)`` against ``target`` over the whole batch (so crops
    with no tissue still count)."""
    p = torch.sigmoid(logits)
    intersection = (p * target).sum()
    return 1.0 - (2.0 * intersection + eps) / (p.sum() + target.sum() + eps)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def pseudo_label_dice(model, images: list[SegmentationImage], threshold: float = 0.5) -> dict[str, float]:
    """Dice of the network's mask (on the whole un-augmented working grey image) against each
    image's pseudo-label."""
    from ..stages.segment import UNetMaskConfig, tissue_probability

    out = {}
    for image in images:
        grey = working_grey(image.rgb)
        config = UNetMaskConfig(size=min(grey.shape), threshold=threshold)
        out[image.name] = dice(tissue_probability(grey, config, model=model) > threshold, image.label)
    return out


# --------------------------------------------------------------------------- entry point
def train_segmentation(
    data,
    weights,
    options: TrainOptions | None = None,
    device=None,
    size: int = 512,
    *,
    batch_size: int = 8,
    augment: AugmentConfig | None = None,
    network: dict | None = None,
    include_skimage: bool = True,
) -> TrainReport:
    """Train :class:`~napari_histreg.networks.segmentation.TissueUNet` on the pseudo-labels of
    ``data`` (folder or cover table of images; landmarks never read; or a list of
    :class:`~.data.TrainingImage`) plus scikit-image's IHC image, and save it to ``weights``.

    ``size``: the images' shorter side (the network's input size at inference); ``network``:
    :class:`TissueUNet` keyword arguments (default: its defaults).
    """
    from ..conventions import default_device

    options = options or dataclasses.replace(DEFAULT_OPTIONS)
    augment = augment or AugmentConfig()
    device = default_device(device)
    images = segmentation_images(data, size, include_skimage)
    torch.manual_seed(options.seed)
    model = TissueUNet(**(network or {}))
    meta = {
        "command": reproducing_command("segmentation", data, weights, options, include_skimage),
        "data": None if isinstance(data, (list, tuple)) or data is None else str(data),
        "images": [f"{i.name} ({i.group})" for i in images],
        "labels": "pseudo-labels (no manual annotation): " + PSEUDO_LABEL_METHOD,
        "pseudo_label_tissue_fraction": {i.name: round(float(i.label.mean()), 4) for i in images},
        "augmentation": dataclasses.asdict(augment),
        "size": size,
        "batch_size": batch_size,
        "loss": "soft Dice over the batch",
    }
    return train(
        model,
        make_batch_fn(images, batch_size, augment, device),
        lambda m, batch: dice_loss(m(batch[0]), batch[1]),
        weights,
        options,
        device=device,
        meta=meta,
        description="train segmentation",
    )
