"""The encoder the semi-supervised bench's runs start from: a supervised run on the synthetic shapes domain,
as the papers' runs start from ImageNet (``lesseg bench semi --pretrain``)."""

from __future__ import annotations

from pathlib import Path

from .. import config
from ..errors import LessegError
from .runs import finished_or_train


def pretrain_synthetic(out: Path, extra: list[str] = (), device: str = "auto", train_missing: bool = True,
                       family: str = "shapes") -> Path:
    """Train (or reuse) ``{family}/pretrain_synthetic.yaml`` in ``out/pretrain``; returns its checkpoint,
    whose evaluated network's encoder ``model.pretrained`` loads. ``extra`` overrides apply (model.* must
    match the runs that start from it) except ``data.*`` ones: the pretraining keeps its own dataset and root."""
    run_dir = out / "pretrain"
    own = [o for o in extra if not o.split("=", 1)[0].strip().startswith("data.")]
    cfg = config.load(f"{family}/pretrain_synthetic.yaml", own + [
        f"out={run_dir}", f"train.device={device}", "train.progress=false"])
    result = finished_or_train(cfg, run_dir, "supervised pretraining on synthetic shapes", train_missing)
    if result is None:
        raise LessegError(f"no finished pretraining in {run_dir}: the runs to summarize start from it")
    print(f"pretrained encoder: {run_dir / 'last.pt'} (synthetic val mIoU {100 * result['miou']:.2f})", flush=True)
    return run_dir / "last.pt"
