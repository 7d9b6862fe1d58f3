"""Proposal-based MIL (methods.md section 7, HCP-style; Wei et al.): image tags in, a trained segmentation
network out, as a pipeline of three stages run by one ``lesseg train``.

``classifier`` trains the multi-label classifier on the tagged stream ``labeled``, as cam's first stage does
(encoder + GAP + 1x1, BCE on the tags; ``method.classifier_checkpoint`` replaces it). ``proposals`` finds
selective-search proposals in every image of that stream (:mod:`lesseg.methods.weak.proposals`: at most
``max_proposals``, each at least ``min_area`` of the image, in the loader's workers), cuts each out at the
classifier's input size (``proposal_size``, default data.crop_size) and scores it with the classifier,
``proposal_batch`` crops a forward; the scores of the image's tags vote into per-class localisation maps (a
pixel's vote for class c: the summed c-scores of the boxes covering it, those below ``min_score`` left out),
normalised by their peaks. Pseudo-masks: the best tagged class where its map is >= ``fg_threshold``,
background below ``bg_threshold``, 255 between, written as a folder dataset to ``<out>/proposals`` and scored
where the images have masks (``quality.json``, as cam's); the stage's metrics also give its speed
(``images_per_s``: the images over the wall seconds of scoring their crops and voting, the proposals, found in
the loader's workers, and the writing left out). The last stage trains a segmentation network with
CE on them (the stream ``pseudo``) in ``<out>``, evaluated on the val split.

Departures from the authors' pipeline:
- HCP trains its classifier on the proposals of an image (scores max-pooled over them); lesseg's is trained on
  whole images (augmented crops) and meets the proposals' crops at the same input size.
- Proposals from selective search (OpenCV contrib) rather than BING or EdgeBoxes.
- No cross-image re-ranking of the proposals (their summed nearest feature distance to other images' proposals
  of the class): the votes are the classifier's scores. methods.md calls MIL a historical baseline.
- The localisation maps become hard pseudo-masks with an uncertain band (as cam's) instead of soft targets.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from ..config import ranged
from ..data.loader import SegDataset
from ..errors import ConfigError, DataError
from .base import METHODS, Stage
from .cam import (
    CAM,
    Throughput,
    cam_inputs,
    check_tagged_run,
    classifier_config,
    load_classifier,
    pseudo_train_config,
    tagged_images,
)
from .stc import write_mask_dataset
from .supervised import SupervisedConfig
from .weak.cam import pseudo_masks
from .weak.proposals import MODES, localization_maps, propose

PROPOSAL_KEYS = ("search", "max_proposals", "min_area", "proposal_size", "min_score", "fg_threshold",
                 "bg_threshold", "bg_class")


@dataclass
class MilConfig(SupervisedConfig):
    name: str = "mil"
    search: str = "fast"  # selective search: fast | quality (more boxes, slower)
    max_proposals: int = ranged(200, "[1, inf)")  # a random subset (seeded per image) of an image's boxes
    min_area: float = ranged(0.01, "[0, 1]")  # boxes smaller than this share of the image are dropped
    proposal_size: list[int] | None = ranged(None, "[1, inf)")  # H, W of the classifier's crops; None: data.crop_size
    proposal_batch: int = ranged(64, "[1, inf)")  # crops a classifier forward
    min_score: float = ranged(0.0, "[0, 1]")  # a box votes for a class where its score is >= this
    fg_threshold: float = ranged(0.5, "[0, 1]")  # best tagged map >= this: that class
    bg_threshold: float | None = ranged(0.2, "[0, 1]")  # below: background; between: 255; None: fg_threshold
    bg_class: int = ranged(0, "[0, inf)")  # the class id background gets (it has no map of its own)
    # last stage: the segmentation network's encoder starts from the classifier's
    init_from_classifier: bool = False
    classifier_checkpoint: str | None = None  # a classifier trained before (then not trained)


class ProposalItems(Dataset):
    """The items of ``data`` with their proposals (``boxes``, N,4 int64), found where the item is read (in
    the loader's workers); the subset of an image's boxes is drawn from a generator of (seed, index)."""

    def __init__(self, data: SegDataset, m: Any, seed: int) -> None:
        self.data, self.seed = data, seed
        self.search, self.max_proposals, self.min_area = m.search, m.max_proposals, m.min_area

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        item = self.data[i]
        rgb = self.data.source.read_image(self.data.samples[i].image)
        if rgb.shape[:2] != tuple(item["image"].shape[-2:]):
            raise DataError(f"image {self.data.samples[i].image} is {rgb.shape[1]}x{rgb.shape[0]} as read, "
                            f"{item['image'].shape[-1]}x{item['image'].shape[-2]} as its dataset gives it")
        rng = np.random.default_rng([self.seed, i])
        item["boxes"] = torch.from_numpy(propose(rgb, self.search, self.max_proposals, self.min_area, rng))
        return item


def write_proposal_dataset(ctx: Any) -> dict:
    """Stage ``proposals``: the pseudo-masks of every tagged image from its proposals' votes."""
    cfg, m = ctx.cfg, ctx.cfg.method
    data, _ = tagged_images(ctx)
    net = load_classifier(ctx.products["classifier"], ctx.class_names, ctx.device)
    size = list(m.proposal_size or cfg.data.crop_size)
    autocast = torch.autocast(ctx.device.type, dtype=ctx.amp) if ctx.amp else nullcontext()

    def classify(crops: Tensor) -> Tensor:
        with autocast:
            return net(crops)["cls"].float()

    speed = Throughput(ctx.device)

    def mask_of(item: dict) -> Tensor:
        with speed.timing(1), torch.no_grad():
            tags = item["tags"].to(ctx.device)
            tags[:, m.bg_class] = 0  # background has no map of its own: low object maps make it
            maps = localization_maps(classify, item["image"][0].to(ctx.device), item["boxes"][0], tags[0], size,
                                     m.proposal_batch, m.min_score)
            return pseudo_masks(maps[None], tags, m.fg_threshold, m.bg_threshold, bg_class=m.bg_class)[0]

    metrics = write_mask_dataset(ctx, data, list(range(len(data))), mask_of, "proposal pseudo-masks",
                                 items=ProposalItems(data, m, cfg.train.seed))
    return {**metrics, "images_per_s": speed.images_per_s(ctx.all_reduce_sum)}


def proposal_inputs(cfg: DictConfig) -> dict:
    """What the pseudo-masks depend on besides the classifier: the images, their tags, the settings, the seed
    (which picks the proposals) and the crop size (the default proposal size)."""
    return {**cam_inputs(cfg, PROPOSAL_KEYS), "seed": cfg.train.seed, "crop_size": list(cfg.data.crop_size)}


def segmentation_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The last stage: CE on the ``proposals`` stage's dataset (the stream ``pseudo``), the encoder from the
    classifier with ``init_from_classifier``."""
    start = products["classifier"] if cfg.method.init_from_classifier else None
    return pseudo_train_config(cfg, products["proposals"], start)


@METHODS.register("mil")
class MIL(CAM):
    """The last stage's training: a segmentation network, CE (or OHEM, aux head) on the proposal masks."""

    Config = MilConfig
    stage_names = ("classifier", "proposals", "train")

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        check_tagged_run(cfg)
        m = cfg.method
        if m.search not in MODES:
            raise ConfigError(f"method.search {m.search!r} is not one of {', '.join(MODES)}")
        return [Stage("classifier", config=classifier_config, given=m.classifier_checkpoint),
                Stage("proposals", run=write_proposal_dataset, inputs=proposal_inputs),
                Stage("train", config=segmentation_config)]


__all__ = ["MIL", "MilConfig", "ProposalItems", "write_proposal_dataset"]
