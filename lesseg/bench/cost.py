"""Cost per step of the method-specific work (``lesseg bench semi``'s cost lines, ``--cost-only``): a method's
training step timed against the network passes it makes, replayed on the same inputs."""

from __future__ import annotations

import re
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn

from .. import config
from ..engine import Trainer
from ..models import Segmentor
from ..models.aux_decoders import ShuffleDecoder
from ..models.discriminator import FCDiscriminator
from ..models.flaw_detector import FlawDetector
from .measure import steady_trainer

# the modules whose forward is one network pass: the segmentation networks and the methods' own extra networks
# (CCT's auxiliary decoders, AdvSemSeg's discriminator, GCT's flaw detector)
NETWORKS = (Segmentor, ShuffleDecoder, FCDiscriminator, FlawDetector)


def _map_tensors(fn, x):
    """``x`` (tensors nested in lists, tuples and dicts; anything else kept) with ``fn`` applied to each tensor."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(fn, v) for k, v in x.items()}
    return x


def _tensors(x) -> list[torch.Tensor]:
    """The tensors nested in ``x``, in order."""
    found: list[torch.Tensor] = []
    _map_tensors(found.append, x)
    return found


def _detached(x):
    """``x``'s tensors as new leaves that keep whether they required gradient."""
    return _map_tensors(lambda t: t.detach().clone().requires_grad_(t.requires_grad), x)


class Pass(NamedTuple):
    """One network call of a real training step: which network, its inputs (detached copies) and whether
    gradient was on."""

    name: str
    net: nn.Module
    args: tuple
    kwargs: dict
    grad: bool

    @property
    def images(self) -> int:
        """The batch size of the first tensor argument."""
        return _tensors(self.args)[0].shape[0]


def record_passes(trainer: Trainer, batch: dict) -> list[Pass]:
    """The network passes one real training step makes, in call order, recorded by forward hooks on every
    network module of the method (``NETWORKS``; a network called inside another counts once, in the outer
    one). The step is taken (it changes the weights and the method's state, as any warm-up step does)."""
    names = {id(m): n for n, m in trainer.method.named_modules() if isinstance(m, NETWORKS)}
    calls, depth = [], [0]

    def pre(module, args, kwargs):
        if depth[0] == 0:
            calls.append(Pass(names[id(module)], module, _detached(args), _detached(kwargs),
                              torch.is_grad_enabled()))
        depth[0] += 1

    def post(module, args, kwargs, output):
        depth[0] -= 1

    nets = [m for m in trainer.method.modules() if isinstance(m, NETWORKS)]
    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in nets]
    handles += [m.register_forward_hook(post, with_kwargs=True, always_call=True) for m in nets]
    try:
        trainer.train_step(batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def describe(calls: list[Pass]) -> list[str]:
    """``calls`` as lines, consecutive passes of numbered siblings (CCT's decoders) merged with a count."""
    lines: list[tuple[str, int]] = []
    for c in calls:
        name = re.sub(r"\.\d+$", ".*", c.name)
        text = f"{name} {c.images} images {'forward+backward' if c.grad else 'forward, no gradient'}"
        if lines and lines[-1][0] == text:
            lines[-1] = (text, lines[-1][1] + 1)
        else:
            lines.append((text, 1))
    return [text if n == 1 else f"{n} x {text}" for text, n in lines]


def bench_overhead(cfg: DictConfig, iters: int = 10, warmup: int = 2) -> dict:
    """Seconds per step of the method vs the network passes it needs, on the same batch.

    The reference replays the network passes a real step of the method makes (recorded by ``record_passes``:
    which network, on which inputs, with or without gradient): each pass with gradient is a forward and a
    backward of its outputs, towards the inputs that required gradient in the real step too (an auxiliary
    decoder's gradient reaches the encoder features); the others a forward without gradient (teachers, CPS's
    pseudo-labels on the unmixed images); then the optimizer step. Passes inside a method's perturbation
    search (VAT's power iteration) are network passes too. A pass made with detached parameters (AdvSemSeg's and GCT's adversarial terms through
    ``functional_call``) is replayed with the parameters' gradient as well, so the reference is then slightly
    above the real passes. The difference is the method-specific work: entropy, percentiles, mixing,
    perturbations, contrastive loss, memory bank, pseudo-labels, losses.
    """
    trainer, (batch,) = steady_trainer(cfg)
    calls = record_passes(trainer, batch)
    cuda = trainer.device.type == "cuda"
    autocast = torch.autocast(trainer.device.type, dtype=trainer.amp) if trainer.amp else nullcontext()

    def inputs(x, grad: bool):  # gradient towards the inputs that had it: VAT's direction, CCT's features
        return _map_tensors(lambda t: t.detach().requires_grad_(grad and t.requires_grad), x)

    def passes():
        with autocast:
            for c in calls:
                with torch.set_grad_enabled(c.grad):
                    out = c.net(*inputs(c.args, c.grad), **inputs(c.kwargs, c.grad))
                    outs = [t.float().mean() for t in _tensors(out) if t.requires_grad]
                    if c.grad and outs:
                        sum(outs).backward()
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
            "passes": describe(calls)}


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
