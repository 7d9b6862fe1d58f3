"""Class activation maps and the pseudo-masks made from them (methods.md section 7, Zhou et al. 2016).

Everything here is a pure function of tensors, batched, on whatever device its inputs are on, in float32
(also under autocast: the maps are compared with thresholds, so they must not be bf16).

- ``CAM_c = ReLU(sum_k w_ck f_k)`` of the last encoder features ``f`` and the bias-free 1x1 classifier ``w``,
  upsampled (bilinear) to the image and divided by its own maximum, so each class map lies in [0, 1] with
  its peak at 1. Only the image's tags get a map: absent classes are zero (their evidence is not used).
- Multi-scale + flip: the ReLU maps of every scale and of the mirrored image (mirrored back) are brought to
  the image's size and summed; the sum is normalised as above (so it equals normalising the mean).
- Pseudo-mask: where the best present class's CAM is >= ``fg_threshold``, that class; where it is below
  ``bg_threshold`` (default: ``fg_threshold``, no band), background; in between, 255 (uncertain). A
  background map (e.g. low saliency, for STC/AE-PSL) adds background; a pixel both foreground by its CAM
  and background by the map is 255: the two cues disagree. An image tagged with no object is background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255

__all__ = ["class_activation_maps", "foreground_counts", "foreground_quality", "multiscale_cams",
           "normalize_cams", "pseudo_masks", "relu_cams"]


def _resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` (H, W) unless the maps have it already. B,C,h,w -> B,C,H,W"""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def relu_cams(features: Tensor, weight: Tensor, size: Sequence[int]) -> Tensor:
    """Unnormalised CAMs of every class: ``ReLU(w_c . f)`` upsampled to ``size``, float32.

    features B,K,h,w ; weight C,K (or the 1x1 conv's C,K,1,1) -> B,C,H,W"""
    w = weight.reshape(weight.shape[0], -1).float()
    raw = torch.einsum("ck,bkhw->bchw", w, features.float())
    return _resize(F.relu(raw), size)


def normalize_cams(cams: Tensor, tags: Tensor) -> Tensor:
    """Each map divided by its own maximum (into [0, 1]); classes not in ``tags`` and all-zero maps are zero.

    cams B,C,H,W (>= 0) ; tags B,C multi-hot -> B,C,H,W float32"""
    cams = cams.float()
    peak = cams.amax(dim=(2, 3), keepdim=True)
    out = torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(cams.dtype).tiny), torch.zeros_like(cams))
    return out * (tags > 0).to(out.dtype)[:, :, None, None]


def class_activation_maps(features: Tensor, weight: Tensor, tags: Tensor, size: Sequence[int]) -> Tensor:
    """CAMs of the image's tags: ReLU(w_c . f), upsampled to ``size``, max-normalised per class to [0, 1],
    zero for the classes the image is not tagged with.

    features B,K,h,w ; weight C,K[,1,1] ; tags B,C -> B,C,H,W float32"""
    return normalize_cams(relu_cams(features, weight, size), tags)


