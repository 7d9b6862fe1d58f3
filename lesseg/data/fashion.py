"""The embedded ``fashion`` dataset: scenes of real product photographs (Fashion-MNIST) on photographic
backgrounds, generated on first use, deterministic.

Methods tuned on the procedurally generated ``shapes`` set may not help on real images; this second embedded
benchmark is built from real photographs, so both the objects and (in the ``real`` domain) the backgrounds
have the textures, shading and clutter of photos. Each scene holds 1-4 Fashion-MNIST products (T-shirt/top,
trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot) at random scales and positions, later
ones on top; an object left with too little visible area is dropped. Each product is tinted with a random
colour multiplicatively (the 28x28 grayscale is a photo's luminance, so its texture stays) and its mask is
its pixels above a small intensity threshold (Fashion-MNIST backgrounds are 0). Fashion-MNIST stores its
catalogue photos with negated intensities (backdrop 0); they are used as luminance as stored, so the shading
is inverted with respect to the original photo while its texture is kept.

Sources:

- Products: the Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz`` and the three others), e.g. from the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or any folder named by
  the data option ``fashion_mnist`` or the environment variable ``LESSEG_FASHION_MNIST``. Training scenes
  take their products from the ``train`` file, validation scenes from the ``t10k`` file: no product photo is
  shared between the splits.
- Backgrounds: random crops (random scale and flips) of the real photographs bundled with scikit-image
  (``skimage.data``, loaded offline: astronaut, coffee, chelsea, rocket, immunohistochemistry,
  hubble_deep_field, retina, the left stereo_motorcycle view; the grayscale texture photos brick, grass and
  gravel, tinted), plus some plain, gradient and smooth-noise backgrounds. Domain ``real`` (the default)
  uses these and adds slight blur, noise and brightness, contrast and colour jitter to the whole scene;
  domain ``synthetic`` has plain or gradient backgrounds and no jitter (the labeled source of the RIPU and
  pretraining configs, as synthetic shapes is for shapes).

Datasets are written in the generic folder format, as :mod:`lesseg.data.shapes` writes them::

    root/images/<stem>.png  root/masks/<stem>.png  root/classes.txt  root/image_labels.csv
    root/splits/train.txt   root/splits/val.txt    root/meta.json  root/masks_full/<stem>.png

Masks hold class indices with a 1 px 255 (ignore) border around each object's visible outline, as in VOC;
``masks_full/`` holds them without the border, for RIPU's simulated annotator (as in shapes).
The ``fashion`` source (:class:`FashionSource`) adds the standard partitions ``labeled_1-16`` /
``unlabeled_1-16`` (and 1-8, 1-4, 1-2) of ``train``, exactly as the ``shapes`` source does.
"""

from __future__ import annotations

import colorsys
import gzip
import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .base import IGNORE, SOURCES
from .shapes import _grid, _layout, _smooth_noise
from .sources.folder import FolderSource, ShapesSource

PRODUCTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Ankle boot")  # Fashion-MNIST's label order
CLASSES = ("background", "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot")  # class k = Fashion-MNIST label k - 1
DOMAINS = ("synthetic", "real")
SPLITS = ("train", "val")
VERSION = 2  # bump whenever the generated files change, so that ensure_fashion regenerates old trees (2: masks_full)
FORMAT = "lesseg-fashion"

