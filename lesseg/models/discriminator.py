"""The fully convolutional discriminator of adversarial semi-supervised segmentation (Hung et al., BMVC 2018).

Five 4x4 convolutions of stride 2 (padding 1), channels ``C -> n -> 2n -> 4n -> 8n -> 1``, a LeakyReLU(0.2)
after each of the first four and no normalization; the 1-channel logit map (input size / 32) is upsampled
bilinearly to the input size, so every pixel gets a real-vs-predicted logit.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn
from torch.nn import functional as F


class FCDiscriminator(nn.Module):
    """Class-probability maps B,C,H,W -> per-pixel logits B,1,H,W ("this pixel comes from a label map")."""

    def __init__(self, num_classes: int, channels: int = 64) -> None:
        super().__init__()
        widths = [num_classes, channels, 2 * channels, 4 * channels, 8 * channels]
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, probs: Tensor) -> Tensor:
        logits = self.layers(probs)  # B,1,H/32,W/32
        return F.interpolate(logits, size=probs.shape[-2:], mode="bilinear", align_corners=False)  # B,1,H,W

    def encoder_parameters(self) -> list[nn.Parameter]:
        """None: the discriminator has no pretrained part (the trainer's parameter-group interface)."""
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())
