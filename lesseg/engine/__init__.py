"""Training loop, evaluation and checkpoints."""

from .evaluate import confusion_matrix, evaluate, iou_from_confusion, predict_probs
from .trainer import Trainer, train

__all__ = ["Trainer", "confusion_matrix", "evaluate", "iou_from_confusion", "predict_probs", "train"]
