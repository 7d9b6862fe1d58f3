"""Pictures: palette masks, overlays and figure grids (what people would rather look at than read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data.base import IGNORE


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map: distinct colours for ``n`` classes. (n, 3) uint8"""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A palette ("P" mode) PNG image of a label map; 255 (ignore) is white."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = np.full((256, 3), 255, np.uint8)
    pal[:num_classes] = palette(num_classes)
    im.putpalette(pal.ravel().tolist())
    return im


def color_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """H,W labels -> H,W,3 uint8 colours (ignore = white)."""
    pal = np.full((256, 3), 255, np.uint8)
    pal[:num_classes] = palette(num_classes)
    return pal[labels.astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over the image (background and ignore left as they are)."""
    colors = color_array(labels, num_classes).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colors * alpha
    keep = (labels == 0) | (labels == IGNORE)
    blend[keep] = image[keep]
    return blend.astype(np.uint8)


def grid_figure(rows: list[list[np.ndarray]], titles: list[str], path: str | Path, row_labels: list[str] | None = None,
                cmap: str | None = None) -> Path:
    """Save a grid of images (rows x columns, column titles) with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(titles)
    fig, axes = plt.subplots(nr, nc, figsize=(2.0 * nc, 2.0 * nr), squeeze=False)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            ax = axes[r][c]
            ax.imshow(im, cmap=cmap if im.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
