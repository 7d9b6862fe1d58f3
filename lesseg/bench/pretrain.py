"""Starting weights for the benches: the encoder the semi-supervised bench's runs start from (a supervised run
on the synthetic shapes domain, as the papers' runs start from ImageNet: ``lesseg bench semi --pretrain``),
and ``lesseg bench pretrain``: the methods at 1/16 from random init, from ``lesseg pretrain`` on the
unlabeled images, and from the synthetic encoder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .. import config
from ..errors import LessegError
from .runs import finished_or_train, read_numbers


def pretrain_synthetic(out: Path, extra: list[str] = (), device: str = "auto", train_missing: bool = True,
                       family: str = "shapes") -> Path:
    """Train (or reuse) ``{family}/pretrain_synthetic.yaml`` in ``out/pretrain``; returns its checkpoint,
    whose evaluated network's encoder ``model.pretrained`` loads. ``extra`` overrides apply (model.* must
    match the runs that start from it) except ``data.*`` ones: the pretraining keeps its own dataset and root."""
    run_dir = out / "pretrain"
    own = [o for o in extra if not o.split("=", 1)[0].strip().startswith("data.")]
    cfg = config.load(f"{family}/pretrain_synthetic.yaml", own + [
        f"out={run_dir}", f"train.device={device}", "train.progress=false"])
    result = finished_or_train(cfg, run_dir, "supervised pretraining on synthetic shapes", train_missing)
    if result is None:
        raise LessegError(f"no finished pretraining in {run_dir}: the runs to summarize start from it")
    print(f"pretrained encoder: {run_dir / 'last.pt'} (synthetic val mIoU {100 * result['miou']:.2f})", flush=True)
    return run_dir / "last.pt"


def ssl_encoder(out: Path, iters: int = 3000, extra: list[str] = (), device: str = "auto",
                train_missing: bool = True, family: str = "shapes") -> tuple[Path, float | None]:
    """``lesseg pretrain`` (DenseCL-style, the default method) on the train split's images, labels unused, in
    ``out/ssl``; reused when its ``pretrain.json`` says it finished ``iters`` steps with the same settings.
    Returns the encoder file and the pretraining's wall time in seconds (None when reused)."""
    import json
    import time

    from .. import pretrain as ssl

    run_dir = out / "ssl"
    own = [o for o in extra if o.split("=", 1)[0].strip().startswith(("model.", "pretrain."))]
    cfg = ssl.load(f"{family}/supervised.yaml", [f"pretrain.iters={iters}", "pretrain.split=train", *own,
                                                 f"out={run_dir}", f"train.device={device}", "train.progress=false"])
    done = run_dir / "pretrain.json"
    if done.is_file() and json.loads(done.read_text()).get("steps") == iters:
        _same_pretraining(cfg, run_dir)
        seconds = read_numbers(run_dir / "wall_s.txt")[:1] or [None]
        return run_dir / "encoder.pt", seconds[0]
    if not train_missing:
        raise LessegError(f"no finished self-supervised pretraining in {run_dir}: the runs to summarize start from it")
    print(f"== lesseg pretrain ({cfg.pretrain.method}, {iters} steps) on the {family} train images", flush=True)
    t0 = time.perf_counter()
    summary = ssl.pretrain(cfg, resume=(run_dir / "last.pt").is_file())
    seconds = time.perf_counter() - t0
    (run_dir / "wall_s.txt").write_text(f"{seconds:.1f}\n")
    return Path(summary["encoder"]), seconds


def _same_pretraining(cfg, run_dir: Path) -> None:
    """Refuse to reuse a finished pretraining made with other settings (its ``config.yaml``: the ``pretrain``
    section but its logging, and what the encoder and the images are)."""
    stored = OmegaConf.load(run_dir / "config.yaml")
    keys = [f"pretrain.{k}" for k in cfg.pretrain if k not in ("log_every", "ckpt_every")]
    keys += ["model.encoder", "model.output_stride", "model.pretrained", "data.dataset", "data.root", "data.options"]
    differ = [(k, OmegaConf.select(stored, k), OmegaConf.select(cfg, k)) for k in keys
              if OmegaConf.select(stored, k) != OmegaConf.select(cfg, k)]
    if differ:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ[:4])
        raise LessegError(f"{run_dir} holds a pretraining with other settings ({shown}); delete it to rerun, "
                          "or pass --out for a new bench folder")


STARTS = ("scratch", "ssl", "synthetic")


def bench_pretrain(out: Path, starts: tuple[str, ...] = STARTS, methods: tuple[str, ...] = ("supervised", "u2pl",
                   "mean_teacher"), seeds: tuple[int, ...] = (0, 1), extra: list[str] = (), ssl_iters: int = 3000,
                   device: str = "auto", train_missing: bool = True, family: str = "shapes") -> list[dict]:
    """The same methods at 1/16 from each start: random init, ``lesseg pretrain`` on the unlabeled images,
    the supervised synthetic-shapes encoder. One row per run, with its start and the start's cost."""
    from .semi import bench_semi

    rows = []
    for start in starts:
        cost, pretrain = None, start == "synthetic"
        if start == "ssl":
            encoder, cost = ssl_encoder(out, ssl_iters, extra, device, train_missing, family)
            pretrain = str(encoder)
        train_extra = [o for o in extra if not o.split("=", 1)[0].strip().startswith("pretrain.")]  # ssl's own
        runs = bench_semi(out / start, methods, ("1-16",), seeds, train_extra, device, pretrain=pretrain,
                          train_missing=train_missing, family=family, reference=False)
        if start == "synthetic":  # its supervised pretraining (bench semi's) recorded its wall time
            cost = (read_numbers(out / start / "pretrain" / "wall_s.txt")[:1] or [None])[0]
        rows += [{**row, "start_kind": start, "start_cost_s": cost} for row in runs]
    return rows


def print_pretrain_table(rows: list[dict]) -> None:
    """mIoU per start (rows) and method (columns), mean over seeds, and the start's cost."""
    import statistics

    starts = list(dict.fromkeys(r["start_kind"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\n{'start':<10s} " + " ".join(f"{m:>13s}" for m in methods) + f" {'start cost':>11s}")
    for s in starts:
        cells = []
        for m in methods:
            vals = [r["miou"] for r in rows if r["start_kind"] == s and r["method"] == m and r["budget"] == "1-16"]
            cells.append(f"{100 * statistics.mean(vals):13.2f}" if vals else f"{'':>13s}")
        cost = next((r["start_cost_s"] for r in rows if r["start_kind"] == s), None)
        print(f"{s:<10s} " + " ".join(cells) + (f" {cost:10.0f}s" if cost else f" {'-':>11s}"))
