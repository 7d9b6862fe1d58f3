"""Object proposals voted into localisation maps (methods.md section 7, proposal-based MIL, HCP-style).

- Proposals: OpenCV contrib's selective search (``cv2.ximgproc.segmentation``, fast or quality mode) on the
  image, boxes ``x0, y0, x1, y1`` (pixel edges, ``x1``/``y1`` exclusive). OpenCV ranks its boxes with the C
  library's unseeded ``rand()``, so its order (not its set of boxes) changes from call to call; lesseg
  sorts the unique boxes, drops those smaller than ``min_area`` of the image, and where more than
  ``max_proposals`` remain keeps a random subset drawn from a generator the caller seeds (per image), so a
  rerun, a resumed run or another process count gives the same proposals.
- Scoring: every box is cut out of the normalised image and resized to the classifier's input size in one
  batched ``roi_align`` (bilinear, pixel centres aligned), then the multi-label classifier scores the
  crops in chunks: ``sigmoid(logits)``, N,C.
- Voting: the map of class ``c`` is the sum, over the boxes that cover a pixel, of their scores for ``c``
  (a box whose score is below ``min_score`` casts no vote); normalised per class by its peak and kept for
  the image's tags only (:func:`~.cam.normalize_cams`, as CAMs are), so :func:`~.cam.pseudo_masks` turns
  them into pseudo-masks with the same thresholds and uncertain band.

Not done: the cross-image re-ranking of the authors' MIL step (each proposal's summed nearest distance to
the proposals of other images of its class). The votes are weighted by the classifier's scores alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from ...errors import ConfigError
from .cam import normalize_cams

MODES = ("fast", "quality")

__all__ = ["MODES", "crop_proposals", "localization_maps", "propose", "score_proposals", "select_proposals",
           "selective_search", "vote_maps"]


def selective_search(rgb: np.ndarray, mode: str = "fast") -> np.ndarray:
    """The unique selective-search boxes of an H,W,3 uint8 RGB image, sorted, as N,4 int64 ``x0,y0,x1,y1``."""
    if mode not in MODES:
        raise ConfigError(f"selective search mode {mode!r} is not one of {', '.join(MODES)}")
    import cv2

    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is None:
        raise ConfigError("proposals need OpenCV's contrib module cv2.ximgproc (selective search): install "
                          "opencv-contrib-python-headless in place of opencv-python-headless")
    ss = ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV reads B, G, R
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    return np.unique(boxes, axis=0)  # sorted: OpenCV's own order is random


def select_proposals(boxes: np.ndarray, size: Sequence[int], max_proposals: int, min_area: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Boxes covering at least ``min_area`` of the H,W image; a random ``max_proposals`` of them (in their
    given order) where there are more."""
    h, w = int(size[0]), int(size[1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes[area >= min_area * h * w]
    if len(boxes) > max_proposals:
        boxes = boxes[np.sort(rng.choice(len(boxes), max_proposals, replace=False))]
    return boxes


def propose(rgb: np.ndarray, mode: str, max_proposals: int, min_area: float,
            rng: np.random.Generator) -> np.ndarray:
    """:func:`selective_search` then :func:`select_proposals`: N,4 int64 boxes."""
    return select_proposals(selective_search(rgb, mode), rgb.shape[:2], max_proposals, min_area, rng)


def crop_proposals(image: Tensor, boxes: Tensor, size: Sequence[int]) -> Tensor:
    """The boxes cut out of one image and resized to ``size`` (H, W) by bilinear ``roi_align`` (several
    samples a bin where a box is larger than the crop, so shrinking averages instead of skipping pixels).

    image 3,H,W float ; boxes N,4 (x0, y0, x1, y1 pixel edges) -> N,3,h,w"""
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1).to(image.dtype)
    return roi_align(image[None], rois, (int(size[0]), int(size[1])), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


@torch.no_grad()
def score_proposals(classify: Callable[[Tensor], Tensor], crops: Tensor, batch: int) -> Tensor:
    """``sigmoid`` of the classifier's logits of every crop, ``batch`` crops a forward. N,3,h,w -> N,C fp32"""
    scores = [torch.sigmoid(classify(crops[k:k + batch]).float()) for k in range(0, len(crops), batch)]
    if not scores:
        raise ValueError("score_proposals needs at least one crop")
    return torch.cat(scores)


def vote_maps(boxes: Tensor, scores: Tensor, size: Sequence[int], min_score: float = 0.0) -> Tensor:
    """Per-class sums of the scores of the boxes covering each pixel; scores below ``min_score`` count 0.

    boxes N,4 (x0, y0, x1, y1; x1, y1 exclusive) ; scores N,C -> C,H,W float32"""
    h, w = int(size[0]), int(size[1])
    s = scores.float()
    s = s * (s >= min_score)
    b = boxes.to(s.device).long()
    ys, xs = torch.arange(h, device=s.device), torch.arange(w, device=s.device)
    rows = ((ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])).float()  # N,H
    cols = ((xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])).float()  # N,W
    return torch.einsum("nc,nh,nw->chw", s, rows, cols)


def localization_maps(classify: Callable[[Tensor], Tensor], image: Tensor, boxes: Tensor, tags: Tensor,
                      crop_size: Sequence[int], batch: int = 64, min_score: float = 0.0) -> Tensor:
    """The normalised localisation maps of one image's tags from its proposals (zero without proposals).

    image 3,H,W (normalised, as the classifier was trained) ; boxes N,4 ; tags C -> C,H,W in [0, 1]"""
    h, w = image.shape[-2:]
    if len(boxes) == 0:
        return image.new_zeros(len(tags), h, w, dtype=torch.float32)
    crops = crop_proposals(image, boxes.to(image.device), crop_size)
    votes = vote_maps(boxes, score_proposals(classify, crops, batch), (h, w), min_score)
    return normalize_cams(votes[None], tags[None].to(votes.device))[0]
