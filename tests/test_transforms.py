"""Augmentation keeps image and mask aligned; the strong view shares the weak view's geometry."""

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from lesseg.data.base import Sample, SegSource
from lesseg.data.loader import SegDataset


class Blocks(SegSource):
    """One 40x56 image of 4 class blocks; pixel value = 60 * class in every channel."""

    classes: ClassVar[list[str]] = ["a", "b", "c", "d"]

    def __init__(self):
        self.root = Path(".")
        self.mask = np.zeros((40, 56), np.uint8)
        self.mask[:, 28:] = 1
        self.mask[20:, :28] = 2
        self.mask[20:, 28:] = 3

    def read_image(self, path):
        return np.repeat((self.mask * 60)[..., None], 3, axis=2).astype(np.uint8)

    def read_mask(self, path):
        return self.mask.copy()


def aug(**kw):
    base = {"scale": [0.5, 2.0], "base_size": None, "hflip": True, "vflip": False, "rotate": 0.0,
            "color_jitter": 0.5, "color_jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": 0.5}
    return SimpleNamespace(**{**base, **kw})


def dataset(a, strong=False):
    return SegDataset(Blocks(), [Sample("x", Path("x.png"), Path("x.png"))], train=True, labeled=True,
                      strong=strong, crop_size=[32, 32], aug=a, mean=[0.0] * 3, std=[1.0] * 3)


@pytest.mark.parametrize("extra", [{}, {"rotate": 40.0, "vflip": True}], ids=["scale_crop_flip", "with_rotation"])
def test_image_and_mask_stay_aligned_under_scale_crop_pad_flip(extra):
    ds = dataset(aug(**extra))
    for seed in range(30):
        item = ds[(0, seed)]
        img, mask = item["image"][0], item["mask"]  # H,W ; values 0..1
        assert img.shape == mask.shape == (32, 32)
        pad = mask == 255
        if not extra:
            assert torch.all(img[pad] == 0)  # padding: image 0, mask ignore
        else:  # bilinear rotation blends the image into the fill along the edge: check away from it
            deep = pad.clone()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    deep &= torch.roll(pad, (dy, dx), (0, 1))
            assert torch.all(img[deep] == 0)
        # interior pixels (whole neighbourhood of one class): the colour says the class. Bilinear scaling
        # then bilinear rotation blend colours over a wider band along edges than scaling alone.
        r = 2 if extra else 1
        m = mask.clone()
        m[pad] = 254
        same = torch.ones_like(m, dtype=torch.bool)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                same &= m == torch.roll(m, (dy, dx), (0, 1))
        inner = same & ~pad
        inner[:r, :] = inner[-r:, :] = False
        inner[:, :r] = inner[:, -r:] = False
        assert inner.any()
        assert torch.allclose(img[inner] * 255, mask[inner].float() * 60, atol=1.5), seed


def test_strong_view_shares_the_weak_geometry_and_seed_fixes_everything():
    ds = dataset(aug(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0), strong=True)
    item = ds[(0, 7)]
    assert torch.equal(item["image"], item["image_strong"])  # no photometric change: identical views
    ds = dataset(aug(), strong=True)
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(0, 4)]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "image_strong", "mask"))  # pure function of seed
    assert not torch.equal(a["mask"], c["mask"]) or not torch.equal(a["image"], c["image"])


def _is_axis_aligned_crop(mask: torch.Tensor, full: np.ndarray) -> bool:
    h, w = mask.shape
    m = mask.numpy()
    return any(np.array_equal(m, full[y:y + h, x:x + w])
               for y in range(full.shape[0] - h + 1) for x in range(full.shape[1] - w + 1))


@pytest.mark.parametrize("rotate", [0.0, 45.0])
def test_rotation_turns_the_mask_with_nearest_labels(rotate):
    """Without rotation every crop is a window of the original mask; with it almost none is, and no label
    other than the 4 classes and ignore appears (nearest interpolation, ignore corners)."""
    ds = dataset(aug(scale=[1.0, 1.0], hflip=False, rotate=rotate))
    full = Blocks().mask
    windows = 0
    for seed in range(20):
        mask = ds[(0, seed)]["mask"]
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
        windows += _is_axis_aligned_crop(mask, full)
    assert (windows == 20) if rotate == 0 else (windows <= 2), windows


