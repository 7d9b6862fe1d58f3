"""RIPU's scores and selection (methods.md section 8): hand-built maps, border windows, the greedy against a
naive reference, exhaustion, budgets."""

from __future__ import annotations

import math

import pytest
import torch

from lesseg.methods.active.selection import (
    pixel_budget,
    pixel_entropy,
    region_budget,
    region_impurity,
    region_scores,
    select_pixels,
    select_regions,
    tie_ranks,
)


def naive_greedy(score: torch.Tensor, n: int, radius: int, active: torch.Tensor | None, active_radius: int,
                 tiebreak: torch.Tensor | None = None):
    """The definition, one pick at a time: best score first, ties by lower tie-break rank (else row-major
    index)."""
    h, w = score.shape
    rank = tiebreak.flatten().tolist() if tiebreak is not None else list(range(h * w))
    order = sorted(range(h * w), key=lambda i: (-float(score.flatten()[i]), rank[i]))
    blocked = torch.zeros(h, w, dtype=torch.bool)
    if active is not None:
        for y, x in active.nonzero().tolist():
            blocked[max(0, y - active_radius): y + active_radius + 1, max(0, x - active_radius): x + active_radius + 1] = True
    picks = []
    for i in order:
        if len(picks) == n:
            break
        y, x = divmod(i, w)
        if blocked[y, x]:
            continue
        picks.append(i)
        blocked[max(0, y - radius): y + radius + 1, max(0, x - radius): x + radius + 1] = True
    return picks


def test_impurity_and_uncertainty_by_hand_with_border_windows():
    pred = torch.tensor([[0, 0, 1], [0, 2, 1], [0, 0, 0]])
    imp = region_impurity(pred, 3, 1)
    # centre: 9 pixels, counts 0:6, 1:2, 2:1 ; corner (0,0): 4 in-image pixels, 0:3, 2:1
    centre = -(6 / 9 * math.log(6 / 9) + 2 / 9 * math.log(2 / 9) + 1 / 9 * math.log(1 / 9))
    corner = -(3 / 4 * math.log(3 / 4) + 1 / 4 * math.log(1 / 4))
    assert imp[1, 1].item() == pytest.approx(centre, abs=1e-6)
    assert imp[0, 0].item() == pytest.approx(corner, abs=1e-6)
    assert imp[2, 0].item() == pytest.approx(-(3 / 4 * math.log(3 / 4) + 1 / 4 * math.log(1 / 4)), abs=1e-6)
    logits = torch.zeros(3, 3, 3)
    logits[0, 0, 0] = 10.0  # one confident pixel, the others uniform (entropy ln 3)
    ent = pixel_entropy(logits)
    assert ent[1, 1].item() == pytest.approx(math.log(3), abs=1e-6) and ent[0, 0].item() < 1e-3
    score, p, u = region_scores(logits, 1)
    assert u[0, 0].item() == pytest.approx((3 * math.log(3) + ent[0, 0].item()) / 4 / math.log(3), abs=1e-6)
    assert torch.allclose(score, p * u)
    _, p19, _ = region_scores(logits, 1, log_norm=math.log(19))  # the authors' normaliser
    assert torch.allclose(p19, p * math.log(3) / math.log(19))


@pytest.mark.parametrize("seed", range(6))
def test_region_selection_equals_the_naive_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = 13 + seed, 17
    score = (torch.rand(h, w, generator=g) * 5).floor()  # many ties
    active = torch.rand(h, w, generator=g) < 0.03
    n = 6 + seed
    centres, squares = select_regions(score, n, k=1, active=active)
    assert centres.tolist() == naive_greedy(score, n, 2, active, 1)
    ref = torch.zeros(h, w, dtype=torch.bool)
    for i in centres.tolist():
        y, x = divmod(i, w)
        ref[max(0, y - 1): y + 2, max(0, x - 1): x + 2] = True
    assert torch.equal(squares, ref) and not (squares & active).any()


@pytest.mark.parametrize("seed", range(4))
def test_pixel_selection_equals_the_naive_greedy(seed):
    g = torch.Generator().manual_seed(100 + seed)
    score = torch.rand(20, 24, generator=g).round(decimals=1)
    active = torch.rand(20, 24, generator=g) < 0.02
    pixels, mask = select_pixels(score, 15, radius=2, active=active)
    assert pixels.tolist() == naive_greedy(score, 15, 2, active, 2)
    assert int(mask.sum()) == 15 and not (mask & active).any()


