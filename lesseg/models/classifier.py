"""A multi-label image classifier on the toolkit's encoders (weak supervision's first stage: CAMs).

Only the encoder and a GAP + bias-free 1x1 classification head: a stage that trains it wraps exactly these
parameters in DDP (no decode head whose parameters would get no gradient), so ``find_unused_parameters``
is never needed. Its encoder keys are ``encoder.*`` as in :class:`Segmentor`: a segmentation run can start
from a classifier checkpoint through ``model.pretrained``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .heads import ClassificationHead
from .pretrained import load_pretrained
from .segmentor import create_encoder


class Classifier(nn.Module):
    """Encoder + classification head; ``forward`` returns ``{"cls": B,C logits}``, ``cam`` the raw maps."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.cls_head = ClassificationHead(encoder.feature_info.channels()[-1], num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"cls": self.cls_head(self.encoder(x)[-1])}  # B,C

    def cam(self, x: Tensor) -> Tensor:
        """Raw class activation maps of the last encoder feature, B,C,h,w."""
        return self.cls_head.cam(self.encoder(x)[-1])

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.cls_head.parameters())


def build_classifier(cfg, num_classes: int) -> Classifier:
    """The classifier of ``model.*`` (encoder, output stride, pretrained weights; the decode head unused)."""
    encoder = create_encoder(cfg.encoder, cfg.output_stride)
    load_pretrained(encoder, cfg)
    return Classifier(encoder, num_classes)
