"""lesseg: label-efficient semantic segmentation (semi-supervised, weakly supervised, active domain adaptation).

Python API::

    from lesseg import config, train
    cfg = config.load("configs/shapes/supervised.yaml", ["train.iters=200"])
    result = train(cfg)          # {"miou": ..., "iou": {...}, "mode": ...}
"""

__version__ = "0.1.0"
__all__ = ["Trainer", "__version__", "config", "evaluate", "train"]


def __getattr__(name: str):
    """Import lazily, so that ``lesseg --help`` does not wait for torch."""
    import importlib

    if name == "config":
        return importlib.import_module(".config", __name__)
    if name in ("Trainer", "evaluate", "train"):
        return getattr(importlib.import_module(".engine", __name__), name)
    raise AttributeError(f"module 'lesseg' has no attribute {name!r}")
