"""The Cityscapes family: Cityscapes, GTAV and SYNTHIA, and the SYNTHIA -> Cityscapes class protocols."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ...errors import ConfigError, DataError
from ..base import SOURCES, Sample, check_label_range
from .files import FileSource, apply_table, first_existing, lookup_table, single_channel

# fmt: off
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
], dtype=np.uint8)
# label id of each train id
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# SYNTHIA-RAND-CITYSCAPES class id of each class of the SYNTHIA -> Cityscapes benchmark (16 classes, as in
# AdaptSegNet, ADVENT, FADA, RIPU).
SYNTHIA_IDS = {
    "road": 3, "sidewalk": 4, "building": 2, "wall": 21, "fence": 5, "pole": 7, "traffic light": 15,
    "traffic sign": 9, "vegetation": 6, "sky": 1, "person": 10, "rider": 17, "car": 8, "bus": 19,
    "motorcycle": 12, "bicycle": 11,
}
# fmt: on
# The Cityscapes classes each class-count protocol leaves out: SYNTHIA -> Cityscapes is evaluated on 16
# classes (no terrain, truck, train: SYNTHIA has no such labels) and on 13 (also no wall, fence, pole).
PROTOCOL_DROPPED = {
    19: (),
    16: ("terrain", "truck", "train"),
    13: ("terrain", "truck", "train", "wall", "fence", "pole"),
}


def protocol_classes(owner: str, n: int, allowed: Sequence[int]) -> list[str]:
    """The classes of the ``n``-class protocol in Cityscapes train-id order (the order both the SYNTHIA and
    the Cityscapes source use, so the two give equal class lists); ``n`` not in ``allowed`` is a ConfigError."""
    if n not in allowed:
        choices = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
        raise ConfigError(f"option classes of {owner} must be {choices}, got {n}")
    return [c for c in CITYSCAPES_CLASSES if c not in PROTOCOL_DROPPED[n]]


class CityscapesLabels(FileSource):
    """The 19 Cityscapes classes. Masks hold label ids, except files named ``*_labelTrainIds.png`` (what
    U2PL/UniMatch lists and DAFormer's converted GTAV/SYNTHIA labels use), which hold the 19 train ids.

    :meth:`use_protocol` narrows the classes to those of a 16- or 13-class protocol: label ids and 19-class
    train ids of the classes left out then map to 255."""

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    table = lookup_table(CITYSCAPES_LABEL_IDS)
    train_table: np.ndarray | None = None  # 19-class train id -> this source's train id; None: identity

    def use_protocol(self, n: int) -> None:
        """Keep the classes of the ``n``-class protocol (19, 16 or 13), in Cityscapes order."""
        self.classes = protocol_classes(type(self).__name__, n, (19, 16, 13))
        kept = [CITYSCAPES_CLASSES.index(c) for c in self.classes]
        self.palette = CITYSCAPES_PALETTE[kept]
        self.table = lookup_table([CITYSCAPES_LABEL_IDS[k] for k in kept])
        self.train_table = lookup_table(kept) if n != len(CITYSCAPES_CLASSES) else None

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if not path.name.endswith("_labelTrainIds.png"):
            return apply_table(raw, self.table, path)
        if self.train_table is None:
            return super().map_labels(raw, path)
        raw = single_channel(raw, path)
        check_label_range(raw, len(CITYSCAPES_CLASSES), path)  # 19 train ids, before the table narrows them
        return self.train_table[raw]


@SOURCES.register("cityscapes")
class CityscapesSource(CityscapesLabels):
    """Cityscapes fine annotations::

        root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
        root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)

    Splits ``train`` and ``val``; a bare name in a split file is looked up in train, val and test.
    Option ``classes``: 19 (default), or 16 / 13 for the SYNTHIA -> Cityscapes protocols (the 19 without
    terrain, truck, train; 13 also without wall, fence, pole), with the class list of the ``synthia``
    source of the same count; the classes left out are ignored (255).
    """

    defaults: ClassVar[dict[str, Any]] = {"classes": 19}
    standard_splits = ("train", "val")

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.use_protocol(self.options["classes"])

    def name_of(self, image: Path) -> str:
        return image.stem.removesuffix("_leftImg8bit")

    def image_path(self, name: str) -> Path:
        city = name.split("_")[0]
        candidates = [
            self.root / "leftImg8bit" / s / city / f"{name}_leftImg8bit.png" for s in ("train", "val", "test")
        ]
        return first_existing(candidates) or candidates[0]

    def find_mask(self, name: str, image: Path) -> Path | None:
        folder = self.root / "gtFine" / image.parent.parent.name / image.parent.name
        return first_existing(
            [folder / f"{name}_gtFine_{kind}.png" for kind in ("labelIds", "labelTrainIds")]
        )

    def standard_split(self, split: str) -> list[Sample]:
        return self.scan(self.root / "leftImg8bit" / split, "*/*_leftImg8bit.png")


@SOURCES.register("gtav")
class GTAVSource(CityscapesLabels):
    """GTA5 (Playing for Data)::

        root/images/<5-digit>.png   root/labels/<5-digit>.png (palette PNG of Cityscapes label ids)
        [root/<name>.txt: split lists such as train.txt, one image name (00001.png) or path per line]

    Split ``all``, a list ``<name>.txt`` at the root (split ``train`` is ``root/train.txt``, as the GTAV
    lists of the domain-adaptation code bases are kept), or split files. A few real pairs differ in size:
    the label is resized to its image (:meth:`align`; ``lesseg data check`` lists them as warnings).
    """

    standard_splits = ("all",)

    def split_candidates(self, split: str) -> list[Path]:
        return [self.root / f"{split}.txt", *super().split_candidates(split)]

    def known_splits(self) -> list[str]:
        return [*self.standard_splits, *sorted(p.stem for p in self.root.glob("*.txt"))]

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.png"

    def find_mask(self, name: str, image: Path) -> Path | None:
        return first_existing([self.root / "labels" / f"{name}.png"])

    def standard_split(self, split: str) -> list[Sample]:
        return self.scan(self.root / "images", "*.png")

    def align(self, image: np.ndarray, mask: np.ndarray, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Resize a label whose size differs from its image's with nearest neighbour (labels stay labels)."""
        h, w = image.shape[:2]
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
        return image, mask


