"""PseudoSeg's self-attention refinement of Grad-CAM maps (SGC; Zou et al., ICLR 2021; the authors' att_v2).

Given encoder features ``f`` (B,K',h,w, the last two encoder levels at the CAM's resolution, detached) and
max-normalised class maps ``s`` (B,K,h,w in [0, 1], detached): query and key are bias-free 1x1 projections
of ``f`` to ``dim`` channels, ``A = softmax_j(q_i . k_j / sqrt(dim))`` over the valid pixels ``j``, and the
refined maps ``r = A s + s`` (a skip connection, so scores lie in [0, 2]). When the maps cover the
foreground classes only, a background score ``2 - max_c r_c`` is inserted at the background's class index;
a bias-free 1x1 convolution with BatchNorm turns the C scores into segmentation logits, trained with CE on
labeled images. Nothing upstream gets gradient from it: features and maps come in detached.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def with_background(scores: Tensor, bg_class: int | None, top: float) -> Tensor:
    """Insert the background score ``top - max_c scores_c`` at channel ``bg_class`` (None: unchanged).
    B,K,h,w -> B,K+1,h,w"""
    if bg_class is None:
        return scores
    bg = top - scores.amax(1, keepdim=True)
    return torch.cat([scores[:, :bg_class], bg, scores[:, bg_class:]], 1)


class SelfAttentionRefiner(nn.Module):
    """(features, class maps, valid pixels) -> SGC logits B,C,h,w (see the module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, bg_class: int | None, dim: int = 128) -> None:
        super().__init__()
        self.bg_class = bg_class
        self.dim = dim
        self.query = nn.Conv2d(in_channels, dim, 1, bias=False)
        self.key = nn.Conv2d(in_channels, dim, 1, bias=False)
        self.classifier = nn.Sequential(nn.Conv2d(num_classes, num_classes, 1, bias=False),
                                        nn.BatchNorm2d(num_classes))  # fmt: skip

    def forward(self, feat: Tensor, scores: Tensor, valid: Tensor) -> Tensor:
        """``feat`` B,K',h,w ; ``scores`` B,K,h,w ; ``valid`` B,h,w bool (pixels that may be attended to)."""
        b, k, h, w = scores.shape
        q = self.query(feat).flatten(2).float()  # B,D,hw
        key = self.key(feat).flatten(2).float()
        logits = torch.einsum("bdi,bdj->bij", q, key) / math.sqrt(self.dim)  # B,hw(query),hw(key)
        logits = logits.masked_fill(~valid.flatten(1)[:, None, :], -1e9)  # padding is never attended to
        attended = torch.einsum("bij,bkj->bki", logits.softmax(-1), scores.flatten(2).float())  # B,K,hw
        refined = attended.view(b, k, h, w) + scores.float()
        return self.classifier(with_background(refined, self.bg_class, 2.0))
