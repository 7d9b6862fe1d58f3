"""Whole-split checks and statistics (``lesseg data check|stats``, and the check before training)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .base import IGNORE, Sample, SegSource

log = logging.getLogger(__name__)


def _check_one(source: SegSource, s: Sample, labeled: bool,
               require_masks: bool) -> tuple[str | None, np.ndarray | None]:
    try:
        image = source.read_image(s.image)
        if not labeled:
            return None, None
        if s.mask is None:
            problem = f"image {s.image} has no mask, but it is in a split read with masks"
            return (problem if require_masks else None), None
        _, mask = source.align(image, source.read_mask(s.mask), s)
        return None, np.bincount(mask[mask != IGNORE].ravel(), minlength=source.num_classes)
    except DataError as e:
        return str(e), None


def scan(source: SegSource, samples: list[Sample], labeled: bool = True, progress: bool = True,
         desc: str = "checking", require_masks: bool = True) -> tuple[list[str], np.ndarray]:
    """Open every file of ``samples``; return (problems, per-class pixel counts of the readable masks).

    ``labeled``: the masks are read and checked too; an image without one is a problem unless
    ``require_masks`` is False (statistics of a split mixing labeled and unlabeled images)."""
    counts = np.zeros(source.num_classes, np.int64)
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda s: _check_one(source, s, labeled, require_masks), samples)
        for err, c in tqdm(results, total=len(samples), desc=desc, disable=not progress, leave=False):
            if err:
                problems.append(err)
            if c is not None:
                counts += c
    return problems, counts


def label_warning(source: SegSource, counts: np.ndarray, what: str) -> str | None:
    """A warning when the labeled pixels of a split are all of class 0: nothing else can be learned from it.

    The usual cause is a 0/255 binary mask read without ``binary_mask``: 255 is the ignore label.
    """
    if source.num_classes < 2 or counts.sum() == 0 or counts[1:].sum() > 0:
        return None
    return (f"every labeled pixel of {what} is class 0 ({source.classes[0]}); 255 is the ignore label, so if "
            "your masks mark the foreground with 255 (0/255 binary masks), set data.options.binary_mask=true")


def require_clean(source: SegSource, samples: list[Sample], labeled: bool, what: str, progress: bool) -> None:
    """Raise one DataError listing every bad file of a split (before any training step is spent)."""
    problems, counts = scan(source, samples, labeled, progress, desc=f"checking {what}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad file(s) in {what}:\n  {shown}{more}")
    warning = label_warning(source, counts, what)
    if warning:
        log.warning(warning)
