"""Multi-label image classification from image-level tags (methods.md section 7: the first stage of CAM,
adversarial erasing, PSL and STC): an encoder with a GAP + 1x1 head trained with BCE on the tags.

Evaluated by the multi-label mAP of its tags on the validation split (``Method.evaluation = "tags"``).
Trained alone it is a pipeline stage; its checkpoint's encoder starts a segmentation network
(``model.pretrained``) and its CAMs make pseudo-masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import build_classifier
from .base import METHODS, Method, MethodConfig, RunInfo


@dataclass
class ClassifierConfig(MethodConfig):
    name: str = "classifier"


def multilabel_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the image logits against the multi-hot tags. B,C ; B,C -> 0-dim"""
    return F.binary_cross_entropy_with_logits(logits.float(), tags.float())


@METHODS.register("classifier")
class ClassifierMethod(Method):
    Config = ClassifierConfig
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss": ("net",)}
    evaluation = "tags"

    def __init__(self, cfg: ClassifierConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_classifier(model_cfg, info.num_classes)

    def training_step(self, batch, step):
        lab = batch["labeled"]
        if "tags" not in lab:
            raise ConfigError("the classifier trains on image tags: every image of the labeled stream needs "
                              "them (image_labels.csv, or data.options.tags for VOC)")
        loss = multilabel_loss(self.net(lab["image"])["cls"], lab["tags"])
        return {"loss": loss}
