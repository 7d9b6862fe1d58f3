"""STC, simple to complex (methods.md section 7; Wei et al., TPAMI 2017): image tags and saliency in, a trained
segmentation network out, as a pipeline of six stages run by one ``lesseg train``.

The tagged stream ``labeled`` is split by its tags: *simple* images carry exactly one object tag (``bg_class``
does not count), *complex* images are the others.

1. ``saliency`` (task): each simple image's saliency map (an OpenCV contrib detector or the user's maps,
   :mod:`lesseg.data.saliency`) makes its mask: the image's class where saliency / 255 >= ``fg_threshold``,
   background below ``bg_threshold``, and between them 255 (``band: ignore``) or, with ``band: sample``, the
   class with probability equal to the saliency and background otherwise (one draw a pixel, seeded per image).
2. ``initial`` (training): the Initial-DCNN, CE on those masks.
3. ``simple_masks`` (task): its predictions of the simple images (evaluation settings) filtered by their tags:
   the argmax over background and the image's classes.
4. ``enhanced`` (training): the Enhanced-DCNN, CE on those.
5. ``complex_masks`` (task): its predictions of the complex images (``powerful_images: all``: of every image),
   filtered by their tags.
6. ``train`` (the run's own training): the Powerful-DCNN, CE on those, evaluated on the val split.

Each task stage writes a dataset in the folder format to ``<out>/<stage>``; where the images have masks
(``labeled: true`` or ``true_masks: true`` on the stream) it is scored against them (``quality.json`` and
``stages.json``: mIoU, accuracy, foreground precision/recall, labelled fraction; masks nothing trains on).
The networks of stages 2 and 4 are ``supervised`` trainings (this config's loss settings and model, each from
``model.pretrained``), scored on val like the last; ``stages.<name>.*`` overrides one stage.

Departures from the paper:
- Its simple images are 40K Flickr images searched by class name, its complex ones PASCAL VOC's train_aug (all of
  it: ``powerful_images: all``); here both come from the one tagged stream, split by the number of tags.
- Its I-DCNN loss is a multi-label cross-entropy with the saliency as soft targets (the class with probability
  s, background 1 - s) at every pixel. A mask dataset carries one label a pixel through the augmentation, so
  lesseg's targets are one-hot, where that loss is CE: hard labels at the confident ends of the saliency and,
  in the band between, none (``band: ignore``) or a label drawn from the soft target (``band: sample``: the CE
  then equals the paper's loss in expectation; everywhere with ``bg_threshold: 0``, ``fg_threshold: 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .. import config as config_mod
from ..config import ranged
from ..data.base import Sample
from ..data.loader import SegDataset
from ..data.saliency import SaliencyMaps
from ..data.writer import FolderWriter
from ..errors import ConfigError
from ..models import class_map
from .base import METHODS, Stage
from .cam import (
    CAM,
    cam_inputs,
    check_saliency,
    check_tagged_run,
    finish_masks,
    pseudo_train_config,
    tagged_images,
)
from .supervised import SupervisedConfig
from .weak.cam import foreground_counts, pseudo_masks

BANDS = ("ignore", "sample")
POWERFUL_IMAGES = ("complex", "all")


@dataclass
class StcConfig(SupervisedConfig):
    name: str = "stc"
    # stage saliency: spectral_residual / fine_grained (OpenCV contrib, on each image) or folder (the user's
    # maps, <saliency_dir>/<image name>.png, 8-bit grey, e.g. of the paper's DRFI)
    saliency: str = "fine_grained"
    saliency_dir: str | None = None
    fg_threshold: float = ranged(0.7, "[0, 1]")  # saliency / 255 >= this: the image's class
    bg_threshold: float = ranged(0.3, "[0, 1]")  # saliency / 255 < this: background
    band: str = "ignore"  # between the thresholds: ignore (255) | sample (the class with probability saliency)
    bg_class: int = ranged(0, "[0, inf)")  # the class id of background (never a tag that makes an image complex)
    powerful_images: str = "complex"  # the last network's images: complex (two or more tags) | all


def split_by_tags(samples: list[Sample], bg_class: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the simple samples (exactly one tag other than ``bg_class``) and of the others."""
    simple, complex_ = [], []
    for i, s in enumerate(samples):
        (simple if len(set(s.tags or ()) - {bg_class}) == 1 else complex_).append(i)
    return simple, complex_