ENV_VAR = "LESSEG_FASHION_MNIST"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {  # split -> (images, labels) file names; scenes of split "train" use "train", "val" uses "t10k"
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ITEM = 28  # Fashion-MNIST images are 28x28
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned byte data, 3 and 1 dimensions

# skimage.data's real photographs that ship with the package (no download). Grayscale textures are tinted.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "stereo_motorcycle")
TEXTURES = ("brick", "grass", "gravel")

_SLOTS = 4  # at most 4 products per scene; scene i owns slots 4i..4i+3 of its split's product order
_SIDE = (24 / 96, 56 / 96)  # product side range as a fraction of the image size (log-uniform)
_LOG_ASPECT = 0.1  # products are stretched by at most exp(+-0.1)
_THRESHOLD = 12.0  # an upsampled product pixel above this (0-255) belongs to the object
_ALPHA = (6.0, 40.0)  # compositing opacity rises from 0 to 1 over these intensities: soft, antialiased edges,
# while the faint noise of some Fashion-MNIST backgrounds (values up to about 5) stays invisible
# visibility rules: shapes' (_layout): an object keeps 60 % of its area unoccluded and 24 px at 64x64 (54 at
# 96x96), scaled with the area
_CONTRAST = 60.0  # minimum RGB distance between a product's mean colour and what lies below it


# -- Fashion-MNIST files

_MISSING_HELP = (
    "Install it with `apt-get install dataset-fashion-mnist` (files in {default}), or place the four files "
    "{files} in a folder and point the data option `fashion_mnist` (data.options.fashion_mnist=<folder>) or "
    "the environment variable {env} at it"
)


def find_fashion_mnist(folder: str | Path | None = None) -> Path:
    """The folder of the Fashion-MNIST IDX files: ``folder`` if given, else ``$LESSEG_FASHION_MNIST``, else
    the Debian package's folder. A DataError saying how to get the files when any of the four is missing."""
    if folder:
        where, path = "option fashion_mnist", Path(folder).expanduser()
    elif os.environ.get(ENV_VAR):
        where, path = f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()
    else:
        where, path = "the default folder", DEFAULT_DIR
    names = [n for pair in FILES.values() for n in pair]
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(
            f"Fashion-MNIST (for the fashion dataset) not found: {path} ({where}) {what}. "
            + _MISSING_HELP.format(default=DEFAULT_DIR, files=", ".join(names), env=ENV_VAR)
        )
    return path.resolve()


def _fingerprint(folder: Path) -> dict[str, int]:
    """File name -> size in bytes of the four files: a cheap check that a tree was made from these files."""
    return {n: (folder / n).stat().st_size for pair in FILES.values() for n in pair}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file whose magic number must be ``magic`` (0x803 images, 0x801
    labels); a DataError naming the file when it is not gzip, has another magic number or the wrong size."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read the gzipped IDX file {path}: {e}") from None
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, shorter than its header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"IDX file {path} has magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == _IMAGES_MAGIC else 'labels'}, unsigned bytes, {ndim} dimension(s))"
        )
    dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    body = len(data) - 4 - 4 * ndim
    if body != math.prod(dims):
        raise DataError(
            f"IDX file {path}: its header gives shape {tuple(dims)} ({math.prod(dims)} bytes of data), "
            f"but {body} bytes follow the header"
        )
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_products(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N x 28 x 28 uint8 images, N uint8 labels 0-9) of Fashion-MNIST's file for a scene split: ``train``
    -> the train files, ``val`` -> the t10k files. A DataError naming the file when they do not match."""
    folder = Path(folder)
    image_path, label_path = (folder / n for n in FILES[split])
    images = read_idx(image_path, _IMAGES_MAGIC)
    labels = read_idx(label_path, _LABELS_MAGIC)
    if images.shape[1:] != (ITEM, ITEM):
        raise DataError(f"IDX file {image_path} holds {images.shape[1]}x{images.shape[2]} images, "
                        f"expected Fashion-MNIST's {ITEM}x{ITEM}")
    if len(images) != len(labels):
        raise DataError(f"IDX file {image_path} holds {len(images)} images but {label_path} holds "
                        f"{len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"IDX file {image_path} holds no images")
    if labels.size and int(labels.max()) >= len(PRODUCTS):
        raise DataError(f"IDX file {label_path} has label {int(labels.max())}; Fashion-MNIST's are 0-9")
    return images, labels


# -- backgrounds


@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[Image.Image, ...], tuple[Image.Image, ...]]:
    """The colour photographs (RGB) and grayscale texture photographs (L) of ``skimage.data``."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("the fashion dataset's backgrounds come from scikit-image's photographs: "
                        "pip install scikit-image") from None

    def load(name: str) -> np.ndarray:
        try:
            a = getattr(skimage.data, name)()
        except Exception as e:  # noqa: BLE001 - any failure here means the photo is unusable offline
            raise DataError(f"cannot load the background photograph skimage.data.{name}: {e}") from None
        return a[0] if name == "stereo_motorcycle" else a  # (left, right, disparity): the left view

    colour = tuple(Image.fromarray(np.ascontiguousarray(load(n)[..., :3])) for n in PHOTOS)
    grey = tuple(Image.fromarray(load(n)) for n in TEXTURES)
    return colour, grey


