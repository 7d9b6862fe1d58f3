"""Training throughput and peak memory of one config (``lesseg bench speed``), or its op profile."""

from __future__ import annotations

import platform
import time

import torch
from omegaconf import DictConfig

from .measure import peak_rss_mib, reset_peak_rss, steady_trainer


def bench_speed(cfg: DictConfig, iters: int = 20, warmup: int = 3) -> dict:
    """Time ``iters`` optimizer steps (after ``warmup``) with data already in memory.

    Returns steps/s, images/s (all streams' images of a step, summed over processes) and peak memory:
    CUDA allocator peak on GPU, peak resident set size of the process on CPU.
    """
    trainer, batches = steady_trainer(cfg, 2)
    images = sum(b["image"].shape[0] for b in batches[0].values()) * trainer.world
    cuda = trainer.device.type == "cuda"
    for i in range(warmup):
        trainer.train_step(batches[i % 2])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    t0 = time.perf_counter()
    for i in range(iters):
        trainer.train_step(batches[i % 2])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda allocated"
    else:
        peak, kind = peak_rss_mib(), "process RSS" if rss_reset else "process RSS (since start)"
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

    trainer, (batch,) = steady_trainer(cfg)
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
