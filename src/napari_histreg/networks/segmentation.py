"""Tissue segmentation U-Net: working grey image -> tissue logits.

The layout follows DeepHistReg's U-Net (GroupNorm + PReLU, skip connections, Dice loss at
shorter side 512) but is much narrower and starts with a strided stem, because a tissue
outline needs context far more than it needs full-resolution detail:

* ``stem_stride=2``: the first 3x3 convolution runs at stride 2, every later layer at half
  resolution or less; the logits are upsampled bilinearly back to the input grid.
* ``channels=(8, 16, 32, 64, 128)``: one level per entry, each level after the first halves
  the resolution (so the deepest features at shorter side 512 are 16 px apart, with a
  receptive field of about 200 px).

Forward pass at 512x512 on one CPU thread: this default (443 k parameters, 1.8 MB) about
0.02 to 0.045 s; DESIGN.md's full-resolution 32-64-128-256-512 encoder (7.1 M parameters) about
0.9 to 1.3 s. The narrow network reaches Dice 0.89 to 0.99 against the pseudo-labels of tissue
blocks held out of its training (the labels' own precision is the limit), so the width was not
the bottleneck; the wide one was not trained (30 to 50 times the compute per step).

Input ``(B, 1, H, W)`` working grey (tissue bright, glass and padding near 0), any ``H, W``:
the input is zero-padded (zero = glass, as the preprocess pads) to a multiple of
:attr:`TissueUNet.multiple` and the logits are cropped back. Output ``(B, 1, H, W)`` logits
(sigmoid = tissue probability).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct


class TissueUNet(nn.Module):
    """U-Net for tissue masks. Keyword-only, JSON-able configuration (stored in ``config``).

    ``channels``: feature channels per level (level ``i`` at ``1 / (stem_stride * 2**i)``
    resolution); ``stem_stride``: 1 or 2 (2 = the whole network runs at half resolution);
    ``convs_per_level``: 3x3 ConvNormAct layers per encoder level (after its strided one);
    ``in_channels``: 1 (working grey).
    """

    kind = "segmentation"

    def __init__(
        self,
        *,
        channels: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128),
        stem_stride: int = 2,
        convs_per_level: int = 1,
        in_channels: int = 1,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, not {stem_stride}")
        self.config = {
            "channels": channels,
            "stem_stride": int(stem_stride),
            "convs_per_level": int(convs_per_level),
            "in_channels": int(in_channels),
        }
        self.stem_stride = int(stem_stride)
        self.multiple = self.stem_stride * 2 ** (len(channels) - 1)
        self.encoder = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(channels):
            stride = self.stem_stride if level == 0 else 2
            layers = [ConvNormAct(previous, width, stride=stride)]
            layers += [ConvNormAct(width, width) for _ in range(int(convs_per_level))]
            self.encoder.append(nn.Sequential(*layers))
            previous = width
        self.decoder = nn.ModuleList()
        for level in range(len(channels) - 2, -1, -1):
            self.decoder.append(ConvNormAct(channels[level + 1] + channels[level], channels[level]))
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` working grey -> ``(B, 1, H, W)`` tissue logits."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # zeros = glass
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        if self.stem_stride != 1:
            logits = F.interpolate(logits, scale_factor=self.stem_stride, mode="bilinear", align_corners=False)
        return logits[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
