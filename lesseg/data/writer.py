"""Writing a dataset in the generic folder format: how a pipeline stage hands pseudo-masks to the next one.

A stage that produces masks (self-training's pseudo-labels, CAM or erasing pseudo-masks, CRF-refined masks)
writes ``root/{images,masks,classes.txt,splits/train.txt}``; the next stage reads it as ``dataset: folder``.
Images are linked, not copied, where the file system allows it. Processes of a distributed run each write
the masks of their shard; the main process writes the class list and the split last.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

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
    process, after every process wrote) writes ``classes.txt`` and ``splits/train.txt``.
    """

    def __init__(self, root: str | Path, names: Sequence[str], classes: Sequence[str]) -> None:
        self.root = Path(root)
        self.classes = list(classes)
        self.stems = safe_stems(names)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "images").mkdir(parents=True)
        (self.root / "masks").mkdir()

    def write(self, i: int, image: Path, mask: np.ndarray, read_image: Callable[[Path], np.ndarray]) -> None:
        """Sample ``i``: its mask (H,W uint8 class ids, 255 ignore) and a link to its image."""
        Image.fromarray(np.asarray(mask, np.uint8)).save(self.root / "masks" / f"{self.stems[i]}.png")
        link_image(image, self.root / "images" / self.stems[i], read_image)

    def finish(self) -> None:
        (self.root / "classes.txt").write_text("".join(f"{c}\n" for c in self.classes))
        write_split(self.root / "splits" / "train.txt", self.stems)
