"""PASCAL VOC 2012 (+ the SBD augmented masks) and the VOC colormap."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from ...errors import DataError
from ..base import IGNORE, SOURCES, Sample
from .files import FileSource, first_existing

# fmt: off
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
# fmt: on


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colormap (n, 3): bit j of R, G, B is bit 3j, 3j+1, 3j+2 of the class index."""
    index = np.arange(n)
    palette = np.zeros((n, 3), np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def tags_from_mask(mask: np.ndarray) -> tuple[int, ...]:
    """The classes present in a train-id mask, without background (0) and ignore (255), sorted."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=IGNORE + 1))
    return tuple(int(c) for c in present if c not in (0, IGNORE))


@SOURCES.register("voc")
class VOCSource(FileSource):
    """PASCAL VOC 2012 with the SBD augmented masks, the root being the ``VOC2012`` folder (a root above it,
    such as the devkit folder ``VOCdevkit``, is an error naming the right path)::

        root/JPEGImages/<id>.jpg
        root/SegmentationClass/<id>.png (palette)   root/SegmentationClassAug/<id>.png (grayscale)
        root/ImageSets/Segmentation/{train,val,trainval}.txt   [root/ImageSets/Segmentation/train_aug.txt]

    Splits: ``train`` (1,464), ``val`` (1,449), ``trainval``, ``train_aug`` (10,582: train_aug.txt when
    present, else every id having a mask in either folder minus val). An id's mask is its SegmentationClass
    file when there is one (VOC's fine masks with 255 borders; UniMatch's prepared folder of that name holds
    all 12,031), else SegmentationClassAug. Option ``aug_masks`` prefers SegmentationClassAug (the SBD masks
    used for all images in CPS/U2PL's blended setting). A mask path in a split file always wins.

    Option ``tags`` (for weak supervision): each sample's image-level tags are **derived from its mask**,
    the classes present without background and 255, as the weakly supervised VOC papers do (VOC ships no
    separate image labels; theirs are the classes of the SBD/VOC masks). Off by default, as it reads every
    mask of a split when the split is first listed (a few seconds for train_aug's 10,582, with a progress
    bar); the source keeps each mask file's tags in memory, so later listings read nothing. Images without
    a mask get no tags (None), and a stream holding one then has none (``SegDataset.with_tags``).
    """

    classes = VOC_CLASSES
    palette = voc_palette(len(VOC_CLASSES))
    defaults: ClassVar[dict[str, Any]] = {"aug_masks": False, "tags": False}
    standard_splits = ("train", "val", "trainval", "train_aug")

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.derived_tags: dict[Path, tuple[int, ...]] = {}  # mask file -> tags derived from it
        if not (self.root / "JPEGImages").is_dir():
            self.point_below()

    def point_below(self) -> None:
        """A root above the VOC folder (the devkit ``VOCdevkit/`` holding ``VOC2012/``, or the folder holding
        ``VOCdevkit/``) is an error naming the folder below it that holds ``JPEGImages/`` (``VOC2012`` first)."""
        below = [p.parent for pattern in ("*/JPEGImages", "*/*/JPEGImages") for p in sorted(self.root.glob(pattern))]
        if not below:
            return
        best = next((p for p in below if p.name == "VOC2012"), below[0])
        others = [str(p) for p in below if p != best]
        raise DataError(
            f"dataset root {self.root} has no JPEGImages/ folder, but {best} has: set data.root (or the stream's "
            f"root) to {best}" + (f" (also found in {', '.join(others)})" if others else "")
        )

    def samples(self, split: str, strict: bool = True) -> list[Sample]:
        found = super().samples(split, strict)
        if not self.options["tags"]:
            return found
        self.derive_tags([s.mask for s in found if s.mask is not None and s.mask.exists()], split, strict)
        return [replace(s, tags=self.derived_tags.get(s.mask)) if s.mask is not None else s for s in found]

    def derive_tags(self, masks: list[Path], split: str, strict: bool) -> None:
        """Read the masks whose tags are not known yet (4 threads, as ``data check``). An unreadable mask is
        one DataError listing every such file, or, when not ``strict``, leaves its sample without tags (``data
        check`` reports the file)."""
        todo = sorted(set(masks) - set(self.derived_tags))

        def read(path: Path) -> tuple[int, ...] | str:
            try:
                return tags_from_mask(self.read_mask(path))
            except DataError as e:
                return str(e)

        from ... import dist  # torch: imported when tags are derived, not with the data layer

        problems = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            desc, show = f"voc: image tags of {split} from its masks", bool(todo) and dist.is_main()
            bar = tqdm(pool.map(read, todo), desc, len(todo), disable=not show, unit="mask")
            for path, result in zip(todo, bar):
                if isinstance(result, str):
                    problems.append(result)
                else:
                    self.derived_tags[path] = result
        if problems and strict:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise DataError(
                f"cannot derive the image tags of {len(problems)} mask(s) of split {split!r}: "
                f"{'; '.join(problems[:10])}{more}"
            )

    def image_path(self, name: str) -> Path:
        return self.root / "JPEGImages" / f"{name}.jpg"

    def find_mask(self, name: str, image: Path) -> Path | None:
        folders = ["SegmentationClass", "SegmentationClassAug"]
        if self.options["aug_masks"]:
            folders.reverse()
        return first_existing([self.root / f / f"{name}.png" for f in folders])

    def standard_split(self, split: str) -> list[Sample]:
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "train_aug" and not (lists / "train_aug.txt").exists():
            val = {s.name for s in self.read_entries(lists / "val.txt")}
            ids = {
                p.stem
                for f in ("SegmentationClass", "SegmentationClassAug")
                for p in (self.root / f).glob("*.png")
            }
            return [self.entry(i, None) for i in sorted(ids - val)]
        return self.read_entries(lists / f"{split}.txt")
