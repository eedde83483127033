"""Training of the affine network (:class:`~napari_histreg.networks.affine.AffineNet`).

Unsupervised, no landmarks: the loss is ``-NCC`` between the source warped by the predicted
matrix and the target (at the network's resolution and at a quarter of it, so that large
residuals still get a gradient).

Samples (all at the network's input size, on the centred square canvas it uses):

* **real pairs**: every ordered cross-stain pair of one tissue block, aligned by the project's
  own instance optimisation (:func:`~.data.prealigned_pairs`, initial + affine, no landmarks);
  what is left between them is the real non-rigid difference the net must ignore.
* **self-pairs**: one image in two stain renderings (HED jitter) and two intensity jitters;
  skimage's IHC image split into haematoxylin and DAB counts as a real pair.

Both images of a sample go through one random *view* (a multiple of 90 degrees, a flip, a
small rotation and zoom: what any pair may look like), then the source alone through a random
*residual* affine (rotation, anisotropic scale, shear, translation, with a random magnitude so
that small residuals, the later recurrent passes' case, are common). The network sees the
intensity-jittered pair and must undo the residual; the loss warps the clean source once by
``view @ residual @ prediction``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import to_tensor
from ..networks.affine import AffineNet, compose_theta
from ..similarity import ncc
from .data import (
    apply_affine,
    grouped_prealigned_pairs,
    jitter_intensity,
    load_training_images,
    random_affine,
    training_renderings,
)
from .loop import TrainOptions, TrainReport, reproducing_command, train

DEFAULT_OPTIONS = TrainOptions(steps=1100, learning_rate=1e-3, weight_decay=0.0, checkpoint_every=50)

#: Residual affine ranges (``random_affine``'s arguments) at full magnitude.
RESIDUAL = {"rotation": 12.0, "scale": 0.15, "shear": 0.08, "translation": 0.10}

#: With ``renderings='wide'``, what the validation set's harder variants add to the geometry: a
#: share of residuals stretched along one axis (up to 1.5x, as sections deformed on mounting) and
#: a share of views zoomed into the tissue (crops with no outline).
WIDE_GEOMETRY = {"stretch_share": 0.2, "max_stretch": 1.5, "crop_share": 0.2, "crop_zoom": (0.55, 0.9)}


class AffineSamples:
    """Everything a batch is drawn from, on ``device`` at the network's input size."""

    def __init__(self, images, net: AffineNet, device, stain_variants: int = 4, include_pairs: bool = True, log=None,
                 renderings: str = "basic"):
        device = torch.device(device or "cpu")
        self.device = device
        self.wide = renderings == "wide"

        def prep(grey: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return net.prepare(to_tensor(grey)[None, None])[0].to(device)

        rng = np.random.default_rng(12345)
        # self-pairs: each image as its own working grey plus stain-jittered renderings
        self.renderings: list[torch.Tensor] = []
        for image in images:
            variants = [prep(grey) for grey in training_renderings(image, rng, stain_variants, renderings)]
            self.renderings.append(torch.stack(variants))  # (V, 1, S, S)
        # real pairs: prealigned cross-stain pairs within a tissue block; pair_groups holds
        # the indices into pairs, one list per tissue block
        pairs, self.pair_groups = grouped_prealigned_pairs(images, log) if include_pairs else ([], [])
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = [(prep(p.source), prep(p.target)) for p in pairs]

    def __len__(self) -> int:
        return len(self.renderings) + len(self.pairs)


def random_view(rng: np.random.Generator, crop_share: float = 0.0) -> np.ndarray:
    """A random 2x3 ``affine_grid`` view of a square: a multiple of 90 degrees, an optional
    flip, a small rotation and a zoom (backward scale ``> 1`` shrinks the content; with
    probability ``crop_share`` a zoom into the tissue, :data:`WIDE_GEOMETRY`'s ``crop_zoom``)."""
    k = int(rng.integers(4))
    angle = k * math.pi / 2 + math.radians(rng.uniform(-15.0, 15.0))
    c, s = math.cos(angle), math.sin(angle)
    if crop_share and rng.random() < crop_share:
        zoom = float(rng.uniform(*WIDE_GEOMETRY["crop_zoom"]))
    else:
        zoom = float(np.exp(rng.uniform(math.log(0.9), math.log(1.3))))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    linear = zoom * np.array([[c, -s], [s, c]]) @ np.diag([flip, 1.0])
    return np.concatenate([linear, rng.uniform(-0.05, 0.05, (2, 1))], axis=1).astype(np.float32)


def make_batch(samples: AffineSamples, rng: np.random.Generator, batch_size: int, real_share: float = 0.5) -> dict:
    """``source`` / ``target``: jittered network inputs ``(B, 1, S, S)``; ``clean_source`` /
    ``clean_target``: the same images without jitter or residual (for the loss); ``view`` and
    ``residual``: ``(B, 2, 3)``."""
    sources, targets, views, residuals = [], [], [], []
    for _ in range(batch_size):
        if samples.pair_groups and rng.random() < real_share:
            # a tissue block first, then one of its pairs: blocks with many sections (or
            # near-identical synthetic ones) do not crowd out the others
            members = samples.pair_groups[int(rng.integers(len(samples.pair_groups)))]
            src, tgt = samples.pairs[members[int(rng.integers(len(members)))]]
        else:
            variants = samples.renderings[int(rng.integers(len(samples.renderings)))]
            i, j = rng.choice(len(variants), size=2, replace=len(variants) < 2)
            src, tgt = variants[int(i)], variants[int(j)]
        magnitude = float(rng.uniform(0.0, 1.0))
        residual = random_affine(rng, **{k: v * magnitude for k, v in RESIDUAL.items()})
        if samples.wide and rng.random() < WIDE_GEOMETRY["stretch_share"]:
            stretch = np.ones(2, np.float32)
            stretch[int(rng.integers(2))] = rng.uniform(1.0, WIDE_GEOMETRY["max_stretch"]) ** rng.choice([-1.0, 1.0])
            residual[:, :2] = residual[:, :2] @ np.diag(stretch)
        sources.append(src)
        targets.append(tgt)
        views.append(random_view(rng, WIDE_GEOMETRY["crop_share"] if samples.wide else 0.0))
        residuals.append(residual)
    device = samples.device
    clean_source = torch.stack(sources)
    clean_target = torch.stack(targets)
    view = torch.as_tensor(np.stack(views), device=device)
    residual = torch.as_tensor(np.stack(residuals), device=device)
    moved_target = apply_affine(clean_target, view)
    moved_source = apply_affine(clean_source, compose_theta(view, residual))
    source = torch.cat([jitter_intensity(x[None], rng, 1.0) for x in moved_source])
    target = torch.cat([jitter_intensity(x[None], rng, 1.0) for x in moved_target])
    return {
        "source": source, "target": target, "clean_source": clean_source, "view_target": moved_target,
        "view": view, "residual": residual,
    }


def affine_loss(model: AffineNet, batch: dict) -> torch.Tensor:
    """``-NCC`` (mean of full and quarter resolution) between the clean source warped by
    ``view @ residual @ prediction`` and the viewed clean target."""
    theta = model.predict_square(batch["source"], batch["target"])
    total = compose_theta(compose_theta(batch["view"], batch["residual"]), theta)
    warped = apply_affine(batch["clean_source"], total)
    target = batch["view_target"]
    fine = ncc(warped, target)
    coarse = ncc(F.avg_pool2d(warped, 4), F.avg_pool2d(target, 4))
    return -(0.5 * (fine + coarse)).mean()


def train_affine(
    data,
    weights,
    options: TrainOptions | None = None,
    device=None,
    include_skimage: bool = True,
    batch_size: int = 4,
    image_size: int = 512,
    network: dict | None = None,
    images=None,
    samples: AffineSamples | None = None,
    renderings: str = "basic",
) -> TrainReport:
    """Train an :class:`AffineNet` on the images of ``data`` (folder or cover table; may be
    None: scikit-image's images only) and write it to ``weights``.

    ``network``: the network's keyword config (default: :class:`AffineNet`'s). ``images`` /
    ``samples``: already loaded training images or samples (reused across experiments).
    ``renderings``: ``basic`` or ``wide`` (:func:`~.data.training_renderings`, and
    :data:`WIDE_GEOMETRY`'s stretched residuals and inner-crop views).
    """
    options = options or DEFAULT_OPTIONS
    device = torch.device(device or "cpu")
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    net = AffineNet(**(network or {}))
    if samples is None:
        if images is None:
            images = load_training_images(data, size=image_size, include_skimage=include_skimage)
        log = print if options.progress else None
        samples = AffineSamples(images, net, device, log=log, renderings=renderings)
    prepare_seconds = time.perf_counter() - started
    meta = {
        "data": str(data) if data is not None else None,
        "include_skimage": include_skimage,
        "batch_size": batch_size,
        "image_size": image_size,
        "images": len(samples.renderings),
        "real_pairs": len(samples.pairs),
        "residual": dict(RESIDUAL),
        "renderings": renderings,
        **({"wide_geometry": dict(WIDE_GEOMETRY)} if renderings == "wide" else {}),
        "loss": "-NCC (full + quarter resolution) after warping",
        "prepare_seconds": round(prepare_seconds, 1),
        "command": reproducing_command("affine", data, weights, options, include_skimage, renderings),
    }
    return train(
        net,
        lambda rng, step: make_batch(samples, rng, batch_size),
        affine_loss,
        weights,
        options,
        device=device,
        meta=meta,
        description="affine",
    )
