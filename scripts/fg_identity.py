"""Diagnose a checkpoint on a dataset whose class 0 is background (shapes): does the network find the
objects, and does it name them right?

Prints, per checkpoint: mIoU, the class-agnostic foreground-vs-background IoU, the share of pixels
correctly called foreground that also get the right class (chance = 1 / number of foreground classes),
and the share of pixels predicted background against the masks' share (a drift to background shows here).

    python scripts/fg_identity.py SPLIT CKPT [CKPT ...]     # e.g. val runs/bench_semi/1-16/u2pl/seed0/last.pt
"""

from __future__ import annotations

import sys

import torch

from lesseg.data import build_eval_dataset
from lesseg.data.loader import eval_loader
from lesseg.engine.evaluate import confusion_matrix, iou_from_confusion, predict_probs
from lesseg.engine.inference import load_checkpoint_net
from lesseg.models import class_map


@torch.no_grad()
def diagnose(path: str, split: str) -> dict:
    net, cfg, info, _ = load_checkpoint_net(path)
    c = info.num_classes
    conf = torch.zeros(c, c, dtype=torch.long)
    net.eval()
    for b in eval_loader(build_eval_dataset(cfg.data, split=split, progress=False), 64, 0, 1, 0):
        probs = predict_probs(net, b["image"], cfg.eval, list(cfg.data.crop_size), c)
        conf += confusion_matrix(class_map(probs), b["mask"], c)
    m = conf.double()
    fg_hit = m[1:, 1:].sum()  # foreground called foreground, any class (symmetric in the matrix's axes)
    fg_iou = fg_hit / (fg_hit + m[0, 1:].sum() + m[1:, 0].sum())
    return {"miou": iou_from_confusion(conf, None)["miou"], "fg_iou": float(fg_iou),
            "right_class": float(m[1:, 1:].diag().sum() / fg_hit), "chance": 1 / (c - 1),
            "bg_pred": float(m[:, 0].sum() / m.sum()), "bg_true": float(m[0].sum() / m.sum())}


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(f"{'checkpoint':<60s} {'mIoU':>6s} {'fg IoU':>7s} {'right class':>12s} {'bg pred/true':>13s}")
    for p in sys.argv[2:]:
        r = diagnose(p, sys.argv[1])
        print(f"{p:<60s} {100 * r['miou']:6.2f} {100 * r['fg_iou']:7.1f} {100 * r['right_class']:11.1f}% "
              f"{r['bg_pred']:6.3f}/{r['bg_true']:.3f}  (chance {100 * r['chance']:.1f}%)")
