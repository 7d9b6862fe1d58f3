"""Saliency maps: the background cue of weakly supervised pseudo-masks (methods.md section 7: CAM, AE, STC).

Where an image is not salient it is most likely background, whatever its CAMs say. A map comes from one of
two places, chosen in the config:

- a classical detector of OpenCV contrib's ``saliency`` module (``cv2.saliency``, in the package
  ``opencv-contrib-python-headless``): ``spectral_residual`` (Hou & Zhang 2007) or ``fine_grained``
  (Montabone & Soto 2010), computed from the image, divided by its peak, 0..255;
- a folder of the user's maps (e.g. of a deep saliency network run elsewhere): ``<folder>/<sample name>.png``,
  8-bit grayscale, 0..255, of the image's size.

:class:`SaliencyMaps` is an extra per-pixel map reader (``read(index, (H, W)) -> H,W uint8``, see
:class:`~lesseg.data.loader.SegDataset`): given as ``SegDataset(maps={"saliency": SaliencyMaps(...)})`` the
plane goes through the same scale, rotation, crop and flips as the image, so it stays aligned with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .base import Sample, SegSource

DETECTORS = ("spectral_residual", "fine_grained")
SOURCES = (*DETECTORS, "folder")

__all__ = ["DETECTORS", "SOURCES", "SaliencyMaps", "check_detectors", "saliency_map"]


def _detector(method: str):
    """A fresh OpenCV static saliency detector (cheap to make; not shared, so worker processes never share
    one). A ConfigError when the name is unknown or OpenCV has no saliency module (the plain
    ``opencv-python-headless`` instead of the contrib build)."""
    if method not in DETECTORS:
        raise ConfigError(f"unknown saliency detector {method!r}; known: {', '.join(DETECTORS)}")
    import cv2

    saliency = getattr(cv2, "saliency", None)
    if saliency is None:
        raise ConfigError(f"saliency detector {method!r} needs OpenCV's contrib module cv2.saliency, which "
                          f"this OpenCV ({cv2.__version__}) lacks: install opencv-contrib-python-headless in "
                          "place of opencv-python-headless (both provide cv2; only one may be installed)")
    if method == "spectral_residual":
        return saliency.StaticSaliencySpectralResidual_create()
    return saliency.StaticSaliencyFineGrained_create()


def check_detectors(method: str) -> None:
    """Raise the ConfigError of :func:`saliency_map` now (unknown name, no cv2.saliency), before any work."""
    _detector(method)


def saliency_map(rgb: np.ndarray, method: str) -> np.ndarray:
    """The saliency of an image by an OpenCV contrib detector, as H,W uint8 0..255.

    The detector's float map (>= 0) is divided by its own peak, as CAMs are, and scaled to 0..255, so one
    threshold means the same for every image and both detectors. Not stretched from its minimum: where
    nothing stands out (a flat image) spectral residual is high everywhere, and stretching would turn its
    numerical noise into strong contrast. A map without a positive value is 0 everywhere.

    rgb H,W,3 uint8 -> H,W uint8"""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"saliency_map takes an H,W,3 uint8 RGB image, not {rgb.dtype} {rgb.shape}")
    detector = _detector(method)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # OpenCV's grey conversion weighs the channels as B, G, R
    ok, sal = detector.computeSaliency(bgr)
    if not ok or sal is None:
        raise DataError(f"OpenCV's {method} saliency detector failed on a {rgb.shape[1]}x{rgb.shape[0]} "
                        "image")
    sal = np.nan_to_num(np.asarray(sal, dtype=np.float64).reshape(rgb.shape[:2]), nan=0.0, posinf=0.0,
                        neginf=0.0)
    sal = np.maximum(sal, 0.0)
    peak = float(sal.max())
    if peak <= 0.0:
        return np.zeros(rgb.shape[:2], np.uint8)
    return np.rint(sal * (255.0 / peak)).astype(np.uint8)


def read_saliency_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A user's saliency map: an 8-bit grayscale (or colour/palette, read as its luminance) PNG of ``size``
    (H, W). A missing or unreadable file, a 16-bit/float image or another size is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"saliency map {path} does not exist (method.saliency: folder reads "
                        "<saliency_dir>/<image name>.png for every image)")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(f"saliency map {path} is a {im.mode} image; an 8-bit grayscale PNG (0..255) "
                                "is expected")
            arr = np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:  # PIL's own message repeats the path
        raise DataError(f"cannot read saliency map {path}: not an image file, or a corrupt or unsupported "
                        "one") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read saliency map {path}: {e}") from None
    if arr.shape != tuple(size):
        raise DataError(f"saliency map {path} is {arr.shape[1]}x{arr.shape[0]}, its image "
                        f"{size[1]}x{size[0]} (width x height)")
    return arr


class SaliencyMaps:
    """The saliency map of each sample, an extra map reader: ``read(index, (H, W)) -> H,W uint8`` 0..255.

    ``method`` ``"folder"`` reads ``<folder>/<sample name>.png`` (:func:`read_saliency_png`); a detector name
    (:data:`DETECTORS`) computes the map from the image (:func:`saliency_map`), each time it is asked for
    (nothing cached: a training stream asks once per view, and the maps are cheap next to a network).
    Holds only the source, the samples and the settings, so it pickles into DataLoader workers.
    """

    def __init__(self, source: SegSource, samples: list[Sample], method: str,
                 folder: str | Path | None = None) -> None:
        if method not in SOURCES:
            raise ConfigError(f"unknown saliency source {method!r}; known: {', '.join(SOURCES)}")
        if method == "folder":
            if folder is None:
                raise ConfigError("saliency 'folder' needs the folder of the maps (method.saliency_dir)")
            if not Path(folder).is_dir():
                raise DataError(f"saliency folder {folder} does not exist or is not a folder")
        else:
            check_detectors(method)
        self.source, self.samples, self.method = source, samples, method
        self.folder = Path(folder) if folder is not None else None

    def path(self, i: int) -> Path:
        """Where sample ``i``'s map is read from (``folder`` only)."""
        if self.folder is None:
            raise ValueError(f"saliency {self.method!r} computes its maps; it reads no files")
        return self.folder / f"{self.samples[i].name}.png"

    def __call__(self, i: int, size: tuple[int, int]) -> np.ndarray:
        size = (int(size[0]), int(size[1]))
        if self.method == "folder":
            return read_saliency_png(self.path(i), size)
        image = self.source.read_image(self.samples[i].image)
        if image.shape[:2] != size:
            raise DataError(f"image {self.samples[i].image} is {image.shape[1]}x{image.shape[0]}, its "
                            f"saliency map is asked for at {size[1]}x{size[0]}")
        return saliency_map(image, self.method)
