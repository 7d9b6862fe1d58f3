"""Batch-level mixing masks and their application (methods.md section 0, "Mixing").

Every function runs on the tensors' device without host synchronisation; randomness comes from torch's
global RNG or an optional ``generator`` (on the same device). Masks are B,1,H,W float with 1 where the pixel
is taken from the partner image: ``mix(a, b, M) = a*(1-M) + b*M`` with ``b = partner(a)``, so image i takes
from image (i+1) mod B (U2PL convention). Apply one mask to every tensor of a view with ``mix_batch`` so
images, pseudo-labels, confidences and validity masks are never mixed inconsistently. ``classmix_mask``
picks its classes in the partner's labels, so that the picked classes are the ones pasted.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .common import IGNORE

PAIR_MASKS = ("cutmix", "classmix")  # the masks of the methods that mix two unlabeled images (CutMix-Seg, CPS)


def check_pair_mask(name: str) -> None:
    """A clear error for a ``method.mixing`` that is not one of ``PAIR_MASKS``."""
    if name not in PAIR_MASKS:
        raise ConfigError(f"method.mixing must be one of {', '.join(PAIR_MASKS)}, got {name!r}")


def _box(y0: torch.Tensor, x0: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor, h: int, w: int):
    """Row and column indicators of boxes with top-left (y0, x0) and size (bh, bw). (...,) -> (...,h), (...,w)."""
    ys = torch.arange(h, device=y0.device, dtype=y0.dtype)
    xs = torch.arange(w, device=x0.device, dtype=x0.dtype)
    rows = (ys >= y0.unsqueeze(-1)) & (ys < (y0 + bh).unsqueeze(-1))
    cols = (xs >= x0.unsqueeze(-1)) & (xs < (x0 + bw).unsqueeze(-1))
    return rows.float(), cols.float()


def box_mask_one(
    b: int,
    h: int,
    w: int,
    device: torch.device | str,
    area: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One rectangle of about ``area`` of the image per sample (U2PL/ReCo ``generate_cutout_mask``). -> B,1,H,W

    Width ~ U(area*W, W), height = area*H*W / width (so the box fits), position uniform inside the image.
    """
    u = torch.rand(3, b, device=device, generator=generator)
    bw = torch.round(area * w + u[0] * (1.0 - area) * w).clamp(1, w)
    bh = torch.round(area * h * w / bw).clamp(1, h)
    x0 = torch.floor(u[1] * (w - bw + 1))
    y0 = torch.floor(u[2] * (h - bh + 1))
    rows, cols = _box(y0, x0, bh, bw, h, w)  # B,H ; B,W
    return (rows[:, :, None] * cols[:, None, :]).unsqueeze(1)


