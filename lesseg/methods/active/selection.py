"""RIPU's scores and selection (methods.md section 8), as pure tensor functions.

Scores (per pixel of one image, from its logits at label resolution):
- region impurity P: the entropy of the predicted-class histogram of the (2k+1)x(2k+1) window around the
  pixel (clipped at the border; the histogram counts in-image pixels only);
- prediction uncertainty U: the mean pixel entropy over the same window;
- both divided by ``log_norm`` (ln C by default; the authors use ln 19 for every dataset), score A = P * U.
  PA's score is the pixel entropy times the impurity of a k = 32 window.

Selection is greedy with suppression, exactly as the definition reads: repeatedly take the highest-scoring
candidate, label it (RA: its clipped (2k+1)^2 square; PA: the pixel), and remove the candidates within
Chebyshev distance ``2k`` (RA) / ``radius`` (PA); pixels labeled in earlier rounds remove the candidates
whose square would touch them (RA: within ``k``; PA: within ``radius``), so squares never overlap and nothing
is selected twice. It stops when the budget is reached **or no candidate is left** (the authors' code then
re-picks pixel (0, 0)).

**Tie rule**: candidates are ordered by decreasing score, equal scores by increasing ``tiebreak`` rank (an
H,W permutation of ``0 .. H*W-1``; :func:`tie_ranks` draws a seeded random one, what RIPU's rounds use) or,
without one, by increasing row-major index (``y * W + x``: the upper-left one wins). Ties are common: a
region inside one predicted class has impurity 0, hence score 0, and a young network that predicts one class
over a whole image scores all of it 0; broken by index, such an image's budget went to squares in a row along
its top border (docs/benchmarks.md, "Active domain adaptation on shapes"), broken at random it spreads over the
image as the random baseline's does.

Vectorised, without a host synchronisation per pick: every pick of the greedy depends only on candidates
of higher priority, so the greedy over the ``K`` best candidates gives exactly the greedy's first picks as
long as it does not run out of them; among those ``K`` the greedy is computed in parallel rounds over the pairs of candidates
that conflict (found by hashing them into cells; a candidate with no conflicting higher-priority
candidate still alive is picked, the candidates it conflicts with are removed), one host sync per round,
not per pick. ``K`` doubles in the rare case the budget is not
met before the candidates run out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models import class_map


# -- scores --------------------------------------------------------------------------------------------
def pixel_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax of each pixel (natural log). C,H,W -> H,W float32"""
    logp = logits.float().log_softmax(0)
    return -(logp.exp() * logp).sum(0)


def _box_sum(x: Tensor, k: int) -> Tensor:
    """Sum of each (2k+1)^2 window clipped to the image, by integral images (cost independent of k; exact
    for integer input). N,H,W -> N,H,W"""
    n, h, w = x.shape
    s = torch.zeros(n, h + 1, w + 1, dtype=x.dtype, device=x.device)
    s[:, 1:, 1:] = x.cumsum(1).cumsum(2)
    y0 = (torch.arange(h, device=x.device) - k).clamp(0, h)
    y1 = (torch.arange(h, device=x.device) + k + 1).clamp(0, h)
    x0 = (torch.arange(w, device=x.device) - k).clamp(0, w)
    x1 = (torch.arange(w, device=x.device) + k + 1).clamp(0, w)
    return s[:, y1][:, :, x1] - s[:, y0][:, :, x1] - s[:, y1][:, :, x0] + s[:, y0][:, :, x0]


def _window_count(h: int, w: int, k: int, device) -> Tensor:
    """In-image pixels of each clipped (2k+1)^2 window. H,W"""
    ry = (torch.arange(h, device=device) + k + 1).clamp(max=h) - (torch.arange(h, device=device) - k).clamp(min=0)
    rx = (torch.arange(w, device=device) + k + 1).clamp(max=w) - (torch.arange(w, device=device) - k).clamp(min=0)
    return (ry[:, None] * rx[None, :]).float()


def _window_mean(x: Tensor, k: int) -> Tensor:
    """Mean of each (2k+1)^2 window over its in-image pixels. N,H,W float -> N,H,W float32"""
    if k <= 4:  # small windows: direct pooling is cheaper than integral images
        return F.avg_pool2d(x.float().unsqueeze(0), 2 * k + 1, stride=1, padding=k, count_include_pad=False)[0]
    total = _box_sum(x.double(), k)
    return (total / _window_count(x.shape[1], x.shape[2], k, x.device)).float()


