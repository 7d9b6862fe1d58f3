"""The one training loop of every method (architecture.md: the trainer owns devices, DDP, autocast, the
optimizer step, the LR schedule, logging, evaluation and checkpoints; methods only return losses)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import config as config_mod
from .. import dist
from ..data import build_eval_dataset, build_streams, eval_loader, stream_source
from ..errors import ConfigError, LessegError, Paused
from ..methods import METHODS, Method, RunInfo, build_method
from ..models.pretrained import resolve_pretrained
from . import checkpoint as ckpt
from .context import EngineContext
from .evaluate import EVALUATORS, eval_mode

log = logging.getLogger(__name__)

class NonFiniteLoss(LessegError):
    """A loss term, a weight, a buffer or the optimizer state became NaN or inf; no checkpoint is written
    over the last good one."""


# keys a resumed run may change: they take effect from the resumed step and are logged (a longer train.iters
# stretches the schedule from there on); every other change is refused: the checkpoint's weights, optimizer
# and scheduler state were made with the stored values, which would silently win over the new ones
RESUMABLE_PREFIXES = ("train.iters", "train.epochs", "train.progress", "train.log_every", "train.eval_every",
                      "train.ckpt_every", "train.device", "data.workers", "data.check", "eval.", "out")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "none" or device.type != "cuda":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Builds data, method and optimizer from a config, then ``fit()`` runs the loop."""

    def __init__(self, cfg: DictConfig, resume: bool = False,
                 log_started: Callable[[], None] | None = None) -> None:
        """``log_started``: called once ``fit`` has begun the run's metrics.jsonl (a fresh run deletes an old one,
        a resume drops what followed its checkpoint), before anything is logged: a pipeline writes its earlier
        stages' events there."""
        self.cfg = cfg
        self.log_started = log_started
        t = cfg.train
        self.device = dist.init(t.device)
        self.rank, self.world = dist.rank(), dist.world()
        self.main = dist.is_main()
        self.progress = t.progress and self.main
        seed_everything(t.seed, t.deterministic)
        self.out = Path(cfg.out)

        method_cls: type[Method] = METHODS.get(cfg.method.name)
        self.streams = build_streams(cfg.data, method_cls.streams, method_cls.strong_streams_for(cfg.method),
                                     strong_views=method_cls.strong_views,
                                     check=cfg.data.check, progress=self.progress, world=self.world)
        self.val_set = build_eval_dataset(cfg.data, check=cfg.data.check, progress=self.progress)
        src = stream_source(cfg.data)
        per_epoch = max(s.batches_per_epoch(self.world) for s in self.streams.values())
        self.max_iters = t.iters if t.iters > 0 else t.epochs * per_epoch
        self.info = RunInfo(num_classes=src.num_classes, class_names=list(src.classes),
                            max_iters=self.max_iters, iters_per_epoch=per_epoch,
                            stream_sizes={n: len(s.dataset) for n, s in self.streams.items()})

        torch.manual_seed(t.seed)  # identical initial weights on every process
        self.method = build_method(cfg, self.info).to(self.device)
        torch.manual_seed(t.seed + self.rank)  # then per-process randomness (mixing boxes, bank samples)
        self.wrapped = list(self.method.trainable_nets())
        if self.world > 1:
            for name, net in self.method.trainable_nets().items():
                if t.sync_bn and self.device.type == "cuda":
                    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
                ids = [self.device.index] if self.device.type == "cuda" else None
                setattr(self.method, name, DDP(net, device_ids=ids))

        o = cfg.optim
        lr = o.lr
        if o.reference_batch > 0:
            first = next(iter(self.streams.values()))
            lr = lr * first.batch_size * self.world / o.reference_batch
        groups = self.method.param_groups()
        for g in groups:  # a method's own lr_mult on a group (a discriminator's, say) multiplies the head's
            g["lr_mult"] = g.get("lr_mult", 1.0) * (o.head_lr_mult if g.pop("head") else 1.0)
            g["lr"] = lr * g["lr_mult"]
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             nesterov=o.nesterov)
        elif o.name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=o.weight_decay)
        else:  # config.load refuses other names
            raise ValueError(f"unknown optim.name {o.name!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step = 0  # number of optimizer steps done
        self.saved_step: int | None = None  # step of the last good last.pt (None: none written yet)
        self.best = -1.0
        self.last_eval: dict = {}
        self.resumed_changes: dict[str, tuple] = {}
        self.resumed_from: int | None = None  # the checkpoint step a resumed run started at
        if resume:
            self._resume()  # keeps the record stored in the checkpoint
        else:  # the weights the run started from (build_method loaded them): spec, tag, file, sha256
            self.pretrained = resolve_pretrained(cfg.model)
            self.pretrained_digest = self.pretrained["sha256"] if self.pretrained else None
        self.evaluator, metrics, main_metric = EVALUATORS.get(method_cls.evaluation)
        self.metric = cfg.eval.metric or main_metric
        if self.metric not in metrics:
            raise ConfigError(f"eval.metric {self.metric!r}: the {method_cls.evaluation} evaluation of "
                              f"{cfg.method.name} gives {', '.join(metrics)}")
        self.rounds = self._round_steps()
        self._attach_label_store()
        self.writer = None

    # -- schedule -------------------------------------------------------------------------------------
    def _lr_factor(self, it: int) -> float:
        o = self.cfg.optim
        poly = (1.0 - min(it, self.max_iters - 1) / self.max_iters) ** o.poly_power
        if o.warmup_iters > 0 and it < o.warmup_iters:
            return poly * (it + 1) / o.warmup_iters
        return poly

    # -- rounds ---------------------------------------------------------------------------------------
    def _round_steps(self) -> list[int]:
        steps = list(self.method.round_steps())
        if steps != sorted(set(steps)) or any(not 0 < r < self.max_iters for r in steps):
            raise LessegError(f"{self.cfg.method.name}: rounds at steps {steps} must increase strictly and lie "
                              f"within 1..{self.max_iters - 1} (train.iters {self.max_iters})")
        return steps

    def _attach_label_store(self) -> None:
        """Streams whose masks come from the method's label store read a snapshot of it (taken anew after
        every round, with new loader workers)."""
        for name in type(self.method).label_store_streams:
            self.streams[name].dataset.maps["mask"] = self.method.label_store.reader()

    def run_round(self) -> None:
        """The method's round for the current step, the whole method in eval mode, then loaders that see the
        new labels (the caller rebuilds them) and a checkpoint (a resume never redoes or skips a round)."""
        index = self.rounds.index(self.step)
        ctx = EngineContext(cfg=self.cfg, device=self.device, class_names=self.info.class_names, amp=self.amp,
                            progress=self.progress, step=self.step, folder=self.out,
                            label_store=getattr(self.method, "label_store", None), log=self._log)
        self._sync_buffers()
        with eval_mode(self.method), torch.no_grad():
            record = self.method.run_round(index, ctx) or {}
        self._log({"event": "round", "step": self.step, "round": index, **record})
        self._attach_label_store()

    # -- checkpoints ----------------------------------------------------------------------------------
    def _sync_buffers(self) -> None:
        """Every process takes rank 0's buffers (BatchNorm statistics, EMA teachers' copies): what is
        evaluated, checkpointed and used in a round is then the same everywhere (on CPU, without SyncBN,
        each process's statistics drift apart between DDP's broadcasts)."""
        if self.world > 1:
            for b in self.method.buffers():
                torch.distributed.broadcast(b, 0)

    def state(self) -> dict:
        return {
            "method": ckpt.unwrap_state(self.method.state_dict(), self.wrapped),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "config": OmegaConf.to_container(self.cfg),
            "info": dataclasses.asdict(self.info),
            "eval_net": self.eval_net_name(),  # whose weights model.pretrained takes from this checkpoint
            "pretrained_sha256": self.pretrained_digest,
            "pretrained": self.pretrained,  # what model.pretrained resolved to (resolve_pretrained), None without
        }

    def eval_net_name(self) -> str:
        """The method attribute holding the evaluated network (``net``, ``teacher``, ``net1``, ...)."""
        net = self.method.eval_net()
        return next(name for name, child in self.method.named_children() if child is net)

    def save(self, name: str, extra: dict | None = None) -> None:
        """Write a checkpoint, unless a weight, buffer or optimizer state is non-finite: then training stops
        and the last good checkpoint stays (every process decides alike, so none waits at a barrier)."""
        self._sync_buffers()
        bad = ckpt.nonfinite_keys({"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()})
        if dist.all_reduce_sum(torch.tensor(len(bad), device=self.device)).item() > 0:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise NonFiniteLoss(
                f"non-finite values in the training state at step {self.step} ({len(bad)} tensor(s) on this "
                f"process{': ' + shown if bad else ''}); training stopped, {self.kept_checkpoint()}. "
                "Lower optim.lr or check the data."
            )
        if self.main:
            ckpt.save_atomic({**self.state(), **(extra or {})}, self.out / name)
        if name == "last.pt":
            self.saved_step = self.step
        dist.barrier()

    def kept_checkpoint(self) -> str:
        """What is left to resume from, said truthfully."""
        if self.saved_step is None:
            return f"no checkpoint was written yet ({self.out} has none to resume from)"
        return f"the last good checkpoint ({self.out / 'last.pt'}, step {self.saved_step}) is kept"

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise LessegError(f"--resume: no checkpoint {path} to resume from")
        state = ckpt.load(path, self.device)
        self.resumed_changes = resume_changes(state.get("config", {}), OmegaConf.to_container(self.cfg), path)
        mine = ckpt.unwrap_state(self.method.state_dict(), self.wrapped)
        differ = ckpt.state_differences(state["method"], mine)
        if differ:
            shown = "; ".join(differ[:5]) + (f"; ... ({len(differ)} in all)" if len(differ) > 5 else "")
            raise LessegError(f"--resume: {path} does not fit this config's method and model: {shown}")
        self._load_method_state(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.saved_step = self.resumed_from = state["step"]
        self.best = state["best"]
        self.last_eval = state.get("eval", {})
        self.pretrained_digest = state.get("pretrained_sha256")  # None: saved before checkpoints kept it
        self.pretrained = state.get("pretrained")  # None: saved before checkpoints kept it
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)

    def _load_method_state(self, state: dict) -> None:
        """Load an unwrapped state dict into a method whose trainable nets may be DDP-wrapped."""
        rewrapped = {}
        for k, v in state.items():
            for name in self.wrapped:
                if isinstance(getattr(self.method, name), DDP) and k.startswith(name + "."):
                    k = f"{name}.module.{k[len(name) + 1 :]}"
                    break
            rewrapped[k] = v
        self.method.load_state_dict(rewrapped)

    # -- the loop -------------------------------------------------------------------------------------
    def eval_net(self) -> torch.nn.Module:
        net = self.method.eval_net()
        return getattr(net, "module", net)

    def evaluate(self) -> dict:
        """The method's evaluation of its evaluated network on the validation split; ``score`` is the number
        that picks best.pt (``eval.metric``)."""
        self._sync_buffers()
        c = self.cfg
        loader = eval_loader(self.val_set, c.eval.batch_size, self.rank, self.world, c.data.workers)
        result = self.evaluator(self.eval_net(), loader, self.info.num_classes, c.eval, list(c.data.crop_size),
                                self.device, self.info.class_names, self.amp, self.progress)
        return {**result, "metric": self.metric, "score": result[self.metric]}

    def _log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the points logged after its checkpoint by the interrupted one; a fresh run
            # in a folder that holds an old run's events hides all of them
            self.writer = SummaryWriter(str(self.out / "tb"),
                                        purge_step=0 if self.resumed_from is None else self.resumed_from + 1)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def train_loaders(self) -> dict:
        """Endless iterators over the training streams, positioned at the current step (resume)."""
        t = self.cfg.train
        return {name: iter(s.loader(seed=t.seed, rank=self.rank, world=self.world, start_batch=self.step,
                                    workers=self.cfg.data.workers, pin=self.device.type == "cuda"))
                for name, s in self.streams.items()}

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch already on the device; returns the method's loss terms."""
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            losses = self.method.training_step(batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_step(self.step)
        self.step += 1
        return losses

    def fit(self) -> dict:
        """Train from ``self.step`` to ``max_iters``; returns the final evaluation."""
        if self.main:  # here, not in __init__: a trainer that only lends its network (self-training's
            # labeler, the cost bench) leaves no run folder behind
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.out)
            config_mod.save(self.cfg, self.out / "config.yaml", self.pretrained)  # what it started from, too
            if self.resumed_from is None:  # a fresh run starts its own log (an old run's, killed early, goes)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            else:
                truncate_metrics(self.out / "metrics.jsonl", self.resumed_from)
                for key, (was, now) in self.resumed_changes.items():
                    log.warning("resuming with %s = %r (the run had %r until step %d)", key, now, was, self.step)
                if self.resumed_changes:
                    self._log({"event": "resume", "step": self.step,
                               "changed": {k: {"was": a, "now": b} for k, (a, b) in self.resumed_changes.items()}})
        if self.log_started is not None:
            self.log_started()
        self._pause_if_waiting()
        self._announce_phases()
        t = self.cfg.train
        iters = self.train_loaders()
        sums: dict[str, torch.Tensor] = {}  # per logged term, over the steps since the last log line
        counts: dict[str, int] = {}
        bad_step = torch.tensor(-1, device=self.device)
        bad_terms: torch.Tensor | None = None
        names: list[str] = []
        bar = tqdm(total=self.max_iters, initial=self.step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        last_eval = self.last_eval
        t_log, n_log = time.perf_counter(), 0  # since the last log line
        self.method.train()
        while self.step < self.max_iters:
            step = self.step
            batch = {name: to_device(next(it), self.device) for name, it in iters.items()}
            losses = self.train_step(batch)
            if list(losses) != names and bad_terms is not None:  # the terms changed (a method's new phase)
                self._check_finite(bad_step, bad_terms, names)
                bad_terms = None
            names = list(losses)
            vals = torch.stack([v.detach().float() for v in losses.values()])
            finite = torch.isfinite(vals)
            first = (bad_step < 0) & ~finite.all()
            bad_step = torch.where(first, step, bad_step)
            bad_terms = ~finite if bad_terms is None else torch.where(first, ~finite, bad_terms)
            for k, v in zip(names, vals):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            n_log += 1
            bar.update(1)

            in_round = self.step in self.rounds
            if in_round:
                self._check_finite(bad_step, bad_terms, names)  # never select with a broken network
                del iters  # the workers of the old loaders end; the new ones read the new labels
                self.run_round()
                iters = self.train_loaders()
            done = self.step == self.max_iters
            do_eval = done or (t.eval_every > 0 and self.step % t.eval_every == 0)
            do_ckpt = do_eval or in_round or (t.ckpt_every > 0 and self.step % t.ckpt_every == 0)
            if self.step % t.log_every == 0 or do_ckpt:
                self._check_finite(bad_step, bad_terms, names)
                means = {k: float(v) / counts[k] for k, v in sums.items()}
                rate = n_log / (time.perf_counter() - t_log)
                sums, counts, t_log, n_log = {}, {}, time.perf_counter(), 0
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
                self._log({"event": "train", "step": self.step, **means,
                           "lr": self.optimizer.param_groups[0]["lr"], "it_per_s": rate})
            if do_eval:
                last_eval = self.evaluate()
                self._log({"event": "eval", "step": self.step, **{k: v for k, v in last_eval.items() if k != "score"}})
                if self.main:
                    bar.write(f"step {self.step}: {self.metric} {100 * last_eval['score']:.2f} ({last_eval['mode']})")
                if last_eval["score"] > self.best:
                    self.best = last_eval["score"]
                    self.save("best.pt", {"eval": last_eval})
            if do_ckpt:
                self.save("last.pt", {"eval": last_eval})
            if in_round:
                self._pause_if_waiting(bar)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        self.last_eval = last_eval
        return last_eval

    def _pause_if_waiting(self, bar: tqdm | None = None) -> None:
        """Stop (resumably: last.pt is written) while the method waits for labels from a person."""
        waiting = self.method.waiting()
        if waiting is None:
            return
        if bar is not None:
            bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        run = self.out
        raise Paused(f"{waiting}; training is paused at step {self.step} of {self.max_iters} ({run / 'last.pt'}). "
                     f"Go on with: lesseg active export {run} --out DIR; label the regions (DIR/README.txt); "
                     f"lesseg active import {run} DIR; then the same lesseg train command with --resume")

    def _announce_phases(self) -> None:
        """Say at the start how many steps each phase of the schedule has (and log it)."""
        phases = [{"phase": d, "start": a, "end": b} for d, a, b in self.method.phases()]
        phases += [{"phase": f"selection round {i}", "start": r, "end": r} for i, r in enumerate(self.rounds)]
        if not phases:
            return
        if self.main and self.step == 0:
            for p in phases:
                span = f"at step {p['start']}" if p["start"] == p["end"] else f"steps {p['start']}-{p['end']}"
                print(f"{self.cfg.method.name}: {p['phase']}: {span} of {self.max_iters}", file=sys.stderr)
        self._log({"event": "phases", "step": self.step, "phases": phases})

    def _check_finite(self, bad_step: torch.Tensor, bad_terms: torch.Tensor | None, names: list[str]) -> None:
        s = int(bad_step)
        if s >= 0 and bad_terms is not None:
            terms = [n for n, b in zip(names, bad_terms.tolist()) if b]
            raise NonFiniteLoss(
                f"non-finite loss at step {s} in term(s) {terms}; training stopped, {self.kept_checkpoint()}. "
                "Lower optim.lr or check the data."
            )


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(stored: dict, now: dict, path: Path) -> dict[str, tuple]:
    """The keys whose value differs between a checkpoint's config and the resuming one: ``{key: (was, now)}``
    for the ones a resume may change (RESUMABLE_PREFIXES); any other difference is one error naming every
    such key. Keys that exist on one side only (added or removed since the checkpoint) are not compared."""
    a, b = flatten(stored), flatten(now)
    changed = {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}
    refused = sorted(k for k in changed if not k.startswith(RESUMABLE_PREFIXES))
    if refused:
        shown = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise LessegError(f"--resume: {path} was trained with other values of {shown}; resume with the run's "
                          "values, or start a new run in another --out")
    return {k: changed[k] for k in sorted(changed)}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records an interrupted run logged after its last checkpoint (the resumed run logs them anew)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def train(cfg: DictConfig, resume: bool = False) -> dict:
    """Train a config end to end (the Python API behind ``lesseg train``): every stage of its method's
    pipeline (finished ones are skipped), ``resume`` continuing the last one."""
    from .stages import run_pipeline  # stages builds Trainers

    finished, paused = False, None
    try:
        result = run_pipeline(cfg, resume)
        finished = True
        return result
    except Paused as e:  # every process pauses at the same step, after the same checkpoint
        finished, paused = True, str(e)  # raised anew below: this one's traceback holds the DDP modules
    finally:
        dist.cleanup(finished)
    raise Paused(paused)
