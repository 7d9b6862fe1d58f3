"""Tiny dataset trees in the exact layouts and file encodings of the real datasets, for tests.

Every builder writes a few 16x32 images under a tmp folder and returns a :class:`FakeTree` with the sample
names of each standard split and the expected train-id mask of every labeled sample. Expected masks come
from the id tables written here by hand, independent of ``lesseg.data.sources``, so a wrong table there is
caught. Masks are vertical bands of known widths: a class's pixel count is 16 x its band width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lesseg.data.sources.voc import voc_palette

H, W = 16, 32

# Cityscapes label id -> train id of the ids the fixtures use (0 unlabeled, 1 ego vehicle, 4 static: ignored)
CITYSCAPES_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
    0: 255,
    1: 255,
    4: 255,
}
# ... in the SYNTHIA -> Cityscapes protocols: 16 classes (terrain 22, truck 27, train 31 ignored) and 13
# (also wall 12, fence 13, pole 17 ignored); the others keep their Cityscapes order.
CITYSCAPES_16 = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    21: 8,
    23: 9,
    24: 10,
    25: 11,
    26: 12,
    28: 13,
    32: 14,
    33: 15,
}
CITYSCAPES_13 = {7: 0, 8: 1, 11: 2, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
# an image whose label ids are those the protocols drop or renumber (wall, fence, pole, terrain, truck,
# train, bus, motorcycle), one band of 4 columns each
PROTOCOL_IDS = [12, 13, 17, 22, 27, 31, 28, 32]
# SYNTHIA class id -> train id in the 16- and 13-class protocols (0 void, 16 terrain: ignored in both).
SYNTHIA_16 = {3: 0, 8: 12, 21: 3, 0: 255, 16: 255, 1: 9, 12: 14, 5: 4, 10: 10}
SYNTHIA_13 = {3: 0, 8: 9, 21: 255, 0: 255, 16: 255, 1: 6, 12: 11, 5: 255, 10: 7}


@dataclass
class FakeTree:
    """A written tree: its root, split name -> expected sample names, name -> expected train-id mask."""

    root: Path
    splits: dict[str, list[str]]
    masks: dict[str, np.ndarray]
    extra: dict = field(default_factory=dict)


def bands(values: Sequence[int], widths: Sequence[int], dtype=np.uint8) -> np.ndarray:
    """HxW array of vertical bands: ``values[k]`` over ``widths[k]`` columns (the widths add up to W)."""
    assert sum(widths) == W, widths
    return np.repeat(np.asarray(values, dtype)[None, :], H, axis=0).repeat(widths, axis=1)


def mapped(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Expected train ids of a raw mask under a hand-written table."""
    out = np.full(raw.shape, 255, np.uint8)
    for raw_id, train_id in table.items():
        out[raw == raw_id] = train_id
    return out


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _palette_image(indices: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """A mode-P PNG whose pixel values are ``indices`` (what VOC and GTAV labels are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8))
    im.putpalette(palette.astype(np.uint8).ravel().tolist())  # L -> P, values kept as indices
    im.save(path)


VOC_COLORMAP = voc_palette()  # only decorates the files: masks are read as indices


def make_voc(tmp: Path, folder: str = "voc") -> FakeTree:
    """VOC 2012 + SBD in ``tmp/folder``: JPEG images, palette SegmentationClass masks with 255 borders,
    grayscale SegmentationClassAug masks (also for the VOC ids, there without borders), ImageSets lists.

    ``extra``: ``aug`` (name -> expected SegmentationClassAug mask), ``no_mask`` (an id without any mask).
    """
    root = tmp / folder
    objects = {"2007_000032": (1, 15), "2007_000039": (20, 5), "2007_000033": (7, 9)}  # fine (VOC) ids
    sbd = {"2008_000002": (12, 3), "2008_000003": (4, 11)}  # SBD-only ids
    masks, aug = {}, {}
    for i, (name, (a, b)) in enumerate({**objects, **sbd}.items()):
        _save(image(i), root / "JPEGImages" / f"{name}.jpg")
        full = bands([0, a, 0, b], [6, 10, 6, 10])
        aug[name] = full
        _save(full, root / "SegmentationClassAug" / f"{name}.png")  # grayscale
        if name in objects:
            fine = full.copy()
            fine[:, [6, 15, 22, 31]] = 255  # object borders
            masks[name] = fine
            _palette_image(fine, VOC_COLORMAP, root / "SegmentationClass" / f"{name}.png")
        else:
            masks[name] = full
    _save(image(99), root / "JPEGImages" / "2009_000001.jpg")  # a test-set image: no mask anywhere
    lists = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    lists["trainval"] = sorted(lists["train"] + lists["val"])
    for split, ids in lists.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    splits = {**lists, "train_aug": sorted(set(objects) - set(lists["val"]) | set(sbd))}
    return FakeTree(root, splits, masks, {"aug": aug, "no_mask": "2009_000001"})


def make_cityscapes(tmp: Path) -> FakeTree:
    """Cityscapes: leftImg8bit PNGs, gtFine ``_labelIds`` (uint8 label ids), ``_color`` and, for the train
    images, ``_labelTrainIds`` (as cityscapesscripts writes them). The last train image,
    ``extra["protocol"]``, has the label ids of :data:`PROTOCOL_IDS`.

    ``masks`` holds the 19-class expectation, ``extra["masks16"]`` / ``extra["masks13"]`` the 16- and
    13-class ones.
    """
    root = tmp / "cityscapes"
    protocol = "zurich_000000_000019"
    layout = {
        "train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313", protocol],
        "val": ["frankfurt_000000_000294"],
    }
    ids = [7, 26, 0, 24, 4, 33, 8, 11, 21, 23, 1]
    masks, masks16, masks13 = {}, {}, {}
    for split, names in layout.items():
        for k, name in enumerate(names):
            city = name.split("_")[0]
            _save(image(k), root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            if name == protocol:
                raw = bands(PROTOCOL_IDS, [4] * len(PROTOCOL_IDS))
            else:
                raw = bands(ids[k : k + 6], [8, 6, 4, 6, 4, 4])
            gt = root / "gtFine" / split / city
            _save(raw, gt / f"{name}_gtFine_labelIds.png")
            _save(image(k + 50), gt / f"{name}_gtFine_color.png")
            masks[name] = mapped(raw, CITYSCAPES_TRAIN_ID)
            masks16[name], masks13[name] = mapped(raw, CITYSCAPES_16), mapped(raw, CITYSCAPES_13)
            if split == "train":
                _save(masks[name], gt / f"{name}_gtFine_labelTrainIds.png")
    return FakeTree(root, layout, masks, {"protocol": protocol, "masks16": masks16, "masks13": masks13})


def make_gtav(tmp: Path, mismatched: bool = True) -> FakeTree:
    """GTA5: ``images/<5-digit>.png``, palette-PNG ``labels`` of Cityscapes label ids and, at the root,
    ``train.txt`` listing the first two images by file name (``00001.png``), as the GTAV lists of the
    domain-adaptation code bases do. With ``mismatched``, the label of ``extra["mismatched"]`` is half the
    image size (H/2 x W/2); its expected mask is the nearest-neighbour upsampling to the image size."""
    root = tmp / "gtav"
    names = ["00001", "00002", "00003"]
    palette = np.random.default_rng(0).integers(0, 256, (256, 3))
    masks = {}
    for k, name in enumerate(names):
        _save(image(k), root / "images" / f"{name}.png")
        raw = bands([7, 26, 0, 24 + k], [8, 8, 8, 8])
        masks[name] = mapped(raw, CITYSCAPES_TRAIN_ID)
        if mismatched and name == names[-1]:
            raw = raw[::2, ::2]  # each label pixel covers 2x2 image pixels
        _palette_image(raw, palette, root / "labels" / f"{name}.png")
    (root / "train.txt").write_text("".join(f"{n}.png\n" for n in names[:2]))
    splits = {"all": names, "train": names[:2]}
    return FakeTree(root, splits, masks, {"mismatched": names[-1] if mismatched else None})


def make_synthia(tmp: Path) -> FakeTree:
    """SYNTHIA-RAND-CITYSCAPES: 8-bit RGB images and 16-bit 3-channel labels with the class id in R, the
    instance id (> 255, so its high byte is non-zero) in G and 0 in B, written with OpenCV (BGR order).

    ``masks`` holds the 16-class expectation, ``extra["masks13"]`` the 13-class one, ``extra["instances"]``
    the G channel.
    """
    import cv2  # only SYNTHIA needs OpenCV (see lesseg.data.sources.read_synthia_ids)

    root = tmp / "synthia"
    names = ["0000000", "0000001", "0000002"]
    ids = [3, 8, 21, 0, 16, 1, 12, 5, 10]
    masks, masks13, instances = {}, {}, {}
    for k, name in enumerate(names):
        _save(image(k), root / "RGB" / f"{name}.png")
        cls = bands(ids[k : k + 7], [8, 4, 4, 4, 4, 4, 4], np.uint16)
        inst = (1000 + 7 * k + np.arange(W, dtype=np.uint16))[None, :].repeat(H, 0)
        path = root / "GT" / "LABELS" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.dstack([np.zeros_like(cls), inst, cls]))  # B, G, R
        masks[name], masks13[name], instances[name] = mapped(cls, SYNTHIA_16), mapped(cls, SYNTHIA_13), inst
    return FakeTree(root, {"all": names}, masks, {"masks13": masks13, "instances": instances})


def make_folder(
    tmp: Path,
    class_sets: Sequence[Sequence[int]] = ((0, 1), (0, 2), (0, 1, 3)),
    *,
    classes: Sequence[str] = ("background", "cat", "dog", "bird"),
    unlabeled: int = 1,
    binary: bool = False,
    suffixes: Sequence[str] = (".png", ".jpg", ".jpeg"),
    modes: Sequence[str] = ("RGB",),
    masks_dir: str = "masks",
) -> FakeTree:
    """The generic folder format: one image per entry of ``class_sets`` with a mask of those classes (equal
    bands, one column of 255) in ``masks_dir``, then ``unlabeled`` images without a mask; ``classes.txt``,
    ``splits/train.txt`` (all), ``splits/labeled.txt`` (those with masks), ``image_labels.csv`` (the class
    sets). ``binary``: masks saved as 0/255 (classes must then be 2). Image ``i`` gets suffix
    ``suffixes[i % len]`` and, when PNG, colour mode ``modes[i % len]`` (RGB, L, I;16, P or RGBA).

    ``extra["images"]``: name -> expected decoded RGB array of the lossless (PNG) images.
    """
    root = tmp / "folder"
    (root / "splits").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    names = [f"img_{i:03d}" for i in range(len(class_sets) + unlabeled)]
    masks, images, tags = {}, {}, []
    for i, name in enumerate(names):
        suffix, mode = suffixes[i % len(suffixes)], modes[i % len(modes)]
        images_path = root / "images" / f"{name}{suffix}"
        if suffix == ".png":
            images[name] = _write_mode(image(i), mode, images_path)
        else:
            _save(image(i), images_path)
        if i < len(class_sets):
            present = list(class_sets[i])
            widths = [W // len(present)] * len(present)
            widths[-1] += W - sum(widths)
            labels = bands(present, widths)
            if binary:
                stored = labels * np.uint8(255)  # class 1 saved as 255
            else:
                labels[:, 0] = 255  # an ignore column
                stored = labels
            masks[name] = labels
            _save(stored, root / masks_dir / f"{name}.png")
            tags.append(f"{name},{';'.join(str(c) for c in present)}\n")
    (root / "image_labels.csv").write_text("".join(tags))
    (root / "splits" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "splits" / "labeled.txt").write_text("".join(f"{n}\n" for n in masks))
    splits = {"train": names, "labeled": list(masks)}
    return FakeTree(root, splits, masks, {"images": images, "tags": dict(zip(names, map(tuple, class_sets)))})


def _write_mode(rgb: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Write a PNG in colour mode ``mode`` and return the RGB array it should decode to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = rgb[..., 0]
    if mode == "L":
        Image.fromarray(gray).save(path)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # full 16-bit range
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        index = gray % 4
        _palette_image(index, VOC_COLORMAP, path)
        return VOC_COLORMAP[index]
    if mode == "RGBA":
        Image.fromarray(np.dstack([rgb, 255 - gray])).save(path)
        return rgb
    Image.fromarray(rgb).save(path)
    return rgb