def region_impurity(pred: Tensor, num_classes: int, k: int) -> Tensor:
    """Entropy of the class histogram of each clipped window of the predicted classes. H,W long -> H,W

    Small windows (k <= 2) compare the window's members pairwise: with n_c members of class c,
    sum_c n_c ln n_c = sum over members p of ln n_(class of p), so each member only needs the count of its
    own class (no C-channel histogram); larger ones count classes with integral images."""
    h, w = pred.shape
    n = _window_count(h, w, k, pred.device)
    if k > 2:
        onehot = F.one_hot(pred, num_classes).permute(2, 0, 1).to(torch.int32)  # C,H,W
        frac = _box_sum(onehot, k).float() / n  # n_c / n
        return -(frac * frac.clamp_min(1e-12).log()).sum(0)
    pad = F.pad(pred.to(torch.int16), (k, k, k, k), value=-1)  # -1 outside the image
    side = 2 * k + 1
    members = [pad[dy : dy + h, dx : dx + w] for dy in range(side) for dx in range(side)]
    counts = [torch.ones(h, w, dtype=torch.uint8, device=pred.device) for _ in members]  # each counts itself
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            same = (members[i] == members[j]).to(torch.uint8)
            counts[i] += same
            counts[j] += same
    table = torch.arange(len(members) + 1, device=pred.device).float().clamp_min(1).log()
    total = torch.zeros(h, w, device=pred.device)
    for m, c in zip(members, counts):
        total += torch.where(m >= 0, table[c.long()], 0.0)  # members outside the image add nothing
    return n.log() - total / n


