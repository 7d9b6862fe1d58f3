"""Active domain adaptation per label budget (``lesseg bench active``): shapes ``synthetic`` (labeled source)
-> ``real`` (unlabeled target, a share of its pixels labeled in rounds), evaluated on the real validation
split (``{family}/ripu.yaml``, methods.md section 8).

Variants, all with RIPU's recipe (source CE + target CE on labeled pixels + local consistency + negative
learning), differing only in what is labeled:

- ``source only``: no target label (PA with a budget of 0 pixels: the rounds pick nothing) — the lower
  bound;
- the paper's region baselines at the same budget: ``random``, ``entropy``, ``impurity`` (RA, 3x3 squares);
- ``RIPU RA`` at 2.2 % and 5 %, ``RIPU PA`` (40 pixels per 1280x640 image), ``RIPU superpixels``;
- ``full target``: every target pixel labeled at the first percent of the run (PA without suppression and
  an unbounded budget) — the upper bound "fully supervised target with the same recipe".

The simulated annotator answers from ``masks_full/`` (the real shapes' masks without the 255 outline border,
``{family}/ripu.yaml``); training on the source and evaluation keep the border.

Every run starts from torchvision's ImageNet MobileNetV2 fine-tuned at a tenth of the head's learning rate
(the paper starts from ImageNet too): from random initialisation the short CPU schedules leave the network
undertrained, and the labels barely matter (600 steps from scratch: RIPU RA 5 % 22.2, random 21.8, the fully
labeled target 21.5 mIoU, seed 0).

Each row: mIoU over seeds, the labeled share of target pixels actually spent, and the selection time per
image per round (scores + selection, on the training device).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import config
from .runs import finished_or_train
from .semi import FINETUNE, IMAGENET

# name -> overrides of {family}/ripu.yaml
VARIANTS: dict[str, list[str]] = {
    "source only": ["method.mode=pixel", "method.pixels=0"],
    "random RA 5%": ["method.score=random", "method.ratio=0.05"],
    "entropy RA 5%": ["method.score=entropy", "method.ratio=0.05"],
    "impurity RA 5%": ["method.score=impurity", "method.ratio=0.05"],
    "RIPU RA 2.2%": ["method.ratio=0.022"],
    "RIPU RA 5%": ["method.ratio=0.05"],
    "RIPU PA": ["method.mode=pixel"],
    "RIPU superpixels 5%": ["method.regions=superpixel", "method.ratio=0.05"],
    "full target": ["method.mode=pixel", "method.pixels=1e12", "method.pa_radius=0", "method.rounds=[0.01]"],
}
QUICK = ["train.iters=150", "train.eval_every=0", "train.log_every=25"]


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("%", "pct").replace(".", "_")


def bench_active(out: Path, variants: tuple[str, ...] = tuple(VARIANTS), seeds: tuple[int, ...] = (0, 1),
                 extra: list[str] = (), device: str = "auto", train_missing: bool = True,
                 family: str = "shapes") -> list[dict]:
    """Train (or reuse) every variant at every seed; one row per finished run."""
    rows = []
    for name in variants:
        for seed in seeds:
            run_dir = out / _slug(name) / f"seed{seed}"
            cfg = config.load(f"{family}/ripu.yaml", [*FINETUNE, *IMAGENET, *VARIANTS[name], *extra,
                                                      f"train.seed={seed}", f"out={run_dir}",
                                                      f"train.device={device}", "train.progress=false"])
            result = finished_or_train(cfg, run_dir, f"{name} seed {seed}", train_missing)
            if result is None:
                continue
            rounds = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                      if r.get("event") == "round"]
            rows.append({"variant": name, "seed": seed, "miou": result["miou"],
                         "labeled_share": rounds[-1].get("labeled_share", 0.0) if rounds else 0.0,
                         "labeled_pixels": rounds[-1].get("labeled_pixels", 0) if rounds else 0,
                         "select_s": statistics.mean(r["select_s_per_image"] for r in rounds) if rounds else None})
    return rows


def summarize_active(rows: list[dict]) -> list[dict]:
    """Mean and spread per variant; the share of the full-target mIoU; the gain over random at 5 %."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    mean = {k: statistics.mean(r["miou"] for r in v) for k, v in groups.items()}
    table = []
    for name, rs in groups.items():
        table.append({
            "variant": name, "seeds": len(rs), "miou": mean[name],
            "spread": statistics.pstdev([r["miou"] for r in rs]) if len(rs) > 1 else 0.0,
            "of_full": mean[name] / mean["full target"] if "full target" in mean else None,
            "labeled_share": statistics.mean(r["labeled_share"] for r in rs),
            "select_s": statistics.mean(r["select_s"] for r in rs if r["select_s"] is not None)
            if any(r["select_s"] is not None for r in rs) else None,
        })
    return table


def print_active_table(table: list[dict]) -> None:
    print(f"\n{'variant':<22s} {'seeds':>5s} {'mIoU':>7s} {'+-':>5s} {'of full':>8s} {'labeled':>8s} "
          f"{'select s/img/round':>19s}")
    for r in table:
        full = f"{100 * r['of_full']:7.1f}%" if r["of_full"] is not None else f"{'':>8s}"
        sel = f"{r['select_s']:19.4f}" if r["select_s"] is not None else f"{'':>19s}"
        print(f"{r['variant']:<22s} {r['seeds']:>5d} {100 * r['miou']:7.2f} {100 * r['spread']:5.2f} {full} "
              f"{100 * r['labeled_share']:7.2f}% {sel}")


def curve_points(rows: list[dict]) -> list[dict]:
    """mIoU against labeled target pixels, one series per selection kind (the budget dropped from the name),
    each point a variant's mean over seeds: what ``labels_curve`` draws."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    return [{"series": name.rsplit(" ", 1)[0] if name.endswith("%") else name,
             "pixels": round(statistics.mean(r["labeled_pixels"] for r in rs)),
             "miou": statistics.mean(r["miou"] for r in rs)} for name, rs in groups.items()]
