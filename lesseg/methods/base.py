"""The Method contract: an nn.Module that owns its networks and returns its losses.

The trainer owns devices, DDP, autocast, the optimizer step, the LR schedule, logging, evaluation and
checkpoints; a method only computes losses (``training_step``) and updates non-gradient state
(``after_step``: EMA teachers). Everything a method must persist (teachers, memory banks, label stores)
is a submodule or buffer, so it is saved with ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry


@dataclass
class MethodConfig:
    name: str = "supervised"


@dataclass
class RunInfo:
    """Facts about the run a method may need, derived by the trainer (not configured twice)."""

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    max_iters: int = 1
    iters_per_epoch: int = 1


class Method(nn.Module):
    Config: ClassVar[type] = MethodConfig
    streams: ClassVar[tuple[str, ...]] = ("labeled",)  # data streams training_step reads
    strong_streams: ClassVar[tuple[str, ...]] = ()  # streams that need a strong view
    # the streams a user's config must define (a multi-stage method's first stages may read others)
    config_streams: ClassVar[tuple[str, ...] | None] = None  # None: ``streams``

    def __init__(self, cfg: Any, model_cfg: Any, info: RunInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.info = info

    @classmethod
    def prepare(cls, cfg: Any) -> Any:
        """Run earlier stages of a multi-stage method (e.g. write pseudo-masks) and return the config of the
        final training. Stages skip themselves when their outputs are complete, so a rerun resumes."""
        return cfg

    @classmethod
    def final_config(cls, cfg: Any) -> Any:
        """The config ``prepare`` returns (the one the final training runs and its checkpoints store), without
        running any stage: what a finished run of ``cfg`` is compared with."""
        return cfg

    def trainable_nets(self) -> dict[str, nn.Module]:
        """Attribute name -> network trained by gradient (these, and only these, are wrapped in DDP)."""
        return {"net": self.net}

    def eval_net(self) -> nn.Module:
        """The network evaluated, exported and used for prediction."""
        return self.net

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        """Losses for one step: ``{"loss": total, <named terms>...}`` (0-dim tensors)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimizer step (EMA updates, schedules)."""

    def param_groups(self) -> list[dict]:
        """Encoder parameters at the base LR, everything else at ``head_lr_mult`` x (set by the trainer)."""
        groups = []
        for net in self.trainable_nets().values():
            net = getattr(net, "module", net)  # DDP-wrapped
            enc = [p for p in net.encoder_parameters() if p.requires_grad]
            head = [p for p in net.head_parameters() if p.requires_grad]
            groups += [{"params": enc, "lr_mult": 1.0, "head": False}, {"params": head, "head": True}]
        return [g for g in groups if g["params"]]


METHODS: Registry[type[Method]] = Registry("method")
