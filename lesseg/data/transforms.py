"""Augmentations from torchvision.transforms.v2 (methods.md section 0: weak and strong views).

The weak view is geometry (random scale, crop with ignore padding, flip); the strong view is the weak view
plus photometric changes, so both views of an image share their geometry and a pseudo-label computed on the
weak view aligns with the strong one. v2 transforms apply the same geometry to an ``Image`` and its
``Mask`` (nearest interpolation for masks) and leave masks alone in photometric transforms.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .base import IGNORE


def _resize(inpt, size: list[int]):
    """Bilinear for images; NEAREST_EXACT for masks: torchvision's default NEAREST floors source
    coordinates and shifts labels by up to half an input pixel against the bilinear image."""
    if isinstance(inpt, tv_tensors.Mask):
        return TF.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return TF.resize(inpt, size, antialias=True)


class RandomScale(v2.Transform):
    """Rescale image and mask by one factor drawn uniformly from ``[lo, hi]``."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        s = float(torch.empty(1).uniform_(self.lo, self.hi))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params: dict):
        return _resize(inpt, params["size"])


class ResizeLong(v2.Transform):
    """Resize so that the long side equals ``size`` (keeps the aspect ratio)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        s = self.size / max(h, w)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params: dict):
        return _resize(inpt, params["size"])


def weak_geometry(aug, crop_size: list[int]) -> v2.Compose:
    """Random scale, rotation, crop (image padded with 0, mask with 255) and flips."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
    ops: list = []
    if aug.base_size:
        ops.append(ResizeLong(aug.base_size))
    lo, hi = aug.scale
    if (lo, hi) != (1.0, 1.0):
        ops.append(RandomScale(lo, hi))
    if aug.rotate:  # masks are rotated with nearest interpolation by torchvision
        ops.append(v2.RandomRotation(aug.rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
    ops.append(v2.RandomCrop(list(crop_size), pad_if_needed=True, fill=fill))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip())
    return v2.Compose(ops)


def strong_photometric(aug, crop_size: list[int]) -> v2.Compose:
    """Colour jitter, random grayscale and Gaussian blur (the strong view's extra perturbations)."""
    j = aug.color_jitter
    k = max(3, int(0.1 * min(crop_size)) // 2 * 2 + 1)  # odd kernel, about 10% of the crop
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(j, j, j, min(0.5, j / 2))], p=aug.color_jitter_p),
            v2.RandomGrayscale(p=aug.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=aug.blur_p),
        ]
    )


def normalize(mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
