"""Small building blocks shared by the networks (torch only: no torchvision here).

All blocks take and return ``(B, C, H, W)`` tensors.
"""

from __future__ import annotations

import torch
from torch import nn


def group_count(channels: int, preferred: int = 8) -> int:
    """The largest group count <= ``preferred`` that divides ``channels`` (GroupNorm needs it)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ConvNormAct(nn.Sequential):
    """3x3 convolution (optionally strided) -> GroupNorm -> PReLU.

    GroupNorm rather than BatchNorm: batches are small (a few patches or pairs) and inference
    runs one pair at a time, where batch statistics would differ from training.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(group_count(out_channels), out_channels),
            nn.PReLU(out_channels),
        )


class ResidualBlock(nn.Module):
    """Two :class:`ConvNormAct` with a skip connection; a strided 1x1 projection when the
    shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(in_channels, out_channels, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(out_channels), out_channels),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.GroupNorm(group_count(out_channels), out_channels),
            )
        )
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))
