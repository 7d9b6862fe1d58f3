"""lesseg: label-efficient semantic segmentation (semi-supervised, weakly supervised, active domain adaptation).

Python API::

    from lesseg import config, train
    cfg = config.load("configs/shapes/supervised.yaml", ["train.iters=200"])
    result = train(cfg)          # {"miou": ..., "iou": {...}, "mode": ...}
"""

from . import config
from .engine import Trainer, evaluate, train

__version__ = "0.1.0"
__all__ = ["Trainer", "config", "evaluate", "train", "__version__"]