def _crop(rng: np.random.Generator, photo: Image.Image, size: int) -> np.ndarray:
    """A random square crop (a fifth to four fifths of the short side, log-uniform), resized to ``size``,
    randomly flipped; float32."""
    w, h = photo.size
    side = min(w, h) * float(np.exp(rng.uniform(np.log(0.2), np.log(0.8))))
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    out = np.asarray(photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side)),
                     dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.25:
        out = out[::-1]
    return out


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """A random RGB colour in [0, 1]^3: uniform hue, saturation and value in the given ranges."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value)),
                    dtype=np.float32)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear ramp in [0, 1] in a random direction."""
    x, y = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    return ((x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / size + 0.5


def _background(rng: np.random.Generator, domain: str, size: int) -> np.ndarray:
    """HxWx3 float32 background in 0-255: mostly photo crops (real), plain or gradient (synthetic)."""
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    c2 = np.clip(c1 + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    u = rng.random()
    if domain == "synthetic":
        u = 0.75 + 0.16 * u  # plain or gradient only
    if u < 0.6:
        colour, _ = _photos()
        return _crop(rng, colour[int(rng.integers(len(colour)))], size).copy()
    if u < 0.75:
        _, grey = _photos()
        tint = _colour(rng, (0.0, 0.6), (0.6, 1.0))
        return _crop(rng, grey[int(rng.integers(len(grey)))], size)[..., None] * tint
    if u < 0.83:
        return np.broadcast_to(c1, (size, size, 3)).copy()
    t = _gradient(rng, size) if u < 0.91 else _smooth_noise(rng, size, int(rng.integers(3, 12)))
    return c1 + (c2 - c1) * t[..., None]


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Real-domain camera effects on the whole scene: brightness, contrast, colour cast, blur and noise."""
    size = img.shape[0]
    img = img * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    img = (img - img.mean()) * rng.uniform(0.85, 1.15) + img.mean()
    blur = ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8) * size / 96)
    img = np.asarray(Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).filter(blur),
                     dtype=np.float32)
    return img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 5)


# -- scenes


@dataclass
class _Object:
    cls: int
    slot: int  # index into the products given to render_scene
    lum: np.ndarray  # HxW float32 0-255, the in-frame part of the placed product (0 elsewhere)
    mask: np.ndarray  # HxW bool, lum above the threshold
    area: int  # full object area, including any part outside the frame
    box: tuple[int, int, int, int]  # x0, y0, width, height of the placed 28x28 frame (may leave the image)


@dataclass(frozen=True)
class Placed:
    """A product kept in a scene: its class, its index in the products given to :func:`render_scene`, the
    box (x0, y0, width, height) its upsampled 28x28 frame was placed at (may reach outside the image) and
    its visible labeled pixels."""

    cls: int
    slot: int
    box: tuple[int, int, int, int]
    visible: int


@dataclass
class Scene:
    """One generated scene: HxWx3 uint8 image, HxW uint8 mask (255 = ignore), the sorted classes present,
    the kept products bottom to top and the mask without ignore border (each border pixel its drawn class)."""

    image: np.ndarray
    mask: np.ndarray
    tags: tuple[int, ...]
    objects: list[Placed] = field(default_factory=list)
    full: np.ndarray | None = None


def _place(rng: np.random.Generator, item: np.ndarray, cls: int, slot: int, size: int) -> _Object:
    """Upsample a 28x28 product smoothly (bicubic) to a random size and put it at a random position; at most
    about a quarter of its frame leaves the image on each axis."""
    side = float(np.exp(rng.uniform(np.log(_SIDE[0]), np.log(_SIDE[1])))) * size
    aspect = float(np.exp(rng.uniform(-_LOG_ASPECT, _LOG_ASPECT)))
    w, h = max(4, round(side * aspect)), max(4, round(side / aspect))
    up = Image.fromarray(item.astype(np.float32)).resize((w, h), Image.Resampling.BICUBIC)
    lum = np.clip(np.asarray(up), 0, 255)
    if rng.random() < 0.5:
        lum = lum[:, ::-1]
    x0 = round(rng.uniform(-0.25 * w, size - 0.75 * w))
    y0 = round(rng.uniform(-0.25 * h, size - 0.75 * h))
    full = np.zeros((size, size), np.float32)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
    full[ya:yb, xa:xb] = lum[ya - y0:yb - y0, xa - x0:xb - x0]
    mask = full > _THRESHOLD
    return _Object(cls, slot, full, mask, int((lum > _THRESHOLD).sum()), (x0, y0, w, h))


def _tint(rng: np.random.Generator, o: _Object, below: np.ndarray) -> np.ndarray:
    """HxWx3 product colours: the luminance (brightened by a random gain) times a random colour; the first of
    30 candidate colours whose mean over the object differs enough from what lies below, else the best."""
    gain = rng.uniform(1.0, 1.5)
    lum = np.clip(o.lum * gain, 0, 255)
    cands = np.array([_colour(rng, (0.0, 1.0), (0.5, 1.0)) for _ in range(30)])
    mean_lum = float(lum[o.mask].mean())
    margin = np.linalg.norm(cands * mean_lum - below[o.mask].mean(0), axis=1) - _CONTRAST
    ok = margin >= 0
    tint = cands[int(np.argmax(ok))] if ok.any() else cands[int(np.argmax(margin))]
    return lum[..., None] * tint


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ConfigError(f"unknown fashion domain {domain!r}; known: {', '.join(DOMAINS)}")


def render_scene(rng: np.random.Generator, products: Sequence[tuple[np.ndarray, int]], domain: str = "real",
                 size: int = 96) -> Scene:
    """A scene of the given products ((28x28 uint8 image, Fashion-MNIST label 0-9), bottom to top).

    Each product gets a random size, position and colour; a product left with little visible area is
    dropped (positions are redrawn when none stays). Mask: class (label + 1) where the product's upsampled
    intensity exceeds a small threshold, 255 on a 1 px border outside each visible outline, 0 elsewhere.
    """
    _check_domain(domain)
    if not products:
        raise ValueError("a scene needs at least one product")
    while True:
        placed = [_place(rng, np.asarray(im), int(lab) + 1, k, size) for k, (im, lab) in enumerate(products)]
        objs, z, border = _layout(placed, size, border_scale=96)
        if objs:
            break
    img = _background(rng, domain, size)
    for o in objs:
        colours = _tint(rng, o, img)
        alpha = np.clip((o.lum - _ALPHA[0]) / (_ALPHA[1] - _ALPHA[0]), 0, 1)[..., None]
        img = img * (1 - alpha) + colours * alpha
    if domain == "real":
        img = _jitter(rng, img)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    lut = np.array([0] + [o.cls for o in objs], dtype=np.uint8)
    full = lut[z]
    mask = full.copy()
    mask[border] = IGNORE
    counts = np.bincount(z[~border].ravel(), minlength=len(objs) + 1)
    kept = [Placed(o.cls, o.slot, o.box, int(counts[k])) for k, o in enumerate(objs, 1)]
    return Scene(image, mask, tuple(sorted({o.cls for o in objs})), kept, full)


def sample_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a split: independent of the split sizes, so datasets nest."""
    return np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), 0, index])


