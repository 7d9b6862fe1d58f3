"""What the on-disk dataset formats share: :class:`FileSource` and the helpers of the format modules.

Each format is a small :class:`SegSource` registered by name (:mod:`.folder`, :mod:`.voc`,
:mod:`.cityscapes`). They share :class:`FileSource`: options checked against declared defaults; a split given
as a standard split name or as a split file, whose lines are U2PL/UniMatch ``image_path [mask_path]`` pairs
relative to the root or bare names; when a line has no mask path, the mask is found from the layout (None when
there is none); and one DataError listing every listed file that does not exist.

A split may also be a difference, ``train - labeled_75`` (a minus with a space on each side): the images of
the first split that none of the others lists, matched by sample name (see :func:`~..splits.split_terms`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import ConfigError, DataError
from ..base import IGNORE, Sample, SegSource, check_label_range
from ..splits import MINUS, read_split_file, split_terms

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def lookup_table(raw_ids: Sequence[int]) -> np.ndarray:
    """256-entry table: raw label id ``raw_ids[k]`` -> train id k, every other id -> 255."""
    table = np.full(256, IGNORE, np.uint8)
    table[list(raw_ids)] = np.arange(len(raw_ids))
    return table


def single_channel(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 2:
        raise DataError(
            f"mask {path} has {raw.shape[2]} channels; expected one channel of label values (not colours)"
        )
    return raw


def apply_table(raw: np.ndarray, table: np.ndarray, path: Path) -> np.ndarray:
    """Map raw label ids through a lookup table (one indexing op, no per-class loop)."""
    raw = single_channel(raw, path)
    if raw.size and int(raw.max()) >= len(table):
        raise DataError(
            f"mask {path} has raw label id {int(raw.max())}, beyond the largest known {len(table) - 1}"
        )
    return table[raw]


def first_existing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


class FileSource(SegSource):
    """What the on-disk formats share: options, split resolution, split-file entries, missing-file checks.

    Subclasses describe their layout with :meth:`image_path`, :meth:`find_mask`, :meth:`name_of` and, for
    their ``standard_splits``, :meth:`standard_split`.
    """

    defaults: ClassVar[dict[str, Any]] = {}  # option name -> default value (whose type the option must have)
    standard_splits: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path, **options: Any) -> None:
        self.options: dict[str, Any] = self.check_options(options)
        super().__init__(root)
        self.tags: dict[str, tuple[int, ...]] = {}
        self.warned: set[tuple[str, str]] = set()  # (split, excluded split) pairs already warned about

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options merged over ``defaults``; an unknown or wrongly typed one is a ConfigError."""
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; known options: {known}")
        for key, value in options.items():
            if type(value) is not type(cls.defaults[key]):
                raise ConfigError(
                    f"option {key} of {cls.__name__} must be {type(cls.defaults[key]).__name__}, got {value!r}"
                )
        return {**cls.defaults, **options}

    # -- layout (per format)
    def image_path(self, name: str) -> Path:
        """The image of a bare sample name."""
        raise NotImplementedError

    def find_mask(self, name: str, image: Path) -> Path | None:
        """The mask of a sample according to the layout, None when it has none."""
        raise NotImplementedError

    def name_of(self, image: Path) -> str:
        """The sample name of an image path."""
        return image.stem

    def standard_split(self, split: str) -> list[Sample]:
        raise NotImplementedError

    # -- shared
    def samples(self, split: str, strict: bool = True) -> list[Sample]:
        base, *excluded = split_terms(split)
        if excluded:
            where, found = f"split {split!r} of {self.root}", self.difference(split, base, excluded)
        else:
            where, found = self.listing(base)
        missing = [str(p) for s in found for p in (s.image, s.mask) if p is not None and not p.exists()]
        if missing and strict:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise DataError(
                f"{len(missing)} file(s) of {where} do not exist: {', '.join(missing[:10])}{more}"
            )
        return found

    def listing(self, split: str) -> tuple[str, list[Sample]]:
        """Where a standard split or a split file is (for messages) and the samples it lists (files not
        checked); none is a DataError."""
        if split in self.standard_splits:
            where, found = f"split {split!r} of {self.root}", self.standard_split(split)
        else:
            path = self.split_file(split)
            where, found = f"split file {path}", self.read_entries(path)
        if not found:
            raise DataError(f"{where} lists no images")
        return where, found

    def difference(self, split: str, base: str, excluded: list[str]) -> list[Sample]:
        """The samples of split ``base`` whose name no split of ``excluded`` lists (``split`` is the whole
        expression, for messages).

        Names of an excluded split that ``base`` does not have are ignored (``train_aug - trainval`` is the
        usual set difference); an excluded split none of whose names is in ``base`` is logged as a warning,
        once: it is most likely the list of another split or dataset."""
        try:
            found = self.listing(base)[1]
            lists = {term: {s.name for s in self.listing(term)[1]} for term in excluded}
        except DataError as e:
            raise DataError(f"split {split!r}: {e}") from None
        names = {s.name for s in found}
        for term, listed in lists.items():
            if not listed & names and (split, term) not in self.warned:
                self.warned.add((split, term))
                log.warning("split %r: none of the %d images of %r is in %r, so it removes nothing (is it the "
                            "list of another split or dataset?)", split, len(listed), term, base)
        drop = set().union(*lists.values())
        kept = [s for s in found if s.name not in drop]
        if not kept:
            raise DataError(f"split {split!r} of {self.root} is empty: each of the {len(found)} images of "
                            f"{base!r} is in {' or '.join(map(repr, excluded))}")
        return kept

    def split_candidates(self, split: str) -> list[Path]:
        """Where the split file ``split`` may be: relative to the root, then to the working directory."""
        return [self.root / split, Path(split)]

    def split_file(self, split: str) -> Path:
        candidates = list(dict.fromkeys(self.split_candidates(split)))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            known = self.known_splits()
            raise DataError(
                f"split {split!r} of {self.root} is not one of its splits ({', '.join(known) or 'none'}) and "
                f"no split file exists at {' or '.join(str(p) for p in candidates)}{minus_hint(split, known)}"
            )
        return found

    def known_splits(self) -> list[str]:
        """The split names this dataset answers to without a path (for messages)."""
        return list(self.standard_splits)

    def read_entries(self, path: Path) -> list[Sample]:
        return [self.entry(first, mask) for first, mask in read_split_file(path)]

    def entry(self, first: str, mask: str | None) -> Sample:
        """A split-file line: an image path (it has a '/') or a bare name (a file name loses its suffix)."""
        if "/" in first:
            image = self.resolve(first)
            return self.make_sample(self.name_of(image), image, mask)
        name = self.name_of(Path(first)) if Path(first).suffix.lower() in IMAGE_SUFFIXES else first
        return self.make_sample(name, self.image_path(name), mask)

    def make_sample(self, name: str, image: Path, mask: str | None = None) -> Sample:
        """A sample with the given mask path, else the one the layout has, and its tags."""
        mask_path = self.resolve(mask) if mask else self.find_mask(name, image)
        return Sample(name, image, mask_path, self.tags.get(name))

    def resolve(self, token: str) -> Path:
        """A split-file path, relative to the root. A leading '/' that does not exist on disk is read as
        root-relative too (DeepLab's VOC ``train_aug.txt`` lists ``/JPEGImages/...``)."""
        path = Path(token)
        if path.is_absolute() and not path.exists():
            return self.root / token.lstrip("/")
        return self.root / path

    def scan(self, folder: Path, pattern: str) -> list[Sample]:
        """Samples of the images matching ``pattern`` in ``folder``, sorted by path."""
        if not folder.is_dir():
            raise DataError(f"folder {folder} does not exist")
        return [self.make_sample(self.name_of(p), p) for p in sorted(folder.glob(pattern))]

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Masks that hold train ids already: one channel; 16-bit values are range-checked before the cast to
        uint8 (which would wrap them)."""
        raw = single_channel(raw, path)
        if raw.dtype != np.uint8:
            check_label_range(raw, self.num_classes, path)
        return raw.astype(np.uint8, copy=False)


def minus_hint(split: str, known: list[str]) -> str:
    """A hint when ``split`` reads as a difference of known splits written without spaces (``train-val``)."""
    for i in (i for i, c in enumerate(split) if c == "-"):
        a, b = split[:i].strip(), split[i + 1 :].strip()
        if a in known and b in known:
            return f"; to take the images of {a!r} that {b!r} does not list, write {a + MINUS + b!r}"
    return ""


def read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def read_tags(path: Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Image-level labels, one ``stem,idx;idx`` line per image (``stem,`` for none)."""
    tags = {}
    for number, line in enumerate(read_lines(path, "image label file"), 1):
        if not line.strip():
            continue
        name, comma, field = line.partition(",")
        ids = [t.strip() for t in field.split(";") if t.strip()]
        if not comma or not all(t.isdigit() and int(t) < num_classes for t in ids):
            raise DataError(
                f"{path}:{number}: expected 'stem,idx;idx' with class indices in 0..{num_classes - 1}, "
                f"got {line!r}"
            )
        tags[name.strip()] = tuple(sorted({int(t) for t in ids}))
    return tags