def multiscale_cams(cam_fn: Callable[[Tensor], Tensor], image: Tensor, tags: Tensor,
                    scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """CAMs aggregated over scales and a horizontal flip, normalised per class, for the image's tags only.

    ``cam_fn`` maps a batch of images to raw class maps B,C,h,w (a :class:`~lesseg.models.Classifier`'s
    ``cam``: the 1x1 classifier on the last features, no ReLU). Each scale resizes the image (bilinear; at
    least one pixel a side); with ``flip`` the mirrored copy goes through the network in the same batch and
    its maps are mirrored back. The ReLU maps of every view are resized to the image and summed, then
    normalised (:func:`normalize_cams`: dividing by the peak makes sum and mean the same).

    image B,3,H,W ; tags B,C -> B,C,H,W float32 in [0, 1]"""
    b, _, h, w = image.shape
    total: Tensor | None = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = _resize(image, size)
        maps = F.relu(cam_fn(torch.cat([x, x.flip(-1)]) if flip else x).float())
        if flip:
            maps = maps[:b] + maps[b:].flip(-1)
        maps = _resize(maps, (h, w))
        total = maps if total is None else total + maps
    if total is None:
        raise ValueError("multiscale_cams needs at least one scale")
    return normalize_cams(total, tags)


def pseudo_masks(cams: Tensor, tags: Tensor, fg_threshold: float, bg_threshold: float | None = None,
                 background: Tensor | None = None, bg_class: int = 0) -> Tensor:
    """Class-index pseudo-masks from normalised CAMs: uint8 B,H,W with ``bg_class`` and 255 (uncertain).

    - the best of the image's tagged classes (``bg_class`` excluded: background has no CAM) where its CAM
      is >= ``fg_threshold``;
    - ``bg_class`` where the best CAM is < ``bg_threshold``; with ``bg_threshold`` None: below
      ``fg_threshold`` (no uncertain band), or, when a ``background`` map is given, nowhere (the map alone
      says what is background);
    - ``bg_class`` where ``background`` (B,H,W bool, e.g. saliency below a threshold) is set, unless the CAM
      says foreground there: such a pixel is 255 (the cues disagree);
    - ``bg_class`` everywhere in an image tagged with no object class;
    - 255 elsewhere (between the thresholds).

    cams B,C,H,W in [0, 1] ; tags B,C multi-hot -> B,H,W uint8"""
    if bg_threshold is not None and bg_threshold > fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} is above fg_threshold {fg_threshold}")
    present = tags > 0
    present[:, bg_class] = False
    scores = cams.float().masked_fill(~present[:, :, None, None], -1.0)  # absent classes never win
    best, label = scores.max(1)  # B,H,W
    has_object = present.any(1)[:, None, None]  # B,1,1
    fg = has_object & (best >= fg_threshold)
    if bg_threshold is not None:
        low = best < bg_threshold
    elif background is None:
        low = best < fg_threshold
    else:
        low = torch.zeros_like(fg)
    bg = ~has_object | low
    if background is not None:
        given = background.to(device=fg.device, dtype=torch.bool)
        bg = bg | given
        fg_kept = fg & ~given
    else:
        fg_kept = fg
    out = torch.full_like(label, IGNORE)
    out = torch.where(bg & ~fg, torch.full_like(label, bg_class), out)
    out = torch.where(fg_kept, label, out)
    return out.to(torch.uint8)


def foreground_counts(mask: Tensor, true: Tensor | None = None, bg_class: int = 0) -> Tensor:
    """Pixel counts that judge pseudo-masks against true masks (where given; their 255 pixels are left out):
    ``[correct foreground, foreground labelled, true foreground, labelled (not 255), scored pixels]``.

    A foreground pixel is correct when its class is the true one. Without ``true`` the first and third
    counts are 0 and every pixel is scored. mask B,H,W ; true B,H,W -> int64 (5,)"""
    m = mask.long()
    if true is None:
        scored = torch.ones_like(m, dtype=torch.bool)
        t = torch.full_like(m, IGNORE)
    else:
        t = true.to(m.device).long()
        scored = t != IGNORE
    labelled = scored & (m != IGNORE)
    pred_fg = labelled & (m != bg_class)
    true_fg = scored & (t != bg_class) & (t != IGNORE)
    correct = pred_fg & (m == t)
    return torch.stack([correct.sum(), pred_fg.sum(), true_fg.sum(), labelled.sum(), scored.sum()])


def foreground_quality(counts: Tensor) -> dict[str, float]:
    """``fg_precision`` (correct / labelled foreground), ``fg_recall`` (correct / true foreground) and
    ``labelled`` (fraction of scored pixels not 255) of :func:`foreground_counts` (summed); 0 for an
    empty denominator."""
    c = [int(v) for v in counts.tolist()]

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {"fg_precision": ratio(c[0], c[1]), "fg_recall": ratio(c[0], c[2]), "labelled": ratio(c[3], c[4])}
