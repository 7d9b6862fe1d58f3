"""SupOnly: cross-entropy on labeled images (methods.md section 1), optional OHEM and auxiliary head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ranged
from ..models import build_model
from .base import METHODS, Method, MethodConfig, RunInfo
from .common import ce_loss, ohem_ce


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    ohem: bool = False  # Cityscapes configs
    ohem_thresh: float = ranged(0.7, "[0, 1]")
    ohem_min_kept: int = ranged(100000, "[0, inf)")
    aux_weight: float = ranged(0.4, "[0, inf)")  # used when model.aux_head is true


def sup_loss(out: dict[str, torch.Tensor], target: torch.Tensor, cfg: SupervisedConfig) -> torch.Tensor:
    """CE (or OHEM CE) on the main logits plus ``aux_weight`` x the same on the auxiliary logits."""

    def crit(logits: torch.Tensor) -> torch.Tensor:
        if cfg.ohem:
            return ohem_ce(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept)
        return ce_loss(logits, target)

    loss = crit(out["logits"])
    if "aux" in out:
        loss = loss + cfg.aux_weight * crit(out["aux"])
    return loss


@METHODS.register("supervised")
class Supervised(Method):
    Config = SupervisedConfig

    def __init__(self, cfg: SupervisedConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)

    def training_step(self, batch, step):
        lab = batch["labeled"]
        loss = sup_loss(self.net(lab["image"]), lab["mask"], self.cfg)
        return {"loss": loss, "loss_sup": loss.detach()}
