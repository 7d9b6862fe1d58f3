"""Diagnose a checkpoint on a dataset whose class 0 is background (shapes): does the network find the
objects, and does it name them right?

Prints, per checkpoint: mIoU, the class-agnostic foreground-vs-background IoU, the share of pixels
correctly called foreground that also get the right class (chance = 1 / number of foreground classes),
and the share of pixels predicted background against the masks' share (a drift to background shows here).
Then, per object (a connected region of one class in the mask, at least 10 pixels): the share of objects
whose pixels' most frequent object class (the argmax over the object classes) is the right one, and the
pixel accuracy inside those; and what a confidence threshold (``--thresh``, FixMatch's 0.95) would keep as
pseudo-labels: the accuracy of the kept pixels predicted as objects, and the share of object pixels kept.

    python scripts/fg_identity.py SPLIT CKPT [CKPT ...] [--thresh 0.95]
    # e.g. val runs/bench_semi/1-16/u2pl/seed0/last.pt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from lesseg.data import build_eval_dataset
from lesseg.data.loader import eval_loader
from lesseg.engine.evaluate import confusion_matrix, iou_from_confusion, predict_probs
from lesseg.engine.inference import load_checkpoint_net
from lesseg.models import class_map


def objects_named(mask: np.ndarray, object_class: np.ndarray, num_classes: int, min_px: int = 10) -> tuple:
    """Per connected object of each class 1.. in ``mask`` (H,W; 255 ignored), whether the most frequent of
    ``object_class`` (H,W, the argmax over the object classes) inside it is its class; -> (named, objects,
    list of the right-class pixel share inside the named ones)"""
    named, total, inside = 0, 0, []
    for cls in range(1, num_classes):
        regions, n = ndimage.label(mask == cls)
        for k in range(1, n + 1):
            region = regions == k
            if region.sum() < min_px:
                continue
            votes = np.bincount(object_class[region], minlength=num_classes)
            total += 1
            if votes.argmax() == cls:
                named += 1
                inside.append(votes[cls] / region.sum())
    return named, total, inside


@torch.no_grad()
def diagnose(path: str, split: str, thresh: float = 0.95) -> dict:
    net, cfg, info, _ = load_checkpoint_net(path)
    c = info.num_classes
    conf = torch.zeros(c, c, dtype=torch.long)
    named, objects, inside = 0, 0, []
    kept_obj = kept_obj_right = obj_px = obj_px_kept = 0
    net.eval()
    for b in eval_loader(build_eval_dataset(cfg.data, split=split, progress=False), 64, 0, 1, 0):
        probs = predict_probs(net, b["image"], cfg.eval, list(cfg.data.crop_size), c)
        y = b["mask"]
        conf += confusion_matrix(class_map(probs), y, c)
        object_class = (probs[:, 1:].argmax(1) + 1).numpy()
        for mask, oc in zip(y.numpy(), object_class):
            n, t, share = objects_named(mask, oc, c)
            named, objects, inside = named + n, objects + t, inside + share
        top, cls = probs.max(1)
        valid, obj = y != 255, (y != 255) & (y > 0)
        sure_obj = valid & (top >= thresh) & (cls > 0)
        kept_obj += int(sure_obj.sum())
        kept_obj_right += int((sure_obj & (cls == y)).sum())
        obj_px += int(obj.sum())
        obj_px_kept += int((obj & (top >= thresh)).sum())
    m = conf.double()
    fg_hit = m[1:, 1:].sum()  # foreground called foreground, any class (symmetric in the matrix's axes)
    fg_iou = fg_hit / (fg_hit + m[0, 1:].sum() + m[1:, 0].sum())
    return {"miou": iou_from_confusion(conf, None)["miou"], "fg_iou": float(fg_iou),
            "right_class": float(m[1:, 1:].diag().sum() / fg_hit), "chance": 1 / (c - 1),
            "bg_pred": float(m[:, 0].sum() / m.sum()), "bg_true": float(m[0].sum() / m.sum()),
            "objects": objects, "named": named / max(objects, 1), "inside": float(np.mean(inside)) if inside else 0.0,
            "sure_obj_acc": kept_obj_right / max(kept_obj, 1), "obj_kept": obj_px_kept / max(obj_px, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--thresh", type=float, default=0.95, help="pseudo-label confidence threshold")
    args = parser.parse_args()
    print(f"{'checkpoint':<60s} {'mIoU':>6s} {'fg IoU':>7s} {'right class':>12s} {'bg pred/true':>13s} "
          f"{'named':>6s} {'inside':>7s} {'sure-obj acc':>13s} {'obj kept':>9s}")
    for p in args.checkpoints:
        r = diagnose(p, args.split, args.thresh)
        print(f"{p:<60s} {100 * r['miou']:6.2f} {100 * r['fg_iou']:7.1f} {100 * r['right_class']:11.1f}% "
              f"{r['bg_pred']:6.3f}/{r['bg_true']:.3f} {100 * r['named']:5.1f}% {100 * r['inside']:6.1f}% "
              f"{100 * r['sure_obj_acc']:12.1f}% {100 * r['obj_kept']:8.1f}%  "
              f"({r['objects']} objects; chance {100 * r['chance']:.1f}%)")
