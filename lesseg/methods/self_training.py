"""Offline self-training (methods.md section 4): a pipeline of three stages run by one ``lesseg train``.

``stage1`` trains the supervised baseline of the same config (in ``<out>/stage1``); ``pseudo`` predicts every
image of the unlabeled stream with the stage-1 network (evaluation settings) and writes a dataset in the
folder format to ``<out>/pseudo`` (pixels below ``threshold`` confidence become 255); the last stage trains
a fresh network with CE on the streams ``labeled`` and ``pseudo`` (that dataset) in ``<out>``. The engine
skips finished stages and resumes an interrupted one; ``method.stage1_checkpoint`` replaces stage 1 by a
network trained before (the supervised baseline one has anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import config as config_mod
from ..config import ranged
from ..data.writer import FolderWriter
from ..errors import ConfigError
from ..models import build_model
from .base import METHODS, Method, RunInfo, Stage
from .common import IGNORE, split_outputs
from .supervised import SupervisedConfig, sup_loss


@dataclass
class SelfTrainingConfig(SupervisedConfig):
    name: str = "self_training"
    threshold: float = ranged(0.0, "[0, 1]")  # stage 2: keep pixels whose confidence is >= threshold (0 keeps all), others 255
    pseudo_weight: float = ranged(1.0, "[0, inf)")  # stage 3: weight of the CE on pseudo-labeled images
    # stage 1 done elsewhere: a lesseg checkpoint (say, your SupOnly run's last.pt) whose evaluated network,
    # same model.* and classes, writes the pseudo-masks; stage 1 is then not trained
    stage1_checkpoint: str | None = None


def pseudo_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Argmax class where the confidence is >= ``threshold``, 255 elsewhere. B,C,H,W -> B,H,W uint8"""
    conf, pred = probs.max(1)
    return pred.masked_fill(conf < threshold, IGNORE).to(torch.uint8)


def write_pseudo_dataset(ctx: Any) -> dict:
    """Stage ``pseudo``: predict the unlabeled stream's split with the ``stage1`` network and write
    ``ctx.folder/{images,masks,classes.txt,splits/train.txt}``. Processes share the images. With
    ``true_masks`` on the unlabeled stream, also ``quality.json``: the pseudo-masks' IoU against the hidden
    masks (diagnostics; the masks are not used otherwise), whose mIoU and accuracy it returns."""
    cfg = ctx.cfg
    scored = bool(cfg.data.streams.unlabeled.true_masks)
    data = ctx.dataset("unlabeled", masks=scored)
    writer = FolderWriter(ctx.folder, [s.name for s in data.samples], ctx.class_names)
    if ctx.main:
        writer.clear()  # leftovers of an interrupted stage
    ctx.barrier()
    net = ctx.network("stage1")
    for item in tqdm(ctx.loader("unlabeled", masks=scored), desc="pseudo-labels", disable=not ctx.progress,
                     leave=False):
        i = int(item["index"])
        mask = pseudo_mask(ctx.predict(net, item["image"]), cfg.method.threshold)[0].cpu()  # H,W
        writer.write(i, data.samples[i].image, mask.numpy(), data.source.read_image,
                     true=item["mask"][0] if scored else None)
    quality = writer.quality(ctx.all_reduce_sum)  # also the processes' meeting point before the files are listed
    if ctx.main:
        writer.finish(quality)
    return {} if quality is None else {"pseudo_miou": quality["miou"], "pseudo_acc": quality["acc"]}


def stage1_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The supervised run of stage 1: same data, model and schedule."""
    d = OmegaConf.to_container(cfg)
    d["method"] = {f.name: d["method"][f.name] for f in fields(SupervisedConfig)} | {"name": "supervised"}
    return config_mod.from_dict(d)


def stage3_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The last stage: streams ``labeled`` (unchanged) and ``pseudo`` (the ``pseudo`` stage's dataset)."""
    d = OmegaConf.to_container(cfg)
    streams = d["data"]["streams"]
    pseudo = {
        **streams["unlabeled"],
        "dataset": "folder",
        "root": str(products["pseudo"]),
        "split": "train",
        "labeled": True,
        "strong": False,
        "true_masks": False,
        "options": {},
    }
    d["data"]["streams"] = {"labeled": streams["labeled"], "pseudo": pseudo}
    return config_mod.from_dict(d)


def pseudo_inputs(cfg: DictConfig) -> dict:
    """What the pseudo-masks depend on (besides the stage-1 network): the images, threshold and prediction."""
    return {"unlabeled": OmegaConf.to_container(cfg.data.streams.unlabeled), "threshold": cfg.method.threshold,
            "eval": OmegaConf.to_container(cfg.eval), "data": {k: OmegaConf.to_container(cfg.data)[k]
                                                                for k in ("dataset", "root", "options", "mean", "std")}}


@METHODS.register("self_training")
class SelfTraining(Method):
    Config = SelfTrainingConfig
    streams = ("labeled", "pseudo")
    config_streams = ("labeled", "unlabeled")
    stage_names = ("stage1", "pseudo", "train")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_pseudo": ("net",)}

    def __init__(self, cfg: SelfTrainingConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        if "unlabeled" not in cfg.data.streams or "labeled" not in cfg.data.streams:
            raise ConfigError(
                f"self_training needs data streams 'labeled' and 'unlabeled' (the images to "
                f"pseudo-label); data.streams defines {list(cfg.data.streams)}"
            )
        given = cfg.method.stage1_checkpoint
        return [Stage("stage1", config=stage1_config, given=given),
                Stage("pseudo", run=write_pseudo_dataset, inputs=pseudo_inputs),
                Stage("train", config=stage3_config)]

    def training_step(self, batch, step):
        lab, pse = batch["labeled"], batch["pseudo"]
        out_l, out_p = split_outputs(self.net(torch.cat([lab["image"], pse["image"]])), lab["image"].shape[0])
        loss_sup = sup_loss(out_l, lab["mask"], self.cfg)
        loss_pseudo = sup_loss(out_p, pse["mask"], self.cfg)
        loss = loss_sup + self.cfg.pseudo_weight * loss_pseudo
        return {"loss": loss, "loss_sup": loss_sup, "loss_pseudo": loss_pseudo}
