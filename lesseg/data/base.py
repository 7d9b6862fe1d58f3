"""The data contract: a dataset *source* lists the samples of a split and maps raw labels to train ids.

Every on-disk format (the generic folder format, VOC, Cityscapes, GTAV, SYNTHIA) is a small subclass of
:class:`SegSource`. Everything downstream (augmentation, loaders, checks, statistics) only sees
:class:`Sample` records and the arrays returned by :meth:`SegSource.read_image` / :meth:`SegSource.read_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..registry import Registry

IGNORE = 255  # the label of pixels that are not scored (and not trained on)


@dataclass(frozen=True)
class Sample:
    """One image of a split. ``mask`` is None for unlabeled images; ``tags`` are image-level class ids."""

    name: str
    image: Path
    mask: Path | None = None
    tags: tuple[int, ...] | None = None


class SegSource:
    """A dataset on disk: class names, split listing and label mapping.

    Subclasses set ``classes`` (train-id order) and implement :meth:`samples` and :meth:`map_labels`.
    """

    classes: list[str]
    palette: np.ndarray | None = None  # (C, 3) uint8, None = default palette

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist or is not a folder")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str, strict: bool = True) -> list[Sample]:
        """List a split: a standard split name of the dataset, or the path of a split file.

        ``strict``: listed files that do not exist are one DataError (``lesseg data check`` passes False to
        report them together with every other problem of the split)."""
        raise NotImplementedError

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map the raw decoded mask array to uint8 train ids (255 ignore). Identity by default."""
        return raw

    def read_image(self, path: Path) -> np.ndarray:
        """HxWx3 uint8 RGB. Grayscale, palette, 16-bit and RGBA images are converted."""
        return read_rgb(path)

    def align(self, image: np.ndarray, mask: np.ndarray, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Reconcile image and mask sizes. Default: a mismatch is an error naming both files."""
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(
                f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but mask {sample.mask} is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        return image, mask

    def read_mask(self, path: Path) -> np.ndarray:
        """HxW uint8 train ids with 255 = ignore, validated against the number of classes."""
        labels = self.map_labels(read_raw_mask(path), path)
        check_label_range(labels, self.num_classes, path)
        return labels


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)  # 16/32-bit grey: full range -> 0..255
                top = 65535.0 if arr.max() > 255 else 255.0
                arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except UnidentifiedImageError:  # PIL's own message repeats the path
        raise DataError(f"cannot read image {path}: not an image file, or a corrupt or unsupported one") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_raw_mask(path: Path) -> np.ndarray:
    """Decode a mask file without colour conversion: palette PNGs give their indices, 16-bit stays 16-bit."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
                return np.array(im)
            if im.mode in ("RGB", "RGBA"):
                return np.array(im.convert("RGB"))
            return np.array(im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path}") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read mask {path}: not an image file, or a corrupt or unsupported one") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None


def check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    bad = (labels >= num_classes) & (labels != IGNORE)
    if bad.any():
        values = sorted(int(v) for v in np.unique(labels[bad]))[:10]
        raise DataError(
            f"mask {path} has label values {values} outside 0..{num_classes - 1} (and 255 = ignore); "
            "if it is a binary mask saved as 0/255, set data.options.binary_mask=true"
        )


SOURCES: Registry[type[SegSource]] = Registry("dataset")
