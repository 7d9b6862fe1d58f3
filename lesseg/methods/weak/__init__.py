"""Weak supervision from image-level tags (methods.md section 7): the pieces its methods share.

``cam``: class activation maps of a GAP + 1x1 classifier (one view, or several scales and flips), and
pseudo-masks from them with an uncertain band and an optional background (saliency) map. The methods
themselves (the ``cam`` pipeline; later adversarial erasing, PSL, STC) live one level up, one file each.
"""

from __future__ import annotations

from .cam import (
    class_activation_maps,
    foreground_counts,
    foreground_quality,
    multiscale_cams,
    normalize_cams,
    pseudo_masks,
    relu_cams,
)

__all__ = [
    "class_activation_maps",
    "foreground_counts",
    "foreground_quality",
    "multiscale_cams",
    "normalize_cams",
    "pseudo_masks",
    "relu_cams",
]
