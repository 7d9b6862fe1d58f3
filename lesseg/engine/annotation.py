"""A person as the annotator of an active-learning run: export a paused round's requests, import the labels.

``lesseg active export RUN --out DIR`` writes, for every target image with requested regions::

    DIR/images/<name>.<ext>       the image (copied as it is on disk)
    DIR/regions/<name>.png        the regions to label: 255 inside, 0 outside
    DIR/regions/<name>_overlay.png  the image with the regions tinted and outlined (to look at)
    DIR/regions/<name>.json       the regions: id, pixel count, bounding box
    DIR/prelabels/<name>.png      the current network's prediction (palette PNG, a starting point)
    DIR/requests.json             run, round, classes, and per image its index, source file and size
    DIR/README.txt                what to do
    DIR/cvat_prelabels.zip        a CVAT "Segmentation mask 1.1" annotation archive: the pre-labels inside
                                  the regions, to upload into a CVAT task made from DIR/images

A person writes ``DIR/labels/<name>.png`` (class indices, 255 = not labeled; palette PNGs as written in
``prelabels/`` are class indices too) or labels in CVAT and exports "Segmentation mask 1.1".
``lesseg active import RUN DIR|ZIP`` then checks everything first (image sizes, class values, the CVAT
labelmap's names against the run's classes) and only then writes: labels inside the requested regions become
the round's entries of the label store, in ``RUN/last.pt`` (written atomically: an import that fails changes
nothing). Labels outside the regions are not taken; regions left unlabeled are reported by image.

CVAT fills every unannotated pixel with its label ``background`` (colour 0,0,0 here): that means *not
labeled*. A class of the run literally named ``background`` is therefore called ``background-class`` in the
CVAT labelmap.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..data.base import IGNORE, read_rgb
from ..data.sources.voc import voc_palette
from ..errors import DataError, LessegError
from ..methods import METHODS
from ..methods.active.pictures import overlay
from ..models import class_map
from ..viz import colorize
from . import checkpoint as ckpt
from .context import EngineContext
from .inference import load_checkpoint_method

CVAT_UNLABELED = "background"  # CVAT's label for pixels nobody annotated
STORE_KEY = "label_store._extra_state"


def cvat_names(classes: list[str]) -> list[str]:
    """The run's class names as CVAT labels (``background`` is CVAT's "not annotated")."""
    return [f"{c}-class" if c == CVAT_UNLABELED else c for c in classes]


def _colors(n: int) -> np.ndarray:
    """One RGB colour per class, never black (black is CVAT's unannotated background)."""
    pal = voc_palette(n + 1)
    return pal[1 : n + 1]


@dataclass
class _Run:
    folder: Path
    state: dict
    method: torch.nn.Module
    cfg: object
    classes: list[str]
    stream: str

    @property
    def store(self):
        return self.method.label_store


def _open_run(run: str | Path) -> _Run:
    folder = Path(run)
    path = folder / "last.pt"
    if not path.is_file():
        raise LessegError(f"{folder} is not a run folder: it has no last.pt")
    method, cfg, info, state = load_checkpoint_method(path)
    streams = METHODS.get(cfg.method.name).label_store_streams
    if not streams or not hasattr(method, "label_store"):
        raise LessegError(f"{path}: method {cfg.method.name} has no label store (not an active-learning run)")
    return _Run(folder, state, method, cfg, list(info.class_names), streams[0])


def _pending(run: _Run) -> dict:
    p = run.store.pending()
    if p is None:
        raise LessegError(f"{run.folder}: no selection round waits for labels (the run is not paused at a round "
                          "with method.annotator=human)")
    return p


def _names(samples) -> list[str]:
    """A file name stem per target image, unique (the sample name; prefixed by its index if two collide)."""
    stems = [Path(s.name).name for s in samples]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:06d}_{s}" for i, s in enumerate(stems)]


