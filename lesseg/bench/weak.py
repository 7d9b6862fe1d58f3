"""Weak supervision from image tags (``lesseg bench weak``): every weakly supervised pipeline of the embedded
dataset (``{family}/weak_<method>.yaml``: CAM, adversarial erasing, AE-PSL, PSL+, STC, proposal MIL) against
the fully supervised network trained on the same images with their masks, with the same start and schedule.

Each pipeline's stages report their products' quality (``stages.json``): the classifier's tag mAP, each
pseudo-mask dataset's mIoU against the true masks (which nothing trains on), the final network's val mIoU.
The table shows where each stage gains and the final mIoU as a share of the fully supervised one.

Every run starts from torchvision's ImageNet MobileNetV2 fine-tuned at a tenth of the head's learning rate
(the papers start from ImageNet classifiers; from random initialisation a CPU schedule leaves the classifier
too weak for its CAMs to mean anything).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import config
from ..errors import LessegError
from .runs import finished_or_train, read_numbers
from .semi import FINETUNE, IMAGENET

WEAK_METHODS = ("cam", "ae", "psl", "psl_plus", "stc", "mil")
# every stage of every pipeline (a run's train.* reaches its stages unless a config sets a stage's own)
QUICK = ["train.iters=60", "train.eval_every=0", "train.log_every=20"]


def bench_weak(out: Path, methods: tuple[str, ...] = WEAK_METHODS, seeds: tuple[int, ...] = (0, 1),
               extra: list[str] = (), device: str = "auto", train_missing: bool = True,
               family: str = "shapes", start: str = "imagenet") -> list[dict]:
    """Train (or reuse) every pipeline and the fully supervised reference at every seed; one row per
    finished run: its stages' metrics, the final mIoU and the wall time."""
    begin = [*FINETUNE, *IMAGENET] if start == "imagenet" else []
    missing = [m for m in methods if not (config.PACKAGED / family / f"weak_{m}.yaml").is_file()]
    if missing:
        known = sorted(p.stem[5:] for p in (config.PACKAGED / family).glob("weak_*.yaml"))
        raise LessegError(f"no {family}/weak_<method>.yaml for {missing}; {family} has {', '.join(known)}")
    # the reference trains as the pipelines' final networks do: without the segmentation configs' copy-paste
    plan = [("full", f"{family}/supervised.yaml", s, ["data.aug.copy_paste=0"]) for s in seeds]
    plan += [(m, f"{family}/weak_{m}.yaml", s, []) for m in methods for s in seeds]
    rows = []
    for name, cfg_name, seed, own in plan:
        run_dir = out / name / f"seed{seed}"
        cfg = config.load(cfg_name, [*begin, *own, *extra, f"train.seed={seed}", f"out={run_dir}",
                                     f"train.device={device}", "train.progress=false"])
        result = finished_or_train(cfg, run_dir, f"{name} seed {seed}", train_missing)
        if result is None:
            continue
        stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").is_file() else []
        rows.append({"method": name, "seed": seed, "miou": result["miou"],
                     "stages": [{"stage": s["stage"], "kind": s["kind"], "metrics": s.get("metrics") or {}}
                                for s in stages],
                     "wall_s": (read_numbers(run_dir / "wall_s.txt")[:1] or [None])[0]})
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def summarize_weak(rows: list[dict]) -> list[dict]:
    """Per method, means over seeds: classifier mAP (the first stage reporting ``map``), each pseudo-mask
    stage's mIoU (``pseudo_miou``, in pipeline order, with its stage name), the final mIoU and its share of
    the fully supervised one, the CAM extraction speed where a stage reports ``images_per_s``."""
    full = _mean([r["miou"] for r in rows if r["method"] == "full"])
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        names = list(dict.fromkeys(s["stage"] for r in runs for s in r["stages"]))

        def stage_mean(stage: str, key: str, runs: list[dict] = runs) -> float | None:
            return _mean([s["metrics"][key] for r in runs for s in r["stages"]
                          if s["stage"] == stage and key in s["metrics"]])

        cls_map = next((v for v in (stage_mean(n, "map") for n in names) if v is not None), None)
        pseudo = [(n, v) for n in names if (v := stage_mean(n, "pseudo_miou")) is not None]
        # PSL+'s refinement scores its masks before the CRF too: shown next to the refined ones
        pseudo = [(f"{n} (before CRF {100 * raw:.1f})" if (raw := stage_mean(n, "raw_miou")) is not None
                   and stage_mean(n, "crf_miou") is not None else n, v) for n, v in pseudo]
        speed = next((v for v in (stage_mean(n, "images_per_s") for n in names) if v is not None), None)
        miou = _mean([r["miou"] for r in runs])
        table.append({"method": method, "seeds": len(runs), "classifier_map": cls_map, "pseudo_miou": pseudo,
                      "miou": miou, "of_full": miou / full if full and method != "full" else None,
                      "cam_images_per_s": speed, "wall_s": _mean([r["wall_s"] for r in runs if r["wall_s"]])})
    return table


def print_weak_table(table: list[dict]) -> None:
    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}" if v is not None else "-"

    print(f"\n{'method':<10s} {'seeds':>5s} {'cls mAP':>8s} {'final mIoU':>10s} {'of full':>8s} {'wall s':>7s}  "
          "pseudo-mask mIoU per stage")
    for r in table:
        stages = ", ".join(f"{n} {pct(v)}" for n, v in r["pseudo_miou"]) or "-"
        if r["cam_images_per_s"]:
            stages += f"  (CAMs {r['cam_images_per_s']:.0f} img/s)"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "-"
        print(f"{r['method']:<10s} {r['seeds']:>5d} {pct(r['classifier_map']):>8s} {pct(r['miou']):>10s} "
              f"{pct(r['of_full']):>8s} {wall:>7s}  {stages}")
