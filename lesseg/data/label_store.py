"""The label store: the target pixels labeled during a training (active learning), kept sparsely.

Each labeled pixel is one entry ``(image, pixel, label, round)``: ``image`` indexes the samples of the
stream the store belongs to, ``pixel`` is ``y * W + x`` at the image's native size (the size read from
disk, before any augmentation), ``label`` a train id, ``round`` the selection round that asked for it. A
region (a square, a superpixel) is stored as its pixels. The entries are saved with the checkpoint in a
compressed-row layout (per image: its sorted pixels), about 6 bytes per labeled pixel, never a dense mask
of the target set (2,975 Cityscapes images at 2048x1024 would be 6 GB dense; 5 % of them labeled sparsely
is 0.3 GB). Datasets read it through :meth:`LabelStore.reader`, a snapshot rasterised per image into a
H,W mask with 255 = unlabeled; the trainer takes a new snapshot (and new loader workers) after each round.

With a person as the annotator, a round does not label: it *requests* regions (``request``: per image, the
pixels and the region each belongs to), the run pauses, and ``resolve`` later turns what the person labeled
inside the requested regions into entries of that round. The pending requests are saved in the checkpoint
too, so a paused run is an ordinary resumable checkpoint.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from ..errors import LessegError
from .base import IGNORE


class LabelStore(nn.Module):
    """Sparse per-pixel labels of the ``num_images`` images of a stream, saved in the owning module's
    ``state_dict`` (0 images: sized by the checkpoint it is loaded from, e.g. to evaluate one)."""

    def __init__(self, num_images: int = 0) -> None:
        super().__init__()
        self.num_images = num_images
        self._pixels: list[np.ndarray] = [np.zeros(0, np.int32) for _ in range(num_images)]  # sorted
        self._labels: list[np.ndarray] = [np.zeros(0, np.uint8) for _ in range(num_images)]
        self._rounds: list[np.ndarray] = [np.zeros(0, np.uint8) for _ in range(num_images)]
        self._sizes = np.zeros((num_images, 2), np.int32)  # H, W of each image with labels (0: none yet)
        # pending requests of one round (a person labels them): per image, pixels and their region ids
        self._req_pixels: list[np.ndarray] = [np.zeros(0, np.int32) for _ in range(num_images)]
        self._req_regions: list[np.ndarray] = [np.zeros(0, np.int32) for _ in range(num_images)]
        self.request_round = -1  # the round whose requests wait (-1: none)

    # -- writing ----------------------------------------------------------------------------------------
    def add(self, image: int, pixels: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, round_: int,
            size: tuple[int, int]) -> int:
        """Label ``pixels`` (flat ``y * W + x`` indices) of ``image`` (native size ``size``) with ``labels``.

        A pixel labeled before is an error (nothing is selected twice); returns the number of pixels added."""
        pixels = np.asarray(torch.as_tensor(pixels).cpu(), dtype=np.int64).ravel()
        labels = np.asarray(torch.as_tensor(labels).cpu()).ravel()
        if pixels.size != labels.size:
            raise LessegError(f"label store: {pixels.size} pixels but {labels.size} labels")
        self._check_new(image, pixels, size)
        self._sizes[image] = size
        p = np.concatenate([self._pixels[image], pixels.astype(np.int32)])
        order = np.argsort(p, kind="stable")
        self._pixels[image] = p[order]
        self._labels[image] = np.concatenate([self._labels[image], labels.astype(np.uint8)])[order]
        self._rounds[image] = np.concatenate([self._rounds[image], np.full(pixels.size, round_, np.uint8)])[order]
        return int(pixels.size)

    # -- requests (a person as the annotator) -----------------------------------------------------------
    def request(self, image: int, pixels: torch.Tensor | np.ndarray, regions: torch.Tensor | np.ndarray,
                round_: int, size: tuple[int, int]) -> int:
        """Ask for labels of ``pixels`` of ``image`` in round ``round_``; ``regions`` gives each pixel's region
        id (a square, a superpixel) so that an import can say which regions were left unlabeled. Requests of
        one round at a time; a labeled or already requested pixel is an error. Returns the pixels requested."""
        pixels = np.asarray(torch.as_tensor(pixels).cpu(), dtype=np.int64).ravel()
        regions = np.asarray(torch.as_tensor(regions).cpu(), dtype=np.int64).ravel()
        if self.request_round not in (-1, round_):
            raise LessegError(f"label store: round {self.request_round}'s requests still wait for labels")
        if pixels.size != regions.size:
            raise LessegError(f"label store: {pixels.size} pixels but {regions.size} region ids")
        self._check_new(image, pixels, size)
        if np.isin(pixels, self._req_pixels[image]).any():
            raise LessegError(f"label store: a pixel of image {image} would be requested twice")
        if not pixels.size:
            return 0
        self._sizes[image] = size
        self.request_round = round_
        self._req_pixels[image] = np.concatenate([self._req_pixels[image], pixels.astype(np.int32)])
        self._req_regions[image] = np.concatenate([self._req_regions[image], regions.astype(np.int32)])
        return int(pixels.size)

    def requested(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """The pending requested pixels of ``image`` and their region ids."""
        return self._req_pixels[image], self._req_regions[image]

    def pending(self) -> dict | None:
        """What the pending round asks for (round, images, regions, pixels), or None when nothing waits."""
        if self.request_round < 0:
            return None
        images = [i for i, p in enumerate(self._req_pixels) if p.size]
        regions = sum(np.unique(self._req_regions[i]).size for i in images)
        pixels = sum(self._req_pixels[i].size for i in images)
        return {"round": self.request_round, "images": len(images), "regions": int(regions), "pixels": int(pixels)}

    def resolve(self, labels: dict[int, np.ndarray]) -> int:
        """End the pending round: ``labels[image]`` (one label or 255 per requested pixel, in the order of
        :meth:`requested`) become entries of that round. A 255 entry is a pixel asked for and left unlabeled:
        it reads as unlabeled but is never asked for again (as the gt annotator's 255 ground-truth pixels);
        the requests of images missing from ``labels`` are dropped (never answered: selectable again).
        Returns the entries added."""
        if self.request_round < 0:
            raise LessegError("label store: no round waits for labels")
        added = 0
        for i, values in labels.items():
            pixels = self._req_pixels[i]
            values = np.asarray(values).ravel()
            if values.size != pixels.size:
                raise LessegError(f"label store: image {i} has {pixels.size} requested pixels, {values.size} labels")
            added += self.add(i, pixels, values, self.request_round, self.size(i))
        self._req_pixels = [np.zeros(0, np.int32) for _ in range(self.num_images)]
        self._req_regions = [np.zeros(0, np.int32) for _ in range(self.num_images)]
        self.request_round = -1
        return added

    def _check_new(self, image: int, pixels: np.ndarray, size: tuple[int, int]) -> None:
        h, w = size
        if not 0 <= image < self.num_images:
            raise LessegError(f"label store: image {image} outside 0..{self.num_images - 1}")
        if self._sizes[image].any() and tuple(self._sizes[image]) != (h, w):
            raise LessegError(f"label store: image {image} was {tuple(self._sizes[image])}, now {size}")
        if pixels.size and (pixels.min() < 0 or pixels.max() >= h * w):
            raise LessegError(f"label store: pixel index outside the {h}x{w} image {image}")
        if np.unique(pixels).size != pixels.size or np.isin(pixels, self._pixels[image]).any():
            raise LessegError(f"label store: a pixel of image {image} would be labeled twice")

    # -- reading ----------------------------------------------------------------------------------------
    def rasterize(self, image: int, size: tuple[int, int]) -> np.ndarray:
        """H,W uint8 mask of ``image``: its labels, 255 where unlabeled."""
        return _raster(self._pixels[image], self._labels[image], size)

    def labeled(self, image: int, size: tuple[int, int]) -> torch.Tensor:
        """H,W bool: the pixels of ``image`` labeled already (a selection skips them)."""
        out = torch.zeros(size[0] * size[1], dtype=torch.bool)
        out[torch.from_numpy(self._pixels[image].astype(np.int64))] = True
        return out.view(size)

    def size(self, image: int) -> tuple[int, int]:
        """H, W of ``image`` as recorded with its labels or requests ((0, 0): none yet)."""
        return int(self._sizes[image][0]), int(self._sizes[image][1])

    def count(self, round_: int | None = None) -> int:
        """Entries (pixels asked for: labels, and 255 where no label could be given) in all, or of one round."""
        if round_ is None:
            return int(sum(p.size for p in self._pixels))
        return int(sum((r == round_).sum() for r in self._rounds))

    def reader(self) -> StoreReader:
        """A picklable snapshot for datasets (a map named ``mask``)."""
        return StoreReader(list(self._pixels), list(self._labels))

    # -- checkpoint -------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        counts = np.array([p.size for p in self._pixels], np.int64)
        return {
            "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
            "pixels": torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *self._pixels])),
            "labels": torch.from_numpy(np.concatenate([np.zeros(0, np.uint8), *self._labels])),
            "rounds": torch.from_numpy(np.concatenate([np.zeros(0, np.uint8), *self._rounds])),
            "sizes": torch.from_numpy(self._sizes.copy()),
            "req_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum([p.size for p in self._req_pixels])])),
            "req_pixels": torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *self._req_pixels])),
            "req_regions": torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *self._req_regions])),
            "request_round": torch.tensor(self.request_round),
        }

    def set_extra_state(self, state: dict) -> None:
        offsets = state["offsets"].numpy()
        if self.num_images and len(offsets) != self.num_images + 1:
            raise LessegError(f"label store of {len(offsets) - 1} images loaded into one of {self.num_images} "
                              "(the stream's split changed since the checkpoint)")
        self.num_images = len(offsets) - 1
        pixels, labels, rounds = state["pixels"].numpy(), state["labels"].numpy(), state["rounds"].numpy()
        cut = list(itertools.pairwise(offsets))
        self._pixels = [pixels[a:b].copy() for a, b in cut]
        self._labels = [labels[a:b].copy() for a, b in cut]
        self._rounds = [rounds[a:b].copy() for a, b in cut]
        self._sizes = state["sizes"].numpy().copy()
        if "req_offsets" in state:  # checkpoints made before requests existed have none pending
            cut = list(itertools.pairwise(state["req_offsets"].numpy()))
            self._req_pixels = [state["req_pixels"].numpy()[a:b].copy() for a, b in cut]
            self._req_regions = [state["req_regions"].numpy()[a:b].copy() for a, b in cut]
            self.request_round = int(state["request_round"])
        else:
            self._req_pixels = [np.zeros(0, np.int32) for _ in range(self.num_images)]
            self._req_regions = [np.zeros(0, np.int32) for _ in range(self.num_images)]
            self.request_round = -1


def _raster(pixels: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.full(size[0] * size[1], IGNORE, np.uint8)
    out[pixels] = labels
    return out.reshape(size)


class StoreReader:
    """A label store's labels at one moment, as an extra map of a dataset (``read(index, (H, W))``)."""

    def __init__(self, pixels: list[np.ndarray], labels: list[np.ndarray]) -> None:
        self.pixels, self.labels = pixels, labels

    def __call__(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return _raster(self.pixels[i], self.labels[i], size)
