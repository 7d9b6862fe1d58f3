"""DenseCL (Wang et al., 2021): MoCo v2's image-level contrast plus the same contrast between locations of
the last feature map, for dense tasks such as segmentation.

The query encoder sees one view, a momentum (EMA) copy sees the other; each query location's positive is the
key location whose encoder feature is most similar (lightly's ``select_most_similar``: the views are
independent crops, so the match is learned, not known), and the negatives are the keys of earlier batches in
a memory bank (lightly's ``NTXentLoss`` with ``memory_bank_size``). The loss is
``(1 - dense_weight) * loss_global + dense_weight * loss_dense``; ``dense_weight=0`` is MoCo v2.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import DenseCLProjectionHead
from lightly.models.utils import deactivate_requires_grad, select_most_similar, update_momentum
from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod, Student, channels, unwrap
from .config import PretrainConfig


def contrast(cfg: PretrainConfig) -> NTXentLoss:
    """NT-Xent against a memory bank of ``queue_size`` keys (filled from every process under DDP)."""
    bank = (cfg.queue_size, cfg.proj_dim) if cfg.queue_size else 0
    return NTXentLoss(temperature=cfg.temperature, memory_bank_size=bank, gather_distributed=True)


def matched_keys(q_feat: Tensor, k_feat: Tensor, k_dense: Tensor) -> Tensor:
    """For each query location, the projected key of the key location most similar in encoder features.
    B,hw,C ; B,hw,C ; B,hw,D -> B,hw,D"""
    return select_most_similar(q_feat, k_feat, k_dense)


@SSL_METHODS.register("densecl")
class DenseCL(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        c = channels(encoder)
        heads = {"global": DenseCLProjectionHead(c, c, cfg.proj_dim)}
        if cfg.dense_weight > 0:
            heads["dense"] = DenseCLProjectionHead(c, c, cfg.proj_dim)
        self.student = Student(encoder, heads)
        self.teacher = copy.deepcopy(self.student)  # the key encoder: never trained, never in DDP
        deactivate_requires_grad(self.teacher)
        self.loss_global = contrast(cfg)
        self.loss_dense = contrast(cfg) if cfg.dense_weight > 0 else None

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        q = self.student(batch["view0"])
        with torch.no_grad():
            k = self.teacher(batch["view1"])
        loss_global = self.loss_global(q["global"].float(), k["global"].float())
        if self.loss_dense is None:
            return {"loss": loss_global}
        # B,hw,D: the positive of each query location (the match itself carries no gradient)
        k_dense = matched_keys(q["feat"].detach(), k["feat"], k["dense"])
        loss_dense = self.loss_dense(q["dense"].flatten(0, 1).float(), k_dense.flatten(0, 1).float())
        w = self.cfg.dense_weight
        return {
            "loss": (1 - w) * loss_global + w * loss_dense,
            "loss_global": loss_global,
            "loss_dense": loss_dense,
        }

    @torch.no_grad()
    def after_step(self) -> None:
        update_momentum(unwrap(self.student), self.teacher, self.cfg.ema)

    # lightly keeps its memory banks in non-persistent buffers; they are saved here, so a resumed run
    # contrasts against the negatives an uninterrupted one would
    def _banks(self) -> dict[str, nn.Module]:
        if not self.cfg.queue_size:
            return {}
        losses = {"global": self.loss_global, "dense": self.loss_dense}
        return {name: loss.memory_bank for name, loss in losses.items() if loss is not None}

    def get_extra_state(self) -> dict[str, Tensor]:
        return {
            f"{name}.{key}": getattr(bank, key).clone()
            for name, bank in self._banks().items()
            for key in ("bank", "bank_ptr")
        }

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        for name, bank in self._banks().items():
            for key in ("bank", "bank_ptr"):
                getattr(bank, key).copy_(state[f"{name}.{key}"])
