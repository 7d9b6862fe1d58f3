"""Cost per step of the method-specific work (``lesseg bench semi``'s cost lines, ``--cost-only``): a method's
training step timed against the segmentation-network passes it needs, replayed on the same batch."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from .. import config
from ..engine import Trainer
from ..models import Segmentor
from .measure import steady_trainer


def record_passes(trainer: Trainer, batch: dict) -> list[tuple[str, nn.Module, int, bool]]:
    """The segmentation-network passes one real training step makes: (network name, network, number of
    images, with gradient) in call order, recorded by forward hooks. The step is taken (it changes the
    weights and the method's state, as any warm-up step does)."""
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
    trainer, (batch,) = steady_trainer(cfg)
    calls = record_passes(trainer, batch)
    images = torch.cat([b["image"] for b in batch.values()])
    inputs = [images[torch.arange(n, device=images.device) % images.shape[0]] for _, _, n, _ in calls]
    cuda = trainer.device.type == "cuda"
    autocast = torch.autocast(trainer.device.type, dtype=trainer.amp) if trainer.amp else nullcontext()

    def passes():
        with autocast:
            for (_, net, _, grad), x in zip(calls, inputs):
                with torch.set_grad_enabled(grad):  # the input needs gradient where the network has none
                    out = net(x.detach().requires_grad_(grad))  # (a frozen teacher's pass towards VAT's direction)
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


def bench_costs(methods: tuple[str, ...], out: Path, extra: list[str] = (), device: str = "auto",
                iters: int = 10, family: str = "shapes") -> list[dict]:
    """``bench_overhead`` of each method's ``{family}/{method}.yaml`` config (the 1/16 ones for shapes), one
    printed line each, the run folders under ``out/overhead``."""
    # self_training's step is a supervised step; its extra cost is pseudo-labelling plus its stage 1, the SupOnly run
    measured = [m for m in methods if m != "self_training"]
    if measured:
        print("\ncost per step (1/16 configs, same batch): method step vs the network passes it needs")
    costs = []
    for m in measured:
        cfg = config.load(f"{family}/{m}.yaml", list(extra) + [
            f"out={out / 'overhead' / m}", "data.check=false", "train.progress=false", f"train.device={device}"])
        c = bench_overhead(cfg, iters=iters)
        costs.append(c)
        print(f"  {m:<14s} step {c['step_s']:.3f} s, passes {c['passes_s']:.3f} s, "
              f"method-specific {100 * c['overhead']:+.1f}%  ({'; '.join(c['passes'])})")
    return costs