def read_synthia_ids(path: Path) -> np.ndarray:
    """Class ids (H,W uint16) of a SYNTHIA label PNG.

    The files are 16-bit RGB: class id in R, instance id in G. Pillow opens 16-bit colour PNGs but keeps only
    the high byte of each value (all class ids read as 0), so they are decoded with OpenCV, as DAFormer does;
    its BGR(A) order puts R at index 2. Single-channel files are taken as they are.
    """
    import cv2  # only SYNTHIA labels need OpenCV

    if not path.exists():
        raise DataError(f"mask file not found: {path}")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or (raw.ndim == 3 and raw.shape[2] < 3):
        raise DataError(f"cannot read mask {path} as a SYNTHIA label image (16-bit PNG, class id in R)")
    return raw if raw.ndim == 2 else raw[:, :, 2]


@SOURCES.register("synthia")
class SynthiaSource(FileSource):
    """SYNTHIA-RAND-CITYSCAPES::

        root/RGB/<7-digit>.png   root/GT/LABELS/<7-digit>.png (16-bit RGB: class id in R)

    Split ``all`` or split files. Option ``classes``: 16 (default) or 13 (without wall, fence, pole), the two
    SYNTHIA -> Cityscapes protocols; train ids follow the Cityscapes order of the kept classes (the class
    list of the ``cityscapes`` source with the same ``classes``).
    """

    defaults: ClassVar[dict[str, Any]] = {"classes": 16}
    standard_splits = ("all",)

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.classes = protocol_classes(type(self).__name__, self.options["classes"], (16, 13))
        if importlib.util.find_spec("cv2") is None:
            raise ConfigError(
                "SYNTHIA labels are 16-bit colour PNGs read with OpenCV: pip install opencv-python-headless"
            )
        self.palette = CITYSCAPES_PALETTE[[CITYSCAPES_CLASSES.index(c) for c in self.classes]]
        self.table = lookup_table([SYNTHIA_IDS[c] for c in self.classes])

    def image_path(self, name: str) -> Path:
        return self.root / "RGB" / f"{name}.png"

    def find_mask(self, name: str, image: Path) -> Path | None:
        return first_existing([self.root / "GT" / "LABELS" / f"{name}.png"])

    def standard_split(self, split: str) -> list[Sample]:
        return self.scan(self.root / "RGB", "*.png")

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return apply_table(raw, self.table, path)

    def read_mask(self, path: Path) -> np.ndarray:
        """Train ids (always in range: the table only produces them and 255)."""
        return self.map_labels(read_synthia_ids(path), path)
