"""Training samples: real images at a training size, random warps, stain and intensity jitter.

Every image becomes a :class:`TrainingImage` holding its RGB and its *working grey* (grey,
inverted so tissue is bright, min-max normalised: exactly what ``preprocess`` gives the
networks at inference). Images in one ``group`` (one folder: the sections of one tissue block)
may be paired across stains; :func:`prealigned_pairs` aligns such pairs with the project's own
instance optimisation (no landmarks) so that the remaining misalignment is the real
non-rigid one.

Randomness always comes from a ``numpy.random.Generator`` passed in; the training loop makes
one per step from ``(seed, step)`` so that a resumed run draws the same samples.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import to_tensor, warp_affine_xy
from ..io import IMAGE_SUFFIXES, HistRegInputError, read_image
from ..stages.preprocess import resample, to_grey


@dataclasses.dataclass
class TrainingImage:
    """One image at training size. ``rgb``: ``(H, W, 3)`` float32 in ``[0, 1]``; ``grey``:
    ``(H, W)`` float32 working grey (tissue bright); ``group``: images of one group are
    sections of one tissue block."""

    name: str
    group: str
    rgb: np.ndarray
    grey: np.ndarray


# --------------------------------------------------------------------------- finding images
def find_images(data) -> list[tuple[Path, str]]:
    """``(path, group)`` for every image under a folder (recursively) or named in an ANHIR
    cover table (``Source image`` / ``Target image`` columns, paths relative to the table).
    The group is the image's folder. Landmark columns are never read."""
    data = Path(data)
    if not data.exists():
        raise HistRegInputError(f"{data}: training data not found (give a folder of images or a cover-table CSV)")
    if data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        root = data
    elif data.suffix.lower() == ".csv":
        root = data.parent
        with open(data, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = [c for c in ("Source image", "Target image") if rows and c in rows[0]]
        if not columns:
            raise HistRegInputError(f"{data}: no 'Source image' / 'Target image' columns")
        paths = sorted({(root / row[c]).resolve() for row in rows for c in columns if row.get(c)})
        root = root.resolve()
    else:
        raise HistRegInputError(f"{data}: expected a folder of images or a cover-table .csv")
    if not paths:
        raise HistRegInputError(f"{data}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for path in paths:
        try:
            group = str(path.parent.relative_to(root))
        except ValueError:
            group = str(path.parent)
        out.append((path, group))
    return out


def _rgb_float(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32 in ``[0, 1]`` from grey/RGB/RGBA of any dtype (RGBA on white)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    scale = 255.0 if image.dtype == np.uint8 else 65535.0 if image.dtype == np.uint16 else None
    rgb = image[..., :3].astype(np.float32)
    if scale is None:
        lo, hi = float(rgb.min()), float(rgb.max())
        rgb = (rgb - lo) / max(hi - lo, 1e-12)
    else:
        rgb /= scale
    if image.shape[-1] == 4:
        alpha = image[..., 3].astype(np.float32) / (scale or float(max(image[..., 3].max(), 1)))
        rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
    return np.clip(rgb, 0.0, 1.0)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased resize so that the longer side is at most ``size``."""
    h, w = rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    if shape == (h, w):
        return rgb.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
    return resample(x, shape)[0].numpy().transpose(1, 2, 0).clip(0, 1).astype(np.float32)


def working_grey(rgb: np.ndarray) -> np.ndarray:
    """Grey, inverted (tissue bright), min-max normalised: the networks' input."""
    grey = 1.0 - to_grey(rgb)
    lo, hi = float(grey.min()), float(grey.max())
    return ((grey - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def make_training_image(rgb: np.ndarray, name: str, group: str, size: int) -> TrainingImage:
    small = resize_rgb(_rgb_float(rgb), size)
    return TrainingImage(name, group, small, working_grey(small))


def skimage_images(size: int = 512) -> list[TrainingImage]:
    """scikit-image's immunohistochemistry image split into two stain renderings of one
    section (haematoxylin alone; DAB with its counterstain): a cross-stain pair that is
    aligned by construction."""
    from skimage import data
    from skimage.color import rgb2hed

    hed = rgb2hed(data.immunohistochemistry())
    return [
        make_training_image(render_stains(hed, (1.0, 0.0, 0.0)), "skimage:ihc-haematoxylin", "skimage:ihc", size),
        make_training_image(render_stains(hed, (0.5, 0.0, 1.0)), "skimage:ihc-dab", "skimage:ihc", size),
    ]


def render_stains(hed: np.ndarray, amounts) -> np.ndarray:
    """RGB ``(H, W, 3)`` float32 in ``[0, 1]`` of the stain concentrations ``hed`` (from
    :func:`skimage.color.rgb2hed`) with each stain scaled by ``amounts`` (haematoxylin, eosin,
    DAB; 0 leaves a stain out): one section rendered as if stained differently."""
    from skimage.color import hed2rgb

    return hed2rgb(hed * np.asarray(amounts, dtype=hed.dtype)).astype(np.float32)


def load_training_images(data=None, size: int = 512, include_skimage: bool = True) -> list[TrainingImage]:
    """Every image of ``data`` (folder or cover table; may be None) plus scikit-image's, at
    longer side ``size``."""
    images = []
    if data is not None:
        for path, group in find_images(data):
            images.append(make_training_image(read_image(path), str(path), group, size))
    if include_skimage:
        images.extend(skimage_images(size))
    if not images:
        raise HistRegInputError("no training images: give --data or allow scikit-image's images")
    return images


def groups(images: list[TrainingImage]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        out.setdefault(image.group, []).append(i)
    return out


# --------------------------------------------------------------------------- real pairs
@dataclasses.dataclass
class AlignedPair:
    """Two sections of one block on one grid: ``source`` warped onto ``target`` by the
    instance-optimised initial + affine stages (working grey, same shape)."""

    source: np.ndarray
    target: np.ndarray
    names: tuple[str, str]


def prealigned_pairs(images: list[TrainingImage], device=None, nonrigid: str = "none", progress=None) -> list[AlignedPair]:
    """Every ordered cross-stain pair within a group, aligned by :func:`napari_histreg.register`
    with ``nonrigid_method=nonrigid`` (no landmarks involved). Pairs whose alignment leaves a
    low global NCC (< 0.2: probably failed) are dropped."""
    from ..pipeline import RegistrationConfig, register
    from ..similarity import ncc

    pairs = []
    for members in groups(images).values():
        for i in members:
            for j in members:
                if i == j:
                    continue
                src, tgt = images[i], images[j]
                config = RegistrationConfig(nonrigid_method=nonrigid)
                config.preprocess.working_size = max(max(src.grey.shape), max(tgt.grey.shape))
                result = register(src.rgb, tgt.rgb, config, device=device)
                warped = np.asarray(result.warp(src.grey), dtype=np.float32)
                score = float(ncc(torch.from_numpy(warped)[None, None], torch.from_numpy(tgt.grey)[None, None]))
                if progress is not None:
                    progress(f"prealigned {Path(src.name).name} -> {Path(tgt.name).name}: NCC {score:.3f}")
                if score >= 0.2:
                    pairs.append(AlignedPair(warped, tgt.grey, (src.name, tgt.name)))
    return pairs


def grouped_prealigned_pairs(images: list[TrainingImage], progress=None) -> tuple[list[AlignedPair], list[list[int]]]:
    """:func:`prealigned_pairs` (no non-rigid stage, on the CPU) and, per tissue block, the
    indices of its pairs (so that samplers can draw a block first, then one of its pairs).
    Both empty when no group holds two images."""
    if not any(len(members) > 1 for members in groups(images).values()):
        return [], []
    group_of = {image.name: image.group for image in images}
    pairs: list[AlignedPair] = []
    by_group: dict[str, list[int]] = {}
    for pair in prealigned_pairs(images, device="cpu", nonrigid="none", progress=progress):
        by_group.setdefault(group_of[pair.names[1]], []).append(len(pairs))
        pairs.append(pair)
    return pairs, list(by_group.values())


# --------------------------------------------------------------------------- random transforms
def random_affine(
    rng: np.random.Generator,
    rotation: float = 10.0,
    scale: float = 0.1,
    shear: float = 0.05,
    translation: float = 0.05,
) -> np.ndarray:
    """A random 2x3 affine in torch ``affine_grid`` convention (normalised ``(x, y)``, backward:
    output point -> input point), about the image centre. ``rotation`` in degrees, ``scale`` /
    ``shear`` relative, ``translation`` in normalised units (1 = half the image)."""
    angle = math.radians(rng.uniform(-rotation, rotation))
    sx, sy = np.exp(rng.uniform(-scale, scale, 2))
    sh = rng.uniform(-shear, shear)
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c, -s], [s, c]]) @ np.array([[sx, sh], [0.0, sy]])
    return np.concatenate([linear, rng.uniform(-translation, translation, (2, 1))], axis=1).astype(np.float32)


def random_smooth_field(rng: np.random.Generator, shape, magnitude: float, control_points: int = 5) -> np.ndarray:
    """``(2, H, W)`` float32 smooth backward field in pixels: Gaussian noise on a
    ``control_points`` grid, bicubic upsampled, scaled so that its largest displacement is
    ``magnitude`` pixels."""
    coarse = torch.from_numpy(rng.normal(size=(1, 2, control_points, control_points)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=True)[0]
    peak = float(field.norm(dim=0).max())
    return (field * (magnitude / max(peak, 1e-6))).numpy()


def apply_affine(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp ``(B, C, H, W)`` by ``(B, 2, 3)`` normalised backward affines (zeros outside)."""
    return warp_affine_xy(image, theta)


# --------------------------------------------------------------------------- jitter
def jitter_stain(rgb: np.ndarray, rng: np.random.Generator, strength: float = 0.05) -> np.ndarray:
    """Random stain variation in haematoxylin-eosin-DAB space (Tellez et al. 2018): each
    stain's concentration scaled by ``1 +- strength`` and shifted by ``+- strength``."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.clip(rgb, 1e-4, 1.0))
    alpha = rng.uniform(1 - strength, 1 + strength, 3)
    beta = rng.uniform(-strength, strength, 3)
    return np.clip(hed2rgb(hed * alpha + beta * hed.std(axis=(0, 1))), 0.0, 1.0).astype(np.float32)


#: ``renderings`` choices of the affine and non-rigid trainers: ``basic`` (stain jitter of each
#: image) and ``wide`` (also the renderings new sections come in, as benchmarks/validation.py's
#: variants make them).
RENDERINGS = ("basic", "wide")


def wide_renderings(image: TrainingImage) -> list[np.ndarray]:
    """Working greys of ``image`` as other scanners and stainings show it: contrast-equalised
    by CLAHE (a common grey export), a pale staining (optical densities x0.35) and a dark one
    (x1.5). Deterministic: the randomness is in the jitter applied on top of them."""
    from skimage.color import rgb2hed
    from skimage.exposure import equalize_adapthist

    hed = rgb2hed(np.clip(image.rgb, 1e-4, 1.0))
    clahe = equalize_adapthist(np.clip(image.grey, 0, 1), clip_limit=0.02).astype(np.float32)
    pale = working_grey(np.clip(render_stains(hed, (0.35, 0.35, 0.35)), 0, 1))
    dark = working_grey(np.clip(render_stains(hed, (1.5, 1.5, 1.5)), 0, 1))
    return [clahe, pale, dark]


def training_renderings(image: TrainingImage, rng: np.random.Generator, stain_variants: int, renderings: str = "basic") -> list[np.ndarray]:
    """The working greys a self-pair of ``image`` is drawn from: its own, ``stain_variants``
    HED-jittered ones, and with ``renderings='wide'`` the :func:`wide_renderings` too."""
    if renderings not in RENDERINGS:
        raise ValueError(f"renderings must be one of {', '.join(RENDERINGS)}, not {renderings!r}")
    variants = [image.grey]
    for _ in range(stain_variants):
        variants.append(working_grey(jitter_stain(image.rgb, rng, strength=0.08)))
    if renderings == "wide":
        variants.extend(wide_renderings(image))
    return variants


def jitter_intensity(grey: np.ndarray | torch.Tensor, rng: np.random.Generator, strength: float = 1.0):
    """Random gamma, contrast, brightness, blur and noise on a working grey image in
    ``[0, 1]``; returns the same type it was given."""
    x = to_tensor(grey) if not isinstance(grey, torch.Tensor) else grey
    gamma = float(np.exp(rng.uniform(-0.4, 0.4) * strength))
    x = x.clamp(0, 1) ** gamma
    x = x * float(rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength)) + float(rng.uniform(-0.05, 0.05) * strength)
    if rng.random() < 0.3 * strength:
        from ..stages.preprocess import gaussian_blur

        squeeze = x.ndim == 2
        x4 = x[None, None] if squeeze else x
        x4 = gaussian_blur(x4, float(rng.uniform(0.5, 1.5)))
        x = x4[0, 0] if squeeze else x4
    noise = torch.from_numpy(rng.normal(0.0, 0.02 * strength, tuple(x.shape)).astype(np.float32)).to(x.device)
    x = (x + noise).clamp(0, 1)
    return x if isinstance(grey, torch.Tensor) else x.cpu().numpy()


def random_crop(arrays: list[np.ndarray], size: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> list[np.ndarray]:
    """The same random ``size`` x ``size`` window of every ``(H, W)`` array (zero-padded when
    smaller). With ``weights`` (``(H, W)``, e.g. the tissue), the window centre is drawn in
    proportion to them, so crops rarely show only glass."""
    h, w = arrays[0].shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]) for a in arrays]
        if weights is not None:
            weights = np.pad(weights, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        h, w = arrays[0].shape[-2:]
    half = size // 2
    if weights is not None and float(weights[half : h - size + half + 1, half : w - size + half + 1].sum()) > 0:
        valid = weights[half : h - size + half + 1, half : w - size + half + 1].astype(np.float64)
        index = rng.choice(valid.size, p=(valid / valid.sum()).ravel())
        top, left = np.unravel_index(index, valid.shape)
    else:
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return [a[..., top : top + size, left : left + size] for a in arrays]
