"""CCT's light decoder (Ouali et al., CVPR 2020; methods-wave2.md section 9): a bias-free 1x1 conv from the
features to the classes, then x2 sub-pixel upsampling stages (conv1x1 C -> 4C, ReLU, PixelShuffle(2)) with
ICNR initialisation, then a bilinear resize to the input size where the stages do not reach it exactly (a
feature stride that is not a power of two, or a crop that is not a multiple of it).

Departure from the authors' ``upsample``: the stages' biases start at 0, so that at initialisation every
stage is exactly a nearest-neighbour upsampling of its 1x1 conv (the point of ICNR; the authors keep
PyTorch's random bias init, which breaks it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def icnr_(weight: Tensor, scale: int = 2) -> Tensor:
    """ICNR init (Aitken et al. 2017) of a 1x1 conv followed by ``PixelShuffle(scale)``: the ``scale**2``
    output channels that become one channel's sub-pixels share one Kaiming-normal kernel, so the shuffled
    output is the nearest-neighbour upsampling of that kernel's conv (no checkerboard at init). In place."""
    out_channels = weight.shape[0]
    base = weight.new_empty((out_channels // scale**2, *weight.shape[1:]))
    nn.init.kaiming_normal_(base, nonlinearity="relu")
    with torch.no_grad():  # PixelShuffle reads channel c*s^2 + k as sub-pixel k of channel c
        weight.copy_(base.repeat_interleave(scale**2, dim=0))
    return weight


class ShuffleStage(nn.Sequential):
    """One x2 stage: conv1x1 C -> 4C (ICNR, bias 0), ReLU, PixelShuffle(2). B,C,h,w -> B,C,2h,2w"""

    def __init__(self, channels: int) -> None:
        conv = nn.Conv2d(channels, 4 * channels, 1)
        icnr_(conv.weight)
        nn.init.zeros_(conv.bias)
        super().__init__(conv, nn.ReLU(), nn.PixelShuffle(2))


class ShuffleDecoder(nn.Module):
    """CCT's decoder (main or auxiliary): features at stride ``upscale`` -> class logits at the input size."""

    def __init__(self, in_channels: int, num_classes: int, upscale: int) -> None:
        super().__init__()
        self.classify = nn.Conv2d(in_channels, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classify.weight, nonlinearity="relu")
        stages = int(math.log2(upscale)) if upscale >= 1 else 0
        self.stages = nn.Sequential(*(ShuffleStage(num_classes) for _ in range(stages)))

    def forward(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        """``z`` B,D,h,w -> logits B,C,H,W (``size`` = (H, W))."""
        logits = self.stages(self.classify(z))  # B,C,h*2^k,w*2^k
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits
