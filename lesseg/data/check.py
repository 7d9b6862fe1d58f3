"""Whole-split checks and statistics (``lesseg data check|stats``, and the check before training)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .base import IGNORE, Sample, SegSource


def _check_one(source: SegSource, s: Sample, labeled: bool) -> tuple[str | None, np.ndarray | None]:
    try:
        image = source.read_image(s.image)
        if not labeled or s.mask is None:
            return None, None
        _, mask = source.align(image, source.read_mask(s.mask), s)
        return None, np.bincount(mask[mask != IGNORE].ravel(), minlength=source.num_classes)
    except DataError as e:
        return str(e), None


def scan(source: SegSource, samples: list[Sample], labeled: bool = True, progress: bool = True,
         desc: str = "checking") -> tuple[list[str], np.ndarray]:
    """Open every file of ``samples``; return (problems, per-class pixel counts of the readable masks)."""
    counts = np.zeros(source.num_classes, np.int64)
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda s: _check_one(source, s, labeled), samples)
        for err, c in tqdm(results, total=len(samples), desc=desc, disable=not progress, leave=False):
            if err:
                problems.append(err)
            if c is not None:
                counts += c
    return problems, counts


def require_clean(source: SegSource, samples: list[Sample], labeled: bool, what: str, progress: bool) -> None:
    """Raise one DataError listing every bad file of a split (before any training step is spent)."""
    problems, _ = scan(source, samples, labeled, progress, desc=f"checking {what}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad file(s) in {what}:\n  {shown}{more}")
