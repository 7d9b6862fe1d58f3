"""Offline self-training (methods.md section 4): a pipeline of three stages run by one ``lesseg train``.

``stage1`` trains the supervised baseline of the same config (in ``<out>/stage1``); ``pseudo`` predicts every
image of the unlabeled stream with the stage-1 network (evaluation settings) and writes a dataset in the
folder format to ``<out>/pseudo`` (pixels below ``threshold`` confidence become 255); the last stage trains
a fresh network with CE on the streams ``labeled`` and ``pseudo`` (that dataset) in ``<out>``. The engine
skips finished stages and resumes an interrupted one; ``method.stage1_checkpoint`` replaces stage 1 by a
network trained before (the supervised baseline one has anyway).

``align`` (``hard`` by default; ``none`` is the paper's): the pseudo-masks' class shares aligned to the labeled masks'
before they are written, DARS's re-distribution (He et al., ICCV 2021) in its own offline setting: a first
pass over the unlabeled images keeps an even sample of each one's class log-probabilities (2^20 pixels in
all), solves the per-class offset on them (``hard``: :func:`common.argmax_shift`, the argmax's shares; ``mean``:
ReMixMatch's ``log pi_lab - log mean p``), and the second pass writes the argmax (and applies ``threshold``)
of the shifted probabilities. The labeled shares count the pixels of the labeled stream's masks.
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
from .common import ALIGN_MODES, IGNORE, argmax_shift, mean_shift, split_outputs
from .supervised import SupervisedConfig, sup_loss


@dataclass
class SelfTrainingConfig(SupervisedConfig):
    name: str = "self_training"
    threshold: float = ranged(0.0, "[0, 1]")  # stage 2: keep pixels whose confidence is >= threshold (0 keeps all), others 255
    pseudo_weight: float = ranged(1.0, "[0, inf)")  # stage 3: weight of the CE on pseudo-labeled images
    # stage 1 done elsewhere: a lesseg checkpoint (say, your SupOnly run's last.pt) whose evaluated network,
    # same model.* and classes, writes the pseudo-masks; stage 1 is then not trained
    stage1_checkpoint: str | None = None
    # none | mean | hard: the pseudo-masks' class shares aligned to the labeled masks' (module docstring). hard
    # (ours; none is the paper's): +1.3 / +1.3 mIoU over SupOnly on shapes / fashion at 300 steps from ImageNet
    # MobileNetV2, two seeds, against +0.9 / +0.0 unaligned (docs/benchmarks.md, "Self-training's pseudo-masks
    # aligned")
    align: str = "hard"


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
    shift = None if cfg.method.align == "none" else alignment_shift(ctx, net, cfg.method.align, len(data))
    for item in tqdm(ctx.loader("unlabeled", masks=scored), desc="pseudo-labels", disable=not ctx.progress,
                     leave=False):
        i = int(item["index"])
        probs = ctx.predict(net, item["image"])
        if shift is not None:
            probs = (probs.clamp_min(1e-12).log() + shift.view(1, -1, 1, 1)).softmax(1)
        mask = pseudo_mask(probs, cfg.method.threshold)[0].cpu()  # H,W
        writer.write(i, data.samples[i].image, mask.numpy(), data.source.read_image,
                     true=item["mask"][0] if scored else None)
    quality = writer.quality(ctx.all_reduce_sum)  # also the processes' meeting point before the files are listed
    if ctx.main:
        writer.finish(quality)
    return {} if quality is None else {"pseudo_miou": quality["miou"], "pseudo_acc": quality["acc"]}


SAMPLED_PIXELS = 2**20  # the class log-probabilities kept for the offline alignment, over every image
OFFLINE_ITERS, OFFLINE_DECAY = 200, 0.97  # the offline solve's steps: from +-0.5 down to +-0.001


@torch.no_grad()
def alignment_shift(ctx: Any, net: torch.nn.Module, mode: str, n_images: int) -> torch.Tensor:
    """The per-class offset (C,) that aligns the stage-1 network's predictions on the unlabeled stream to the
    class shares of the labeled stream's masks (``mode``: ``hard`` or ``mean``; module docstring). Counts
    and samples are summed over processes, which share the images."""
    c = len(ctx.class_names)
    labeled = torch.zeros(c, dtype=torch.float64)
    for item in tqdm(ctx.loader("labeled", masks=True), desc="labeled class shares", disable=not ctx.progress,
                     leave=False):
        m = item["mask"].reshape(-1).long()
        labeled += torch.bincount(m[m != IGNORE], minlength=c)[:c].double()
    labeled = ctx.all_reduce_sum(labeled.to(ctx.device)).float()
    target = labeled / labeled.sum().clamp_min(1.0)
    per_image = max(16, SAMPLED_PIXELS // max(n_images, 1))
    logps, mean = [], torch.zeros(c, device=ctx.device)
    for item in tqdm(ctx.loader("unlabeled"), desc="alignment (pass 1 of 2)", disable=not ctx.progress,
                     leave=False):
        probs = ctx.predict(net, item["image"])[0]  # C,H,W
        if mode == "mean":  # the mean probability only
            mean += probs.sum((1, 2))
            continue
        flat = probs.reshape(c, -1)
        stride = max(1, -(-flat.shape[1] // per_image))
        logps.append(flat[:, ::stride].t().clamp_min(1e-12).log())
    if mode == "mean":
        mean = ctx.all_reduce_sum(mean)
        return mean_shift(target, mean / mean.sum().clamp_min(1e-12))
    logp = torch.cat(logps) if logps else torch.zeros(0, c, device=ctx.device)
    return argmax_shift(logp, torch.ones(logp.shape[0], device=logp.device), target, torch.zeros_like(target),
                        iters=OFFLINE_ITERS, decay=OFFLINE_DECAY)


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
    """What the pseudo-masks depend on (besides the stage-1 network): the images, threshold and prediction, and
    with an alignment the labeled stream whose masks give its target."""
    inputs = {"unlabeled": OmegaConf.to_container(cfg.data.streams.unlabeled), "threshold": cfg.method.threshold,
              "eval": OmegaConf.to_container(cfg.eval), "data": {k: OmegaConf.to_container(cfg.data)[k]
                                                                  for k in ("dataset", "root", "options", "mean", "std")}}
    if cfg.method.align != "none":  # the aligned masks also depend on the labeled masks (unaligned runs keep their inputs)
        inputs |= {"align": cfg.method.align, "labeled": OmegaConf.to_container(cfg.data.streams.labeled)}
    return inputs


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
        if cfg.method.align not in ALIGN_MODES:
            raise ConfigError(f"method.align must be one of {', '.join(ALIGN_MODES)}, got {cfg.method.align!r}")
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
