"""Training of the patch network (:class:`~napari_histreg.networks.nonrigid.PatchFieldUNet`).

Unsupervised, no landmarks, and *in patch groups exactly as inference runs them*: a sample is
a square region of a pyramid level a few patches wide (``patches_per_side`` patches of
``patch_size`` pixels at stride ``patch_size / 2``). The region is cut into its overlapping
patches, the network predicts every patch field in one group, the fields are blended with the
engine's Hann window (:func:`~napari_histreg.stages.nonrigid.fold_patches`) and the source
region is warped with the blended field. The loss is taken on the blended result:
``-local NCC(warped source, target) + regularisation * diffusion(field)`` over the region's
interior (the part whose pixels are near a patch centre, as in the engine), so the network
learns fields that blend, not fields that are good patch by patch.

Samples, at the pyramid level sizes inference uses (longer side ``levels`` of a working grid
of ``image_size``):

* **real pairs** (most of the batch): every ordered cross-stain pair of one tissue block,
  aligned by the project's own initial + affine optimisation (:func:`~.data.prealigned_pairs`,
  no landmarks): the misalignment left between them is the real non-rigid one.
* **self-pairs**: one image in two stain renderings (HED jitter), the target seen through a
  random smooth field (:func:`~.data.random_smooth_field`) of random magnitude, which is then
  the known answer (an optional supervised term, ``NonrigidTrainConfig.supervised``).

The real pairs' sources also go through an extra random smooth warp of random magnitude (so
that the network sees the misalignment of a first pass as well as the small residual of a
later one); every sample goes through one of the eight flips / quarter turns, and both images
through their own intensity jitter (the network sees the jittered images, the loss compares
the clean ones).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import ALIGN_CORNERS, warp
from ..networks.nonrigid import PatchFieldUNet
from ..similarity import curvature, diffusion, local_ncc
from ..stages.nonrigid import fold_patches
from ..stages.preprocess import level_shape as _level_shape
from ..stages.preprocess import resample
from .data import grouped_prealigned_pairs, jitter_intensity, load_training_images, random_smooth_field, training_renderings
from .loop import TrainOptions, TrainReport, reproducing_command, train

# 10 000 steps (15 min on one CPU thread): against the former 3500, the landmark-free validation
# set (benchmarks/validation.py, seeds 0 and 1) had a lower learned-mode MrTRE on 29 of 32 pairs
# (MMrTRE 0.00106 / 0.00193 -> 0.00078 / 0.00092) and hybrid-mode on 16, equal on 13.
DEFAULT_OPTIONS = TrainOptions(steps=10000, learning_rate=1e-3, weight_decay=0.0, checkpoint_every=100)


@dataclasses.dataclass
class NonrigidTrainConfig:
    """``levels``: longer sides of the pyramid levels samples are drawn at (those inference
    runs at, and one between); ``patch_size`` / ``patches_per_side``: the region is
    ``patches_per_side`` patches wide; ``regions`` per step; ``real_share``: share of regions
    from real prealigned pairs; ``self_warp`` / ``extra_warp``: largest random displacement
    (level pixels) of the self-pairs' warp and of the extra warp on every source;
    ``window``: local NCC window; ``regularisation``: diffusion weight (as the dense
    optimiser's); ``curvature``: curvature weight; ``supervised``: weight of the end-point
    error against the known field of self-pairs (their warp is applied to the target, so the
    backward field to find is that warp itself); ``stain_variants``: HED-jittered renderings
    per image for self-pairs; ``renderings``: ``basic`` or ``wide`` (also CLAHE, pale and dark
    renderings: :func:`~.data.training_renderings`)."""

    levels: tuple[int, ...] = (256, 320, 384)
    patch_size: int = 64
    patches_per_side: int = 4
    regions: int = 4
    real_share: float = 0.7
    self_warp: float = 6.0
    extra_warp: float = 3.0
    window: int = 7
    regularisation: float = 1.0
    curvature: float = 0.0
    supervised: float = 0.0
    stain_variants: int = 3
    renderings: str = "basic"


# --------------------------------------------------------------------------- samples
class NonrigidSamples:
    """Level images of every real pair and every self-pair rendering, cached per level."""

    def __init__(self, images, config: NonrigidTrainConfig, device=None, include_pairs: bool = True, log=None):
        self.config = config
        self.device = torch.device(device or "cpu")
        rng = np.random.default_rng(12345)
        self.renderings: list[list[np.ndarray]] = []  # per image: working greys of stain variants
        for image in images:
            self.renderings.append(training_renderings(image, rng, config.stain_variants, config.renderings))
        pairs, self.pair_groups = grouped_prealigned_pairs(images, log) if include_pairs else ([], [])
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = [(p.source, p.target) for p in pairs]
        self._levels: dict[tuple, torch.Tensor] = {}

    def level(self, key: tuple, image: np.ndarray, size: int) -> torch.Tensor:
        """``(1, 1, h, w)`` level image of ``image`` at longer side ``size`` (cached by ``key``)."""
        key = key + (size,)
        if key not in self._levels:
            shape = _level_shape(image.shape, size)
            self._levels[key] = resample(image, shape, device=self.device, align_corners=ALIGN_CORNERS)[None, None].contiguous()
        return self._levels[key]


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the eight flips / quarter turns of ``(..., H, W)`` images (``k`` in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _crop(images: list[torch.Tensor], size: int, rng: np.random.Generator, weights: torch.Tensor) -> list[torch.Tensor]:
    """The same ``size`` square of every ``(1, 1, H, W)`` image (zero-padded when smaller),
    its centre drawn in proportion to ``weights`` (tissue) so that crops rarely show only glass."""
    h, w = images[0].shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        images = [F.pad(x, pad) for x in images]
        weights = F.pad(weights, pad)
        h, w = images[0].shape[-2:]
    valid = weights[0, 0, size // 2 : h - size + size // 2 + 1, size // 2 : w - size + size // 2 + 1]
    valid = valid.double().cpu().numpy().ravel()
    if valid.sum() > 0:
        index = int(rng.choice(valid.size, p=valid / valid.sum()))
        top, left = divmod(index, w - size + 1)
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return [x[..., top : top + size, left : left + size] for x in images]


def _smooth_warp(image: torch.Tensor, rng: np.random.Generator, magnitude: float) -> torch.Tensor:
    if magnitude <= 0:
        return image
    field = random_smooth_field(rng, image.shape[-2:], magnitude, control_points=int(rng.integers(3, 7)))
    return warp(image, torch.from_numpy(field).to(image.device)[None], padding_mode="border")


def region_size(config: NonrigidTrainConfig) -> int:
    """Side of a training region: ``patches_per_side`` patches at stride ``patch_size / 2``."""
    return (config.patches_per_side - 1) * (config.patch_size // 2) + config.patch_size


def make_batch(samples: NonrigidSamples, rng: np.random.Generator) -> dict:
    """``source`` / ``target``: ``(R, 1, C, C)`` regions (``C = region_size``) misaligned by
    the real residual and / or a random smooth warp; the network sees them intensity-jittered
    (``source_in`` / ``target_in``), the loss compares the clean ones. ``truth``:
    ``(R, 2, C, C)`` backward field where it is known (``known``: ``(R,)`` bool, self-pairs),
    zero elsewhere."""
    config = samples.config
    size = region_size(config)
    margin = int(np.ceil(max(config.self_warp, config.extra_warp))) + 2
    sources, targets, truths, known = [], [], [], []
    for _ in range(config.regions):
        level = int(config.levels[int(rng.integers(len(config.levels)))])
        if samples.pair_groups and rng.random() < config.real_share:
            members = samples.pair_groups[int(rng.integers(len(samples.pair_groups)))]
            index = members[int(rng.integers(len(members)))]
            src_img, tgt_img = samples.pairs[index]
            src = samples.level(("pair", index, 0), src_img, level)
            tgt = samples.level(("pair", index, 1), tgt_img, level)
            self_pair = False
        else:
            index = int(rng.integers(len(samples.renderings)))
            variants = samples.renderings[index]
            i, j = rng.choice(len(variants), size=2, replace=len(variants) < 2)
            src = samples.level(("self", index, int(i)), variants[int(i)], level)
            tgt = samples.level(("self", index, int(j)), variants[int(j)], level)
            self_pair = True
        weights = (tgt > 0.1).float() + 1e-3
        src, tgt = _crop([src, tgt], size + 2 * margin, rng, weights)
        truth = torch.zeros((1, 2) + tuple(src.shape[-2:]), device=src.device)
        if self_pair:
            # the target is the source seen through a known smooth field: the backward field
            # to find is that field itself
            magnitude = float(rng.uniform(0.0, config.self_warp))
            truth = torch.from_numpy(random_smooth_field(rng, src.shape[-2:], max(magnitude, 1e-3), int(rng.integers(3, 7))))[None]
            tgt = warp(tgt, truth.to(tgt.device), padding_mode="border")
        else:
            src = _smooth_warp(src, rng, float(rng.uniform(0.0, config.extra_warp)))
        k = int(rng.integers(8))
        inner = slice(margin, margin + size)
        sources.append(_dihedral(src[..., inner, inner], k))
        targets.append(_dihedral(tgt[..., inner, inner], k))
        truths.append(_dihedral_field(truth[..., inner, inner], k))
        known.append(self_pair)
    source = torch.cat(sources)
    target = torch.cat(targets)
    source_in = torch.cat([jitter_intensity(x[None], rng, 0.7) for x in source])
    target_in = torch.cat([jitter_intensity(x[None], rng, 0.7) for x in target])
    return {
        "source": source, "target": target, "source_in": source_in, "target_in": target_in,
        "truth": torch.cat(truths).to(source.device), "known": torch.tensor(known, device=source.device),
    }


def _dihedral_field(field: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_dihedral` of a ``(1, 2, H, W)`` (row, col) displacement field: the grid moves
    like an image and the vectors turn with it."""
    field = field.clone()
    if k >= 4:
        field = field.flip(-1)
        field[:, 1] = -field[:, 1]
    for _ in range(k % 4):
        # rot90 (counter-clockwise): new(r, c) = old(c, W-1-r); vectors (dr, dc) -> (-dc, dr)
        field = torch.rot90(field, 1, dims=(-2, -1))
        field = torch.stack((-field[:, 1], field[:, 0]), dim=1)
    return field


# --------------------------------------------------------------------------- the loss
def predict_region(model, source: torch.Tensor, target: torch.Tensor, patch: int) -> torch.Tensor:
    """The engine's computation on ``(R, 1, C, C)`` regions: cut into overlapping patches
    (stride ``patch / 2``), predict all of them in one group, blend with the Hann window.
    Returns the ``(R, 2, C - stride, C - stride)`` field of each region's interior (the pixels
    at least ``stride / 2`` from its edge, in interior coordinates)."""
    stride = patch // 2
    r, _, c, _ = source.shape
    def cut(x):
        cols = F.unfold(x, kernel_size=patch, stride=stride)  # (R, P*P, L)
        n = cols.shape[-1]
        return cols.transpose(1, 2).reshape(r * n, 1, patch, patch), n
    src_patches, n = cut(source)
    tgt_patches, _ = cut(target)
    fields = model(src_patches, tgt_patches).reshape(r, n, 2, patch, patch)
    inner = c - 2 * (stride // 2)
    return torch.cat([fold_patches(fields[i], (c, c), (inner, inner), patch, stride) for i in range(r)])


def region_loss(
    model, batch: dict, patch: int, window: int = 7, regularisation: float = 1.0, curvature_weight: float = 0.0, supervised: float = 0.0
) -> torch.Tensor:
    """``-local NCC`` of the blended-field warp on the regions' interiors + regularisers
    (+ ``supervised`` * mean squared end-point error on the regions with a known field)."""
    source, target = batch["source"], batch["target"]
    field = predict_region(model, batch["source_in"], batch["target_in"], patch)
    m = (source.shape[-1] - field.shape[-1]) // 2
    full = F.pad(field, (m, m, m, m), mode="replicate")
    warped = warp(source, full, padding_mode="border")[..., m:-m, m:-m]
    loss = -local_ncc(warped, target[..., m:-m, m:-m], window) + regularisation * diffusion(field)
    if curvature_weight:
        loss = loss + curvature_weight * curvature(field)
    if supervised and "truth" in batch:
        error = (field - batch["truth"][..., m:-m, m:-m]).pow(2).sum(dim=1).mean(dim=(1, 2))
        loss = loss + supervised * error * batch["known"].to(error.dtype)
    return loss.mean()


# --------------------------------------------------------------------------- training
def train_nonrigid(
    data,
    weights,
    options: TrainOptions | None = None,
    device=None,
    include_skimage: bool = True,
    config: NonrigidTrainConfig | None = None,
    network: dict | None = None,
    image_size: int = 768,
    images=None,
    samples: NonrigidSamples | None = None,
    renderings: str | None = None,
) -> TrainReport:
    """Train a :class:`PatchFieldUNet` on the images of ``data`` (folder or cover table; may be
    None: scikit-image's images only) and write it to ``weights``.

    ``config``: sampling and loss (:class:`NonrigidTrainConfig`); ``network``: the network's
    keyword config (default: :class:`PatchFieldUNet`'s); ``image_size``: longer side of the
    working grid the levels are taken from (the pipeline's default working size);
    ``images`` / ``samples``: already loaded data (reused across experiments); ``renderings``
    (``basic`` | ``wide``) overrides ``config.renderings``.
    """
    options = options or DEFAULT_OPTIONS
    config = config or NonrigidTrainConfig()
    if renderings is not None:
        config = dataclasses.replace(config, renderings=renderings)
    device = torch.device(device or "cpu")
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    net = PatchFieldUNet(**(network or {}))
    if samples is None:
        if images is None:
            images = load_training_images(data, size=image_size, include_skimage=include_skimage)
        samples = NonrigidSamples(images, config, device, log=print if options.progress else None)
    prepare_seconds = time.perf_counter() - started
    meta = {
        "data": str(data) if data is not None else None,
        "include_skimage": include_skimage,
        "image_size": image_size,
        "train_config": dataclasses.asdict(config),
        "images": len(samples.renderings),
        "real_pairs": len(samples.pairs),
        "loss": "-local NCC + diffusion of the Hann-blended patch field, on regions cut and blended as inference does",
        "prepare_seconds": round(prepare_seconds, 1),
        "command": reproducing_command("nonrigid", data, weights, options, include_skimage, config.renderings),
    }
    return train(
        net,
        lambda rng, step: make_batch(samples, rng),
        lambda model, batch: region_loss(
            model, batch, config.patch_size, config.window, config.regularisation, config.curvature, config.supervised
        ),
        weights,
        options,
        device=device,
        meta=meta,
        description="nonrigid",
    )
