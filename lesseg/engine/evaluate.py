"""Evaluation: a C x C confusion matrix over the whole set (never per-image IoUs), reduced across processes.

Inference modes (methods.md section 0): ``whole`` (optionally resized to a fixed size, logits resized back),
``slide`` (windows with the last one aligned to the border, logits averaged by a per-pixel window count;
windows are clipped to the image, so it equals ``whole`` when the window covers the image) and ``center``
(a centre crop of image and mask). Multi-scale and flip average softmax outputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import dist
from ..errors import LessegError
from ..metrics import confusion_matrix, iou_from_confusion, mean_average_precision
from ..models import class_map, eval_mode
from ..registry import Registry

__all__ = ["EVALUATORS", "confusion_matrix", "eval_mode", "evaluate", "evaluate_tags", "iou_from_confusion",
           "predict_probs", "windows"]


def windows(size: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``size``; the last window is aligned to the border."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def slide_logits(net, image: torch.Tensor, crop: list[int], stride: list[int], num_classes: int) -> torch.Tensor:
    """Logits of overlapping windows averaged per pixel by the number of windows covering it. B,C,H,W"""
    b, _, h, w = image.shape
    out = image.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    ch, cw = min(crop[0], h), min(crop[1], w)
    for y in windows(h, ch, stride[0]):
        for x in windows(w, cw, stride[1]):
            out[:, :, y : y + ch, x : x + cw] += net(image[:, :, y : y + ch, x : x + cw])["logits"].float()
            count[:, :, y : y + ch, x : x + cw] += 1
    return out / count


def _logits(net, image: torch.Tensor, cfg, crop: list[int], num_classes: int) -> torch.Tensor:
    if cfg.mode == "slide":
        stride = list(cfg.stride) if cfg.stride else [max(1, c * 2 // 3) for c in crop]
        return slide_logits(net, image, crop, stride, num_classes)
    if cfg.resize:
        h, w = image.shape[-2:]
        small = F.interpolate(image, size=list(cfg.resize), mode="bilinear", align_corners=False)
        return F.interpolate(net(small)["logits"].float(), size=(h, w), mode="bilinear", align_corners=False)
    return net(image)["logits"].float()


@torch.no_grad()
def predict_probs(net, image: torch.Tensor, cfg, crop: list[int], num_classes: int) -> torch.Tensor:
    """Class probabilities at the image's resolution, averaged over scales and flips. B,C,H,W"""
    h, w = image.shape[-2:]
    total = None
    for s in cfg.scales:
        x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if cfg.flip else [x]
        for k, v in enumerate(views):
            p = _logits(net, v, cfg, crop, num_classes).softmax(1)
            if k == 1:
                p = p.flip(-1)
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
    return total / (len(cfg.scales) * (2 if cfg.flip else 1))


def center_crop(t: torch.Tensor, crop: list[int]) -> torch.Tensor:
    h, w = t.shape[-2:]
    ch, cw = min(crop[0], h), min(crop[1], w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return t[..., y : y + ch, x : x + cw]


@torch.no_grad()
def evaluate(net, loader, num_classes: int, cfg, crop: list[int], device: torch.device,
             class_names: list[str] | None = None, amp_dtype: torch.dtype | None = None,
             progress: bool = True) -> dict:
    """mIoU and per-class IoU of ``net`` over ``loader`` (each process its shard; the matrix is all-reduced)."""
    crop = list(cfg.crop_size) if cfg.crop_size else list(crop)
    with eval_mode(net):
        conf = _confusion(net, loader, num_classes, cfg, crop, device, amp_dtype, progress)
    result = iou_from_confusion(conf.cpu(), class_names)
    result["mode"] = describe_mode(cfg, crop)
    return result


def _confusion(net, loader, num_classes: int, cfg, crop: list[int], device: torch.device,
               amp_dtype: torch.dtype | None, progress: bool) -> torch.Tensor:
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        if cfg.mode == "center":
            image, mask = center_crop(image, crop), center_crop(mask, crop)
        with autocast:
            probs = predict_probs(net, image, cfg, crop, num_classes)
        conf += confusion_matrix(class_map(probs), mask, num_classes)
    return dist.all_reduce_sum(conf)


def describe_mode(cfg, crop: list[int]) -> str:
    """A one-line description of the evaluation protocol, stored with every reported number."""
    parts = [cfg.mode]
    if cfg.mode in ("slide", "center"):
        parts.append(f"crop={list(cfg.crop_size or crop)}")
    if cfg.mode == "slide":
        parts.append(f"stride={list(cfg.stride) if cfg.stride else 'auto(2/3)'}")
    if cfg.mode == "whole" and cfg.resize:
        parts.append(f"resize={list(cfg.resize)}")
    if list(cfg.scales) != [1.0]:
        parts.append(f"scales={list(cfg.scales)}")
    if cfg.flip:
        parts.append("flip")
    return " ".join(parts)


@torch.no_grad()
def evaluate_tags(net, loader, num_classes: int, cfg, crop: list[int], device: torch.device,
                  class_names: list[str] | None = None, amp_dtype: torch.dtype | None = None,
                  progress: bool = True) -> dict:
    """Multi-label classification of the image tags (a classifier stage): mAP over the classes that occur,
    from the sigmoid of the network's ``cls`` output on whole images (each process its shard, gathered)."""
    scores, tags = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with eval_mode(net):
        for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
            if "tags" not in batch:
                raise LessegError("the classification evaluation needs image tags (image_labels.csv, or tags "
                                  "derived from masks) for every validation image")
            with autocast:
                scores.append(net(batch["image"].to(device))["cls"].float().sigmoid())
            tags.append(batch["tags"].to(device))
    s = torch.cat(scores) if scores else torch.zeros(0, num_classes, device=device)
    t = torch.cat(tags) if tags else torch.zeros(0, num_classes, device=device)
    s, t = _gather_rows(s), _gather_rows(t)
    return {**mean_average_precision(s.cpu(), t.cpu(), class_names), "mode": "whole, sigmoid of cls"}


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of every process (shards may differ by one row: padded, then cut)."""
    if not dist.is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = dist.all_gather_cat(n)
    padded = torch.cat([t, t.new_zeros(int(sizes.max()) - t.shape[0], *t.shape[1:])])
    every = dist.all_gather_cat(padded.unsqueeze(0))  # world, max, ...
    return torch.cat([every[r, : int(k)] for r, k in enumerate(sizes)])


EVALUATORS: Registry = Registry("evaluation")
"""``name -> (function, metrics it returns, the one that picks best.pt by default)``; a method names its
evaluation (``Method.evaluation``), ``eval.metric`` may pick another of its metrics."""
EVALUATORS.register("segmentation")((evaluate, ("miou", "acc"), "miou"))
EVALUATORS.register("tags")((evaluate_tags, ("map",), "map"))
