"""Segmentation models: timm encoders with DeepLab heads (architecture.md, item 6)."""

from lesseg.models.pretrained import LoadReport, load_encoder_weights
from lesseg.models.segmentor import HEADS, Segmentor, build_model, class_map, create_encoder

__all__ = ["HEADS", "LoadReport", "Segmentor", "build_model", "class_map", "create_encoder", "load_encoder_weights"]
