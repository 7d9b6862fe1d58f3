"""The embedded ``shapes`` dataset: procedurally generated, deterministic, no download.

Classes are told apart by shape only: colours are drawn independently of the class. Two domains share the
classes: ``synthetic`` (flat colours, clean edges, plain or gradient backgrounds, larger objects) and
``real`` (textured backgrounds with clutter strokes, shaded and textured objects, smaller objects, lighting
changes, blur and sensor noise). Datasets are written in the generic folder format::

    root/images/<stem>.png  root/masks/<stem>.png  root/classes.txt  root/image_labels.csv
    root/splits/train.txt   root/splits/val.txt    root/meta.json  root/masks_full/<stem>.png

Masks hold class indices with a thin 255 (ignore) border around each object's visible outline, as in VOC:
training and evaluation read them. ``masks_full/`` holds the same masks without the border (each border
pixel the class it was drawn as): what a person answers who labels every pixel of a requested region, as
Cityscapes' fine annotations do. RIPU's simulated annotator reads them (``masks_dir: masks_full`` on its
target stream): the border lies on object outlines, where RIPU's regions concentrate, and a region that the
ground truth leaves 255 there is budget spent on nothing (16-24 % of RIPU's labeled pixels at 1,500 steps,
5 % of random regions': docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .base import IGNORE

CLASSES = ("background", "disk", "square", "triangle", "star", "ring", "cross")
DOMAINS = ("synthetic", "real")
VERSION = 3  # bump whenever the generated files change, so that ensure_shapes regenerates old trees (3: masks_full)
FORMAT = "lesseg-shapes"

_MIN_VISIBLE_FRAC = 0.6  # an object keeps at least this share of its full area unoccluded, else dropped
_MIN_VISIBLE_PX = 24  # ... and at least this many labeled pixels (at 64x64; scales with the area)
_BG_CONTRAST = 90.0  # minimum RGB distance between an object's colour and the background colour(s)
_OBJ_CONTRAST = 60.0  # minimum RGB distance between the colours of two objects


@dataclass(frozen=True)
class _Style:
    """Per-domain geometry: object radius range as a fraction of the image size, log-aspect range."""

    radius: tuple[float, float]
    log_aspect: float


_STYLES = {
    "synthetic": _Style(radius=(0.14, 0.32), log_aspect=0.1),
    "real": _Style(radius=(0.12, 0.28), log_aspect=0.2),
}


@dataclass
class _Object:
    cls: int
    mask: np.ndarray  # HxW bool, the in-frame part of the full shape
    area: int  # full area, including any part outside the frame
    center: tuple[float, float]  # x, y in pixels
    radius: float


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each HxW float32."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c)


def _circle(n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _outline(cls: int, rng: np.random.Generator, radius: float, scale: float) -> list[np.ndarray]:
    """Polygons of a shape about 2 units across: the outline, then an optional hole."""
    name = CLASSES[cls]
    if name == "disk":
        return [_circle()]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.85]
    if name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [np.stack([np.cos(t), np.sin(t)], 1) * 1.25]
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.2, 1.2 * rng.uniform(0.42, 0.52))
        return [np.stack([np.cos(t) * r, np.sin(t) * r], 1)]
    if name == "ring":
        # The band keeps >= 3 px and the hole >= 2 px radius (at 64x64) so that both stay visible.
        hi = min(0.62, 1.0 - 3.0 * scale / radius)
        lo = min(max(0.42, 2.0 * scale / radius), hi)
        return [_circle(), _circle() * rng.uniform(lo, hi)]
    if name == "cross":
        h = rng.uniform(0.28, 0.36)
        q = [(h, 1), (h, h), (1, h), (1, -h), (h, -h), (h, -1)]
        return [np.array(q + [(-x, -y) for x, y in q], dtype=np.float64) * 1.05]
    raise ValueError(f"no shape for class {cls}")


def _sample_object(rng: np.random.Generator, size: int, style: _Style) -> _Object:
    """A random shape of a random class with random size, aspect, rotation and position."""
    scale = size / 64
    cls = int(rng.integers(1, len(CLASSES)))
    lo, hi = style.radius
    radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * size
    aspect = float(np.exp(rng.uniform(-style.log_aspect, style.log_aspect)))
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    margin = 0.35 * radius  # the centre stays inside, so at most about a third is cut off by the frame
    center = rng.uniform(margin, size - margin, 2)
    pad = int(np.ceil(2.1 * radius)) + 1  # the widest shape (cross) at the largest aspect fits
    canvas = Image.new("1", (size + 2 * pad, size + 2 * pad))
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(_outline(cls, rng, radius, scale)):
        pts = (poly * [radius * aspect, radius / aspect]) @ rot + center + pad
        draw.polygon(pts.ravel().tolist(), fill=int(i == 0))
    full = np.asarray(canvas)
    inside = full[pad:pad + size, pad:pad + size]
    return _Object(cls, inside, int(full.sum()), (float(center[0]), float(center[1])), radius)


def _dilate_max(z: np.ndarray, w: int) -> np.ndarray:
    """Grey dilation of ``z`` with a (2w+1)x(2w+1) square."""
    h, wd = z.shape
    p = np.pad(z, w, mode="edge")
    out = z.copy()
    for dy in range(2 * w + 1):
        for dx in range(2 * w + 1):
            np.maximum(out, p[dy:dy + h, dx:dx + wd], out=out)
    return out


def _layout(objs: list, size: int, border_scale: int = 64) -> tuple[list, np.ndarray, np.ndarray]:
    """Stack the objects (anything with a ``mask`` and a full ``area``; later on top), drop hardly visible ones
    and mark the ignore borders (1 px per ``border_scale`` pixels of image side; fashion scenes: 96).

    Returns the kept objects, the z-order map (0 background, k the k-th kept object) and the border map.
    """
    w = max(1, round(size / border_scale))
    min_px = _MIN_VISIBLE_PX * (size / 64) ** 2
    while True:
        z = np.zeros((size, size), np.int16)
        for k, o in enumerate(objs, 1):
            z[o.mask] = k
        border = _dilate_max(z, w) > z  # pixels next to an object lying above them
        counts = np.bincount(z[~border].ravel(), minlength=len(objs) + 1)
        keep = [o for k, o in enumerate(objs, 1) if counts[k] >= max(min_px, _MIN_VISIBLE_FRAC * o.area)]
        if len(keep) == len(objs):  # dropping objects only uncovers the others: this loop ends
            return objs, z, border
        objs = keep


def _pick_colour(rng: np.random.Generator, avoid_bg: list[np.ndarray],
                 avoid_obj: list[np.ndarray]) -> np.ndarray:
    """A uniform random RGB colour (independent of the class) that contrasts with the given colours.

    The first of 30 candidates that keeps the minimum distances, else the one that comes closest.
    """
    cands = rng.uniform(0, 255, (30, 3)).astype(np.float32)
    avoid = np.array(avoid_bg + avoid_obj).reshape(-1, 3)
    need = np.array([_BG_CONTRAST] * len(avoid_bg) + [_OBJ_CONTRAST] * len(avoid_obj))
    margin = (np.linalg.norm(cands[:, None] - avoid[None], axis=2) - need).min(1)
    ok = margin >= 0
    return cands[int(np.argmax(ok))] if ok.any() else cands[int(np.argmax(margin))]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bicubically upsampled random ``cells`` x ``cells`` grid, rescaled to [0, 1]."""
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    t = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A real-domain background texture in [0, 1]: smoothed noise, stripes or a checkerboard."""
    x, y = _grid(size)
    kind = rng.integers(3)
    if kind == 0:
        return _smooth_noise(rng, size, int(rng.integers(3, 10)))
    a = rng.uniform(0, np.pi)
    u = x * math.cos(a) + y * math.sin(a)
    period = rng.uniform(0.08, 0.25 if kind == 1 else 0.16) * size  # big checker cells look like squares
    if kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        return t if rng.random() < 0.5 else np.round(t)
    v = -x * math.sin(a) + y * math.cos(a)
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _background(rng: np.random.Generator, domain: str, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """HxWx3 float background and its main colours."""
    x, y = _grid(size)
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255)
    if domain == "synthetic":
        if rng.random() < 0.5:
            return np.broadcast_to(c1, (size, size, 3)).astype(np.float32), [c1]
        a = rng.uniform(0, 2 * np.pi)
        t = ((x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / size + 0.5
    else:
        t = 0.8 * _pattern(rng, size) + 0.2 * _smooth_noise(rng, size, size // 4)
    return (c1 + (c2 - c1) * t[..., None]).astype(np.float32), [c1, c2]


def _clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Draw 0-3 thin random strokes (lines and arcs, all background) on a float image."""
    size = img.shape[0]
    n = int(rng.integers(4))
    if n == 0:
        return img
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    width = max(1, round(size / 64 * rng.uniform(1, 2.5)))
    for _ in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line((rng.uniform(-0.1, 1.1, 4) * size).tolist(), fill=colour, width=width)
        else:  # a wide, open arc: never mistaken for a ring
            cx, cy = rng.uniform(0, 1, 2) * size
            r = rng.uniform(0.2, 0.6) * size
            start = rng.uniform(0, 360)
            end = start + rng.uniform(40, 160)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, end, fill=colour, width=width)
    return np.asarray(pil, dtype=np.float32)


