"""RIPU's extra loss terms (methods.md section 8), pure functions of probabilities and labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...metrics import IGNORE


def boundary_pixels(labels: Tensor) -> Tensor:
    """Semantic-boundary pixels: valid pixels whose 3x3 neighbourhood (replicate padding, so the border adds
    no new label) holds a different valid label. B,H,W long -> B,H,W bool"""
    valid = labels != IGNORE
    lab = labels.float().unsqueeze(1)
    # a valid neighbour differing from the centre: compare with the max and min of the valid neighbours
    big = torch.where(valid.unsqueeze(1), lab, torch.full_like(lab, -1.0))
    small = torch.where(valid.unsqueeze(1), lab, torch.full_like(lab, 1e9))
    hi = F.max_pool2d(F.pad(big, (1, 1, 1, 1), mode="replicate"), 3, 1)
    lo = -F.max_pool2d(F.pad(-small, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return valid & ((hi.squeeze(1) > labels) | (lo.squeeze(1) < labels))


def local_consistency(probs: Tensor, labels: Tensor) -> Tensor:
    """L1 distance (summed over classes) between each pixel's probabilities and their 3x3 mean (replicate
    padding), averaged over the semantic-boundary pixels of ``labels``; 0 when there are none.
    B,C,H,W probabilities ; B,H,W labels -> 0-dim"""
    p = probs.float()
    mean = F.avg_pool2d(F.pad(p, (1, 1, 1, 1), mode="replicate"), 3, 1)
    dist = (p - mean).abs().sum(1)  # B,H,W
    edge = boundary_pixels(labels).float()
    return (dist * edge).sum() / edge.sum().clamp_min(1.0)


def negative_learning(probs: Tensor, valid: Tensor, tau: float = 0.05) -> Tensor:
    """``-ln(1 - p_c)`` over every entry (pixel, class) of a valid pixel with ``p_c < tau``, averaged over
    those entries; 0 (never NaN) when there are none. B,C,H,W ; B,H,W bool -> 0-dim"""
    p = probs.float()
    low = (p < tau) & valid.unsqueeze(1)
    terms = -torch.log1p(-p.clamp(max=tau)) * low
    return terms.sum() / low.sum().clamp_min(1)