def test_each_stream_has_its_own_crop_and_augmentation(tiny_cfg):
    """RIPU crops source and target differently: a stream's crop_size and aug overrides apply to it only."""
    import pytest

    from lesseg.data import build_streams
    from lesseg.errors import ConfigError

    cfg = tiny_cfg(data={"streams": {
        "labeled": {"split": "train", "batch_size": 2},
        "target": {"split": "train", "batch_size": 2, "labeled": False, "crop_size": [16, 24],
                   "aug": {"scale": [1.0, 1.0], "hflip": False}}}})  # fmt: skip
    streams = build_streams(cfg.data, ("labeled", "target"), progress=False)
    lab, tgt = streams["labeled"].dataset[(0, 1)], streams["target"].dataset[(0, 1)]
    assert lab["image"].shape[-2:] == (32, 32) and tgt["image"].shape[-2:] == (16, 24)
    assert tgt["valid"].shape == (16, 24)
    assert cfg.data.streams.target.aug.scale == [1.0, 1.0] and cfg.data.aug.scale == [0.75, 1.25]
    with pytest.raises(ConfigError, match=r"data\.streams\.target\.aug\.bogus"):
        tiny_cfg(["data.streams.target.aug.bogus=1"], data={"streams": {
            "target": {"split": "train", "batch_size": 2, "labeled": False}}})
    with pytest.raises(ConfigError, match=r"data\.streams\.target\.aug\.blur_p must be in \[0, 1\]"):
        tiny_cfg(["data.streams.target.aug.blur_p=3"], data={"streams": {
            "target": {"split": "train", "batch_size": 2, "labeled": False}}})


class TwoImages(SegSource):
    """Image "a": class 3 everywhere; image "b": class 0 on the left, 1 top right, 2 bottom right. 32x32,
    pixel value = 60 * class; tags from the masks."""

    classes: ClassVar[list[str]] = ["bg", "one", "two", "three"]

    def __init__(self):
        self.root = Path(".")
        b = np.zeros((32, 32), np.uint8)
        b[:16, 16:] = 1
        b[16:, 16:] = 2
        self.masks = {"a": np.full((32, 32), 3, np.uint8), "b": b}

    def read_image(self, path):
        return np.repeat((self.masks[path.stem] * 60)[..., None], 3, axis=2).astype(np.uint8)

    def read_mask(self, path):
        return self.masks[path.stem].copy()


def pasting(p=1.0, exclude=(0,), labeled=True):
    samples = [Sample(n, Path(f"{n}.png"), Path(f"{n}.png"), tags=t) for n, t in (("a", (3,)), ("b", (1, 2)))]
    return SegDataset(TwoImages(), samples, train=True, labeled=labeled, crop_size=[32, 32],
                      aug=aug(scale=[1.0, 1.0], hflip=False), mean=[0.0] * 3, std=[1.0] * 3,
                      copy_paste=p, paste_exclude=exclude)


def test_copy_paste_pastes_one_allowed_class_of_another_image_with_its_pixels():
    ds = pasting()
    pasted = {}
    for seed in range(40):
        item = ds[(0, seed)]  # image "a" (all class 3)
        mask, img = item["mask"], item["image"][0]
        assert torch.allclose(img * 255, mask.float() * 60, atol=0.5)  # image and mask pasted together
        new = set(mask.unique().tolist()) - {3}
        assert new <= {1, 2} and len(new) <= 1, new  # one class, never the excluded background
        # the map of pasted pixels (distribution alignment's prior leaves them out); "a" pasted on itself: all
        assert torch.equal(item["pasted"], mask != 3) or (not new and bool(item["pasted"].all()))
        for c in new:  # the whole 16x16 block of that class, where image "b" has it
            assert (mask == c).sum() == 256 and bool((mask[:16, 16:] == c).all() or (mask[16:, 16:] == c).all())
            assert item["tags"].tolist() == [0, 1 if c == 1 else 0, 1 if c == 2 else 0, 1]
            pasted[c] = pasted.get(c, 0) + 1
        assert torch.equal(ds[(0, seed)]["mask"], mask)  # a pure function of the seed (exact resume)
    assert set(pasted) == {1, 2}, pasted  # both classes of "b" get drawn
    assert sum(pasted.values()) >= 10  # "a" draws "b" about half the time (itself: nothing to paste)
    for seed in range(10):  # p = 0: never; background allowed: class 0 can be pasted too
        assert torch.equal(pasting(p=0.0)[(0, seed)]["mask"], torch.full((32, 32), 3))
        assert "pasted" not in pasting(p=0.0)[(0, seed)]
    assert any((pasting(exclude=())[(0, s)]["mask"] == 0).any() for s in range(40))


def test_copy_paste_errors_name_the_setting(tiny_cfg):
    from lesseg.data import build_streams
    from lesseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"paste_exclude: \[7\] are not class ids of this 4-class"):
        pasting(exclude=(7,))
    with pytest.raises(ConfigError, match="labeled streams only"):
        pasting(labeled=False)
    cfg = tiny_cfg(["data.aug.copy_paste=1.0"], data={"streams": {
        "labeled": {"split": "train", "batch_size": 2},
        "unlabeled": {"split": "train", "batch_size": 2, "labeled": False}}})  # fmt: skip
    streams = build_streams(cfg.data, ("labeled", "unlabeled"), progress=False)
    assert streams["labeled"].dataset.copy_paste == 1.0 and streams["unlabeled"].dataset.copy_paste == 0.0
    with pytest.raises(ConfigError, match=r"data\.streams\.unlabeled\.aug\.copy_paste: stream 'unlabeled' is unlabeled"):
        tiny_cfg(["data.streams.unlabeled.aug.copy_paste=0.5"], data={"streams": {
            "unlabeled": {"split": "train", "batch_size": 2, "labeled": False}}})  # fmt: skip
