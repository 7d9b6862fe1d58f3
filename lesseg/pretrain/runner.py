"""The pretraining loop: data, method, DDP, optimizer, schedule, logs and checkpoints, as lesseg's trainer
keeps them (atomic ``last.pt``, weights-only loading, nothing non-finite written, exact resume), then the
product ``encoder.pt``: the encoder's state dict, which ``model.pretrained`` takes.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from lightly.utils.scheduler import CosineWarmupScheduler
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import config as config_mod
from .. import dist
from ..data import Stream
from ..data.check import require_clean
from ..engine import checkpoint as ckpt
from ..engine.trainer import (
    NonFiniteLoss,
    Trainer,
    amp_dtype,
    resume_changes,
    seed_everything,
    to_device,
    truncate_metrics,
)
from ..errors import ConfigError, DataError, LessegError
from ..models import create_encoder
from ..models.pretrained import load_pretrained
from . import densecl, simclr  # noqa: F401  (register the methods)
from .base import SSL_METHODS, SSLMethod
from .config import queue_for
from .data import ViewPairs, image_split, view_transform

# keys a resumed run may change (besides the ones lesseg's trainer lets a resume change: device, workers, out)
RESUMABLE = ("pretrain.iters", "pretrain.epochs", "pretrain.log_every", "pretrain.ckpt_every")
PRODUCT = "encoder.pt"


class Pretrainer:
    """Builds the images, the method and the optimizer from a config; ``fit()`` runs the loop."""

    def __init__(self, cfg: DictConfig, resume: bool = False) -> None:
        if cfg.out is None:
            raise ConfigError("set `out` (the run folder) for the pretraining")
        self.cfg, p, t = cfg, cfg.pretrain, cfg.train
        self.device = dist.init(t.device)
        self.rank, self.world, self.main = dist.rank(), dist.world(), dist.is_main()
        self.progress = t.progress and self.main
        seed_everything(t.seed, t.deterministic)
        self.out = Path(cfg.out)

        source, self.split = image_split(cfg)
        samples = source.samples(self.split)
        if not samples:
            raise DataError(f"pretraining: split {self.split!r} of {source.root} is empty")
        if len(samples) < p.batch_size * self.world:
            raise ConfigError(
                f"pretraining split {self.split!r} of {source.root} has {len(samples)} images, fewer "
                f"than one global batch ({p.batch_size} x {self.world} process(es)); lower "
                "pretrain.batch_size"
            )
        if cfg.data.check:
            require_clean(source, samples, False, f"pretraining split {self.split!r}", self.progress)
        self.stream = Stream("pretrain", ViewPairs(source, samples, view_transform(cfg)), p.batch_size)
        self.max_iters = p.iters if p.iters > 0 else p.epochs * self.stream.batches_per_epoch(self.world)
        if p.warmup_iters > self.max_iters:
            raise ConfigError(
                f"pretrain.warmup_iters ({p.warmup_iters}) exceeds the {self.max_iters} steps of the run"
            )

        torch.manual_seed(t.seed)  # identical initial weights (and memory banks) on every process
        encoder = create_encoder(cfg.model.encoder, cfg.model.output_stride)
        if not resume:  # a resumed run takes every weight from its checkpoint
            load_pretrained(encoder, cfg.model)
        self.queue = queue_for(p.queue_size, len(samples))
        if self.main and p.method == "densecl":
            print(f"pretrain: memory banks of {self.queue} keys ({len(samples)} images)", flush=True)
            if self.queue >= len(samples):
                print(f"pretrain: warning: pretrain.queue_size={self.queue} is not smaller than the {len(samples)} "
                      "images: older keys of each image are in the bank as its own negatives; leave it unset "
                      f"(here {queue_for(None, len(samples))})", flush=True)
        method_cfg = OmegaConf.merge(p, {"queue_size": self.queue})
        self.method: SSLMethod = SSL_METHODS.get(p.method)(encoder, method_cfg).to(self.device)
        torch.manual_seed(t.seed + self.rank)
        params = list(self.method.student.parameters())
        if self.world > 1:
            student = self.method.student
            if t.sync_bn and self.device.type == "cuda":
                student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            self.method.student = DDP(
                student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            params = list(self.method.student.parameters())
        if p.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=p.lr, momentum=p.sgd_momentum, weight_decay=p.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
        self.scheduler = CosineWarmupScheduler(
            self.optimizer, warmup_epochs=p.warmup_iters, max_epochs=self.max_iters
        )
        self.amp = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step = 0
        self.saved_step: int | None = None
        self.resumed_from: int | None = None
        self.resumed_changes: dict[str, tuple] = {}
        if resume:
            self._resume()

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> dict:
        """``last.pt``, laid out as lesseg's training checkpoints are: ``model.pretrained`` takes the encoder
        of the network that ``eval_net`` names (the student) from it, as from ``encoder.pt``."""
        return {
            "method": ckpt.unwrap_state(self.method.state_dict(), ["student"]),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
            "config": OmegaConf.to_container(self.cfg),
            "info": {"max_iters": self.max_iters, "images": len(self.stream.dataset), "split": self.split},
            "eval_net": "student",
        }

    def _sync_buffers(self) -> None:
        """Every process takes rank 0's buffers (BatchNorm statistics of the momentum encoder)."""
        if self.world > 1:
            for b in self.method.buffers():
                torch.distributed.broadcast(b, 0)

    def save(self) -> None:
        """Write ``last.pt`` atomically, unless a weight, buffer or optimizer state is non-finite: then the
        pretraining stops and the last good checkpoint stays."""
        self._sync_buffers()
        bad = ckpt.nonfinite_keys(
            {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}
        )
        if dist.all_reduce_sum(torch.tensor(len(bad), device=self.device)).item() > 0:
            raise NonFiniteLoss(
                f"non-finite values in the pretraining state at step {self.step} "
                f"({', '.join(bad[:3]) or 'on another process'}); stopped, {self.kept_checkpoint()}. "
                "Lower pretrain.lr or check the data."
            )
        if self.main:
            ckpt.save_atomic(self.state(), self.out / "last.pt")
        self.saved_step = self.step
        dist.barrier()

    # what is left to resume from, in the trainer's words (it reads ``out`` and ``saved_step``)
    kept_checkpoint = Trainer.kept_checkpoint

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise LessegError(f"--resume: no checkpoint {path} to resume from")
        state = ckpt.load(path, self.device)
        if state.get("eval_net") != "student" or "pretrain" not in state.get("config", {}):
            raise LessegError(f"--resume: {path} is not a checkpoint of `lesseg pretrain`")
        self.resumed_changes = pretrain_resume_changes(
            state["config"], OmegaConf.to_container(self.cfg), path
        )
        mine = ckpt.unwrap_state(self.method.state_dict(), ["student"])
        differ = ckpt.state_differences(state["method"], mine)
        if differ:
            raise LessegError(f"--resume: {path} does not fit this config: {'; '.join(differ[:5])}")
        student = self.method.student
        self.method.student = getattr(student, "module", student)  # load the unwrapped names
        self.method.load_state_dict(state["method"])
        self.method.student = student
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # a longer pretrain.iters stretches the schedule from here on
        self.scheduler.max_epochs = self.max_iters
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.scale_lr(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.saved_step = self.resumed_from = state["step"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)

    def export(self, last: dict) -> dict:
        """Write ``encoder.pt`` (the encoder's state dict, timm's ``features_only`` names) and
        ``pretrain.json`` (what made it); returns the summary."""
        p = self.cfg.pretrain
        summary = {
            "encoder": str(self.out / PRODUCT),
            "checkpoint": str(self.out / "last.pt"),
            "method": p.method,
            "model": self.cfg.model.encoder,
            "steps": self.step,
            "images": len(self.stream.dataset),
            "split": self.split,
            "queue_size": self.queue if p.method == "densecl" else None,
            **last,
        }
        if self.main:
            weights = {k: v.detach().cpu().clone() for k, v in self.method.encoder.state_dict().items()}
            ckpt.save_atomic(weights, self.out / PRODUCT)
            summary["sha256"] = ckpt.file_digest(self.out / PRODUCT)
            (self.out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
        return summary

    # -- the loop -------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _start(self) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.out)
        config_mod.save(self.cfg, self.out / "config.yaml")
        if self.resumed_from is not None:
            truncate_metrics(self.out / "metrics.jsonl", self.resumed_from)
            if self.resumed_changes:
                self._log(
                    {
                        "event": "resume",
                        "step": self.step,
                        "changed": {k: {"was": a, "now": b} for k, (a, b) in self.resumed_changes.items()},
                    }
                )

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            losses = self.method.training_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_step()
        self.step += 1
        return losses

    def fit(self) -> dict:
        """Pretrain from ``self.step`` to ``max_iters``; write ``encoder.pt``; return the summary."""
        self._start()
        p = self.cfg.pretrain
        loader = iter(
            self.stream.loader(
                seed=self.cfg.train.seed,
                rank=self.rank,
                world=self.world,
                start_batch=self.step,
                workers=self.cfg.data.workers,
                pin=self.device.type == "cuda",
            )
        )
        bar = tqdm(
            total=self.max_iters,
            initial=self.step,
            desc=f"pretrain {p.method}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        sums: dict[str, torch.Tensor] = {}
        first, t_log, n_log, last = self.step, time.perf_counter(), 0, {}
        self.method.train()
        while self.step < self.max_iters:
            losses = self.train_step(to_device(next(loader), self.device))
            for k, v in losses.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n_log += 1
            bar.update(1)
            done = self.step == self.max_iters
            do_ckpt = done or (p.ckpt_every > 0 and self.step % p.ckpt_every == 0)
            if self.step % p.log_every == 0 or do_ckpt:
                means = {k: float(v) / n_log for k, v in sums.items()}
                bad = [k for k, v in means.items() if not torch.isfinite(torch.tensor(v))]
                if bad:
                    raise NonFiniteLoss(
                        f"non-finite loss between steps {first} and {self.step} in term(s) {bad}; "
                        f"stopped, {self.kept_checkpoint()}. Lower pretrain.lr or check the data."
                    )
                rate = n_log / (time.perf_counter() - t_log)
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
                self._log(
                    {
                        "event": "pretrain",
                        "step": self.step,
                        **means,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "it_per_s": rate,
                    }
                )
                sums, first, t_log, n_log, last = {}, self.step, time.perf_counter(), 0, means
            if do_ckpt:
                self.save()
        bar.close()
        return self.export(last)


def pretrain_resume_changes(stored: dict, now: dict, path: Path) -> dict[str, tuple]:
    """lesseg's resume rule (:func:`lesseg.engine.trainer.resume_changes`: any other change is refused,
    naming it) with the pretraining's own resumable keys added."""
    stored, now = copy.deepcopy(stored), copy.deepcopy(now)
    changed = {}
    for key in RESUMABLE:
        section, name = key.split(".")
        was, new = stored.get(section, {}).pop(name, None), now[section].pop(name)
        if was is not None and was != new:
            changed[key] = (was, new)
    return {**resume_changes(stored, now, path), **changed}


def pretrain(cfg: DictConfig, resume: bool = False) -> dict:
    """Pretrain an encoder self-supervised (the Python API behind ``lesseg pretrain``); returns the summary,
    whose ``encoder`` is the file ``model.pretrained`` takes."""
    finished = False
    try:
        result = Pretrainer(cfg, resume).fit()
        finished = True
        return result
    finally:
        dist.cleanup(finished)