def region_scores(logits: Tensor, k: int = 1, log_norm: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RIPU's region score A = P * U with its impurity P and uncertainty U, each divided by ``log_norm``
    (ln C by default). C,H,W logits -> (A, P, U), each H,W float32."""
    c = logits.shape[0]
    norm = math.log(c) if log_norm is None else log_norm
    impurity = region_impurity(class_map(logits[None])[0], c, k) / norm
    uncertainty = _window_mean(pixel_entropy(logits).unsqueeze(0), k)[0] / norm
    return impurity * uncertainty, impurity, uncertainty


def pixel_scores(logits: Tensor, k: int = 32, log_norm: float | None = None) -> Tensor:
    """RIPU's PA score: the pixel entropy times the impurity of its (2k+1)^2 window, both / ``log_norm``."""
    c = logits.shape[0]
    norm = math.log(c) if log_norm is None else log_norm
    return (pixel_entropy(logits) / norm) * (region_impurity(class_map(logits[None])[0], c, k) / norm)


def baseline_scores(kind: str, logits: Tensor, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """The paper's baselines at the same budget: ``random``, ``entropy`` (U alone) or ``impurity`` (P alone)."""
    if kind == "random":
        return torch.rand(logits.shape[1:], generator=generator, device=logits.device)
    _, impurity, uncertainty = region_scores(logits, k)
    if kind == "entropy":
        return uncertainty
    if kind == "impurity":
        return impurity
    raise ValueError(f"unknown baseline {kind!r}: random, entropy or impurity")


# -- budgets -------------------------------------------------------------------------------------------
def region_budget(h: int, w: int, ratio: float, rounds: int, k: int = 1) -> int:
    """Regions per image per round for RA: ``ceil(H * W * ratio / rounds / (2k+1)^2)``."""
    return math.ceil(h * w * ratio / rounds / (2 * k + 1) ** 2)


def pixel_budget(pixels: float, rounds: int, size: tuple[int, int] | None = None,
                 reference: tuple[int, int] = (640, 1280)) -> int:
    """Pixels per image per round for PA: ``pixels`` per image of the ``reference`` size (the paper's 40 per
    1280x640), scaled to the image's ``size`` (the authors' ~21 per round at 2048x1024), split over rounds."""
    scale = 1.0 if size is None else size[0] * size[1] / (reference[0] * reference[1])
    return math.ceil(pixels * scale / rounds)


# -- greedy selection with suppression -----------------------------------------------------------------
def tie_ranks(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
    """A random priority among equal scores: a permutation of ``0 .. numel-1`` shaped ``shape`` (drawn with
    ``generator``: the same seed, the same picks)."""
    n = math.prod(shape)
    device = device if device is not None else (generator.device if generator is not None else None)
    return torch.randperm(n, generator=generator, device=device).view(shape)


def _ordered_candidates(score: Tensor, valid: Tensor, count: int, tiebreak: Tensor | None = None) -> Tensor:
    """Flat indices of a prefix of the valid pixels in the tie rule's order (decreasing score, then increasing
    ``tiebreak`` rank or index) holding at least the ``count`` best (all of them when fewer are valid).

    The cut is found on a strided sample of the map (a threshold that about twice ``count`` pixels pass),
    lowered until enough pass: one comparison over the map instead of a top-k or sort of all of it."""
    flat = torch.where(valid.flatten(), score.flatten().float(), -torch.inf)
    step = max(1, flat.numel() // max(64 * count, 1))
    sample = flat[::step]
    want = min(sample.numel(), max(1, 2 * count // step))
    threshold = sample.topk(want).values[-1]
    while True:
        keep = (flat >= threshold) & (flat > -torch.inf)
        idx = keep.nonzero().flatten()  # ascending index
        if idx.numel() >= count or threshold == -torch.inf:
            break
        below = flat[flat < threshold]  # not enough: the next cut takes at least count more
        threshold = below.topk(min(count, below.numel())).values[-1] if below.numel() else -torch.inf
    if tiebreak is not None:  # the whole tie at the cut passed it (>=): re-rank within ties
        idx = idx[tiebreak.flatten()[idx].argsort()]
    order = flat[idx].argsort(descending=True, stable=True)  # ties keep the tie-break (or ascending index) order
    return idx[order]


def _conflicts(ys: Tensor, xs: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """Every ordered pair (i, j), i != j, of candidates within Chebyshev distance ``radius``: candidates are
    hashed into cells of side radius + 1, so only the 3x3 neighbouring cells are compared (the pairs are
    few: candidates are sparse in the image)."""
    side = radius + 1
    cy, cx = ys // side, xs // side
    stride = int(cx.max()) + 3 if len(cx) else 1
    key = (cy + 1) * stride + (cx + 1)
    order = key.argsort()
    sorted_key = key[order]
    firsts, seconds = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            target = key + dy * stride + dx
            lo = torch.searchsorted(sorted_key, target, right=False)
            hi = torch.searchsorted(sorted_key, target, right=True)
            counts = hi - lo
            i = torch.repeat_interleave(torch.arange(len(key), device=key.device), counts)
            offset = torch.arange(int(counts.sum()), device=key.device) - torch.repeat_interleave(
                counts.cumsum(0) - counts, counts)
            j = order[torch.repeat_interleave(lo, counts) + offset]
            firsts.append(i)
            seconds.append(j)
    i, j = torch.cat(firsts), torch.cat(seconds)
    near = (i != j) & ((ys[i] - ys[j]).abs() <= radius) & ((xs[i] - xs[j]).abs() <= radius)
    return i[near], j[near]


def _greedy(cand: Tensor, width: int, radius: int, n: int) -> tuple[Tensor, bool]:
    """Greedy picks among ``cand`` (flat indices in priority order) with Chebyshev suppression ``radius``, at
    most ``n`` of them, in priority order; and whether the candidates ran out before ``n`` picks."""
    k = len(cand)
    ei, ej = _conflicts(cand // width, cand % width, radius)  # j conflicts with i (both directions listed)
    above = ej < ei  # j ranks above i
    rank = torch.arange(k, device=cand.device)
    alive = torch.ones(k, dtype=torch.bool, device=cand.device)
    picked = torch.zeros_like(alive)
    while bool(alive.any()):
        blocked = torch.zeros(k, device=cand.device).index_add_(0, ei, (alive[ej] & above).float()) > 0
        pick = alive & ~blocked  # no higher-priority conflicting candidate left: the greedy takes it
        picked |= pick
        removed = torch.zeros(k, device=cand.device).index_add_(0, ei, pick[ej].float()) > 0
        alive &= ~pick & ~removed
        if int(picked.sum()) >= n and not bool((alive & (rank < picked.nonzero()[n - 1])).any()):
            break  # the first n picks are final: every candidate still alive ranks below the n-th pick
    order = picked.nonzero().flatten()
    return cand[order[:n]], bool(order.numel() < n)


def _select(score: Tensor, n: int, radius: int, active: Tensor | None, active_radius: int,
            tiebreak: Tensor | None) -> Tensor:
    w = score.shape[1]
    valid = torch.ones_like(score, dtype=torch.bool)
    if active is not None and bool(active.any()):
        near = F.max_pool2d(active.float()[None, None], 2 * active_radius + 1, 1, active_radius)[0, 0] > 0
        valid &= ~near
    k = max(4 * n, 64)
    while True:
        cand = _ordered_candidates(score, valid, k, tiebreak)
        picks, ran_out = _greedy(cand, w, radius, n)
        if not ran_out or len(cand) >= int(valid.sum()):
            return picks  # the budget is met, or no candidate is left anywhere
        k = 4 * len(cand)


def select_regions(score: Tensor, n: int, k: int = 1, active: Tensor | None = None,
                   tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RA: up to ``n`` region centres of one image (flat indices, in the order picked) and the H,W bool mask of
    their clipped (2k+1)^2 squares. ``active``: H,W bool, the pixels labeled in earlier rounds; ``tiebreak``:
    H,W ranks ordering equal scores (:func:`tie_ranks`; None: row-major)."""
    centres = _select(score, n, 2 * k, active, k, tiebreak)
    h, w = score.shape
    mask = torch.zeros(h * w, dtype=torch.bool, device=score.device)
    mask[centres] = True
    squares = F.max_pool2d(mask.view(1, 1, h, w).float(), 2 * k + 1, 1, k)[0, 0] > 0
    return centres, squares


def select_pixels(score: Tensor, n: int, radius: int = 1, active: Tensor | None = None,
                  tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PA: up to ``n`` pixels of one image (flat indices, in the order picked), no two within Chebyshev
    distance ``radius``, none within ``radius`` of a pixel labeled before; and their H,W bool mask.
    ``tiebreak`` as :func:`select_regions`."""
    pixels = _select(score, n, radius, active, radius, tiebreak)
    h, w = score.shape
    mask = torch.zeros(h * w, dtype=torch.bool, device=score.device)
    mask[pixels] = True
    return pixels, mask.view(h, w)
