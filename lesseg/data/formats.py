"""On-disk dataset formats: the generic folder format, PASCAL VOC (+ SBD), Cityscapes, GTAV and SYNTHIA.

Each format is a small :class:`SegSource` registered by name. They share :class:`FileSource`: options
checked against declared defaults; a split given as a standard split name or as a split file, whose lines
are U2PL/UniMatch ``image_path [mask_path]`` pairs relative to the root or bare names; when a line has no
mask path, the mask is found from the layout (None when there is none); and one DataError listing every
listed file that does not exist.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import dist
from ..errors import ConfigError, DataError
from .base import IGNORE, SOURCES, Sample, SegSource, check_label_range
from .splits import make_splits, read_split_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# fmt: off
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
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


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colormap (n, 3): bit j of R, G, B is bit 3j, 3j+1, 3j+2 of the class index."""
    index = np.arange(n)
    palette = np.zeros((n, 3), np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def lookup_table(raw_ids: Sequence[int]) -> np.ndarray:
    """256-entry table: raw label id ``raw_ids[k]`` -> train id k, every other id -> 255."""
    table = np.full(256, IGNORE, np.uint8)
    table[list(raw_ids)] = np.arange(len(raw_ids))
    return table


def _single_channel(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 2:
        raise DataError(
            f"mask {path} has {raw.shape[2]} channels; expected one channel of label values (not colours)"
        )
    return raw


def apply_table(raw: np.ndarray, table: np.ndarray, path: Path) -> np.ndarray:
    """Map raw label ids through a lookup table (one indexing op, no per-class loop)."""
    raw = _single_channel(raw, path)
    if raw.size and int(raw.max()) >= len(table):
        raise DataError(
            f"mask {path} has raw label id {int(raw.max())}, beyond the largest known {len(table) - 1}"
        )
    return table[raw]


def _first_existing(paths: Sequence[Path]) -> Path | None:
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
        if split in self.standard_splits:
            where = f"split {split!r} of {self.root}"
            found = self.standard_split(split)
        else:
            path = self.split_file(split)
            where = f"split file {path}"
            found = self.read_entries(path)
        if not found:
            raise DataError(f"{where} lists no images")
        missing = [str(p) for s in found for p in (s.image, s.mask) if p is not None and not p.exists()]
        if missing and strict:
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise DataError(
                f"{len(missing)} file(s) of {where} do not exist: {', '.join(missing[:10])}{more}"
            )
        return found

    def split_candidates(self, split: str) -> list[Path]:
        """Where the split file ``split`` may be: relative to the root, then to the working directory."""
        return [self.root / split, Path(split)]

    def split_file(self, split: str) -> Path:
        candidates = list(dict.fromkeys(self.split_candidates(split)))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            known = ", ".join(self.known_splits()) or "none"
            raise DataError(
                f"split {split!r} of {self.root} is not one of its splits ({known}) and no split "
                f"file exists at {' or '.join(str(p) for p in candidates)}"
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
        raw = _single_channel(raw, path)
        if raw.dtype != np.uint8:
            check_label_range(raw, self.num_classes, path)
        return raw.astype(np.uint8, copy=False)


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def read_tags(path: Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Image-level labels, one ``stem,idx;idx`` line per image (``stem,`` for none)."""
    tags = {}
    for number, line in enumerate(_read_lines(path, "image label file"), 1):
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


@SOURCES.register("folder")
class FolderSource(FileSource):
    """The generic format::

        root/images/<stem>.png|jpg|jpeg   root/masks/<stem>.png   root/classes.txt   root/splits/<name>.txt
        root/image_labels.csv (optional: ``stem,idx;idx``)

    Masks hold class indices with 255 = ignore (grayscale, palette or 16-bit PNG); an image without a mask
    file is unlabeled. Tags come only from image_labels.csv (never derived from masks). Split ``name`` is
    ``splits/<name>.txt``. Option ``binary_mask``: masks saved as 0/255 are read as classes 0/1.
    """

    defaults: ClassVar[dict[str, Any]] = {"binary_mask": False}

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.classes = [c.strip() for c in _read_lines(self.root / "classes.txt", "class list") if c.strip()]
        if not self.classes:
            raise DataError(f"class list {self.root / 'classes.txt'} is empty")
        if self.options["binary_mask"] and self.num_classes != 2:
            raise ConfigError(
                f"binary_mask=true needs 2 classes in {self.root / 'classes.txt'}, it lists "
                f"{self.num_classes}"
            )
        if (self.root / "image_labels.csv").exists():
            self.tags = read_tags(self.root / "image_labels.csv", self.num_classes)

    def split_candidates(self, split: str) -> list[Path]:
        return [self.root / "splits" / f"{split}.txt", *super().split_candidates(split)]

    def known_splits(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "splits").glob("*.txt"))

    def image_path(self, name: str) -> Path:
        candidates = [self.root / "images" / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
        # when none exists, the path named in the missing-file error lists every suffix looked for
        suffixes = ",".join(s[1:] for s in IMAGE_SUFFIXES)
        return _first_existing(candidates) or self.root / "images" / f"{name}.{{{suffixes}}}"

    def find_mask(self, name: str, image: Path) -> Path | None:
        return _first_existing([self.root / "masks" / f"{name}.png"])

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if not self.options["binary_mask"]:
            return super().map_labels(raw, path)
        raw = _single_channel(raw, path)
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
    ``labeled_1-16``/``unlabeled_1-16`` (and 1-8, 1-4, 1-2) of ``train``, drawn once with seed 0."""

    defaults: ClassVar[dict[str, Any]] = {
        **FolderSource.defaults, "domain": "real", "n_train": 1024, "n_val": 256, "size": 64, "seed": 0,
    }
    partitions: ClassVar[dict[str, Fraction]] = {f"1-{k}": Fraction(1, k) for k in (16, 8, 4, 2)}

    def __init__(self, root: str | Path, **options: Any) -> None:
        from .shapes import ensure_shapes

        opts = self.check_options(options)
        ensure_shapes(root, **{k: opts[k] for k in ("domain", "n_train", "n_val", "size", "seed")})
        super().__init__(root, **options)
        self.write_partitions()

    def write_partitions(self) -> None:
        splits = self.root / "splits"
        if all((splits / f"{kind}_{p}.txt").exists() for p in self.partitions for kind in ("labeled", "unlabeled")):
            return
        train = self.samples("train")
        for name, fraction in self.partitions.items():
            parts = make_splits(train, self.read_mask, self.num_classes, fraction, seed=0)
            for kind, names in zip(("labeled", "unlabeled"), parts):
                tmp = splits / f".{kind}_{name}.{os.getpid()}.tmp"  # atomic: DDP processes may race here
                tmp.write_text("".join(f"{n}\n" for n in names))
                os.replace(tmp, splits / f"{kind}_{name}.txt")


def tags_from_mask(mask: np.ndarray) -> tuple[int, ...]:
    """The classes present in a train-id mask, without background (0) and ignore (255), sorted."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=IGNORE + 1))
    return tuple(int(c) for c in present if c not in (0, IGNORE))


@SOURCES.register("voc")
class VOCSource(FileSource):
    """PASCAL VOC 2012 with the SBD augmented masks::

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
        return _first_existing([self.root / f / f"{name}.png" for f in folders])

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
        raw = _single_channel(raw, path)
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
        return _first_existing(candidates) or candidates[0]

    def find_mask(self, name: str, image: Path) -> Path | None:
        folder = self.root / "gtFine" / image.parent.parent.name / image.parent.name
        return _first_existing(
            [folder / f"{name}_gtFine_{kind}.png" for kind in ("labelIds", "labelTrainIds")]
        )

    def standard_split(self, split: str) -> list[Sample]:
        return self.scan(self.root / "leftImg8bit" / split, "*/*_leftImg8bit.png")


@SOURCES.register("gtav")
class GTAVSource(CityscapesLabels):
    """GTA5 (Playing for Data)::

        root/images/<5-digit>.png   root/labels/<5-digit>.png (palette PNG of Cityscapes label ids)

    Split ``all`` or split files. A few real pairs differ in size; the label is resized to its image.
    """

    standard_splits = ("all",)

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.png"

    def find_mask(self, name: str, image: Path) -> Path | None:
        return _first_existing([self.root / "labels" / f"{name}.png"])

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
        return _first_existing([self.root / "GT" / "LABELS" / f"{name}.png"])

    def standard_split(self, split: str) -> list[Sample]:
        return self.scan(self.root / "RGB", "*.png")

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return apply_table(raw, self.table, path)

    def read_mask(self, path: Path) -> np.ndarray:
        """Train ids (always in range: the table only produces them and 255)."""
        return self.map_labels(read_synthia_ids(path), path)