def box_mask_xor(
    b: int,
    h: int,
    w: int,
    device: torch.device | str,
    n_boxes: int = 3,
    area_range: tuple[float, float] = (0.25, 0.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CutMix-Seg's authors' box mask generator, with CPS's settings by default: ``n_boxes`` XOR-combined
    rectangles with random aspect ratios (CutMix-Seg itself: one box of area 0.5). -> B,1,H,W

    As the authors' ``BoxMaskGenerator`` (prop_by_area, random aspect ratio, within bounds, invert): a
    proportion p ~ U(area_range) per box, split into height/width proportions ``p^u`` and ``p^(1-u)``
    (u ~ U(0,1)), each scaled by sqrt(1/n_boxes); sizes and positions rounded to pixels; overlapping parts
    cancel. Mean coverage is about 0.25.
    """
    u = torch.rand(4, b, n_boxes, device=device, generator=generator)
    prop = area_range[0] + u[0] * (area_range[1] - area_range[0])
    y_prop = torch.exp(u[1] * torch.log(prop))
    x_prop = prop / y_prop
    fac = (1.0 / n_boxes) ** 0.5
    bh = torch.round(y_prop * fac * h)
    bw = torch.round(x_prop * fac * w)
    y0 = torch.round((h - bh) * u[2])
    x0 = torch.round((w - bw) * u[3])
    rows, cols = _box(y0, x0, bh, bw, h, w)  # B,n,H ; B,n,W
    count = torch.einsum("bky,bkx->byx", rows, cols)  # boxes covering each pixel
    return torch.remainder(count, 2).unsqueeze(1)


def cutmix_box(
    b: int,
    h: int,
    w: int,
    device: torch.device | str,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    tries: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UniMatch's ``obtain_cutmix_box`` for a batch, each image on its own: with probability ``p`` one box of
    area ~ U(area) x H W and aspect ratio (h/w) ~ U(ratio), fully inside the image. -> B,1,H,W float

    The authors redraw ratio and top-left corner until the box fits; here ``tries`` candidates are drawn at
    once and the first that fits is kept (the same distribution; if none fits, the first candidate is
    clipped to the image, which happens with negligible probability). Sizes are truncated like ``int()``.
    """
    u = torch.rand(2, b, device=device, generator=generator)
    v = torch.rand(3, b, tries, device=device, generator=generator)
    size = (area[0] + u[0] * (area[1] - area[0])) * h * w  # B
    r = ratio[0] + v[0] * (ratio[1] - ratio[0])  # B,T
    bw = torch.sqrt(size[:, None] / r).floor()
    bh = torch.sqrt(size[:, None] * r).floor()
    x0, y0 = (v[1] * w).floor(), (v[2] * h).floor()
    fits = (x0 + bw <= w) & (y0 + bh <= h)
    k = fits.float().argmax(1, keepdim=True)  # first fitting candidate (0 when none)
    bw, bh = bw.gather(1, k).squeeze(1).clamp(max=w), bh.gather(1, k).squeeze(1).clamp(max=h)
    x0 = torch.minimum(x0.gather(1, k).squeeze(1), w - bw)
    y0 = torch.minimum(y0.gather(1, k).squeeze(1), h - bh)
    rows, cols = _box(y0, x0, bh, bw, h, w)  # B,H ; B,W
    box = rows[:, :, None] * cols[:, None, :]
    on = (u[1] < p).float()  # the authors draw the box with probability p per image
    return (box * on[:, None, None]).unsqueeze(1)


def classmix_mask(
    labels: torch.Tensor, ignore: int = IGNORE, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ClassMix mask in the module's convention: for image i, the pixels of ceil(n/2) classes picked at random
    among the n classes present in its partner's labels (image (i+1) mod B; ``ignore`` excluded). -> B,1,H,W

    So ``mix_batch`` pastes the picked classes of the partner, at their own pixels, over image i (the ClassMix
    paper: ceil(n/2) classes of image A pasted onto image B, here A = partner(i), B = i), and image i keeps
    every pixel outside them. A partner with one class is pasted whole; its ``ignore`` pixels are never
    pasted, so a partner with no valid pixel leaves image i unchanged. ``labels`` are each image's own
    (pseudo-)labels, not yet mixed, with values < 256.
    """
    b = labels.shape[0]
    flat = partner(labels).reshape(b, -1)  # B,HW: row i holds the labels of image (i+1) mod B
    present = torch.zeros(b, 256, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    present[:, ignore] = False
    score = torch.rand(b, 256, device=labels.device, generator=generator).masked_fill(~present, float("inf"))
    n_pick = (present.sum(1) + 1) // 2  # B: ceil(n/2), as in the ClassMix paper's code
    kth = score.sort(dim=1).values.gather(1, n_pick.unsqueeze(1))  # B,1: first score not picked (inf if none)
    chosen = present & (score < kth)  # B,256
    return chosen.gather(1, flat).reshape(labels.shape).unsqueeze(1).float()


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a*(1-M) + b*M`` for a binary B,1,H,W mask and B,C,H,W or B,H,W tensors of any dtype (one select)."""
    m = mask if a.dim() == 4 else mask.squeeze(1)
    return torch.where(m.bool(), b, a)


def partner(x: torch.Tensor) -> torch.Tensor:
    """The batch rolled so that image i is paired with image (i+1) mod B."""
    return x.roll(-1, 0)


def mix_batch(tensors: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mix every tensor with its partner under one mask (image, pseudo-label, entropy, valid, ...)."""
    return {k: mix(v, partner(v), mask) for k, v in tensors.items()}


def cutout(
    image: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the image inside the mask and set its labels to 255. B,C,H,W ; B,H,W ; B,1,H,W."""
    return image * (1.0 - mask), labels.masked_fill(mask.squeeze(1).bool(), IGNORE)
