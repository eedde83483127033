"""Learned non-rigid stage: the patch U-Net run by the patch-group engine.

:func:`learned_nonrigid` fills the pipeline's non-rigid slot
(``(source, target, field, progress) -> field``). Per pyramid level and iteration the engine
(:func:`~napari_histreg.stages.nonrigid.patch_nonrigid`) warps the source with the current
field, cuts both images into overlapping patches (stride = half a patch), asks
:class:`NetworkPredictor` for each group's patch fields, blends them with the Hann window and
composes the result with the field. The network was trained on exactly that computation
(:mod:`napari_histreg.training.nonrigid`), so its fields are made to blend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from ..networks.checkpoint import cached_network
from ..progress import ProgressCallback
from .nonrigid import PatchConfig, patch_nonrigid

#: Activation memory budget of one predictor call on devices without a memory query (cpu, mps).
CPU_GROUP_BUDGET = 512 * 2**20
#: Share of the free CUDA memory one predictor call may use.
CUDA_MEMORY_SHARE = 0.5
MAX_GROUP_SIZE = 1024


@dataclasses.dataclass
class LearnedNonrigidConfig:
    """``weights``: a weights file, or ``"nonrigid"`` for the shipped network; ``levels``:
    longer side per pyramid level (of the working grid), coarse to fine; ``iterations`` of
    warp-predict-compose per level; ``patch_size`` in level pixels (stride is half of it);
    ``group_size``: patches per network call, ``None`` = as many as fit in memory
    (:func:`choose_group_size`)."""

    weights: str = "nonrigid"
    levels: tuple[int, ...] = (256, 384)
    iterations: tuple[int, ...] = (1, 1)
    patch_size: int = 64
    group_size: int | None = None


def load_nonrigid_network(weights: str = "nonrigid", device=None) -> nn.Module:
    """The non-rigid network of ``weights`` on ``device``, loaded once (see
    :func:`~napari_histreg.networks.checkpoint.cached_network`)."""
    return cached_network(weights, "nonrigid", device)


def bytes_per_patch(network: nn.Module, patch_size: int) -> int:
    """Rough peak activation memory (bytes, float32) of one patch through ``network`` in
    inference: every feature map at its resolution, times 3 (convolution, normalisation and
    activation outputs alive together), plus the inputs and the field."""
    config = getattr(network, "config", {})
    channels = list(config.get("channels", (16, 32, 64)))
    stride = int(config.get("input_stride", 1))
    pixels = patch_size * patch_size
    features = sum(c * pixels / (stride * 2**level) ** 2 for level, c in enumerate(channels))
    return int(4 * (3 * features + 6 * pixels))


def choose_group_size(network: nn.Module, patch_size: int, device=None, budget: int | None = None) -> int:
    """Patches per predictor call that fit the memory: on CUDA a share of the free memory
    (``torch.cuda.mem_get_info``), elsewhere :data:`CPU_GROUP_BUDGET` bytes (or ``budget``)."""
    device = torch.device(device or "cpu")
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * CUDA_MEMORY_SHARE)
        else:
            budget = CPU_GROUP_BUDGET
    return int(max(1, min(MAX_GROUP_SIZE, budget // max(1, bytes_per_patch(network, patch_size)))))


class NetworkPredictor:
    """Predictor for :func:`~napari_histreg.stages.nonrigid.patch_nonrigid`: the network on
    ``(B, 1, P, P)`` source / target patches, without gradients, ``(B, 2, P, P)`` fields out."""

    def __init__(self, network: nn.Module):
        self.network = network

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(source, target)


def learned_nonrigid(
    source: np.ndarray,
    target: np.ndarray,
    initial_field: np.ndarray,
    config: LearnedNonrigidConfig | None = None,
    device=None,
    progress: ProgressCallback = None,
) -> np.ndarray:
    """Refine ``initial_field`` (``(2, H, W)`` backward, working pixels) with the patch network;
    returns the ``(2, H, W)`` float32 total field."""
    config = config or LearnedNonrigidConfig()
    device = torch.device(device or "cpu")
    network = load_nonrigid_network(config.weights, device)
    group = config.group_size or choose_group_size(network, config.patch_size, device)
    engine = PatchConfig(
        levels=tuple(config.levels), iterations=tuple(config.iterations), patch_size=config.patch_size, group_size=group
    )
    with torch.no_grad():
        field = patch_nonrigid(source, target, initial_field, NetworkPredictor(network), engine, device, progress)
    return np.asarray(field, dtype=np.float32)