def test_selection_stops_when_no_candidate_is_left():
    """A 5x5 image holds 4 non-overlapping 3x3 squares at most (centres 3 apart); asking for 10 gives what
    exists and never re-picks pixel (0, 0) (the authors' defect)."""
    score = torch.arange(25.0).view(5, 5).flip(0)
    centres, _ = select_regions(score, 10, k=1)
    assert centres.tolist() == naive_greedy(score, 10, 2, None, 1) and len(centres) < 10
    assert len(set(centres.tolist())) == len(centres)
    full = torch.ones(5, 5, dtype=torch.bool)
    assert select_regions(score, 3, k=1, active=full)[0].numel() == 0  # everything labeled already


def test_ties_break_towards_the_upper_left():
    score = torch.zeros(6, 6)
    centres, _ = select_regions(score, 3, k=1)
    assert centres.tolist() == [0, 3, 18]  # (0,0), (0,3), (3,0)


@pytest.mark.parametrize("seed", range(4))
def test_random_tie_ranks_order_equal_scores_and_nothing_else(seed):
    """With tie ranks the greedy is the naive one ordering ties by rank; scores still decide first."""
    g = torch.Generator().manual_seed(200 + seed)
    h, w = 15, 19
    score = (torch.rand(h, w, generator=g) * 3).floor()  # three values: ties everywhere
    active = torch.rand(h, w, generator=g) < 0.03
    ranks = tie_ranks((h, w), g)
    assert sorted(ranks.flatten().tolist()) == list(range(h * w))
    centres, _ = select_regions(score, 9, k=1, active=active, tiebreak=ranks)
    assert centres.tolist() == naive_greedy(score, 9, 2, active, 1, ranks)
    pixels, _ = select_pixels(score, 12, radius=1, active=active, tiebreak=ranks)
    assert pixels.tolist() == naive_greedy(score, 12, 1, active, 1, ranks)
    assert all(score.flatten()[i] == score.max() for i in centres[:3].tolist())  # the best value still first


def test_random_ties_spread_a_flat_map_over_the_image():
    """A map of one value (a network predicting one class everywhere scores 0 everywhere): by index the
    picks fill the top rows, by seeded random ranks they cover the image, the same for the same seed."""
    score = torch.zeros(64, 64)
    by_index = select_regions(score, 20, k=1)[0] // 64
    assert by_index.max() <= 6  # rows 0, 3 and 6 only
    spread = [select_regions(score, 20, k=1, tiebreak=tie_ranks((64, 64), torch.Generator().manual_seed(s)))[0]
              for s in (0, 0, 1)]
    assert torch.equal(spread[0], spread[1]) and not torch.equal(spread[0], spread[2])
    rows = spread[0] // 64
    assert rows.min() < 20 and rows.max() > 44  # both halves of the image


def test_budgets():
    assert region_budget(1024, 2048, 0.022, 5, 1) == math.ceil(1024 * 2048 * 0.022 / 5 / 9) == 1026
    assert pixel_budget(40, 5) == 8  # 40 pixels per 1280x640 image over 5 rounds
    assert pixel_budget(40, 5, size=(1024, 2048)) == 21  # the authors' rescaling to 2048x1024


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_impurity_paths_agree_with_a_one_hot_histogram(k):
    """Pairwise member counts (k <= 2) and integral images (larger k) against pooled one-hot histograms."""
    import torch.nn.functional as F

    pred = torch.randint(0, 5, (23, 31), generator=torch.Generator().manual_seed(k))
    onehot = F.one_hot(pred, 5).permute(2, 0, 1).float()
    frac = F.avg_pool2d(onehot[None], 2 * k + 1, 1, k, count_include_pad=False)[0]
    ref = -(frac * frac.clamp_min(1e-12).log()).sum(0)
    assert torch.allclose(region_impurity(pred, 5, k), ref, atol=1e-5)


def test_bench_select_prints_a_table(capsys):
    from lesseg.cli import main

    assert main(["bench", "select", "--size", "64x96", "--classes", "5", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "RA 2.2%/5 rounds, k=1, round 1" in out and "PA 40 px/1280x640" in out
    rows = __import__("json").loads(out.strip().splitlines()[-1])
    assert rows[0]["budget"] == region_budget(64, 96, 0.022, 5, 1) == rows[0]["picked"]
    assert "superpixels 2.2%/5" in out and rows[-1]["picked"] >= 1  # whole superpixels up to the budget
