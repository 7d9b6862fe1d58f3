"""The images of any split of any dataset as pairs of augmented views (lightly's SimCLR augmentations).

Items are indexed by ``(index, aug_seed)`` and batched by lesseg's resumable, DDP-sharded sampler (a
:class:`lesseg.data.Stream`), so a resumed run sees exactly the views an uninterrupted one would.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from lightly.transforms import SimCLRTransform
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from ..data import Sample, SegSource, stream_source

IMAGENET_SIDE = 224  # the image side SimCLR's blur range (sigma 0.1 to 2 pixels) was chosen for


def image_split(cfg: DictConfig) -> tuple[SegSource, str]:
    """The source and split to read: ``pretrain.stream``'s (or ``data``'s) and ``pretrain.split``."""
    sc = cfg.data.streams[cfg.pretrain.stream] if cfg.pretrain.stream is not None else None
    split = cfg.pretrain.split or (sc.split if sc is not None else "train")
    return stream_source(cfg.data, sc), split


def view_transform(cfg: DictConfig) -> SimCLRTransform:
    """Two random resized crops of ``pretrain.image_size`` with ``data.aug``'s flips, rotation, colour jitter,
    grayscale and blur probabilities, normalized with ``data.mean``/``data.std``."""
    p, aug = cfg.pretrain, cfg.data.aug
    return SimCLRTransform(
        input_size=p.image_size,
        min_scale=p.min_scale,
        cj_prob=aug.color_jitter_p,
        cj_strength=aug.color_jitter,
        random_gray_scale=aug.grayscale_p,
        gaussian_blur=aug.blur_p,
        sigmas=(0.1, max(0.1, 2.0 * p.image_size / IMAGENET_SIDE)),  # the same blur relative to the image
        hf_prob=0.5 if aug.hflip else 0.0,
        vf_prob=0.5 if aug.vflip else 0.0,
        rr_prob=1.0 if aug.rotate else 0.0,
        rr_degrees=float(aug.rotate) if aug.rotate else None,
        normalize={"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
    )


@contextmanager
def seeded(seed: int):
    """torch's and numpy's global generators seeded with ``seed`` inside, restored after (lightly's blur and
    rotation draw from numpy's)."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


class ViewPairs(Dataset):
    """``{"view0", "view1"}`` (3,S,S float each) and ``index`` of each image of ``samples`` (masks unread)."""

    def __init__(self, source: SegSource, samples: list[Sample], transform: SimCLRTransform) -> None:
        self.source, self.samples, self.transform = source, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, seed = key
        image = Image.fromarray(self.source.read_image(self.samples[i].image))
        with seeded(seed):
            view0, view1 = self.transform(image)
        return {"view0": view0, "view1": view1, "index": i}