# -- export ---------------------------------------------------------------------------------------------
def export_requests(run: str | Path, out: str | Path, device: str = "cpu", progress: bool = True) -> dict:
    """Write the paused round's requests into ``out`` (layout in the module docstring); returns a summary."""
    r = _open_run(run)
    pending = _pending(r)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LessegError(f"--out {out} is not empty; export into a new folder")
    ctx = EngineContext(cfg=r.cfg, device=torch.device(device), class_names=r.classes, progress=progress)
    data = ctx.dataset(r.stream)
    names = _names(data.samples)
    net = r.method.eval_net().to(device).eval()
    images = [i for i in range(r.store.num_images) if r.store.requested(i)[0].size]
    for sub in ("images", "regions", "prelabels", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    colors, listing, cvat_masks = _colors(len(r.classes)), [], {}
    for i in tqdm(images, desc="export", disable=not progress):
        sample, name = data.samples[i], names[i]
        item = data[i]
        h, w = item["image"].shape[-2:]
        pixels, regions = r.store.requested(i)
        shutil.copyfile(sample.image, out / "images" / f"{name}{Path(sample.image).suffix.lower()}")
        inside = np.zeros(h * w, np.uint8)
        inside[pixels] = 255
        Image.fromarray(inside.reshape(h, w)).save(out / "regions" / f"{name}.png")
        Image.fromarray(overlay(read_rgb(Path(sample.image)), inside.reshape(h, w) > 0)).save(
            out / "regions" / f"{name}_overlay.png")
        (out / "regions" / f"{name}.json").write_text(json.dumps(_region_list(pixels, regions, w), indent=1))
        pred = class_map(ctx.predict(net, item["image"][None]))[0].to(torch.uint8).cpu().numpy()
        colorize(pred, len(r.classes)).save(out / "prelabels" / f"{name}.png")
        rgb = np.zeros((h * w, 3), np.uint8)  # CVAT: the pre-label inside the regions, unannotated elsewhere
        rgb[pixels] = colors[pred.ravel()[pixels]]
        cvat_masks[name] = rgb.reshape(h, w, 3)
        listing.append({"name": name, "index": i, "source": str(sample.image), "size": [int(h), int(w)],
                        "regions": int(np.unique(regions).size), "pixels": int(pixels.size)})
    _write_cvat(out / "cvat_prelabels.zip", cvat_masks, r.classes)
    summary = {"run": str(Path(run).resolve()), "round": pending["round"], "step": int(r.state["step"]),
               "classes": r.classes, "ignore": IGNORE, "stream": r.stream, "images": listing}
    (out / "requests.json").write_text(json.dumps(summary, indent=1))
    (out / "README.txt").write_text(_readme(r, pending, out))
    return {k: pending[k] for k in ("round", "images", "regions", "pixels")} | {"out": str(out)}


def _region_list(pixels: np.ndarray, regions: np.ndarray, w: int) -> list[dict]:
    out = []
    for rid in np.unique(regions):
        p = pixels[regions == rid]
        ys, xs = p // w, p % w
        out.append({"id": int(rid), "pixels": int(p.size),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]})
    return out


