"""Segmentation models: timm encoders with DeepLab heads (architecture.md, item 6)."""

from lesseg.models.classifier import Classifier, build_classifier
from lesseg.models.pretrained import LoadReport, load_encoder_weights
from lesseg.models.segmentor import (
    HEADS,
    Segmentor,
    batchnorm_groups,
    build_model,
    class_map,
    create_encoder,
    eval_mode,
)

__all__ = ["HEADS", "Classifier", "LoadReport", "Segmentor", "batchnorm_groups", "build_classifier", "build_model",
           "class_map", "create_encoder", "eval_mode", "load_encoder_weights"]
