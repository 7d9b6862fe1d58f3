"""Split files: the shared parser, the writer, and labeled/unlabeled partitions (``lesseg splits``).

A split file has one sample per line: a bare name (``2007_000032``) or ``image_path [mask_path]`` relative
to the dataset root, as in the U2PL and UniMatch split lists. :func:`make_splits` draws a labeled subset that
covers every class when it can, deterministically for a seed.

Wherever a split is named (a stream's ``split``, ``data.val_split``, ``--split``), ``a - b`` is the images of
split ``a`` that split ``b`` does not list (:func:`split_terms`); :func:`write_complement` writes such a
difference to a file (``lesseg splits --labeled-list``).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import IGNORE, Sample, SegSource

log = logging.getLogger(__name__)

MINUS = " - "  # a split difference: "train - labeled_75" (a bare "-" is part of names such as labeled_1-16)


def split_terms(split: str) -> list[str]:
    """A split and the splits subtracted from it: ``"train - labeled_75 - hard"`` -> ``["train",
    "labeled_75", "hard"]``; a split without `` - `` is one term. An empty term is a ConfigError."""
    terms = [t.strip() for t in split.split(MINUS)]
    if len(terms) > 1 and not all(terms):
        raise ConfigError(
            f"split {split!r} has an empty term; write a split, or a split minus others: 'train - labeled_75'"
        )
    return terms


def read_split_file(path: Path) -> list[tuple[str, str | None]]:
    """Lines of a split file as ``(first, second or None)``; blank lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {path}: {e}") from None
    entries: list[tuple[str, str | None]] = []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if len(tokens) > 2:
            raise DataError(
                f"{path}:{number}: expected 'name' or 'image_path [mask_path]', got {len(tokens)} "
                "whitespace-separated fields (paths with spaces are not supported)"
            )
        if tokens:
            entries.append((tokens[0], tokens[1] if len(tokens) == 2 else None))
    return entries


def write_split(path: str | Path, names: Sequence[str]) -> Path:
    """Write one sample name per line (the format every source reads back as bare names)."""
    bad = [n for n in names if not n or len(n.split()) != 1 or n != n.strip()]
    if bad:
        raise DataError(
            f"cannot write split {path}: names must be non-empty without whitespace, got {bad[:5]}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def parse_amount(text: str) -> int | Fraction:
    """``"92"`` -> 92 images; ``"1/16"`` or ``"0.0625"`` -> the exact fraction 1/16."""
    text = text.strip()
    try:
        return int(text) if text.isdigit() else Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"labeled amount {text!r} is neither a count (e.g. 92) nor a fraction (e.g. 1/16 or 0.0625)"
        ) from None


def labeled_count(labeled: float | Fraction, available: int) -> int:
    """Number of labeled images for a count or a fraction of ``available``, rounded up as U2PL's splits are
    (1/16 of VOC's 10,582 = 662, of Cityscapes' 2,975 = 186)."""
    if isinstance(labeled, int):
        count = labeled
    else:
        fraction = labeled if isinstance(labeled, Fraction) else Fraction(str(labeled))
        if not 0 < fraction < 1:
            raise ConfigError(f"a labeled fraction must lie in (0, 1), got {labeled}")
        count = math.ceil(fraction * available)
    if not 0 < count < available:
        raise ConfigError(
            f"asked for {count} labeled images, but there are {available} images with masks "
            "(at least one must remain unlabeled)"
        )
    return count


def _cover(
    order: list[Sample], masks_reader: Callable[[Path], np.ndarray], num_classes: int
) -> tuple[list[Sample], set[int]]:
    """Images, in ``order``, that each add a class not yet covered, minus those that later picks made
    redundant; and the classes covered. Masks are read only until every class is covered."""
    picks: list[tuple[Sample, set[int]]] = []
    covered: set[int] = set()
    for s in order:
        if len(covered) == num_classes:
            break
        present = {int(c) for c in np.unique(masks_reader(s.mask)) if c != IGNORE and c < num_classes}
        if present - covered:
            picks.append((s, present))
            covered |= present
    for sample, classes in list(picks):
        if classes <= set().union(*(c for s, c in picks if s is not sample)):
            picks.remove((sample, classes))
    return [s for s, _ in picks], covered


def make_splits(
    samples: Sequence[Sample],
    masks_reader: Callable[[Path], np.ndarray],
    num_classes: int,
    labeled: float | Fraction,
    seed: int,
) -> tuple[list[str], list[str]]:
    """Partition sample names into (labeled, unlabeled), both sorted.

    Only samples with a mask can be labeled; ``labeled`` is a count or a fraction in (0, 1) of those. In a
    seeded random order, images that add a class not yet covered are taken first (so every class appears in
    the labeled part when the budget allows), then the rest is filled in the same random order. The same
    samples and seed give the same partition, whatever the order of ``samples``.
    """
    names = [s.name for s in samples]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise DataError(f"sample names must be unique to write a partition, repeated: {twice[:10]}")
    order = sorted((s for s in samples if s.mask is not None), key=lambda s: s.name)
    count = labeled_count(labeled, len(order))
    random.Random(seed).shuffle(order)
    cover, covered = _cover(order, masks_reader, num_classes)
    if len(cover) > count:
        log.warning(
            "%d labeled images cannot cover the %d classes present (%d needed by the greedy cover)",
            count,
            len(covered),
            len(cover),
        )
    chosen = {s.name for s in cover[:count]}
    fill = [s.name for s in order if s.name not in chosen][: count - len(chosen)]
    chosen.update(fill)
    return sorted(chosen), sorted(n for n in names if n not in chosen)


def write_partition(
    source: SegSource, split: str, labeled: str | float | Fraction, seed: int, out_dir: str | Path
) -> dict:
    """Draw a partition of ``split`` and write ``out_dir/labeled.txt`` and ``out_dir/unlabeled.txt``.

    ``labeled`` may be a string for :func:`parse_amount` ("1/16", "0.0625", "92"). Returns the counts and
    the paths of the two files.
    """
    amount = parse_amount(labeled) if isinstance(labeled, str) else labeled
    labeled_names, unlabeled_names = make_splits(
        source.samples(split), source.read_mask, source.num_classes, amount, seed
    )
    out = Path(out_dir)
    return {
        "labeled": len(labeled_names),
        "unlabeled": len(unlabeled_names),
        "labeled_path": write_split(out / "labeled.txt", labeled_names),
        "unlabeled_path": write_split(out / "unlabeled.txt", unlabeled_names),
    }


def write_complement(source: SegSource, split: str, labeled: str, out_dir: str | Path) -> dict:
    """Write ``out_dir/unlabeled.txt``: the images of ``split`` that the split (file) ``labeled`` does not
    list, i.e. the split ``split - labeled``. Returns the counts (``labeled``: the images of ``split`` that
    ``labeled`` lists) and the path."""
    pool = source.samples(split, strict=False)  # only counted: the files that matter are checked below
    rest = [s.name for s in source.samples(f"{split}{MINUS}{labeled}")]
    return {
        "labeled": len(pool) - len(rest),
        "unlabeled": len(rest),
        "unlabeled_path": write_split(Path(out_dir) / "unlabeled.txt", rest),
    }