def _object_colours(rng: np.random.Generator, o: _Object, base: np.ndarray, size: int) -> np.ndarray:
    """Real-domain object appearance: linear shading plus an optional stripe or noise texture."""
    x, y = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x - o.center[0]) * math.cos(a) + (y - o.center[1]) * math.sin(a)) / o.radius
    shade = 1.0 + rng.uniform(0, 0.3) * np.clip(ramp, -1.5, 1.5)
    kind = rng.integers(3)
    if kind == 0:
        tex = np.zeros_like(x)
    elif kind == 1:
        b = rng.uniform(0, np.pi)
        period = rng.uniform(3, 7) * size / 64
        tex = np.sin(2 * np.pi * (x * math.cos(b) + y * math.sin(b)) / period)
    else:
        tex = 2 * _smooth_noise(rng, size, max(4, size // 6)) - 1
    return base * shade[..., None] + (rng.uniform(8, 25) * tex)[..., None]


def _degrade(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Real-domain camera effects: lighting gradient, colour cast, contrast, gamma, blur and noise."""
    size = img.shape[0]
    x, y = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / size
    light = 1.0 + rng.uniform(0, 0.5) * ramp
    img = img * light[..., None] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    img = (img - 128) * rng.uniform(0.7, 1.1) + 128 + rng.uniform(-25, 25)
    img = 255 * (np.clip(img, 0, 255) / 255) ** rng.uniform(0.8, 1.25)
    blur = ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * size / 64)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(blur), dtype=np.float32)
    return img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2, 6)


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ConfigError(f"unknown shapes domain {domain!r}; known: {', '.join(DOMAINS)}")


def render_sample(rng: np.random.Generator, domain: str = "real",
                  size: int = 64) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """One sample: (HxWx3 uint8 image, HxW uint8 mask with 255 = ignore, sorted object class ids present).

    Draws 1-4 objects (later ones occlude earlier ones); an object with little visible area is dropped.
    """
    image, mask, _, tags = render_sample_full(rng, domain, size)
    return image, mask, tags


def render_sample_full(rng: np.random.Generator, domain: str = "real",
                       size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """:func:`render_sample` with the mask without ignore border as well: (image, mask, full mask, tags)."""
    _check_domain(domain)
    style = _STYLES[domain]
    while True:
        objs, z, border = _layout([_sample_object(rng, size, style) for _ in range(rng.integers(1, 5))], size)
        if objs:
            break
    img, bg_colours = _background(rng, domain, size)
    if domain == "real":
        img = _clutter(rng, img)
    colours: list[np.ndarray] = []
    for o in objs:
        colours.append(_pick_colour(rng, bg_colours, colours))
        if domain == "synthetic":
            img[o.mask] = colours[-1]
        else:
            img[o.mask] = _object_colours(rng, o, colours[-1], size)[o.mask]
    if domain == "real":
        img = _degrade(rng, img)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    lut = np.array([0] + [o.cls for o in objs], dtype=np.uint8)
    full = lut[z]
    mask = full.copy()
    mask[border] = IGNORE
    return image, mask, full, tuple(sorted({o.cls for o in objs}))


def sample_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of the split sizes, so datasets nest."""
    return np.random.default_rng([seed, DOMAINS.index(domain), index])


def _meta(domain: str, n_train: int, n_val: int, size: int, seed: int) -> dict:
    _check_domain(domain)
    if size < 16 or n_train < 0 or n_val < 0 or seed < 0 or n_train + n_val == 0:
        raise ConfigError(
            f"shapes needs size >= 16, n_train, n_val >= 0 with at least one image and seed >= 0; "
            f"got size={size}, n_train={n_train}, n_val={n_val}, seed={seed}"
        )
    return {"format": FORMAT, "version": VERSION, "domain": domain, "n_train": n_train, "n_val": n_val,
            "size": size, "seed": seed, "classes": list(CLASSES)}


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write(root: Path, meta: dict, progress: bool) -> None:
    """Write a complete dataset into the fresh folder ``root``; meta.json comes last."""
    domain, n_train, n = meta["domain"], meta["n_train"], meta["n_train"] + meta["n_val"]
    for sub in ("images", "masks", "masks_full", "splits"):
        (root / sub).mkdir(parents=True)
    stems, labels = [], []
    for i in tqdm(range(n), desc=f"generating shapes/{domain}", disable=not progress, unit="img"):
        stem = f"{domain}_{i:05d}"
        image, mask, full, tags = render_sample_full(sample_rng(meta["seed"], domain, i), domain, meta["size"])
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(full).save(root / "masks_full" / f"{stem}.png")
        stems.append(stem)
        labels.append(f"{stem},{';'.join(str(t) for t in tags)}\n")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (root / "splits" / "train.txt").write_text("".join(f"{s}\n" for s in stems[:n_train]))
    (root / "splits" / "val.txt").write_text("".join(f"{s}\n" for s in stems[n_train:]))
    (root / "image_labels.csv").write_text("".join(labels))
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def generate_shapes(root: str | Path, *, domain: str = "real", n_train: int = 1024, n_val: int = 256,
                    size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """Generate the dataset into ``root`` (replacing a previous shapes dataset there); return it, absolute.

    Files are written to a temporary sibling folder that is renamed into place when complete, so an
    interrupted run never leaves a folder that looks finished. Same parameters give byte-identical files.
    """
    root = Path(root).resolve()
    meta = _meta(domain, n_train, n_val, size, seed)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_meta(root) is None)):
        raise DataError(f"{root} exists and is not a shapes dataset (no meta.json); refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, meta, progress)
        if _read_meta(root) == meta:  # a concurrent process finished the same dataset first
            return root
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def ensure_shapes(root: str | Path, *, domain: str = "real", n_train: int = 1024, n_val: int = 256,
                  size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """Return ``root`` (absolute) at once if it holds the shapes dataset with these parameters, else
    generate it."""
    root = Path(root).resolve()
    if _read_meta(root) == _meta(domain, n_train, n_val, size, seed):
        return root
    return generate_shapes(root, domain=domain, n_train=n_train, n_val=n_val, size=size, seed=seed,
                           progress=progress)