class ProductOrder:
    """The products of a split's scenes: scene ``i`` owns slots ``4i .. 4i+3`` of an endless sequence of
    seeded permutations of the file's items, so no product repeats within a split until the file is used up
    (15,000 training scenes with Fashion-MNIST's 60,000), whatever the split sizes."""

    def __init__(self, seed: int, domain: str, split: str, n_items: int) -> None:
        self.key = [seed, DOMAINS.index(domain), SPLITS.index(split), 1]
        self.n = n_items
        self.cycles: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> list[int]:
        out = []
        for slot in range(_SLOTS * index, _SLOTS * index + _SLOTS):
            cycle, pos = divmod(slot, self.n)
            if cycle not in self.cycles:
                self.cycles[cycle] = np.random.default_rng([*self.key, cycle]).permutation(self.n)
            out.append(int(self.cycles[cycle][pos]))
        return out


def scene(seed: int, domain: str, split: str, index: int, images: np.ndarray, labels: np.ndarray,
          size: int = 96, order: ProductOrder | None = None) -> tuple[Scene, list[int]]:
    """Scene ``index`` of a split from that split's Fashion-MNIST arrays, and the item indices offered to it
    (``Placed.slot`` indexes this list)."""
    rng = sample_rng(seed, domain, split, index)
    order = order or ProductOrder(seed, domain, split, len(images))
    items = order(index)[:int(rng.integers(1, _SLOTS + 1))]
    return render_scene(rng, [(images[i], int(labels[i])) for i in items], domain, size), items


