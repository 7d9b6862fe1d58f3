"""Score the masks an erasing run's regions give under several mask rules and dense-CRF settings, offline, against
the true masks (docs/benchmarks.md, "The erasing masks by the dense CRF").

    .venv/bin/python scripts/erasing_masks_crf.py RUN_DIR [--data data/bench/shapes] [--step erase1]

RUN_DIR is an ``ae``/``psl`` run folder (its ``<step>/regions/*.npz`` and ``image_labels.csv``); the images and
true masks are read from the folder dataset ``--data``. Prints one line per rule: mIoU on the labelled pixels,
foreground precision and recall, the labelled share."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesseg.data.saliency import saliency_map
from lesseg.methods.weak.cam import foreground_counts, foreground_quality
from lesseg.methods.weak.crf import CrfParams, dense_crf
from lesseg.methods.weak.erasing import crf_object_masks, load_regions, object_masks, region_unary
from lesseg.metrics import confusion_matrix, iou_from_confusion

KERNELS = {"deeplab 121/5/4": (121.0, 5.0, 4.0), "affinitynet 80/13/10": (80.0, 13.0, 10.0),
           "30/13/4": (30.0, 13.0, 4.0), "15/13/4": (15.0, 13.0, 4.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, default=Path("data/bench/shapes"))
    ap.add_argument("--step", default="erase1")
    ap.add_argument("--saliency-threshold", type=float, default=0.2)
    args = ap.parse_args()
    folder = args.run / args.step
    n = len((args.data / "classes.txt").read_text().split())
    tags = dict(line.split(",", 1) for line in (folder / "image_labels.csv").read_text().splitlines())
    scores: dict[str, list] = {}

    def add(name: str, mask: torch.Tensor, true: torch.Tensor) -> None:
        c, conf = scores.setdefault(name, [torch.zeros(5, dtype=torch.long), torch.zeros(n, n, dtype=torch.long)])
        c += foreground_counts(mask[None], true[None])
        conf += confusion_matrix(mask[None], true[None].masked_fill(mask[None] == 255, 255), n)

    for stem in (folder / "splits" / "train.txt").read_text().split():
        rgb = np.array(Image.open(args.data / "images" / f"{stem}.png").convert("RGB"))
        true = torch.from_numpy(np.array(Image.open(args.data / "masks" / f"{stem}.png")).astype(np.int64))
        regions = load_regions(folder / "regions" / f"{stem}.npz", n, true.shape)
        t = torch.zeros(n)
        t[[0, *(int(c) for c in tags[stem].split(";") if c)]] = 1.0
        low = torch.from_numpy(saliency_map(rgb, "spectral_residual") / 255.0 < args.saliency_threshold)
        add("regions + saliency, conflicts 255", object_masks(regions[None], t[None], low[None])[0], true)
        add("regions alone, background elsewhere", object_masks(regions[None], t[None])[0], true)
        for name, (xy, rgb_w, w) in KERNELS.items():
            for prob in (0.6, 0.7):
                params = CrfParams(bi_xy=xy, bi_rgb=rgb_w, bi_w=w)
                add(f"crf {name}, prob {prob}", crf_object_masks(rgb, regions, t, prob, params), true)
        params = CrfParams(bi_xy=80.0, bi_rgb=13.0, bi_w=10.0)
        add("crf affinitynet, prob 0.7, saliency in the unary", crf_object_masks(rgb, regions, t, 0.7, params, low),
            true)
        classes = sorted(torch.nonzero(t > 0)[:, 0].tolist())
        if len(classes) > 1:  # the CRF's marginals: 255 where the best is below 0.95
            q = dense_crf(rgb, region_unary(regions, classes, 0.7), params)
            band = torch.tensor(classes)[torch.from_numpy(q.argmax(0))].masked_fill(torch.from_numpy(q.max(0) < 0.95), 255)
        else:
            band = torch.zeros_like(true)
        add("crf affinitynet, prob 0.7, 255 below 0.95", band.to(torch.uint8), true)
    for name, (counts, conf) in scores.items():
        q = foreground_quality(counts)
        print(f"{name:52s} mIoU {100 * iou_from_confusion(conf)['miou']:5.1f}  fg precision "
              f"{100 * q['fg_precision']:5.1f} %  recall {100 * q['fg_recall']:5.1f} %  labelled {100 * q['labelled']:5.1f} %")


if __name__ == "__main__":
    main()