def _write_cvat(path: Path, masks: dict[str, np.ndarray], classes: list[str]) -> None:
    """A CVAT "Segmentation mask 1.1" archive: labelmap.txt, ImageSets/Segmentation/default.txt and one RGB
    SegmentationClass (and SegmentationObject) PNG per image."""
    colors = _colors(len(classes))
    lines = ["# label:color_rgb:parts:actions", f"{CVAT_UNLABELED}:0,0,0::"]
    lines += [f"{n}:{c[0]},{c[1]},{c[2]}::" for n, c in zip(cvat_names(classes), colors)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("labelmap.txt", "\n".join(lines) + "\n")
        z.writestr("ImageSets/Segmentation/default.txt", "\n".join(masks) + "\n")
        for name, rgb in masks.items():
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            z.writestr(f"SegmentationClass/{name}.png", buf.getvalue())
            z.writestr(f"SegmentationObject/{name}.png", buf.getvalue())


def _readme(r: _Run, pending: dict, out: Path) -> str:
    classes = "\n".join(f"  {i:3d}  {n}" for i, n in enumerate(r.classes))
    return f"""Selection round {pending['round']} of {r.folder} asks for labels of {pending['regions']} regions
({pending['pixels']} pixels) in {pending['images']} images.

Label only the pixels inside the regions (regions/<name>.png: white = to label; regions/<name>.json lists
them). Pixels labeled outside the regions are not used; a region left unlabeled is reported and stays
unlabeled (its budget is not spent). Either

1. write labels/<name>.png for each image: one class index per pixel (below), 255 = not labeled, the size of
   images/<name>.*. prelabels/<name>.png is the network's current prediction, a palette PNG whose pixel
   values are class indices: copy it to labels/ and correct it inside the regions. Then

     lesseg active import {r.folder} {out}

2. or label in CVAT: create a task from images/ with the labels of cvat_prelabels.zip's labelmap.txt,
   upload cvat_prelabels.zip as annotations in the "Segmentation mask 1.1" format (the network's prediction
   inside the regions), correct it, export the task's annotations as "Segmentation mask 1.1" and run

     lesseg active import {r.folder} EXPORT.zip

   CVAT's "background" (black) means not labeled; a class named background is "background-class" there.

Then resume the training with the same lesseg train command and --resume.

Classes (index  name):
{classes}
"""


# -- import ---------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    round: int
    images: int = 0
    labeled_pixels: int = 0
    requested_pixels: int = 0
    unlabeled_regions: dict[str, int] = field(default_factory=dict)  # image -> regions with no label
    outside: dict[str, int] = field(default_factory=dict)  # image -> labeled pixels outside the regions
    missing: list[str] = field(default_factory=list)  # images with requests but no label file

    def lines(self) -> list[str]:
        out = [(f"round {self.round}: {self.labeled_pixels} of {self.requested_pixels} requested pixels labeled "
                f"in {self.images} images")]
        if self.missing:
            out.append(f"no label file for {len(self.missing)} image(s): {', '.join(self.missing[:10])}"
                       + (" ..." if len(self.missing) > 10 else ""))
        for name, n in self.unlabeled_regions.items():
            out.append(f"{name}: {n} region(s) left unlabeled")
        for name, n in self.outside.items():
            out.append(f"{name}: {n} pixel(s) labeled outside the requested regions (not used)")
        return out


def import_labels(run: str | Path, source: str | Path) -> ImportReport:
    """Read a person's labels (a folder of class-index PNGs, or CVAT's "Segmentation mask 1.1" export as a zip
    or its unpacked folder), keep those inside the pending round's regions, and write them into the run's
    label store (``RUN/last.pt``, atomically). Every check happens before anything is written."""
    r = _open_run(run)
    pending = _pending(r)
    ctx = EngineContext(cfg=r.cfg, device=torch.device("cpu"), class_names=r.classes, progress=False)
    samples = ctx.dataset(r.stream).samples
    names = _names(samples)
    reader = _label_reader(Path(source), r.classes)
    report = ImportReport(round=pending["round"])
    labels: dict[int, np.ndarray] = {}
    for i in range(r.store.num_images):
        pixels, regions = r.store.requested(i)
        if not pixels.size:
            continue
        name, (h, w) = names[i], r.store.size(i)
        report.requested_pixels += int(pixels.size)
        found = reader(name, (h, w))
        if found is None:
            report.missing.append(name)
            continue
        flat = found.ravel()
        values = flat[pixels]
        labels[i] = values
        report.images += 1
        report.labeled_pixels += int((values != IGNORE).sum())
        outside = np.ones(flat.size, bool)
        outside[pixels] = False
        n_out = int((flat[outside] != IGNORE).sum())
        if n_out:
            report.outside[name] = n_out
        labeled_regions = np.unique(regions[values != IGNORE])
        n_unlabeled = int(np.unique(regions).size - labeled_regions.size)
        if n_unlabeled:
            report.unlabeled_regions[name] = n_unlabeled
    if not labels:
        raise LessegError(f"{source}: no label file for any of the {pending['images']} images of round "
                          f"{pending['round']} (expected labels/<name>.png or a CVAT export; names in "
                          "requests.json)")
    state = r.state
    r.store.resolve(labels)  # validated again by the store (sizes, nothing labeled twice)
    state["method"][STORE_KEY] = r.store.get_extra_state()
    ckpt.save_atomic(state, r.folder / "last.pt")
    record = {"event": "import", "step": int(state["step"]), "round": report.round,
              "pixels": report.labeled_pixels, "requested_pixels": report.requested_pixels,
              "images": report.images, "unlabeled_regions": sum(report.unlabeled_regions.values()),
              "outside_pixels": sum(report.outside.values())}
    with open(r.folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return report


def _label_reader(source: Path, classes: list[str]):
    """``read(name, (H, W)) -> H,W uint8 class indices (255 unlabeled) or None`` for a labels folder, a CVAT
    export zip, or an unpacked CVAT export. Wrong values, colours, class names or sizes are errors."""
    if not source.exists():
        raise DataError(f"labels not found: {source}")
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise DataError(f"{source} is neither a folder of label PNGs nor a zip (CVAT export)")
        z = zipfile.ZipFile(source)
        files = {Path(n).as_posix(): n for n in z.namelist()}
        return _cvat_reader(lambda rel: z.read(files[rel]) if rel in files else None, str(source), classes)
    if (source / "labelmap.txt").is_file():
        return _cvat_reader(lambda rel: (source / rel).read_bytes() if (source / rel).is_file() else None,
                            str(source), classes)
    folder = source / "labels" if (source / "labels").is_dir() else source

    def read(name: str, size: tuple[int, int]) -> np.ndarray | None:
        path = folder / f"{name}.png"
        if not path.is_file():
            return None
        arr = _open_png(path.read_bytes(), str(path))
        if arr.ndim != 2:
            raise DataError(f"{path}: a label PNG holds one class index per pixel (mode L or P), not {arr.ndim} "
                            "channels; CVAT colour masks go with their labelmap.txt")
        _check_size(arr, size, str(path))
        bad = (arr >= len(classes)) & (arr != IGNORE)
        if bad.any():
            raise DataError(f"{path}: values {sorted(set(np.unique(arr[bad]).tolist()))[:5]} are not classes of this "
                            f"run ({len(classes)} classes: 0-{len(classes) - 1}, {IGNORE} = not labeled); the class "
                            "map differs")
        return arr.astype(np.uint8)

    return read


def _cvat_reader(read_bytes, where: str, classes: list[str]):
    text = read_bytes("labelmap.txt")
    if text is None:
        raise DataError(f"{where}: no labelmap.txt (a CVAT \"Segmentation mask 1.1\" export has one)")
    ours = {n: i for i, n in enumerate(cvat_names(classes))}
    lut: dict[tuple[int, int, int], int] = {}
    for line in text.decode().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, rgb = line.split(":")[:2]
        color = tuple(int(v) for v in rgb.split(","))
        if name == CVAT_UNLABELED:
            lut[color] = IGNORE
        elif name in ours:
            lut[color] = ours[name]
        else:
            raise DataError(f"{where}: CVAT label {name!r} is not a class of this run ({', '.join(ours)}); the "
                            "class map differs")
    keys = np.array(list(lut), np.int64)
    order = np.argsort((keys[:, 0] << 16) | (keys[:, 1] << 8) | keys[:, 2])
    codes = ((keys[:, 0] << 16) | (keys[:, 1] << 8) | keys[:, 2])[order]  # sorted colour codes
    values = np.array(list(lut.values()), np.uint8)[order]

    def read(name: str, size: tuple[int, int]) -> np.ndarray | None:
        data = read_bytes(f"SegmentationClass/{name}.png")
        if data is None:
            return None
        rel = f"{where}: SegmentationClass/{name}.png"
        arr = _open_png(data, rel, rgb=True)
        _check_size(arr, size, rel)
        code = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
        pos = np.clip(np.searchsorted(codes, code), 0, len(codes) - 1)
        hit = codes[pos] == code
        if not hit.all():
            y, x = np.argwhere(~hit)[0]
            raise DataError(f"{rel}: colour {tuple(int(v) for v in arr[y, x])} at ({x}, {y}) is not in labelmap.txt")
        return values[pos]

    return read


def _open_png(data: bytes, where: str, rgb: bool = False) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB") if rgb else im)
    except (UnidentifiedImageError, OSError):
        raise DataError(f"cannot read {where}: not a PNG, or a corrupt one") from None


def _check_size(arr: np.ndarray, size: tuple[int, int], where: str) -> None:
    if tuple(arr.shape[:2]) != tuple(size):
        raise DataError(f"{where} is {arr.shape[1]}x{arr.shape[0]}, the image is {size[1]}x{size[0]}")