# -- the dataset tree


def stem(domain: str, split: str, index: int) -> str:
    """The sample name of scene ``index`` of a split: val names do not shift when n_train changes."""
    return f"{domain}_{split}_{index:05d}"


def _meta(domain: str, n_train: int, n_val: int, size: int, seed: int) -> dict[str, Any]:
    _check_domain(domain)
    if size < 24 or n_train < 0 or n_val < 0 or seed < 0 or n_train + n_val == 0:
        raise ConfigError(
            f"fashion needs size >= 24, n_train, n_val >= 0 with at least one image and seed >= 0; "
            f"got size={size}, n_train={n_train}, n_val={n_val}, seed={seed}"
        )
    return {"format": FORMAT, "version": VERSION, "domain": domain, "n_train": n_train, "n_val": n_val,
            "size": size, "seed": seed, "classes": list(CLASSES), "backgrounds": [*PHOTOS, *TEXTURES]}


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _matches(old: dict | None, meta: dict, files: dict[str, int] | None) -> bool:
    """Whether a tree's meta.json is the one these parameters write; its source files must have the same
    sizes as ``files`` when these are known (a tree stays usable when the Fashion-MNIST folder is gone)."""
    if old is None or {k: old.get(k) for k in meta} != meta:
        return False
    return files is None or old.get("source", {}).get("files") == files


