"""Pictures of active learning: what a selection round scored and picked, and what the labels bought.

- ``round_picture``: one row per image: the image, its score map (with a colorbar, one scale for the whole
  round so rows compare), and the image with the selected pixels overlaid (``overlay``);
- ``labels_curve``: mIoU against the number of labeled target pixels, one line per series (method, score).

RIPU's regions are 3x3 squares: drawn as they are they vanish once a 2048-pixel-wide image is shrunk into a
400-pixel panel, so ``overlay`` tints the selected pixels and rings them with a solid band a few pixels wide,
wide enough (by default) to survive that shrinking. Matplotlib with the Agg backend, as in ``lesseg.viz``
(whose score colormap, magma, is kept here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SELECTED_COLOR = (255, 0, 255)  # magenta: far from magma's colours and rare in street scenes
SCORE_CMAP = "magma"  # lesseg.viz.heat's default


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """The pixels within Chebyshev distance ``r`` of a True pixel (a separable max filter). H,W bool"""
    if r <= 0:
        return mask.copy()
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    x = F.max_pool2d(x, (1, 2 * r + 1), 1, (0, r))
    x = F.max_pool2d(x, (2 * r + 1, 1), 1, (r, 0))
    return x[0, 0].numpy() > 0


def default_thickness(h: int, w: int) -> int:
    """Outline width for an H,W image: about 1/200 of its longer side (10 pixels at 2048), at least 1, so a
    3x3 region stays a few screen pixels wide in a panel of about 400 pixels."""
    return max(1, round(max(h, w) / 200))


def overlay(image: np.ndarray, selected: np.ndarray, color: Sequence[int] = SELECTED_COLOR,
            thickness: int | None = None, alpha: float = 0.5) -> np.ndarray:
    """The image with the selected pixels tinted (``alpha`` of ``color``) and ringed by a solid ``color`` band
    of ``thickness`` pixels (Chebyshev distance) around them; everything farther is left as it is.
    H,W,3 uint8 and H,W bool -> H,W,3 uint8 (a new array)."""
    if image.ndim != 3 or image.shape[2] != 3 or selected.shape != image.shape[:2]:
        raise ValueError(f"overlay expects an H,W,3 image and an H,W mask, got {image.shape} and {selected.shape}")
    sel = selected.astype(bool)
    t = default_thickness(*sel.shape) if thickness is None else thickness
    col = np.asarray(color, np.float32)
    out = image.copy()
    out[sel] = np.round(image[sel].astype(np.float32) * (1 - alpha) + col * alpha).astype(np.uint8)
    ring = _dilate(sel, t) & ~sel
    out[ring] = col.astype(np.uint8)
    return out


def round_picture(images: list[np.ndarray], scores: list[np.ndarray], selected: list[np.ndarray],
                  path: str | Path, title: str) -> Path:
    """One PNG for a selection round: per image (one row each, any sizes) the image, the score map (one colour
    scale for all rows, with a colorbar) and the image with the selected pixels overlaid (``overlay``)."""
    n = len(images)
    if n == 0 or len(scores) != n or len(selected) != n:
        raise ValueError(f"round_picture needs as many scores and masks as images (at least one), got "
                         f"{n} images, {len(scores)} scores, {len(selected)} masks")
    for i, (im, sc, sel) in enumerate(zip(images, scores, selected)):
        if im.ndim != 3 or im.shape[2] != 3 or sc.shape != im.shape[:2] or sel.shape != im.shape[:2]:
            raise ValueError(f"image {i}: expected H,W,3 with H,W score and mask, got {im.shape}, "
                             f"{sc.shape}, {sel.shape}")
    finite = [s[np.isfinite(s)] for s in scores]
    lo = min((float(f.min()) for f in finite if f.size), default=0.0)
    hi = max((float(f.max()) for f in finite if f.size), default=1.0)
    lo = min(lo, 0.0)  # scores are >= 0 in RIPU: start the scale at 0 so rows compare
    hi = hi if hi > lo else lo + 1.0

    plt = _pyplot()
    panel = 4.0  # inches per panel width
    ratios = [im.shape[0] / im.shape[1] for im in images]
    fig, axes = plt.subplots(n, 3, figsize=(3 * panel + 1.0, panel * sum(ratios) + 0.6 * n + 0.6),
                             squeeze=False, gridspec_kw={"height_ratios": ratios}, layout="constrained")
    for r, (im, sc, sel) in enumerate(zip(images, scores, selected)):
        h, w = sel.shape
        count = int(sel.sum())
        axes[r][0].imshow(im)
        axes[r][0].set_title(f"image {r} ({h}x{w})", fontsize=9)
        shown = axes[r][1].imshow(sc, cmap=SCORE_CMAP, vmin=lo, vmax=hi)
        axes[r][1].set_title("score", fontsize=9)
        fig.colorbar(shown, ax=axes[r][1], fraction=0.046, pad=0.02)
        axes[r][2].imshow(overlay(im, sel))
        axes[r][2].set_title(f"selected: {count} px ({100 * count / (h * w):.3g} %)", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_series(points: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Group ``{"series", "pixels", "miou"}`` points by series (in order of first appearance), each sorted by
    its number of labeled pixels: series -> (pixels, mious)."""
    grouped: dict[str, list[tuple[int, float]]] = {}
    for i, p in enumerate(points):
        missing = {"series", "pixels", "miou"} - set(p)
        if missing:
            raise ValueError(f"point {i} lacks {sorted(missing)}: {p}")
        grouped.setdefault(str(p["series"]), []).append((int(p["pixels"]), float(p["miou"])))
    return {name: ([x for x, _ in sorted(pts)], [y for _, y in sorted(pts)]) for name, pts in grouped.items()}


def x_scale(pixels: Sequence[int]) -> str:
    """``log`` when the labeled-pixel counts span a decade or more and are all positive, ``symlog`` when they
    span a decade but include 0 (source-only, no target label yet), else ``linear``."""
    positive = [x for x in pixels if x > 0]
    if not positive or max(positive) < 10 * min(positive):
        return "linear"
    return "log" if len(positive) == len(pixels) else "symlog"


def labels_curve(points: list[dict], path: str | Path, title: str = "mIoU against labeled target pixels") -> Path:
    """A PNG of mIoU against the number of labeled target pixels, one line per series (``curve_series``),
    the x axis logarithmic where the counts span a decade (``x_scale``)."""
    series = curve_series(points)
    if not series:
        raise ValueError("labels_curve needs at least one point")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=4, label=name)
    all_x = [x for xs, _ in series.values() for x in xs]
    scale = x_scale(all_x)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=min(x for x in all_x if x > 0))
    elif scale == "log":
        ax.set_xscale("log")
    ax.set_xlabel("labeled target pixels")
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

