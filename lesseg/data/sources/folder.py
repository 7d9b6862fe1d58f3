"""The generic folder format and the embedded ``shapes`` dataset read through it."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import ConfigError, DataError
from ..base import SOURCES
from ..splits import make_splits
from .files import IMAGE_SUFFIXES, FileSource, first_existing, read_lines, read_tags, single_channel


@SOURCES.register("folder")
class FolderSource(FileSource):
    """The generic format::

        root/images/<stem>.png|jpg|jpeg   root/masks/<stem>.png   root/classes.txt   root/splits/<name>.txt
        root/image_labels.csv (optional: ``stem,idx;idx``)

    Masks hold class indices with 255 = ignore (grayscale, palette or 16-bit PNG); an image without a mask
    file is unlabeled. Tags come only from image_labels.csv (never derived from masks). Split ``name`` is
    ``splits/<name>.txt``. Option ``binary_mask``: masks saved as 0/255 are read as classes 0/1. Option
    ``masks_dir``: the masks' folder, relative to the root (``masks_binary``) or absolute; one other than
    ``masks`` must exist (``masks`` may not: a dataset without masks).
    """

    defaults: ClassVar[dict[str, Any]] = {"binary_mask": False, "masks_dir": "masks"}

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.classes = [c.strip() for c in read_lines(self.root / "classes.txt", "class list") if c.strip()]
        if not self.classes:
            raise DataError(f"class list {self.root / 'classes.txt'} is empty")
        if self.options["binary_mask"] and self.num_classes != 2:
            raise ConfigError(
                f"binary_mask=true needs 2 classes in {self.root / 'classes.txt'}, it lists "
                f"{self.num_classes}"
            )
        if (self.root / "image_labels.csv").exists():
            self.tags = read_tags(self.root / "image_labels.csv", self.num_classes)
        self.mask_folder = self.root / self.options["masks_dir"]
        if self.options["masks_dir"] != self.defaults["masks_dir"] and not self.mask_folder.is_dir():
            raise DataError(f"masks folder {self.mask_folder} (option masks_dir) does not exist")

    def split_candidates(self, split: str) -> list[Path]:
        return [self.root / "splits" / f"{split}.txt", *super().split_candidates(split)]

    def known_splits(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "splits").glob("*.txt"))

    def image_path(self, name: str) -> Path:
        candidates = [self.root / "images" / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
        # when none exists, the path named in the missing-file error lists every suffix looked for
        suffixes = ",".join(s[1:] for s in IMAGE_SUFFIXES)
        return first_existing(candidates) or self.root / "images" / f"{name}.{{{suffixes}}}"

    def find_mask(self, name: str, image: Path) -> Path | None:
        return first_existing([self.mask_folder / f"{name}.png"])

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if not self.options["binary_mask"]:
            return super().map_labels(raw, path)
        raw = single_channel(raw, path)
        bad = np.unique(raw[(raw != 0) & (raw != 255)])
        if bad.size:
            raise DataError(
                f"binary mask {path} has values {bad[:10].tolist()}; with binary_mask=true only "
                "0 and 255 are allowed"
            )
        return (raw == 255).astype(np.uint8)


@SOURCES.register("shapes")
class ShapesSource(FolderSource):
    """The embedded dataset (:mod:`lesseg.data.shapes`), generated on first use or when its options change,
    then read as a folder dataset. Besides ``train``/``val`` it has the standard partitions
    ``labeled_1-16``/``unlabeled_1-16`` (and 1-8, 1-4, 1-2) of ``train``, drawn once with seed 0 from
    ``masks/``. ``masks_dir: masks_full`` reads the masks without ignore border (RIPU's annotator)."""

    defaults: ClassVar[dict[str, Any]] = {
        **FolderSource.defaults, "domain": "real", "n_train": 1024, "n_val": 256, "size": 64, "seed": 0,
    }
    partitions: ClassVar[dict[str, Fraction]] = {f"1-{k}": Fraction(1, k) for k in (16, 8, 4, 2)}

    def __init__(self, root: str | Path, **options: Any) -> None:
        from ..shapes import ensure_shapes

        opts = self.check_options(options)
        ensure_shapes(root, **{k: opts[k] for k in ("domain", "n_train", "n_val", "size", "seed")})
        super().__init__(root, **options)
        self.write_partitions()

    def write_partitions(self) -> None:
        splits = self.root / "splits"
        if all((splits / f"{kind}_{p}.txt").exists() for p in self.partitions for kind in ("labeled", "unlabeled")):
            return
        if self.options["masks_dir"] != self.defaults["masks_dir"]:  # drawn from the dataset's own masks,
            type(self)(self.root, **{**self.options, "masks_dir": self.defaults["masks_dir"]})  # whoever is first
            return
        train = self.samples("train")
        for name, fraction in self.partitions.items():
            parts = make_splits(train, self.read_mask, self.num_classes, fraction, seed=0)
            for kind, names in zip(("labeled", "unlabeled"), parts):
                tmp = splits / f".{kind}_{name}.{os.getpid()}.tmp"  # atomic: DDP processes may race here
                tmp.write_text("".join(f"{n}\n" for n in names))
                os.replace(tmp, splits / f"{kind}_{name}.txt")
