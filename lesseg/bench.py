"""Benchmarks that print tables: training throughput and peak memory (``lesseg bench speed``).

Figures go into docs/benchmarks.md together with the command that produced them; they are not unit tests.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from .engine.trainer import Trainer, to_device
from .errors import LessegError


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _steady_trainer(cfg: DictConfig, n_batches: int = 1) -> tuple[Trainer, list[dict]]:
    """A Trainer in train mode placed mid-schedule (past supervised warm-ups and ramp-ups, so a method's
    full step is measured) and ``n_batches`` batches already on its device."""
    trainer = Trainer(cfg)
    loaders = trainer.train_loaders()
    batches = [{k: to_device(next(it), trainer.device) for k, it in loaders.items()} for _ in range(n_batches)]
    trainer.method.train()
    trainer.step = trainer.max_iters // 2
    return trainer, batches


def bench_speed(cfg: DictConfig, iters: int = 20, warmup: int = 3) -> dict:
    """Time ``iters`` optimizer steps (after ``warmup``) with data already in memory.

    Returns steps/s, images/s (all streams' images of a step, summed over processes) and peak memory:
    CUDA allocator peak on GPU, peak resident set size of the process on CPU.
    """
    trainer, batches = _steady_trainer(cfg, 2)
    images = sum(b["image"].shape[0] for b in batches[0].values()) * trainer.world
    cuda = trainer.device.type == "cuda"
    for i in range(warmup):
        trainer.train_step(batches[i % 2])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    for i in range(iters):
        trainer.train_step(batches[i % 2])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda allocated"
    else:
        peak, kind = _peak_rss_mib(), "process RSS" if rss_reset else "process RSS (since start)"
    return {
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "head": cfg.model.head,
        "crop": list(cfg.data.crop_size),
        "batch": {k: s.batch_size for k, s in trainer.streams.items()},
        "device": torch.cuda.get_device_name(trainer.device) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": str(trainer.amp).replace("torch.", "") if trainer.amp else "fp32",
        "step_s": dt / iters,
        "images_per_s": images * iters / dt,
        "peak_mib": peak,
        "peak_kind": kind,
    }


def profile_steps(cfg: DictConfig, iters: int = 5, warmup: int = 3, rows: int = 25) -> str:
    """torch.profiler table (self time per op, largest first) of ``iters`` training steps on one batch."""
    from torch.profiler import ProfilerActivity, profile

    trainer, (batch,) = _steady_trainer(cfg)
    for _ in range(warmup):
        trainer.train_step(batch)
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def print_speed_table(rows: list[dict]) -> None:
    print(f"\n{'method':<12s} {'encoder':<12s} {'head':<14s} {'crop':>9s} {'batch':<22s} {'amp':<6s} "
          f"{'s/step':>7s} {'img/s':>7s} {'peak MiB':>9s}")
    for r in rows:
        crop = "x".join(map(str, r["crop"]))
        batch = "+".join(f"{v}" for v in r["batch"].values())
        print(f"{r['method']:<12s} {r['encoder']:<12s} {r['head']:<14s} {crop:>9s} {batch:<22s} {r['amp']:<6s} "
              f"{r['step_s']:7.3f} {r['images_per_s']:7.1f} {r['peak_mib'] or float('nan'):9.0f}")
    if rows:
        print(f"device: {rows[0]['device']}, torch threads: {rows[0]['threads']}, peak = {rows[0]['peak_kind']}")


# -- accuracy per label budget -------------------------------------------------------------------------------
SEMI_METHODS = ("supervised", "mean_teacher", "cutmix_seg", "self_training", "cps", "u2pl")
# Fine-tuning a pretrained encoder as the papers do (head_lr_mult, methods.md 0): the encoder at a tenth of the
# head's learning rate (the shapes default, 2e-3 everywhere, suits training from scratch). From the synthetic
# encoder at 1/16 it lifts SupOnly from 38.3 to 39.6 and U2PL from 35.1 to 40.0 (docs/benchmarks.md).
# Overrides given to the bench win.
FINETUNE = ("optim.lr=0.0002", "optim.head_lr_mult=10")


def _semi_overrides(cfg_name: str, budget: str) -> list[str]:
    """Point a shapes config's labeled/unlabeled streams at a budget ("all" = the whole train split)."""
    from . import config

    base = config.load(cfg_name)
    if budget == "all":
        return ["data.streams.labeled.split=train"]
    out = [f"data.streams.labeled.split=labeled_{budget}"]
    if "unlabeled" in base.data.streams:  # shapes has every mask: log the pseudo-labels' quality
        out += [f"data.streams.unlabeled.split=unlabeled_{budget}", "data.streams.unlabeled.true_masks=true"]
    return out


def _train_records(metrics: Path) -> list[dict]:
    import json

    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [r for r in map(json.loads, lines) if r.get("event") == "train"]


def _mean_rate(records: list[dict]) -> float | None:
    rates = [r["it_per_s"] for r in records if r.get("it_per_s")]
    return sum(rates) / len(rates) if rates else None


def _last(records: list[dict], key: str) -> float | None:
    """The last logged value of ``key`` (e.g. pl_miou: the pseudo-labels' quality at the end), or None."""
    return next((r[key] for r in reversed(records) if key in r), None)


def _numbers(path: Path) -> list[float | None]:
    """The whitespace-separated numbers of a small file, None for each that is not a finite number."""
    import math

    values = []
    for tok in path.read_text().split() if path.is_file() else []:
        try:
            v = float(tok)
        except ValueError:
            v = math.nan
        values.append(v if math.isfinite(v) else None)
    return values


def _finished_or_train(cfg: DictConfig, run_dir: Path, title: str, train_missing: bool = True) -> dict | None:
    """The final evaluation of a finished run in ``run_dir``, else train it (recording wall time and peak RSS);
    without ``train_missing``, None for a run that is not finished."""
    from .engine import checkpoint as ckpt
    from .engine.trainer import train

    state = _same_run(cfg, run_dir)
    result = ckpt.final_eval(state) if state is not None else None
    if result is None and not train_missing:
        print(f"-- not finished, left out: {title}", flush=True)
        return None
    if result is None:
        resume = state is not None  # interrupted (a killed bench, a session's end): go on from its last.pt
        print(f"== {title}" + (f" (resuming at step {state['step']})" if resume else ""), flush=True)
        _reset_peak_rss()
        t0 = time.perf_counter()
        result = train(cfg, resume=resume)
        if not resume:  # a resumed run's time and peak would be those of its last part only: not recorded
            (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n{_peak_rss_mib()}\n")
    return result


def _same_run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Refuse to reuse or resume a run folder whose run had another config (say, before a config changed).
    Returns the folder's ``last.pt`` state, None when it has none."""
    from omegaconf import OmegaConf

    from . import config
    from .engine import checkpoint as ckpt
    from .methods import METHODS

    path = run_dir / "last.pt"
    if not path.is_file():
        return None
    cfg = METHODS.get(cfg.method.name).final_config(cfg)  # what the run's checkpoints store (self-training: stage 3)
    # through today's schema: keys added since the run was made read as their defaults
    try:
        state = ckpt.load(path)
        stored = OmegaConf.to_container(config.from_dict(state["config"]))
    except LessegError as e:
        raise LessegError(f"{run_dir} holds a run this version cannot compare ({e}); delete it to rerun") from None

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    ignored = {"out", "train.progress", "train.device"}  # and true_masks: diagnostics, training is the same
    old, new = flat(stored), flat(OmegaConf.to_container(cfg))
    differ = sorted(k for k in old.keys() | new.keys()
                    if k not in ignored and not k.endswith(".true_masks") and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise LessegError(
            f"{run_dir} holds a run with another config ({shown}{', ...' if len(differ) > 4 else ''}); "
            "delete it to rerun, or pass --out for a new bench folder"
        )
    _same_start(cfg.model.pretrained, state.get("pretrained_sha256"), run_dir)
    return state


def _same_start(pretrained: str | None, digest: str | None, run_dir: Path) -> None:
    """Refuse a run that started from another version of its ``model.pretrained`` file (same path, say a
    retrained bench encoder). Runs from before checkpoints kept the digest: the file must predate the run."""
    from .engine import checkpoint as ckpt

    if not pretrained or not Path(pretrained).is_file():
        return  # training it (resuming) reports the missing file
    if digest is not None:
        changed = digest != ckpt.file_digest(pretrained)
    else:
        started = run_dir / "config.yaml"  # written when the run starts
        started = started if started.is_file() else run_dir / "last.pt"
        changed = Path(pretrained).stat().st_mtime > started.stat().st_mtime
    if changed:
        raise LessegError(f"{run_dir} holds a run that started from another version of {pretrained} (the file "
                          "changed since); delete it to rerun, or pass --out for a new bench folder")


def pretrain_synthetic(out: Path, extra: list[str] = (), device: str = "auto", train_missing: bool = True) -> Path:
    """Train (or reuse) ``shapes/pretrain_synthetic.yaml`` in ``out/pretrain``; returns its checkpoint, whose
    evaluated network's encoder ``model.pretrained`` loads. ``extra`` overrides apply (model.* must match the
    runs that start from it) except ``data.*`` ones: the pretraining keeps its own dataset and root."""
    from . import config

    run_dir = out / "pretrain"
    own = [o for o in extra if not o.split("=", 1)[0].strip().startswith("data.")]
    cfg = config.load("shapes/pretrain_synthetic.yaml", own + [
        f"out={run_dir}", f"train.device={device}", "train.progress=false"])
    result = _finished_or_train(cfg, run_dir, "supervised pretraining on synthetic shapes", train_missing)
    if result is None:
        raise LessegError(f"no finished pretraining in {run_dir}: the runs to summarize start from it")
    print(f"pretrained encoder: {run_dir / 'last.pt'} (synthetic val mIoU {100 * result['miou']:.2f})", flush=True)
    return run_dir / "last.pt"


def bench_semi(out: Path, methods: tuple[str, ...] = SEMI_METHODS, budgets: tuple[str, ...] = ("1-16", "1-8"),
               seeds: tuple[int, ...] = (0, 1), extra: list[str] = (), device: str = "auto",
               pretrain: bool = False, train_missing: bool = True) -> list[dict]:
    """Train every method at every budget and seed on shapes; with ``supervised`` among the methods, also the
    supervised reference on all labels. ``pretrain``: every run starts from the encoder of a supervised run
    on the synthetic shapes domain (trained first, once), as the papers' runs start from ImageNet.

    Finished runs are reused (delete ``out`` to start over), so the plan can be split over processes by method
    (e.g. ``cps`` in one, ``supervised,u2pl`` in another, each with a run folder per method) and summarised
    afterwards by the whole plan; ``self_training`` labels with the SupOnly run of its budget and seed (its
    stage 1), training that first where it is not there, so keep it in the process that runs ``supervised``.
    Returns one row per run; without ``train_missing``, one per finished run (nothing is trained: the table
    so far, while other processes train the rest).
    """
    from . import config

    if pretrain:
        extra = [*FINETUNE, *extra, f"model.pretrained={pretrain_synthetic(out, extra, device, train_missing)}"]
    reference = [("supervised", "all", s) for s in seeds] if "supervised" in methods else []
    plan = reference + [(m, b, s) for b in budgets for m in methods for s in seeds]
    rows = []

    def run(method: str, budget: str, seed: int) -> tuple[Path, dict | None]:
        run_dir = out / budget / method / f"seed{seed}"
        cfg_name = f"shapes/{method}.yaml"
        own = []
        if method == "self_training":  # its stage 1 is the SupOnly run of the same budget and seed: reuse it
            own = [f"method.stage1_checkpoint={run('supervised', budget, seed)[0] / 'last.pt'}"]
        cfg = config.load(cfg_name, _semi_overrides(cfg_name, budget) + list(extra) + own +
                          [f"train.seed={seed}", f"out={run_dir}", f"train.device={device}", "train.progress=false"])
        return run_dir, _finished_or_train(cfg, run_dir, f"{method} {budget} seed {seed}", train_missing)

    for method, budget, seed in plan:
        run_dir, result = run(method, budget, seed)
        if result is None:
            continue
        wall, peak = (_numbers(run_dir / "wall_s.txt") + [None, None])[:2]  # None: not recorded
        records = _train_records(run_dir / "metrics.jsonl")
        rate = _mean_rate(records)
        rows.append({"method": method, "budget": budget, "seed": seed, "miou": result["miou"],
                     "s_per_iter": 1 / rate if rate else None, "wall_s": wall, "peak_mib": peak,
                     "pl_miou": _last(records, "pl_miou"), "pl_c0": _last(records, "pl_c0"),
                     "true_c0": _last(records, "true_c0")})
    return rows


def summarize_semi(rows: list[dict]) -> list[dict]:
    """Mean and spread per (method, budget) and the share of the SupOnly-to-full gap each method closes."""
    import statistics

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


def print_semi_table(table: list[dict]) -> None:
    """One row per method and budget; the last columns are the pseudo-labels at the end of training (mIoU
    against the unlabeled images' masks; share of class 0 in them / in the masks)."""
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


# -- cost of the method-specific work ---------------------------------------------------------------------
def record_passes(trainer: Trainer, batch: dict) -> list[tuple[str, nn.Module, int, bool]]:
    """The segmentation-network passes one real training step makes: (network name, network, number of
    images, with gradient) in call order, recorded by forward hooks. The step is taken (it changes the
    weights and the method's state, as any warm-up step does)."""
    from .models import Segmentor

    names = {id(m): n for n, m in trainer.method.named_modules() if isinstance(m, Segmentor)}
    calls = []

    def hook(module, args):
        calls.append((names[id(module)], module, args[0].shape[0], torch.is_grad_enabled()))

    handles = [m.register_forward_pre_hook(hook) for m in trainer.method.modules() if isinstance(m, Segmentor)]
    try:
        trainer.train_step(batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def bench_overhead(cfg: DictConfig, iters: int = 10, warmup: int = 2) -> dict:
    """Seconds per step of the method vs the network passes it needs, on the same batch.

    The reference replays the segmentation-network passes a real step of the method makes (recorded by
    ``record_passes``: which network, on how many images, with or without gradient): each pass with
    gradient is a forward + backward, the others a forward without gradient (teachers, CPS's pseudo-labels
    on the unmixed images), then the optimizer step. The difference is the method-specific work: entropy,
    percentiles, mixing, contrastive loss, memory bank, pseudo-labels, losses.
    """
    trainer, (batch,) = _steady_trainer(cfg)
    calls = record_passes(trainer, batch)
    images = torch.cat([b["image"] for b in batch.values()])
    inputs = [images[torch.arange(n, device=images.device) % images.shape[0]] for _, _, n, _ in calls]
    cuda = trainer.device.type == "cuda"
    autocast = torch.autocast(trainer.device.type, dtype=trainer.amp) if trainer.amp else nullcontext()

    def passes():
        with autocast:
            for (_, net, _, grad), x in zip(calls, inputs):
                with torch.set_grad_enabled(grad):
                    out = net(x)
                if grad:
                    sum(v.float().mean() for v in out.values()).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def once(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once(lambda: trainer.train_step(batch))
        once(passes)
    # interleaved, medians: background load hits both measurements alike
    pairs = [(once(lambda: trainer.train_step(batch)), once(passes)) for _ in range(iters)]
    full = statistics.median(p[0] for p in pairs)
    ref = statistics.median(p[1] for p in pairs)
    return {"method": cfg.method.name, "step_s": full, "passes_s": ref, "overhead": full / ref - 1.0,
            "passes": [f"{name} {n} images {'forward+backward' if grad else 'forward, no gradient'}"
                       for name, _, n, grad in calls]}
