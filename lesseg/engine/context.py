"""What the engine lends a method outside its training step: to a pipeline's task stage and to a round.

A method never imports the engine; it receives an :class:`EngineContext` and asks it for un-augmented,
sharded loaders of any stream, the networks of earlier stages' checkpoints, predictions with the run's
evaluation settings, all-gathers across processes, the label store and a log.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from .. import dist
from ..data import SegDataset, stream_source
from ..errors import ConfigError
from ..models import build_model
from ..models.pretrained import eval_net_weights
from . import checkpoint as ckpt
from .evaluate import predict_probs


@dataclass
class EngineContext:
    cfg: DictConfig  # the stage's (or the run's) config
    device: torch.device
    class_names: list[str]
    amp: torch.dtype | None = None
    progress: bool = True
    folder: Path | None = None  # a task stage's folder (its product); a round's: the run folder
    products: dict[str, Path] = field(default_factory=dict)  # earlier stages' products, by stage name
    step: int = 0  # a round's step
    label_store: Any = None
    log: Callable[[dict], None] = lambda record: None

    @property
    def rank(self) -> int:
        return dist.rank()

    @property
    def world(self) -> int:
        return dist.world()

    @property
    def main(self) -> bool:
        return dist.is_main()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- data ------------------------------------------------------------------------------------------
    def dataset(self, stream: str, masks: bool = False) -> SegDataset:
        """The images of ``stream``'s split at their native size, without augmentation (``masks``: with their
        ground-truth masks, e.g. a simulated annotator's or a pseudo-mask's quality)."""
        if stream not in self.cfg.data.streams:
            raise ConfigError(f"stream {stream!r} is not in data.streams ({list(self.cfg.data.streams)})")
        sc = self.cfg.data.streams[stream]
        src = stream_source(self.cfg.data, sc)
        return SegDataset(src, src.samples(sc.split), train=False, labeled=masks, mean=list(self.cfg.data.mean),
                          std=list(self.cfg.data.std))

    def loader(self, stream: str, masks: bool = False) -> DataLoader:
        """One image at a time; each process gets every ``world``-th image (items carry ``index``)."""
        data = self.dataset(stream, masks)
        shard = torch.utils.data.Subset(data, list(range(self.rank, len(data), self.world)))
        return DataLoader(shard, batch_size=1, shuffle=False, num_workers=self.cfg.data.workers)

    # -- networks --------------------------------------------------------------------------------------
    def network(self, product: str) -> torch.nn.Module:
        """The evaluated network of the checkpoint an earlier stage produced (or was given), built with this
        config's ``model.*``, on the device, in eval mode. Other classes or another model is one error."""
        path = self.products[product]
        state = ckpt.load(path)
        if not all(k in state for k in ("method", "info", "eval_net")):
            raise ConfigError(f"{path} is not a lesseg training checkpoint")
        names = state["info"].get("class_names")
        if names != self.class_names:
            raise ConfigError(f"{path} was trained on classes {names}, this run's data has {self.class_names}")
        net = build_model(_without_pretrained(self.cfg.model), self.num_classes)
        try:
            net.load_state_dict(eval_net_weights(state))
        except RuntimeError as e:
            raise ConfigError(f"{path} does not fit this config's model.* settings: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from None
        return net.to(self.device).eval()

    @torch.no_grad()
    def predict(self, net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities with the evaluation settings (mode, scales, flip). B,3,H,W -> B,C,H,W float"""
        crop = list(self.cfg.eval.crop_size or self.cfg.data.crop_size)
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            return predict_probs(net, image.to(self.device), self.cfg.eval, crop, self.num_classes).float()

    # -- processes -------------------------------------------------------------------------------------
    def gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order (``[obj]`` in one process)."""
        if not dist.is_dist():
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(t)

    def barrier(self) -> None:
        dist.barrier()


def _without_pretrained(model_cfg: DictConfig) -> DictConfig:
    """The checkpoint's weights replace the encoder's: its pretrained file need not be read (or exist)."""
    return OmegaConf.merge(model_cfg, {"pretrained": None})
