"""Whole-split checks and statistics (``lesseg data check|stats``, and the check before training)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .base import IGNORE, Sample, SegSource

log = logging.getLogger(__name__)


class Scan(NamedTuple):
    """What reading every file of a split found."""

    problems: list[str]  # one message per bad file: training refuses the split
    counts: np.ndarray  # per-class pixel counts of the readable masks
    resized: list[str]  # one note per mask of another size than its image that the source resizes to it


def _check_one(source: SegSource, s: Sample, labeled: bool,
               require_masks: bool) -> tuple[str | None, np.ndarray | None, str | None]:
    try:
        image = source.read_image(s.image)
        if not labeled:
            return None, None, None
        if s.mask is None:
            problem = f"image {s.image} has no mask, but it is in a split read with masks"
            return (problem if require_masks else None), None, None
        raw = source.read_mask(s.mask)
        _, mask = source.align(image, raw, s)  # raises where the source refuses a size mismatch
        resized = None
        if raw.shape[:2] != image.shape[:2]:
            (h, w), (mh, mw) = image.shape[:2], raw.shape[:2]
            resized = f"{s.mask} ({mw}x{mh}, image {s.image} {w}x{h})"
        return None, np.bincount(mask[mask != IGNORE].ravel(), minlength=source.num_classes), resized
    except DataError as e:
        return str(e), None, None


def scan(source: SegSource, samples: list[Sample], labeled: bool = True, progress: bool = True,
         desc: str = "checking", require_masks: bool = True) -> Scan:
    """Open every file of ``samples``: the problems, the per-class pixel counts of the readable masks and the
    masks resized to their image.

    ``labeled``: the masks are read and checked too; an image without one is a problem unless
    ``require_masks`` is False (statistics of a split mixing labeled and unlabeled images)."""
    result = Scan([], np.zeros(source.num_classes, np.int64), [])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda s: _check_one(source, s, labeled, require_masks), samples)
        for err, c, resized in tqdm(results, total=len(samples), desc=desc, disable=not progress, leave=False):
            if err:
                result.problems.append(err)
            if c is not None:
                result.counts[:] += c
            if resized:
                result.resized.append(resized)
    return result


def label_warning(source: SegSource, counts: np.ndarray, what: str) -> str | None:
    """A warning when the labeled pixels of a split are all of class 0: nothing else can be learned from it.

    The usual cause is a 0/255 binary mask read without ``binary_mask``: 255 is the ignore label.
    """
    if source.num_classes < 2 or counts.sum() == 0 or counts[1:].sum() > 0:
        return None
    return (f"every labeled pixel of {what} is class 0 ({source.classes[0]}); 255 is the ignore label, so if "
            "your masks mark the foreground with 255 (0/255 binary masks), set data.options.binary_mask=true")


def resized_warning(resized: list[str], what: str, shown: int | None = None) -> str | None:
    """A warning naming the masks of ``what`` whose size differs from their image's (GTAV has a few): the
    source resizes them to the image (nearest neighbour), so they train, but their labels may be shifted.
    ``shown``: list only that many (and say how many more)."""
    if not resized:
        return None
    listed = resized[:shown] if shown is not None else resized
    left = len(resized) - len(listed)
    more = f"\n  ... and {left} more (lesseg data check lists them all)" if left else ""
    return (f"{len(resized)} mask(s) of {what} differ in size from their image and are resized to it "
            "(nearest neighbour):\n  " + "\n  ".join(listed) + more)


def require_clean(source: SegSource, samples: list[Sample], labeled: bool, what: str, progress: bool) -> None:
    """Raise one DataError listing every bad file of a split (before any training step is spent)."""
    problems, counts, resized = scan(source, samples, labeled, progress, desc=f"checking {what}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad file(s) in {what}:\n  {shown}{more}")
    for warning in (label_warning(source, counts, what), resized_warning(resized, what, shown=5)):
        if warning:
            log.warning(warning)


def batch_problem(stream: str, n: int, batch_size: int, world: int = 1) -> str | None:
    """Why a stream of ``n`` images cannot give one global batch, or None when it can."""
    if n >= batch_size * world:
        return None
    return (f"stream {stream!r} has {n} images, fewer than one global batch ({batch_size} x {world} "
            f"process(es)); lower data.streams.{stream}.batch_size")
