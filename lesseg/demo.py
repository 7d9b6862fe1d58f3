"""``lesseg demo``: the shapes dataset, a few trainings at different label budgets, a table and a figure.

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
    ] + [DemoRun(f"{m}_1-16", f"shapes/{m}.yaml", "1/16", [lab, unl]) for m in _semi_methods()]


def _semi_methods() -> list[str]:
    """Semi-supervised methods shown in the demo, when they are available in this installation."""
    from .methods import METHODS

    return [m for m in ("u2pl", "cps") if m in METHODS]


DEMO_ITERS = 150  # the four runs in ~7-8 minutes on 2 CPU cores (estimate from step times, docs/benchmarks.md)


def run_demo(out: Path, quick: bool = False, device: str = "auto", iters: int | None = None,
             overrides: list[str] = ()) -> list[dict]:
    """Train every demo run (skipping finished ones), print a table, write demo.png and results.json.

    ``iters`` steps per run (default: ``DEMO_ITERS``, 40 with ``quick``); the shapes configs' own 1,500
    steps are what docs/benchmarks.md reports.
    """
    out.mkdir(parents=True, exist_ok=True)
    iters = iters or (40 if quick else DEMO_ITERS)
    extra = [f"train.iters={iters}", "train.eval_every=0", "train.log_every=10", *overrides]
    rows = []
    for run in demo_runs():
        run_dir = out / f"iters{iters}" / run.name
        cfg = config.load(run.config, run.overrides + extra + [f"out={run_dir}", f"train.device={device}"])
        result = ckpt.finished_eval(run_dir)
        t0 = time.perf_counter()
        if result is None:
            print(f"== {run.name}: {run.config} with {run.labels} of the labels", flush=True)
            result = train(cfg)
        rows.append({"run": run.name, "method": cfg.method.name, "labels": run.labels, "miou": result["miou"],
                     "mode": result["mode"], "seconds": round(time.perf_counter() - t0, 1),
                     "checkpoint": str(run_dir / "last.pt")})
    _print_table(rows)
    print(f"\n{iters} steps per run: a CPU-sized budget. The label-efficiency gap at the configs' full budget "
          "(1,500 steps) is in docs/benchmarks.md; run it with `lesseg demo --iters 1500` or `lesseg bench semi`.")
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
