"""GCT's flaw detector (Ke et al., ECCV 2020; methods-wave2.md s. 10): from an image and a softmax prediction,
a per-pixel map of how wrong the prediction is.

Seven 4x4 convolutions with (channels, stride) (w,2) (2w,2) (2w,1) (4w,2) (4w,1) (8w,2) (8w,1), w = 64 in the
paper, each followed by IBNorm and LeakyReLU 0.2, then a 4x4 classifier (1 channel, stride 2) whose map is
bilinearly upsampled to the prediction's size. No activation: the flaw map is regressed with MSE.

The detector's total stride is 32 and its stride-1 4x4 convolutions trim a position each: a 321-pixel crop
(the paper's) gives a 9x9 map, a 64-pixel crop a single value, i.e. a constant map that flags nothing.
Inputs whose shorter side is below ``min_side`` are therefore upsampled first (256: a 7x7 map, 128: 3x3);
the map is returned at the input size either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_SIDE = 64  # the smallest input side for which every layer keeps a position (InstanceNorm needs 2x2)


class IBNorm(nn.Module):
    """BatchNorm on the first half of the channels (rounded up), InstanceNorm without affine on the rest."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.n_bn = int(channels * 0.5 + 0.5)
        self.bn = nn.BatchNorm2d(self.n_bn)
        self.inorm = nn.InstanceNorm2d(channels - self.n_bn, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.bn(x[:, : self.n_bn]), self.inorm(x[:, self.n_bn :])], dim=1)


class FlawDetector(nn.Module):
    """``forward(image, prob) -> flaw map`` B,1,H,W (raw), for an image B,3,H,W and a prediction B,C,H,W."""

    LAYERS = ((1, 2), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1))  # (channels / width, stride)

    def __init__(self, in_channels: int, width: int = 64, min_side: int = 256) -> None:
        super().__init__()
        if min_side < MIN_SIDE:
            raise ValueError(f"the flaw detector needs inputs of {MIN_SIDE} pixels or more, not {min_side}")
        self.min_side = min_side
        layers: list[nn.Module] = []
        c_in = in_channels
        for mult, stride in self.LAYERS:
            c_out = width * mult
            layers += [nn.Conv2d(c_in, c_out, 4, stride, 1), IBNorm(c_out), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c_in, 1, 4, 2, 1)

    def forward(self, image: Tensor, prob: Tensor) -> Tensor:
        size = prob.shape[-2:]
        x = torch.cat([image.to(prob.dtype), prob], dim=1)  # B,3+C,H,W
        short = min(size)
        if short < self.min_side:
            scale = self.min_side / short
            x = F.interpolate(x, size=[round(s * scale) for s in size], mode="bilinear", align_corners=True)
        flaw = self.classifier(self.body(x))  # B,1,h,w
        return F.interpolate(flaw, size=size, mode="bilinear", align_corners=True)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """None: the detector is trained from scratch (Method.param_groups puts it at the head LR)."""
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())
