"""Metrics shared by the engine (evaluation) and the methods (pseudo-label diagnostics, stage products):
the bottom layer, importing nothing of lesseg but the ignore label (defined, torch-free, with the data contract).

Segmentation: a C x C confusion matrix over a whole set (never per-image IoUs), IoU and mIoU from it.
Multi-label classification: average precision per class and its mean (mAP), for classifier stages.
"""

from __future__ import annotations

import torch

from .data.base import IGNORE


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C matrix, rows = ground truth, columns = prediction; pixels labeled 255 are skipped.

    Fixed shapes (skipped pixels go to a spare bin), so it never waits for the device: usable inside a
    training step (pseudo-label diagnostics) as well as in evaluation.
    """
    c2 = num_classes * num_classes
    valid = target != IGNORE
    idx = torch.where(valid, target.long() * num_classes + pred.long(), c2).flatten()
    counts = torch.zeros(c2 + 1, dtype=torch.long, device=idx.device).index_add_(0, idx, valid.flatten().long())
    return counts[:c2].reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Per-class IoU = TP/(TP+FP+FN); mIoU over classes present in ground truth or prediction."""
    conf = conf.double()
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = tp / denom.clamp_min(1)
    present = denom > 0
    names = class_names or [str(i) for i in range(conf.shape[0])]
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "acc": float(tp.sum() / conf.sum().clamp_min(1)),
        "iou": {n: (float(v) if p else None) for n, v, p in zip(names, iou, present)},
    }


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each class (column): the mean, over its positives, of the precision at each
    positive's rank when the images are sorted by decreasing score (equal scores keep the given order).
    N,C float ; N,C {0,1} -> C float (NaN for a class with no positive)."""
    order = scores.float().argsort(dim=0, descending=True, stable=True)  # N,C
    hits = targets.float().gather(0, order)  # N,C: 1 where the k-th ranked image is a positive
    precision = hits.cumsum(0) / torch.arange(1, hits.shape[0] + 1, device=hits.device).unsqueeze(1)
    positives = hits.sum(0)
    return (precision * hits).sum(0) / positives.where(positives > 0, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mAP over the classes that have a positive, and the AP of each (None where it has none)."""
    ap = average_precision(scores, targets)
    present = ~ap.isnan()
    names = class_names or [str(i) for i in range(ap.shape[0])]
    return {"map": float(ap[present].mean()) if present.any() else 0.0,
            "ap": {n: (float(v) if p else None) for n, v, p in zip(names, ap, present)}}
