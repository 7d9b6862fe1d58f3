"""Superpixel regions for active learning: SLIC ids, RIPU's scores per superpixel (by hand, against a naive
loop and against selection.py's square windows), the greedy selection against a naive reference, the
budget rule, exhaustion and the exclusion of labeled pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.measure import label as connected_components

from lesseg.methods.active.selection import region_scores
from lesseg.methods.active.superpixels import select_superpixels, slic_segments, superpixel_scores


# -- SLIC ----------------------------------------------------------------------------------------------
def _halves(h: int = 48, w: int = 64) -> np.ndarray:
    """Left half red, right half blue, with a little noise (SLIC must not merge across the edge)."""
    rng = np.random.default_rng(0)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)
    rgb[:, w // 2:] = (30, 30, 200)
    return np.clip(rgb.astype(int) + rng.integers(-10, 11, rgb.shape), 0, 255).astype(np.uint8)


def test_slic_ids_consecutive_connected_and_deterministic():
    rgb = _halves()
    seg = slic_segments(rgb, pixels_per_segment=64)
    assert seg.dtype == torch.int64 and seg.shape == (48, 64)
    ids = seg.unique().tolist()
    assert ids == list(range(len(ids))) and len(ids) > 4  # consecutive from 0, every id used
    assert torch.equal(seg, slic_segments(rgb, pixels_per_segment=64))  # deterministic
    for i in ids:  # enforce_connectivity: each superpixel is one connected piece
        assert connected_components(seg.numpy() == i, connectivity=1).max() == 1


def test_slic_follows_colour_edges_and_the_requested_size():
    rgb = _halves()
    seg = slic_segments(rgb, pixels_per_segment=64).numpy()
    left, right = set(np.unique(seg[:, :32]).tolist()), set(np.unique(seg[:, 32:]).tolist())
    assert not left & right  # no superpixel straddles the red / blue edge (the colour is actually used)
    fine = len(np.unique(seg))
    coarse = len(np.unique(slic_segments(rgb, pixels_per_segment=512).numpy()))
    assert coarse < fine
    assert 48 * 64 / 64 / 3 < fine < 48 * 64 / 64 * 3  # about H*W / pixels_per_segment
    whole = slic_segments(rgb, pixels_per_segment=10 ** 9)  # asks for max(1, 0) = 1 segment
    assert whole.max() <= 1  # one per colour at most (connectivity may split it), never an error


def test_slic_rejects_a_grey_image():
    with pytest.raises(ValueError, match="H,W,3"):
        slic_segments(np.zeros((8, 8), np.uint8), 16)


# -- scores --------------------------------------------------------------------------------------------
def _entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def test_scores_by_hand_mixed_vs_pure():
    """Superpixel 0 (an interleaved, non-rectangular set of 4 pixels) predicts four different classes with
    flat probabilities; superpixel 1 (4 pixels) predicts class 0 confidently everywhere."""
    c = 4
    segments = torch.tensor([[0, 1, 0, 1],
                             [1, 0, 1, 0]])
    mixed = [0.4, 0.2, 0.2, 0.2]
    pure = [0.97, 0.01, 0.01, 0.01]
    probs = torch.zeros(c, 2, 4)
    k = 0
    for y in range(2):
        for x in range(4):
            if segments[y, x] == 0:
                probs[:, y, x] = torch.tensor(mixed).roll(k)  # argmax class k = 0, 1, 2, 3
                k += 1
            else:
                probs[:, y, x] = torch.tensor(pure)
    score, impurity, uncertainty = superpixel_scores(probs.log(), segments)
    ln4 = math.log(4)
    assert impurity.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)  # ln 4 / ln 4; one class: 0
    assert uncertainty.tolist() == pytest.approx([_entropy(mixed) / ln4, _entropy(pure) / ln4], rel=1e-5)
    assert score.tolist() == pytest.approx([_entropy(mixed) / ln4, 0.0], rel=1e-5)
    assert score.shape == (2,) and score.dtype == torch.float32

    # a 3:1 mix in superpixel 1 and an explicit normaliser (ln 1 = 1 would be a different scale)
    probs[:, 0, 1] = torch.tensor([0.1, 0.7, 0.1, 0.1])
    _, impurity, uncertainty = superpixel_scores(probs.log(), segments, log_norm=1.0)
    assert impurity[1].item() == pytest.approx(_entropy([0.75, 0.25]), rel=1e-5)
    assert uncertainty[1].item() == pytest.approx(
        (3 * _entropy(pure) + _entropy([0.1, 0.7, 0.1, 0.1])) / 4, rel=1e-5)


def naive_scores(logits: torch.Tensor, segments: torch.Tensor, log_norm: float):
    """One superpixel at a time, with Python counts."""
    p = logits.softmax(0)
    ent = -(p * p.log()).sum(0)
    pred = logits.argmax(0)
    imp, unc = [], []
    for s in range(int(segments.max()) + 1):
        m = segments == s
        n = int(m.sum())
        if n == 0:
            imp.append(0.0)
            unc.append(0.0)
            continue
        counts = torch.bincount(pred[m], minlength=logits.shape[0]).tolist()
        imp.append(_entropy([k / n for k in counts]) / log_norm)
        unc.append(float(ent[m].sum()) / n / log_norm)
    return torch.tensor(imp), torch.tensor(unc)


@pytest.mark.parametrize("seed", range(4))
def test_scores_match_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    c, h, w = 5, 9, 13
    logits = torch.randn(c, h, w, generator=g) * 2
    segments = torch.randint(0, 12, (h, w), generator=g)
    segments[segments == 7] = 8  # an id with no pixel: scores 0, not NaN
    score, impurity, uncertainty = superpixel_scores(logits, segments)
    imp, unc = naive_scores(logits, segments, math.log(c))
    assert torch.allclose(impurity, imp, atol=1e-6) and torch.allclose(uncertainty, unc, atol=1e-6)
    assert torch.allclose(score, imp * unc, atol=1e-6)
    assert score[7] == 0 and not score.isnan().any()


def test_scores_on_3x3_tiles_equal_ripu_square_windows():
    """With 3x3 tiles as superpixels, a tile's score is selection.region_scores (k = 1) at its centre."""
    g = torch.Generator().manual_seed(3)
    c, h, w = 6, 9, 12
    logits = (torch.randn(c, h, w, generator=g) * 2).log_softmax(0)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    segments = (ys // 3) * (w // 3) + xs // 3
    score, impurity, uncertainty = superpixel_scores(logits, segments, log_norm=math.log(19))
    a, p, u = region_scores(logits, k=1, log_norm=math.log(19))
    centres = (slice(1, h, 3), slice(1, w, 3))
    assert torch.allclose(impurity, p[centres].flatten(), atol=1e-5)
    assert torch.allclose(uncertainty, u[centres].flatten(), atol=1e-5)
    assert torch.allclose(score, a[centres].flatten(), atol=1e-5)


# -- selection -----------------------------------------------------------------------------------------
def naive_select(score: torch.Tensor, segments: torch.Tensor, budget: int, active: torch.Tensor | None):
    """The definition, one superpixel at a time: best score first, ties by lower id; skip superpixels with a
    labeled pixel or no pixel; take one while the pixels taken so far are below the budget."""
    s = score.numel()
    order = sorted(range(s), key=lambda i: (-float(score[i]), i))
    taken, pixels = [], 0
    for i in order:
        if pixels >= budget:
            break
        m = segments == i
        if not m.any() or (active is not None and (active & m).any()):
            continue
        taken.append(i)
        pixels += int(m.sum())
    return taken


@pytest.mark.parametrize("seed", range(30))
def test_selection_matches_the_naive_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
    s = int(torch.randint(1, 20, (1,), generator=g))
    segments = torch.randint(0, s, (h, w), generator=g)
    score = torch.randint(0, 4, (s,), generator=g).float() / 4  # few distinct values: many ties
    active = torch.rand(h, w, generator=g) < [0.0, 0.05, 0.2][seed % 3]
    budget = int(torch.randint(0, h * w + 5, (1,), generator=g))
    ids, mask = select_superpixels(score, segments, budget, active)
    want = naive_select(score, segments, budget, active)
    assert ids.tolist() == want  # same superpixels, same order
    assert torch.equal(mask, torch.isin(segments, torch.tensor(want, dtype=torch.long)))
    assert not (mask & active).any()


def test_ties_go_to_the_lower_id():
    segments = torch.tensor([[0, 1, 2, 3]])
    ids, _ = select_superpixels(torch.tensor([0.5, 0.9, 0.5, 0.9]), segments, 3)
    assert ids.tolist() == [1, 3, 0]


def test_tie_ranks_order_equal_scores_only():
    segments = torch.tensor([[0, 1, 2, 3]])
    score = torch.tensor([0.5, 0.9, 0.5, 0.9])
    ids, _ = select_superpixels(score, segments, 4, tiebreak=torch.tensor([3, 2, 0, 1]))
    assert ids.tolist() == [3, 1, 2, 0]  # 0.9s first (rank 1 before 2), then the 0.5s (rank 0 before 3)


def test_budget_rule_may_overshoot_by_less_than_the_last_superpixel():
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2]])  # sizes 5, 2, 1
    score = torch.tensor([0.1, 0.9, 0.5])
    take = {b: select_superpixels(score, segments, b)[0].tolist() for b in (0, 1, 2, 3, 4, 100)}
    assert take[0] == []  # nothing asked, nothing taken
    assert take[1] == [1] and take[2] == [1]  # 2 pixels reach a budget of 1 or 2
    assert take[3] == [1, 2]  # 2 < 3: one more (3 pixels)
    assert take[4] == [1, 2, 0]  # 3 < 4: the 5-pixel superpixel too (8 pixels, 4 over)
    assert take[100] == [1, 2, 0]  # exhaustion: every candidate, no error and nothing repeated
    _, mask = select_superpixels(score, segments, 3)
    assert mask.tolist() == [[False] * 5 + [True] * 3]


