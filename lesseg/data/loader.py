"""Datasets and loaders: named streams of training batches and a sharded evaluation loader.

Randomness is a pure function of (seed, stream, epoch, position): the sampler draws each epoch's order from
its own generator and hands every sample an augmentation seed, so a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of workers, and loaders never touch the global RNG.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from ..errors import ConfigError, DataError
from .base import IGNORE, Sample, SegSource
from .check import batch_problem
from .transforms import normalize, strong_photometric, weak_geometry


class SegDataset(Dataset):
    """Reads samples of a source and returns dicts of named tensors.

    Train items are indexed by ``(index, aug_seed)``; eval items by ``index`` (no augmentation).
    Keys: ``image`` (3,H,W float), ``mask`` (H,W long, labeled only), ``valid`` (H,W bool, unlabeled train
    only: False on padding), ``image_strong`` (strong view; ``image_strong2``, ... with ``strong_views`` > 1:
    independent photometric draws of the same geometry), ``tags`` (C multi-hot, when every sample has
    tags), ``index``, ``name``, and one H,W long tensor per extra map (``maps``).

    Extra maps are per-pixel uint8 planes of the sample at the image's size (true masks, label-store masks,
    saliency, erasing masks): ``maps[name](index, (H, W))`` reads one. They go through the same geometry as
    the image and mask (nearest interpolation, padding 255), so every plane stays aligned with the pixels.
    ``true_masks`` adds the map ``true_mask`` (the hidden mask of an unlabeled image, for diagnostics only).
    A map named ``mask`` on an unlabeled stream gives the stream its masks (a label store's labels).
    """

    def __init__(
        self,
        source: SegSource,
        samples: list[Sample],
        *,
        train: bool,
        labeled: bool,
        strong: bool = False,
        strong_views: int = 1,
        true_masks: bool = False,
        crop_size: list[int] | None = None,
        aug=None,
        mean: list[float],
        std: list[float],
        maps: dict[str, MapReader] | None = None,
        copy_paste: float = 0.0,
        paste_exclude: tuple[int, ...] = (0,),
    ) -> None:
        self.source, self.samples = source, samples
        self.train, self.labeled, self.strong = train, labeled, strong
        self.strong_views = strong_views
        self.maps: dict[str, MapReader] = dict(maps or {})
        if labeled:
            missing = [s.image for s in samples if s.mask is None]
            if missing:
                raise ConfigError(
                    f"{len(missing)} image(s) of a labeled stream have no mask, e.g. {missing[0]}; "
                    "list them in an unlabeled stream or provide their masks"
                )
        if true_masks and train and not labeled:
            missing = [s.image for s in samples if s.mask is None]
            if missing:
                raise ConfigError(
                    f"true_masks: {len(missing)} image(s) of an unlabeled stream have no mask, e.g. "
                    f"{missing[0]}; set true_masks=false (it only serves pseudo-label diagnostics)"
                )
            self.maps["true_mask"] = TrueMask(source, samples)
        if copy_paste and not labeled:
            raise ConfigError("aug.copy_paste pastes labeled pixels: set it on labeled streams only")
        bad = [c for c in paste_exclude if not 0 <= c < source.num_classes]
        if copy_paste and bad:
            raise ConfigError(f"aug.paste_exclude: {bad} are not class ids of this {source.num_classes}-class "
                              f"dataset ({source.classes})")
        self.copy_paste, self.paste_exclude = copy_paste, set(paste_exclude)
        self.with_tags = bool(samples) and all(s.tags is not None for s in samples)
        self.geometry = weak_geometry(aug, crop_size) if train else None
        self.photometric = strong_photometric(aug, crop_size) if (train and strong) else None
        self.norm = normalize(mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded image (H,W,3 uint8) and mask (H,W uint8 train ids, or None when unlabeled)."""
        s = self.samples[i]
        image = self.source.read_image(s.image)
        if not self.labeled:
            return image, None
        mask = self.source.read_mask(s.mask)
        return self.source.align(image, mask, s)

    def planes(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask, list[str]]:
        """Sample ``i`` as an image and its per-pixel planes (the mask, or ``_pad`` when unlabeled, then the
        extra maps), with the planes' names."""
        image, mask = self.load(i)
        size = image.shape[:2]
        planes = {"mask": mask} if mask is not None else {"_pad": np.zeros(size, np.uint8)}  # 255 marks padding
        for name, read in self.maps.items():
            plane = read(i, size)
            if plane.shape != size:
                raise DataError(f"map {name!r} of {self.samples[i].image} is {plane.shape[1]}x{plane.shape[0]}, "
                                f"the image {size[1]}x{size[0]}")
            planes[name] = plane
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        return img, tv_tensors.Mask(torch.from_numpy(np.stack(list(planes.values())))), list(planes)

    def paste(self, img: tv_tensors.Image,
              m: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask, int | None, torch.Tensor | None]:
        """Copy-paste: a random image of the stream through its own geometry, and every pixel of one of its
        classes (drawn uniformly among those it shows, ``paste_exclude`` and ignore left out) pasted on
        ``img`` and each plane. Returns the pasted class and the H,W map of pasted pixels (None, None: the drawn
        image shows none). Draws from torch's global generator (the caller seeds it). Two ``torch.where`` after the stream's own torchvision
        geometry: albumentations' CopyAndPaste is instance-level (crop, shrink, place) and not torchvision's."""
        j = int(torch.randint(len(self), ()))
        seed = int(torch.randint(2**62, ()))
        d_img, d_m, _ = self.planes(j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            d_img, d_m = self.geometry(d_img, d_m)
        shown = [c for c in d_m[0].unique().tolist() if c != IGNORE and c not in self.paste_exclude]
        if not shown:
            return img, m, None, None
        c = shown[int(torch.randint(len(shown), ()))]
        where = d_m[0] == c
        return (tv_tensors.wrap(torch.where(where, d_img, img), like=img),
                tv_tensors.wrap(torch.where(where, d_m, m), like=m), c, where.as_subclass(torch.Tensor))

    def __getitem__(self, key) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)
        img, m, names = self.planes(i)
        item: dict = {"index": i, "name": self.samples[i].name}
        pasted = where_pasted = None
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                img, m = self.geometry(img, m)
                if self.copy_paste and float(torch.rand(())) < self.copy_paste:
                    img, m, pasted, where_pasted = self.paste(img, m)
                if self.photometric is not None:  # image_strong, then image_strong2, ...: independent draws
                    for v in range(self.strong_views):
                        item["image_strong" + (str(v + 1) if v else "")] = self.norm(self.photometric(img))
        item["image"] = self.norm(img)
        if self.train and self.copy_paste:  # where pixels were pasted (PriorAlignment leaves them out)
            item["pasted"] = torch.zeros(m.shape[-2:], dtype=torch.bool) if where_pasted is None else where_pasted
        m = m.as_subclass(torch.Tensor).long()
        for k, name in enumerate(names):
            if name == "_pad":
                if self.train:
                    item["valid"] = m[k] != IGNORE
            else:
                item[name] = m[k]
        if self.with_tags:
            tags = torch.zeros(self.source.num_classes)
            tags[list(self.samples[i].tags)] = 1.0
            if pasted is not None:
                tags[pasted] = 1.0
            item["tags"] = tags
        return item


MapReader = Callable[[int, tuple[int, int]], np.ndarray]
"""``read(index, (H, W)) -> H,W uint8``: an extra per-pixel map of sample ``index`` (picklable: workers)."""


class TrueMask:
    """The hidden mask of an unlabeled sample (diagnostics only), as an extra map."""

    def __init__(self, source: SegSource, samples: list[Sample]) -> None:
        self.source, self.samples = source, samples

    def __call__(self, i: int, size: tuple[int, int]) -> np.ndarray:
        s = self.samples[i]
        image = np.empty((*size, 3), np.uint8)  # only the size matters to align()
        return self.source.align(image, self.source.read_mask(s.mask), s)[1]


def _stable_hash(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


class InfiniteBatchSampler:
    """Endless batches of ``(index, aug_seed)`` over epochs, sharded over DDP ranks, resumable at any batch.

    Epoch ``e`` uses a permutation drawn from ``Generator(seed, stream, e)``; incomplete batches are dropped
    so all ranks take the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, stream: str, rank: int = 0, world: int = 1,
                 start_batch: int = 0) -> None:
        self.n, self.bs, self.seed, self.stream = n, batch_size, seed, stream
        self.rank, self.world = rank, world
        self.per_epoch = n // (batch_size * world)
        problem = batch_problem(stream, n, batch_size, world)
        if problem:
            raise ConfigError(problem)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, b = divmod(self.start_batch, self.per_epoch)
        while True:
            g = torch.Generator().manual_seed(_stable_hash(self.seed, self.stream, epoch))
            perm = torch.randperm(self.n, generator=g)[: self.per_epoch * self.bs * self.world]
            mine = perm[self.rank :: self.world].tolist()
            base = _stable_hash(self.seed, self.stream, epoch, "aug") << 20
            for j in range(b, self.per_epoch):
                idx = mine[j * self.bs : (j + 1) * self.bs]
                yield [(i, (base + i) % (2**63)) for i in idx]
            epoch, b = epoch + 1, 0


@dataclass
class Stream:
    """A named training stream: its dataset and batch size (the loader is made when training starts)."""

    name: str
    dataset: SegDataset
    batch_size: int

    def loader(self, *, seed: int, rank: int, world: int, start_batch: int, workers: int, pin: bool) -> DataLoader:
        sampler = InfiniteBatchSampler(len(self.dataset), self.batch_size, seed=seed, stream=self.name, rank=rank,
                                       world=world, start_batch=start_batch)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                          persistent_workers=workers > 0, generator=torch.Generator())

    def batches_per_epoch(self, world: int) -> int:
        return len(self.dataset) // (self.batch_size * world)


def eval_loader(dataset: SegDataset, batch_size: int, rank: int, world: int, workers: int) -> DataLoader:
    """Each rank takes every ``world``-th sample: no padding, no sample evaluated twice."""
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
