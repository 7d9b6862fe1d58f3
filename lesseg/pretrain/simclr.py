"""SimCLR (Chen et al., 2020): image-level contrast between two views of each image, the other images of the
(global, all-process) batch as negatives. lightly's projection head and NT-Xent loss."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead
from torch import Tensor, nn

from .base import SSL_METHODS, SSLMethod, Student, channels
from .config import PretrainConfig


@SSL_METHODS.register("simclr")
class SimCLR(SSLMethod):
    def __init__(self, encoder: nn.Module, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        c = channels(encoder)
        self.student = Student(encoder, {"global": SimCLRProjectionHead(c, c, cfg.proj_dim)})
        # gather_distributed: under DDP the negatives are the whole global batch
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = torch.cat([batch["view0"], batch["view1"]])  # 2B,3,S,S: one forward (BatchNorm sees both)
        z0, z1 = self.student(views)["global"].float().chunk(2)  # B,D each
        return {"loss": self.criterion(z0, z1)}
