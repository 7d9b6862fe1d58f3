"""Superpixel regions for active learning: RIPU's scores and a greedy selection over SLIC superpixels.

RIPU's (2k+1)^2 squares (selection.py) are cheap to simulate with a ground-truth annotator but awkward for a
person: a 3x3 square straddles object boundaries and asks for a label per pixel. A superpixel follows the
image's edges, so it is usually one class and a person labels it with one click. The scores keep RIPU's
definitions (methods.md section 8), with the superpixel in place of the square window:

- impurity P(s): the entropy of the histogram of the predicted (argmax) classes of the superpixel's pixels;
- uncertainty U(s): the mean over the superpixel's pixels of the pixel prediction entropy
  (``selection.pixel_entropy``);
- both divided by ``log_norm`` (ln C by default, as in ``selection.region_scores``), score A = P * U.

Selection per image per round is greedy by decreasing score over the superpixels none of whose pixels is
labeled already (so nothing is labeled twice across rounds), taken while the pixels taken so far are below
the round's pixel budget (the last superpixel may overshoot it by less than its own size), until the
candidates run out.

**Tie rule**: equal scores are taken by increasing ``tiebreak`` rank (RIPU's rounds: a seeded random permutation,
``selection.tie_ranks``) or, without one, by increasing superpixel id (SLIC's raster order: the upper-left first).

All of it is vectorised over the superpixels (bincount, one stable sort, a cumulative sum): no Python loop over
superpixels or picks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .selection import pixel_entropy


def slic_segments(rgb: np.ndarray, pixels_per_segment: int, compactness: float = 10.0) -> Tensor:
    """SLIC superpixels of one image: H,W,3 uint8 -> H,W int64 ids 0..S-1 (consecutive, every id used).

    scikit-image's ``slic`` (k-means in Lab colour and position) asked for ``max(1, round(H*W /
    pixels_per_segment))`` segments, with ``enforce_connectivity`` so every superpixel is one connected piece
    (a person labels a region they can see as one); SLIC returns about, not exactly, that many, and its ids
    may skip values, hence the relabeling. Deterministic (SLIC's initialisation is a regular grid)."""
    from skimage.segmentation import slic

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"slic_segments expects an H,W,3 image, got shape {rgb.shape}")
    if pixels_per_segment < 1:
        raise ValueError(f"pixels_per_segment must be >= 1, got {pixels_per_segment}")
    h, w = rgb.shape[:2]
    n_segments = max(1, round(h * w / pixels_per_segment))
    labels = slic(rgb, n_segments=n_segments, compactness=compactness, start_label=0,
                  enforce_connectivity=True, channel_axis=-1)
    _, consecutive = np.unique(labels, return_inverse=True)  # ids in order of the original ones, no gaps
    return torch.from_numpy(consecutive.reshape(h, w).astype(np.int64))


def superpixel_scores(logits: Tensor, segments: Tensor, log_norm: float | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """RIPU's score A = P * U per superpixel, with its impurity P and uncertainty U, each / ``log_norm``.

    ``logits``: C,H,W (log-probabilities or logits: the entropies use their softmax); ``segments``: H,W integer
    ids 0..S-1 with S = max id + 1. Returns (A, P, U), each (S,) float32 on ``logits``' device. An id that no
    pixel carries scores 0 (its P and U are 0), so it is never preferred."""
    c = logits.shape[0]
    if segments.shape != logits.shape[1:]:
        raise ValueError(f"segments {tuple(segments.shape)} and logits {tuple(logits.shape)} differ in size")
    norm = math.log(c) if log_norm is None else log_norm
    seg = segments.to(logits.device, torch.int64).flatten()
    s = int(seg.max()) + 1 if seg.numel() else 0
    # max(0) returns the first maximal index, as argmax does, and is 2-3x faster over the channel dim on CPU
    pred = logits.max(0).indices.flatten()
    hist = torch.bincount(seg * c + pred, minlength=s * c).view(s, c).double()  # n_(s,c)
    size = hist.sum(1)
    frac = hist / size.clamp_min(1)[:, None]
    impurity = -torch.special.xlogy(frac, frac).sum(1)  # 0 ln 0 = 0
    ent_sum = torch.zeros(s, dtype=torch.float64, device=logits.device)
    ent_sum.scatter_add_(0, seg, pixel_entropy(logits).flatten().double())
    uncertainty = ent_sum / size.clamp_min(1)
    impurity, uncertainty = (impurity / norm).float(), (uncertainty / norm).float()
    return impurity * uncertainty, impurity, uncertainty


def select_superpixels(score: Tensor, segments: Tensor, budget_pixels: int, active: Tensor | None = None,
                       tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The superpixels to label in one round of one image: their ids (int64, in the order picked) and the H,W
    bool mask of their pixels.

    Candidates: the superpixels with at least one pixel, none of them in ``active`` (H,W bool, the pixels
    labeled in earlier rounds). Greedy by decreasing ``score`` (S,), **ties by increasing ``tiebreak`` rank**
    ((S,), e.g. :func:`selection.tie_ranks`; None: by increasing id, i.e. SLIC's raster order); a candidate
    is taken while the pixels taken before it are fewer than ``budget_pixels``, so the round labels at least
    the budget (overshooting by less than the last superpixel's size) unless the candidates run out first
    (then all of them are taken); ``budget_pixels <= 0`` takes nothing."""
    seg = segments.to(score.device, torch.int64)
    s = score.numel()
    if seg.numel() and int(seg.max()) >= s:
        raise ValueError(f"segments has id {int(seg.max())} but only {s} scores")
    flat = seg.flatten()
    size = torch.bincount(flat, minlength=s)
    candidate = size > 0
    if active is not None:
        touched = torch.bincount(flat[active.to(score.device).flatten()], minlength=s) > 0
        candidate &= ~touched
    ids = candidate.nonzero().flatten()  # ascending id
    if tiebreak is not None:
        ids = ids[tiebreak.to(score.device)[ids].argsort()]
    order = score[ids].argsort(descending=True, stable=True)  # stable: equal scores keep the tie-break order
    ids = ids[order]
    sizes = size[ids]
    before = sizes.cumsum(0) - sizes  # pixels taken before each one, if all before it are taken
    chosen = ids[before < budget_pixels]  # a prefix: ``before`` never decreases (sizes > 0)
    picked = torch.zeros(s, dtype=torch.bool, device=score.device)
    picked[chosen] = True
    return chosen, picked[seg]
