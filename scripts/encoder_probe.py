"""Frozen-encoder probe: how well do an encoder's features name the class under each object pixel?

For a dataset whose class 0 is background (shapes, fashion), every level of the frozen encoder is upsampled
to the image size and concatenated, one linear layer is trained (Adam, ``--steps`` batches of 8,192 pixels)
on the object pixels of the first ``--train-images`` images of ``train`` to name their class, and it is
scored on the object pixels of ``val`` (chance: 1 / number of object classes). Background pixels are left
out: on shapes, SupOnly at 1/16 finds the objects but names them barely above chance, and this measures how
much of the naming an encoder brings before any fine-tuning (docs/benchmarks.md, "lesseg bench pretrain").

    python scripts/encoder_probe.py CONFIG START [START ...]
    # e.g. lesseg/configs/shapes/supervised.yaml random runs/bench_pretrain/ssl/encoder.pt runs/x/last.pt

A START is ``random`` or anything ``model.pretrained`` takes (an ``encoder.pt``, a run's ``last.pt``,
``imagenet``); CONFIG gives the dataset (``data.*``) and the encoder (``model.*``); ``key=value`` overrides
follow ``--set``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lesseg import config
from lesseg.data import stream_source
from lesseg.models import build_model


def pixels(encoder, source, samples, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and classes - 1 (N,) of the object pixels of ``samples``."""
    feats, labels = [], []
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            chunk = samples[i:i + 64]
            x = np.stack([source.read_image(s.image) for s in chunk]).astype(np.float32) / 255.0
            x = torch.from_numpy((x - mean) / std).permute(0, 3, 1, 2)
            y = torch.from_numpy(np.stack([source.read_mask(s.mask) for s in chunk]).astype(np.int64))
            levels = encoder(x)
            f = torch.cat([F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)
                           for t in levels], 1)
            keep = (y > 0) & (y < 255)
            feats.append(f.permute(0, 2, 3, 1)[keep])
            labels.append(y[keep] - 1)
    return torch.cat(feats), torch.cat(labels)


def probe(cfg, start: str, train_images: int, steps: int) -> tuple[float, float]:
    """(val accuracy, train accuracy) of the linear probe on the encoder ``start``."""
    torch.manual_seed(0)
    overrides = [] if start == "random" else [f"model.pretrained={start}"]
    cfg = config.from_dict(OmegaConf.to_container(cfg), overrides)
    source = stream_source(cfg.data)
    encoder = build_model(cfg.model, source.num_classes).encoder.eval()
    mean, std = np.array(cfg.data.mean, np.float32), np.array(cfg.data.std, np.float32)
    f_tr, y_tr = pixels(encoder, source, source.samples("train")[:train_images], mean, std)
    f_va, y_va = pixels(encoder, source, source.samples(cfg.data.val_split), mean, std)
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_va = (f_tr - mu) / sd, (f_va - mu) / sd
    linear = torch.nn.Linear(f_tr.shape[1], source.num_classes - 1)
    opt = torch.optim.Adam(linear.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(f_tr), (8192,))
        loss = F.cross_entropy(linear(f_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda f, y: (linear(f).argmax(1) == y).float().mean().item()
        return acc(f_va, y_va), acc(f_tr[:200_000], y_tr[:200_000])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("starts", nargs="+")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of CONFIG")
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    cfg = config.load(args.config, args.set)
    for start in args.starts:
        val, train = probe(cfg, start, args.train_images, args.steps)
        print(f"{start}: object pixels named right, val {val:.3f} (train {train:.3f}; chance "
              f"{1 / (stream_source(cfg.data).num_classes - 1):.3f})", flush=True)


if __name__ == "__main__":
    main()