def saliency_masks(saliency: Tensor, tags: Tensor, fg_threshold: float, bg_threshold: float,
                   bg_class: int = 0, draws: Tensor | None = None) -> Tensor:
    """Masks of simple images from their saliency: the image's one class where saliency / 255 is >=
    ``fg_threshold``, ``bg_class`` below ``bg_threshold``, 255 between; with ``draws`` (uniform in [0, 1), one
    a pixel) a pixel between is the class where its draw is below its saliency / 255, else background.

    saliency B,H,W (0..255) ; tags B,C multi-hot, one object class an image -> B,H,W uint8"""
    objects = (tags > 0).clone()
    objects[:, bg_class] = False
    if not bool((objects.sum(1) == 1).all()):
        raise ValueError("saliency_masks takes simple images: exactly one object tag an image")
    s = saliency.float() / 255.0  # B,H,W
    maps = objects.float()[:, :, None, None] * s[:, None]  # B,C,H,W: the saliency as the one class's map
    masks = pseudo_masks(maps, objects.float(), fg_threshold, bg_threshold, bg_class=bg_class)
    if draws is not None:
        cls = objects.float().argmax(1).to(masks.dtype)[:, None, None].expand_as(masks)
        drawn = torch.where(draws.to(s.device) < s, cls, torch.full_like(masks, bg_class))
        masks = torch.where(masks == 255, drawn, masks)
    return masks


def tag_filtered_masks(probs: Tensor, tags: Tensor, bg_class: int = 0) -> Tensor:
    """The most likely class among background and the image's tags, at every pixel.

    probs B,C,H,W ; tags B,C multi-hot -> B,H,W uint8"""
    allowed = (tags > 0).clone()
    allowed[:, bg_class] = True
    return class_map(probs.float().masked_fill(~allowed[:, :, None, None], -1.0)).to(torch.uint8)


def write_mask_dataset(ctx: Any, data: SegDataset, indices: list[int], mask_of: Callable[[dict], Tensor],
                       desc: str, items: Dataset | None = None) -> dict:
    """A task stage's product: the masks ``mask_of(item) -> H,W uint8`` of the samples ``indices`` of
    ``data`` (items of ``items``, default ``data``: batch 1, sharded over the processes) as a folder dataset at
    ``ctx.folder``, scored against the true masks where ``data`` reads them (``quality.json``); returns the
    numbers for ``stages.json`` (:func:`~.cam.finish_masks`)."""
    writer = FolderWriter(ctx.folder, [data.samples[i].name for i in indices], ctx.class_names)
    position = {i: k for k, i in enumerate(indices)}
    if ctx.main:
        writer.clear()  # leftovers of an interrupted stage
    ctx.barrier()
    shard = Subset(items if items is not None else data, indices[ctx.rank::ctx.world])
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=ctx.cfg.data.workers)
    counts = torch.zeros(5, dtype=torch.long, device=ctx.device)
    for item in tqdm(loader, desc=desc, disable=not ctx.progress, leave=False):
        i = int(item["index"])
        mask = mask_of(item).to(ctx.device)  # H,W
        true = item["mask"].to(ctx.device) if data.labeled else None  # 1,H,W
        counts += foreground_counts(mask[None], true, ctx.cfg.method.bg_class)
        writer.write(position[i], data.samples[i].image, mask.cpu().numpy(), data.source.read_image,
                     true=item["mask"][0] if data.labeled else None)
    return finish_masks(ctx, writer, counts)


def write_saliency_dataset(ctx: Any) -> dict:
    """Stage ``saliency``: the saliency masks of the simple images (:func:`saliency_masks`)."""
    m = ctx.cfg.method
    data, _ = tagged_images(ctx)
    simple, _ = split_by_tags(data.samples, m.bg_class)
    if not simple:
        raise ConfigError("stc trains its first network on the simple images (exactly one object tag), and "
                          "the stream 'labeled' has none")
    saliency = SaliencyMaps(data.source, data.samples, m.saliency, m.saliency_dir)

    def mask_of(item: dict) -> Tensor:
        i, size = int(item["index"]), tuple(item["image"].shape[-2:])
        draws = None
        if m.band == "sample":  # one draw a pixel, from the image's own generator
            rng = np.random.default_rng([ctx.cfg.train.seed, i])
            draws = torch.from_numpy(rng.random(size, dtype=np.float32))[None]
        s = torch.from_numpy(saliency(i, size))[None]
        return saliency_masks(s, item["tags"], m.fg_threshold, m.bg_threshold, m.bg_class, draws)[0]

    return write_mask_dataset(ctx, data, simple, mask_of, "saliency masks")