def _write(root: Path, meta: dict, folder: Path, progress: bool) -> None:
    """Write a complete dataset into the fresh folder ``root``; meta.json comes last."""
    domain, seed, size = meta["domain"], meta["seed"], meta["size"]
    for sub in ("images", "masks", "masks_full", "splits"):
        (root / sub).mkdir(parents=True)
    counts = {"train": meta["n_train"], "val": meta["n_val"]}
    bar = tqdm(total=sum(counts.values()), desc=f"generating fashion/{domain}", disable=not progress,
               unit="img")
    labels = []
    with bar:
        for split, n in counts.items():
            if not n:
                (root / "splits" / f"{split}.txt").write_text("")
                continue
            images, item_labels = load_products(folder, split)
            order = ProductOrder(seed, domain, split, len(images))
            stems = []
            for i in range(n):
                s = stem(domain, split, i)
                sc, _ = scene(seed, domain, split, i, images, item_labels, size, order)
                Image.fromarray(sc.image).save(root / "images" / f"{s}.png")
                Image.fromarray(sc.mask).save(root / "masks" / f"{s}.png")
                Image.fromarray(sc.full).save(root / "masks_full" / f"{s}.png")
                stems.append(s)
                labels.append(f"{s},{';'.join(str(t) for t in sc.tags)}\n")
                bar.update()
            (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (root / "image_labels.csv").write_text("".join(labels))
    source = {"folder": str(folder), "files": _fingerprint(folder)}
    (root / "meta.json").write_text(json.dumps({**meta, "source": source}, indent=2) + "\n")


def generate_fashion(root: str | Path, *, domain: str = "real", n_train: int = 1024, n_val: int = 256,
                     size: int = 96, seed: int = 0, fashion_mnist: str | Path | None = None,
                     progress: bool = True) -> Path:
    """Generate the dataset into ``root`` (replacing a previous fashion dataset there); return it, absolute.

    ``fashion_mnist``: the folder of the four IDX files (see :func:`find_fashion_mnist`). Files are written
    to a temporary sibling folder that is renamed into place when complete, so an interrupted run never
    leaves a folder that looks finished. Same parameters and source files give byte-identical files.
    """
    root = Path(root).resolve()
    meta = _meta(domain, n_train, n_val, size, seed)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_meta(root) is None)):
        raise DataError(f"{root} exists and is not a fashion dataset (no meta.json); refusing to overwrite it")
    folder = find_fashion_mnist(fashion_mnist)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, meta, folder, progress)
        if _matches(_read_meta(root), meta, _fingerprint(folder)):  # a concurrent process finished first
            return root
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def ensure_fashion(root: str | Path, *, domain: str = "real", n_train: int = 1024, n_val: int = 256,
                   size: int = 96, seed: int = 0, fashion_mnist: str | Path | None = None,
                   progress: bool = True) -> Path:
    """Return ``root`` (absolute) at once if it holds the fashion dataset with these parameters (and, when
    the Fashion-MNIST files are found, made from files of the same sizes), else generate it."""
    root = Path(root).resolve()
    meta = _meta(domain, n_train, n_val, size, seed)
    old = _read_meta(root)
    if _matches(old, meta, None):
        try:
            files = _fingerprint(find_fashion_mnist(fashion_mnist))
        except DataError:  # the source is gone: the finished tree is all that is needed
            files = None
        if _matches(old, meta, files):
            return root
    return generate_fashion(root, domain=domain, n_train=n_train, n_val=n_val, size=size, seed=seed,
                            fashion_mnist=fashion_mnist, progress=progress)


@SOURCES.register("fashion")
class FashionSource(FolderSource):
    """The embedded fashion dataset (:mod:`lesseg.data.fashion`), generated on first use or when its options
    change, then read as a folder dataset. Besides ``train``/``val`` it has the standard partitions
    ``labeled_1-16``/``unlabeled_1-16`` (and 1-8, 1-4, 1-2) of ``train``, drawn once with seed 0, as the
    shapes source has. Option ``fashion_mnist``: the folder of the Fashion-MNIST files ("" = the environment
    variable ``LESSEG_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``)."""

    defaults: ClassVar[dict[str, Any]] = {
        **FolderSource.defaults, "domain": "real", "n_train": 1024, "n_val": 256, "size": 96, "seed": 0,
        "fashion_mnist": "",
    }
    partitions: ClassVar = ShapesSource.partitions
    write_partitions = ShapesSource.write_partitions

    def __init__(self, root: str | Path, **options: Any) -> None:
        opts = self.check_options(options)
        ensure_fashion(root, **{k: opts[k] for k in ("domain", "n_train", "n_val", "size", "seed",
                                                     "fashion_mnist")})
        super().__init__(root, **options)
        self.write_partitions()