def test_labeled_pixels_exclude_their_whole_superpixel():
    segments = torch.tensor([[0, 0, 1, 1],
                             [2, 2, 3, 3]])
    score = torch.tensor([0.9, 0.8, 0.7, 0.6])
    active = torch.zeros(2, 4, dtype=torch.bool)
    active[0, 1] = True  # one pixel of the best superpixel is labeled already
    active[1, 2] = True
    ids, mask = select_superpixels(score, segments, 100, active)
    assert ids.tolist() == [1, 2]  # 0 and 3 are never proposed again, even with budget to spare
    assert not (mask & active).any() and int(mask.sum()) == 4
    everything = torch.ones(2, 4, dtype=torch.bool)
    ids, mask = select_superpixels(score, segments, 100, everything)
    assert ids.numel() == 0 and not mask.any()  # all labeled: an empty round, not an error


def test_superpixels_end_to_end_on_a_slic_map():
    """Rounds on one image: the labeled pixels only grow, never twice, and each round meets its budget."""
    rgb = _halves(40, 56)
    segments = slic_segments(rgb, pixels_per_segment=30)
    logits = torch.randn(19, 40, 56, generator=torch.Generator().manual_seed(0)).log_softmax(0)
    score = superpixel_scores(logits, segments)[0]
    active = torch.zeros(40, 56, dtype=torch.bool)
    seen: set[int] = set()
    for _ in range(3):
        ids, mask = select_superpixels(score, segments, 200, active)
        assert not seen & set(ids.tolist())
        seen |= set(ids.tolist())
        assert int(mask.sum()) >= 200 and not (mask & active).any()
        active |= mask
