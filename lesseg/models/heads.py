"""Segmentation heads: small modules on top of a timm feature encoder (architecture.md, item 6).

The two decode heads share one interface, `forward(features) -> (feat, logits)`, where `features` is the
encoder's list of feature maps (shallow to deep) and both outputs are at the head's own resolution; the
Segmentor upsamples the logits to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LOW_LEVEL_CHANNELS = 48  # DeepLab-v3+ projects the stride-4 feature to 48 channels (Chen et al., 2018)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Conv with 'same' padding (no bias: BatchNorm follows) -> BatchNorm -> ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """DeepLab-v3 atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, image pooling.

    The image-pooling branch has no BatchNorm: its input is 1x1, so BatchNorm would fail in training with
    one image per process; the BatchNorm of the projection after the concatenation normalizes it anyway.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            conv_bn_relu((len(rates) + 2) * out_channels, out_channels, 1), nn.Dropout2d(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]  # x: B,Cin,h,w
        pooled = self.pool(x).expand(-1, -1, h, w)  # B,D,h,w
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))  # B,D,h,w


class DeepLabV3PlusHead(nn.Module):
    """DeepLab-v3+ decoder (Chen et al., ECCV 2018).

    ASPP on the last feature, upsampled to the stride-4 feature, concatenated with that feature projected to
    48 channels, refined by two 3x3 convs (`feat`, stride 4), then dropout and a 1x1 classifier.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        low_level_index: int,
        num_classes: int,
        channels: int,
        rates: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.low_level_index = low_level_index
        self.out_channels = channels
        self.aspp = ASPP(in_channels, channels, rates, dropout)
        self.low_level_project = conv_bn_relu(low_level_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + LOW_LEVEL_CHANNELS, channels), conv_bn_relu(channels, channels)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        low = self.low_level_project(features[self.low_level_index])  # B,48,h,w (stride 4)
        high = self.aspp(features[-1])  # B,D,h',w' (output stride)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)  # B,D,h,w
        feat = self.fuse(torch.cat([high, low], dim=1))  # B,D,h,w
        return feat, self.classifier(self.dropout(feat))  # B,D,h,w ; B,C,h,w


class DeepLabV2Head(nn.Module):
    """DeepLab-v2 ASPP classifier (Chen et al., TPAMI 2017), as used by RIPU.

    Parallel 3x3 convs with dilations 6/12/18/24 map the last encoder feature straight to class logits and
    are summed. The dilations are the paper's (defined at output stride 8) at any output stride. Weights
    start from N(0, 0.01) as in the original. `feat` is the last encoder feature itself.
    """

    def __init__(
        self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.out_channels = in_channels
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feat = features[-1]  # B,K,h,w
        logits = self.branches[0](feat)  # B,C,h,w
        for branch in self.branches[1:]:
            logits = logits + branch(feat)
        return feat, logits


class RepresentationHead(nn.Module):
    """U2PL representation head on the decoder features: conv3x3 -> BN -> ReLU -> conv1x1 to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn_relu(in_channels, hidden_channels), nn.Conv2d(hidden_channels, out_channels, 1)
        )

    def forward(self, feat: Tensor) -> Tensor:
        return self.layers(feat)  # B,rep_dim,h,w


class ClassificationHead(nn.Module):
    """Image-level multi-label classifier: global average pooling + a bias-free 1x1 conv (Zhou et al., 2016).

    Without a bias the image logits are exactly the spatial mean of the class activation maps, so the CAMs
    are the classifier's own evidence.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        pooled = features.mean(dim=(2, 3), keepdim=True)  # B,K,1,1
        return self.classifier(pooled).flatten(1)  # B,C

    def cam(self, features: Tensor) -> Tensor:
        """Raw class activation maps CAM_c = sum_k w_ck f_k (no ReLU, no normalization), B,C,h,w."""
        return self.classifier(features)


class FCNHead(nn.Module):
    """Auxiliary FCN head (PSPNet-style deep supervision): conv3x3-BN-ReLU-dropout-conv1x1 to class logits."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn_relu(in_channels, channels), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)  # B,C,h,w
