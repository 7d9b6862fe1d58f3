"""Writing a dataset in the generic folder format: how a pipeline stage hands pseudo-masks to the next one.

A stage that produces masks (self-training's pseudo-labels, CAM or erasing pseudo-masks, CRF-refined masks)
writes ``root/{images,masks,classes.txt,splits/train.txt}``; the next stage reads it as ``dataset: folder``.
Images are linked, not copied, where the file system allows it. Processes of a distributed run each write
the masks of their shard; the main process writes the class list and the split last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..metrics import IGNORE, confusion_matrix, iou_from_confusion
from .sources.files import IMAGE_SUFFIXES
from .splits import write_split


def safe_stems(names: Sequence[str]) -> list[str]:
    """File-system safe, unique stems for sample names (other characters become ``_``; clashes get ``-k``).

    Dots are replaced too, so a stem never looks like a file name with an image suffix.
    """
    stems, seen = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "_"
        unique, k = stem, 1
        while unique in seen:
            unique, k = f"{stem}-{k}", k + 1
        seen.add(unique)
        stems.append(unique)
    return stems


def link_image(src: Path, dst_stem: Path, read_image: Callable[[Path], np.ndarray]) -> None:
    """``dst_stem.<suffix>`` -> the original image: a symlink, a copy where links fail, a PNG written with
    ``read_image`` where the suffix is not one the folder format reads."""
    suffix = src.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        Image.fromarray(read_image(src)).save(dst_stem.with_suffix(".png"))
        return
    try:
        os.symlink(src.resolve(), dst_stem.with_suffix(suffix))
    except OSError:
        shutil.copyfile(src, dst_stem.with_suffix(suffix))


class FolderWriter:
    """Writes the samples' images (linked) and masks of a folder-format dataset at ``root``.

    ``names``: every sample name of the dataset (each process may write a shard of them); ``clear``
    (main process only, before anyone writes) empties what an interrupted stage left; ``finish`` (main
    process, after every process wrote) writes ``classes.txt`` and ``splits/train.txt``; masks written with
their true masks are scored (``quality``: the product's pseudo-mask mIoU, kept in ``quality.json``).
    """

    def __init__(self, root: str | Path, names: Sequence[str], classes: Sequence[str]) -> None:
        self.root = Path(root)
        self.classes = list(classes)
        self.stems = safe_stems(names)
        self.conf = torch.zeros(len(self.classes), len(self.classes), dtype=torch.long)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "images").mkdir(parents=True)
        (self.root / "masks").mkdir()

    def write(self, i: int, image: Path, mask: np.ndarray, read_image: Callable[[Path], np.ndarray],
              true: np.ndarray | torch.Tensor | None = None) -> None:
        """Sample ``i``: its mask (H,W uint8 class ids, 255 ignore) and a link to its image. ``true``: the
        sample's real mask where it exists, against which the written mask is scored (its 255 pixels are
        left out: a pseudo-mask is judged on what it labels)."""
        mask = np.asarray(mask, np.uint8)
        Image.fromarray(mask).save(self.root / "masks" / f"{self.stems[i]}.png")
        link_image(image, self.root / "images" / self.stems[i], read_image)
        if true is not None:
            m = torch.from_numpy(mask).long()
            t = torch.as_tensor(true).long().cpu().masked_fill(m == IGNORE, IGNORE)
            self.conf += confusion_matrix(m, t, len(self.classes))

    def quality(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict | None:
        """mIoU, accuracy and per-class IoU of the written masks against the true ones (summed over the
        processes by ``reduce``: call it on every process); None when no true mask was given anywhere."""
        conf = reduce(self.conf.clone())
        return iou_from_confusion(conf, self.classes) if int(conf.sum()) else None

    def finish(self, quality: dict | None = None) -> None:
        """Main process, after every process wrote: the class list, the split, and ``quality.json``."""
        (self.root / "classes.txt").write_text("".join(f"{c}\n" for c in self.classes))
        write_split(self.root / "splits" / "train.txt", self.stems)
        if quality is not None:
            (self.root / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
