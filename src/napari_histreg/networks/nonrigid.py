"""Patch U-Net of the learned non-rigid stage: a pair of patches in, a backward patch field out.

:class:`PatchFieldUNet` takes a group of source and target patches ``(B, 1, P, P)`` (the
source already warped by the current field) and returns the backward displacement field
``(B, 2, P, P)`` in patch pixels (channel 0 = rows) that aligns the source patch onto the
target patch: ``aligned(p) = source(p + field(p))``. It is what the patch-group engine
(:func:`napari_histreg.stages.nonrigid.patch_nonrigid`) calls on every group.

Shape of the network (kept small: it runs on every patch of every level):

* each patch is normalised on its own (zero mean, unit standard deviation with a floor), so
  one network serves every pyramid level and stain;
* encoder: the two patches folded space-to-depth (``input_stride``), a
  :class:`~.layers.ConvNormAct`, then ``len(channels) - 1`` stride-2 stages of two
  ``ConvNormAct`` each;
* decoder: upsample, concatenate the encoder features, ``ConvNormAct``, up to
  ``1 / output_stride`` of the patch; a last 3x3 convolution (zero-initialised, so an
  untrained network returns exactly the zero field) predicts the field there and a bilinear
  upsampling brings it to the patch size. Fields between neighbouring patch pixels are smooth,
  so predicting them at a quarter of the resolution costs little accuracy and most of the
  decoder's time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct


def normalise_patches(patches: torch.Tensor, floor: float = 0.05) -> torch.Tensor:
    """``(B, C, P, P)`` patches with zero mean and unit standard deviation each; ``floor``
    bounds the divisor so that near-empty (glass) patches are not blown up into noise."""
    mean = patches.mean(dim=(-2, -1), keepdim=True)
    var = (patches * patches).mean(dim=(-2, -1), keepdim=True) - mean * mean
    return (patches - mean) / (var.clamp_min(0).sqrt() + floor)


class PatchFieldUNet(nn.Module):
    """``(source, target)`` patches ``(B, 1, P, P)`` each to a backward field ``(B, 2, P, P)``.

    ``input_stride``: the two normalised patches are folded space-to-depth
    (:func:`torch.nn.functional.pixel_unshuffle`) by this factor before the first convolution,
    which is lossless and far cheaper than convolving two channels at full resolution;
    ``channels``: encoder widths, the first at ``P / input_stride``, each further one at half
    the previous resolution; ``output_stride``: resolution of the predicted field relative to
    the patch (a power of 2 between ``input_stride`` and the deepest level's stride);
    ``field_scale``: the raw output is multiplied by this many patch pixels (keeps the last
    layer's weights of order one). ``P`` must be a multiple of the deepest level's stride.
    """

    kind = "nonrigid"

    def __init__(
        self,
        channels: tuple[int, ...] | list[int] = (16, 32, 64),
        input_stride: int = 2,
        output_stride: int = 4,
        field_scale: float = 4.0,
        norm_floor: float = 0.05,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        depth = len(channels) - 1
        if depth < 1:
            raise ValueError("channels needs at least two entries (one downsampling)")
        if input_stride < 1 or input_stride & (input_stride - 1):
            raise ValueError(f"input_stride must be a power of 2, not {input_stride}")
        deepest = input_stride * 2**depth
        if output_stride < input_stride or output_stride & (output_stride - 1) or output_stride > deepest // 2:
            raise ValueError(
                f"output_stride must be a power of 2 from {input_stride} to {deepest // 2} (input_stride to half the deepest stride), not {output_stride}"
            )
        self.config = {
            "channels": channels,
            "input_stride": int(input_stride),
            "output_stride": int(output_stride),
            "field_scale": float(field_scale),
            "norm_floor": float(norm_floor),
        }
        self.input_stride = int(input_stride)
        self.output_stride = int(output_stride)
        self.field_scale = float(field_scale)
        self.norm_floor = float(norm_floor)
        self.multiple = deepest
        self.stem = ConvNormAct(2 * input_stride * input_stride, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(ConvNormAct(channels[i], channels[i + 1], stride=2), ConvNormAct(channels[i + 1], channels[i + 1]))
            for i in range(depth)
        )
        out_level = int(round(math.log2(output_stride // input_stride)))
        self.up = nn.ModuleList()
        width = channels[-1]
        for level in range(depth - 1, out_level - 1, -1):
            self.up.append(ConvNormAct(width + channels[level], channels[level]))
            width = channels[level]
        self.head = nn.Conv2d(width, 2, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if source.shape != target.shape or source.ndim != 4 or source.shape[1] != 1:
            raise ValueError(
                f"expected source and target patches of one shape (B, 1, P, P), got {tuple(source.shape)} and {tuple(target.shape)}"
            )
        size = source.shape[-2:]
        if size[0] % self.multiple or size[1] % self.multiple:
            raise ValueError(f"patch size {tuple(size)} must be a multiple of {self.multiple}")
        x = normalise_patches(torch.cat((source, target), dim=1), self.norm_floor)
        if self.input_stride > 1:
            x = F.pixel_unshuffle(x, self.input_stride)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat((x, skip), dim=1))
        field = self.head(x) * self.field_scale
        if self.output_stride > 1:
            field = F.interpolate(field, size=size, mode="bilinear", align_corners=False)
        return field