def write_predicted_dataset(ctx: Any, network: str, images: str) -> dict:
    """Stages ``simple_masks`` / ``complex_masks``: the tag-filtered predictions of ``images`` (simple,
    complex or all) by the network of stage ``network``."""
    m = ctx.cfg.method
    data, _ = tagged_images(ctx)
    simple, complex_ = split_by_tags(data.samples, m.bg_class)
    indices = {"simple": simple, "complex": complex_, "all": list(range(len(data)))}[images]
    if not indices:
        raise ConfigError("stc trains its last network on the complex images (two or more object tags), and "
                          "the stream 'labeled' has none (method.powerful_images: all takes every image)")
    net = ctx.network(network)

    def mask_of(item: dict) -> Tensor:
        probs = ctx.predict(net, item["image"])
        return tag_filtered_masks(probs, item["tags"].to(probs.device), m.bg_class)[0]

    return write_mask_dataset(ctx, data, indices, mask_of, f"{network} network's masks")


def mask_inputs(*keys: str, predicted: bool = False) -> Callable[[DictConfig], dict]:
    """What a task stage's masks depend on besides its upstream products: the tagged images, the method
    settings ``keys``, the seed, and for predictions the evaluation settings."""

    def inputs(cfg: DictConfig) -> dict:
        out = {**cam_inputs(cfg, keys), "seed": cfg.train.seed}
        if predicted:
            ev = OmegaConf.to_container(cfg.eval)
            out["eval"] = {k: v for k, v in ev.items() if k not in ("metric", "batch_size")}
            out["crop_size"] = list(cfg.data.crop_size)  # the default evaluation window
        return out

    return inputs


def network_config(cfg: DictConfig, products: dict[str, Path], masks: str) -> DictConfig:
    """Stages ``initial`` / ``enhanced``: a supervised training (this config's CE settings) on the dataset
    ``masks`` as the stream ``labeled``, with the tagged stream's batch, crop and augmentation."""
    d = OmegaConf.to_container(pseudo_train_config(cfg, products[masks]))
    d["data"]["streams"] = {"labeled": d["data"]["streams"]["pseudo"]}
    d["method"] = {f.name: d["method"][f.name] for f in fields(SupervisedConfig)} | {"name": "supervised"}
    return config_mod.from_dict(d)


def powerful_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The last stage: this method (CE) on the stream ``pseudo``, the ``complex_masks`` dataset."""
    return pseudo_train_config(cfg, products["complex_masks"])


@METHODS.register("stc")
class STC(CAM):
    """The last stage's training: the Powerful-DCNN, CE (or OHEM, aux head) on the complex images' masks."""

    Config = StcConfig
    stage_names = ("saliency", "initial", "simple_masks", "enhanced", "complex_masks", "train")

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        check_tagged_run(cfg)
        m = cfg.method
        for key, known in (("band", BANDS), ("powerful_images", POWERFUL_IMAGES)):
            if m[key] not in known:
                raise ConfigError(f"method.{key} {m[key]!r} is not one of {', '.join(known)}")
        check_saliency(m)  # a str: the config already refuses null
        saliency_keys = ("saliency", "saliency_dir", "fg_threshold", "bg_threshold", "band", "bg_class")
        return [
            Stage("saliency", run=write_saliency_dataset, inputs=mask_inputs(*saliency_keys)),
            Stage("initial", config=partial(network_config, masks="saliency")),
            Stage("simple_masks", run=partial(write_predicted_dataset, network="initial", images="simple"),
                  inputs=mask_inputs("bg_class", predicted=True)),
            Stage("enhanced", config=partial(network_config, masks="simple_masks")),
            Stage("complex_masks", run=partial(write_predicted_dataset, network="enhanced",
                                               images=m.powerful_images),
                  inputs=mask_inputs("bg_class", "powerful_images", predicted=True)),
            Stage("train", config=powerful_config),
        ]


__all__ = ["STC", "StcConfig", "saliency_masks", "split_by_tags", "tag_filtered_masks", "write_mask_dataset"]
