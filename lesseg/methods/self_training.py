"""Offline self-training (methods.md section 4), three stages run by one ``lesseg train`` command.

``SelfTraining.prepare`` (called by the trainer before it builds anything) runs stage 1, a supervised
training of the same config in ``<out>/stage1``, and stage 2, which predicts every image of the unlabeled
stream with the stage-1 network (evaluation settings) and writes a generic-folder-format dataset of
pseudo-masks to ``<out>/pseudo`` (pixels below ``threshold`` confidence become 255). It returns the stage-3
config: streams ``labeled`` and ``pseudo``, on which this method trains a fresh network with CE.
Stages are resumable: stage 1 resumes from its ``last.pt`` (a finished run does no step), and stage 2 is
skipped once its ``done`` marker exists (written after every file). ``method.stage1_checkpoint`` replaces
stage 1 by a network trained before (the supervised baseline one has anyway).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from .. import config as config_mod
from .. import dist
from ..config import ranged
from ..data import SegDataset, eval_loader, stream_source
from ..data.formats import IMAGE_SUFFIXES
from ..data.splits import write_split
from ..errors import ConfigError
from ..models import build_model
from ..models.pretrained import eval_net_weights
from .base import METHODS, Method, RunInfo
from .common import IGNORE, split_outputs
from .supervised import SupervisedConfig, sup_loss

if TYPE_CHECKING:
    from ..engine.trainer import Trainer

log = logging.getLogger(__name__)
DONE = "done"  # marker file of a complete pseudo-label dataset


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


def safe_stems(names: list[str]) -> list[str]:
    """File-system safe, unique stems for sample names (other characters become ``_``; clashes get ``-k``).

    Dots are replaced too, so a stem never looks like a file name with an image suffix.
    """
    stems, seen = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "_"
        unique, k = stem, 1
        while unique in seen:
            unique, k = f"{stem}-{k}", k + 1
        seen.add(unique)
        stems.append(unique)
    return stems


def _link_image(src: Path, dst_stem: Path, read_image) -> None:
    """``dst_stem.<suffix>`` -> the original image: a symlink, a copy where links fail, a PNG written with
    ``read_image`` where the suffix is not one the folder format reads."""
    suffix = src.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        Image.fromarray(read_image(src)).save(dst_stem.with_suffix(".png"))
        return
    try:
        os.symlink(src.resolve(), dst_stem.with_suffix(suffix))
    except OSError:
        shutil.copyfile(src, dst_stem.with_suffix(suffix))


def write_pseudo_dataset(cfg: DictConfig, trainer: Trainer, root: Path) -> None:
    """Stage 2: predict the unlabeled stream's split with the trained network of ``trainer`` and write
    ``root/{images,masks,classes.txt,splits/train.txt}``, then ``root/done``. Processes share the images.
    With ``true_masks`` on the unlabeled stream, also ``root/quality.json``: the pseudo-masks' IoU against
    the hidden masks (diagnostics; the masks are not used otherwise)."""
    from ..engine.evaluate import (  # lazy: engine imports methods
        confusion_matrix,
        iou_from_confusion,
        predict_probs,
    )

    src = stream_source(cfg.data, cfg.data.streams.unlabeled)
    samples = src.samples(cfg.data.streams.unlabeled.split)
    stems = safe_stems([s.name for s in samples])
    if trainer.main:
        shutil.rmtree(root, ignore_errors=True)  # leftovers of an interrupted stage 2
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
    dist.barrier()
    scored = bool(cfg.data.streams.unlabeled.true_masks)  # diagnostics: compare with the hidden masks
    data = SegDataset(
        src, samples, train=False, labeled=scored, mean=list(cfg.data.mean), std=list(cfg.data.std)
    )
    c = trainer.info.num_classes
    conf = torch.zeros(c, c, dtype=torch.long, device=trainer.device)
    loader = eval_loader(data, 1, trainer.rank, trainer.world, cfg.data.workers)
    crop = list(cfg.eval.crop_size or cfg.data.crop_size)
    net = trainer.eval_net().eval()
    autocast = torch.autocast(trainer.device.type, dtype=trainer.amp) if trainer.amp else nullcontext()
    for item in tqdm(loader, desc="pseudo-labels", disable=not trainer.progress, leave=False):
        i = int(item["index"])
        with autocast:
            probs = predict_probs(
                net, item["image"].to(trainer.device), cfg.eval, crop, trainer.info.num_classes
            )
        mask = pseudo_mask(probs, cfg.method.threshold)[0].cpu()  # H,W
        Image.fromarray(mask.numpy()).save(root / "masks" / f"{stems[i]}.png")
        if scored:  # pixels left unlabeled (below the threshold) are not scored
            true = item["mask"][0].masked_fill(mask == IGNORE, IGNORE)
            conf += confusion_matrix(mask, true, c).to(conf.device)
        _link_image(samples[i].image, root / "images" / stems[i], src.read_image)
    dist.all_reduce_sum(conf)  # also the processes' meeting point before the files are listed
    if trainer.main:
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in trainer.info.class_names))
        if scored:
            quality = iou_from_confusion(conf.cpu(), trainer.info.class_names)
            (root / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
            log.info("pseudo-masks vs the unlabeled masks: mIoU %.2f, pixel accuracy %.2f (%s)",
                     100 * quality["miou"], 100 * quality["acc"], root / "quality.json")
        write_split(root / "splits" / "train.txt", stems)
        (root / DONE).write_text(f"{len(stems)} images\n")
    dist.barrier()


def stage1_config(cfg: DictConfig) -> DictConfig:
    """The supervised run of stage 1: same data, model and schedule, in ``<out>/stage1``."""
    d = OmegaConf.to_container(cfg)
    d["method"] = {f.name: d["method"][f.name] for f in fields(SupervisedConfig)} | {"name": "supervised"}
    d["out"] = str(Path(cfg.out) / "stage1")
    return config_mod.from_dict(d)


def load_stage1(trainer: Trainer, path: str) -> None:
    """Put the evaluated network of the lesseg checkpoint ``path`` into the stage-1 trainer's network; a
    checkpoint of other classes or another model is one error naming it."""
    from ..engine import checkpoint as ckpt  # lazy: lesseg.engine imports lesseg.methods

    state = ckpt.load(path)
    if not all(k in state for k in ("method", "info", "eval_net")):
        raise ConfigError(f"method.stage1_checkpoint {path} is not a lesseg training checkpoint")
    names = state["info"].get("class_names")
    if names != trainer.info.class_names:
        raise ConfigError(f"method.stage1_checkpoint {path} was trained on classes {names}, this run's data has "
                          f"{trainer.info.class_names}")
    try:
        trainer.eval_net().load_state_dict(eval_net_weights(state))
    except RuntimeError as e:
        raise ConfigError(f"method.stage1_checkpoint {path} does not fit this config's model.* settings: "
                          f"{str(e).splitlines()[-1].strip()[:300]}") from None


def pseudo_root(cfg: DictConfig) -> Path:
    """Where stage 2 writes the pseudo-masked dataset of a run (inside its run folder)."""
    return Path(cfg.out) / "pseudo"


def stage3_config(cfg: DictConfig, root: Path) -> DictConfig:
    """The config of stage 3: streams ``labeled`` (unchanged) and ``pseudo`` (the stage-2 folder dataset)."""
    d = OmegaConf.to_container(cfg)
    streams = d["data"]["streams"]
    pseudo = {
        **streams["unlabeled"],
        "dataset": "folder",
        "root": str(root),
        "split": "train",
        "labeled": True,
        "strong": False,
        "options": {},
    }
    d["data"]["streams"] = {"labeled": streams["labeled"], "pseudo": pseudo}
    return config_mod.from_dict(d)


@METHODS.register("self_training")
class SelfTraining(Method):
    Config = SelfTrainingConfig
    streams = ("labeled", "pseudo")
    config_streams = ("labeled", "unlabeled")

    def __init__(self, cfg: SelfTrainingConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)

    @classmethod
    def prepare(cls, cfg: DictConfig) -> DictConfig:
        """Run stages 1 and 2 (or skip what is complete) and return the stage-3 config."""
        from ..engine.trainer import Trainer  # lazy: lesseg.engine imports lesseg.methods

        if cfg.out is None:
            raise ConfigError("self_training needs a run folder: set `out`")
        if "unlabeled" not in cfg.data.streams or "labeled" not in cfg.data.streams:
            raise ConfigError(
                f"self_training needs data streams 'labeled' and 'unlabeled' (the images to "
                f"pseudo-label); data.streams defines {list(cfg.data.streams)}"
            )
        given = cfg.method.stage1_checkpoint
        if given is not None and not Path(given).is_file():
            raise ConfigError(f"method.stage1_checkpoint: no checkpoint {given}")
        root = pseudo_root(cfg)
        if not (root / DONE).is_file():
            stage1 = stage1_config(cfg)
            if given is None:
                trainer = Trainer(stage1, resume=(Path(stage1.out) / "last.pt").is_file())
                trainer.fit()
            else:  # a trainer only for its device, run info and network, which takes the given weights
                trainer = Trainer(stage1)
                load_stage1(trainer, given)
            write_pseudo_dataset(cfg, trainer, root)
        return cls.final_config(cfg)

    @classmethod
    def final_config(cls, cfg: DictConfig) -> DictConfig:
        return stage3_config(cfg, pseudo_root(cfg))

    def training_step(self, batch, step):
        lab, pse = batch["labeled"], batch["pseudo"]
        out_l, out_p = split_outputs(self.net(torch.cat([lab["image"], pse["image"]])), lab["image"].shape[0])
        loss_sup = sup_loss(out_l, lab["mask"], self.cfg)
        loss_pseudo = sup_loss(out_p, pse["mask"], self.cfg)
        loss = loss_sup + self.cfg.pseudo_weight * loss_pseudo
        return {"loss": loss, "loss_sup": loss_sup, "loss_pseudo": loss_pseudo}
