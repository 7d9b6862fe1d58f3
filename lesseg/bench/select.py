"""``lesseg bench select``: the time of RIPU's scores and selection for one image (methods.md section 8).

A random logit map of the given size and class count (selection time depends on the size, the budget and
how clustered the scores are, not on what the network predicts), RA at ``ratio`` over ``rounds`` rounds with
k = 1 and PA at 40 pixels per 1280x640 image; superpixels (SLIC on a smooth random image, an eighth of the
round's budget per superpixel, as ``method.superpixel_size: 0``), whose "scores" column includes SLIC itself;
the median of ``repeat`` runs, after one warm-up.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from ..methods.active.selection import (
    pixel_budget,
    pixel_scores,
    region_budget,
    region_scores,
    select_pixels,
    select_regions,
)
from ..methods.active.superpixels import select_superpixels, slic_segments, superpixel_scores


def _median_time(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_select(height: int = 1024, width: int = 2048, classes: int = 19, ratio: float = 0.022,
                 rounds: int = 5, repeat: int = 3, seed: int = 0) -> list[dict]:
    """One row per mode (RA round 1, RA round 2 with round 1's squares labeled, PA): scores and selection."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(classes, height, width, generator=g) * 2.0
    rows = []
    t_scores, (score, _, _) = _median_time(lambda: region_scores(logits, 1), repeat)
    n = region_budget(height, width, ratio, rounds, 1)
    t_sel, (centres, squares) = _median_time(lambda: select_regions(score, n, 1), repeat)
    rows.append({"mode": f"RA {100 * ratio:g}%/{rounds} rounds, k=1, round 1", "budget": n, "picked": len(centres),
                 "scores_s": t_scores, "select_s": t_sel})
    t_sel2, (centres2, _) = _median_time(lambda: select_regions(score, n, 1, active=squares), repeat)
    rows.append({"mode": "RA, round 2 (round 1 labeled)", "budget": n, "picked": len(centres2),
                 "scores_s": t_scores, "select_s": t_sel2})
    t_pscores, pscore = _median_time(lambda: pixel_scores(logits, 32), repeat)
    m = pixel_budget(40, rounds, size=(height, width))
    t_psel, (pixels, _) = _median_time(lambda: select_pixels(pscore, m, 1), repeat)
    rows.append({"mode": f"PA 40 px/1280x640, {rounds} rounds, k=32", "budget": m, "picked": len(pixels),
                 "scores_s": t_pscores, "select_s": t_psel})
    budget = math.ceil(height * width * ratio / rounds)
    rgb = _smooth_image(height, width, g)
    size = max(9, math.ceil(budget / 8))

    def superpixels():
        segments = slic_segments(rgb, size)
        return segments, superpixel_scores(logits, segments)[0]

    t_sp, (segments, sp_score) = _median_time(superpixels, repeat)
    t_spsel, (ids, _) = _median_time(lambda: select_superpixels(sp_score, segments, budget), repeat)
    rows.append({"mode": f"superpixels {100 * ratio:g}%/{rounds}, {size} px each", "budget": budget,
                 "picked": len(ids), "scores_s": t_sp, "select_s": t_spsel})
    return rows


def _smooth_image(height: int, width: int, g: torch.Generator):
    """An RGB image with structure for SLIC to follow (on white noise it collapses to one segment)."""
    low = torch.rand(1, 3, max(2, height // 64), max(2, width // 64), generator=g)
    up = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (up * 255).byte().permute(1, 2, 0).numpy()


def print_select_table(rows: list[dict], height: int, width: int, classes: int) -> None:
    print(f"RIPU selection, one {height}x{width} image, {classes} classes, {torch.get_num_threads()} thread(s)")
    print(f"{'mode':<40s} {'budget':>7s} {'picked':>7s} {'scores s':>9s} {'select s':>9s}")
    for r in rows:
        print(f"{r['mode']:<40s} {r['budget']:>7d} {r['picked']:>7d} {r['scores_s']:>9.3f} {r['select_s']:>9.3f}")
