"""Adversarial erasing (AE, Wei et al. CVPR 2017; methods.md section 7): the arithmetic of a step and the
steps themselves, the first stages of the ``ae`` and ``psl`` pipelines (:mod:`lesseg.methods.psl`).

Step t trains a classifier on the images with the regions of steps 1..t-1 erased, computes its CAMs of each
image's tags (:mod:`.cam`), and takes as step t's region of class c the pixels whose normalised CAM_c is
>= a threshold (0.5: methods.md). Erased pixels are set to the mean pixel (the dataset mean, so 0 once the
image is normalised: the paper sets them to 0 in the network's input). The union of a class's regions over
the accepted steps is its object region; pseudo-masks take the object regions, background from a saliency
map (low saliency) where one is given, and 255 where the cues disagree or nothing is known. With ``mask_crf``
(ours) the dense CRF over the image makes them instead, from a unary of the regions (and the saliency cue)
(:func:`region_unary`, :func:`crf_object_masks`): every pixel labelled, the regions' edges moved to the image's.

The paper's stopping rule: erasing goes on while the classifier trained on the erased images still reaches
a low loss; once it cannot, most of the objects are gone and its CAMs would mine background, so its step adds
nothing (the paper kept 3 steps: the 4th lowered the masks' mIoU). "Low" is ours (the paper gives no number):
its multi-label BCE on its own training images is at most ``stop_loss`` times the BCE of the tag frequencies
(what a classifier that sees no image reaches), a scale that does not depend on the number of classes. The
step that stops keeps the regions of the steps before; the later steps' stages are then skipped by the engine
(``Stage.skip``: their classifiers do not train, their products are links to the stopping step's).

The arithmetic is pure functions of tensors (regions are B,C,H,W bool over all classes, untagged ones empty).
The steps are stages: ``classifier`` (the ``cam`` method's), then ``erase1``, ``classifier2``, ``erase2``, ...
``erase{t}`` writes a folder dataset: the original images (linked), the masks of the regions so far (scored
against true masks where they exist: ``quality.json``), the tags (``image_labels.csv``), the regions
(``regions/*.npz``), its record (``erasing.json``) and, before the last step, the erased images
(``erased/``) on which ``classifier{t+1}`` trains (with the first classifier's ``stages.classifier``
settings, then its own). Its metrics also give the CAM extraction speed (``images_per_s``: erasing, moving
to the device and the multi-scale CAMs, writing left out) when it mined.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ... import config as config_mod
from ...data.saliency import DETECTORS, SaliencyMaps, check_detectors
from ...data.writer import FolderWriter
from ...errors import ConfigError
from ...metrics import confusion_matrix
from ..base import Stage
from ..cam import (
    Throughput,
    add_raw_quality,
    cam_inputs,
    check_saliency,
    classifier_config,
    finish_masks,
    load_classifier,
    low_saliency,
    same_size_batches,
    tagged_images,
)
from ..classifier import multilabel_loss
from .cam import IGNORE, foreground_counts, multiscale_cams, pseudo_masks
from .crf import CrfParams, crf_missing, dense_crf

__all__ = ["ERASED", "ERASE_STAGES", "MAX_STEPS", "STATE", "crf_object_masks", "erase", "erase_regions",
           "erasing_converged", "erasing_stages", "erasing_stopped", "fill_values", "load_regions",
           "object_masks", "region_unary", "run_erasing_step", "save_regions", "tag_prior_loss", "write_tags"]

MAX_STEPS = 4  # erasing steps a run may have (the stage names exist for these); the paper tried 4, kept 3
ERASED = "erased"  # an erasing step's dataset of erased images, for the next step's classifier
STATE = "erasing.json"  # an erasing step's record: did it mine regions, its classifier's loss
ERASE_KEYS = ("scales", "flip", "bg_class", "saliency", "saliency_dir", "saliency_threshold", "erase_threshold",
              "stop_loss", "mask_crf")
CRF_KEYS = ("mask_crf_prob", "crf_iters", "crf_pos_xy", "crf_pos_w", "crf_bi_xy", "crf_bi_rgb", "crf_bi_w")
ERASE_STAGES = ("classifier", *(f"{kind}{t}" for t in range(1, MAX_STEPS + 1)
                                for kind in ("classifier", "erase") if (kind, t) != ("classifier", 1)))


def erase_regions(cams: Tensor, tags: Tensor, threshold: float, bg_class: int = 0) -> Tensor:
    """The discriminative regions of one step: ``CAM_c >= threshold`` for each tagged object class (never
    background, which has no CAM; untagged classes are empty whatever their map).

    cams B,C,H,W in [0, 1] ; tags B,C multi-hot -> B,C,H,W bool"""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the erasing threshold must lie in (0, 1], got {threshold}")
    present = tags > 0
    present[:, bg_class] = False
    return (cams.float() >= threshold) & present[:, :, None, None]


def erase(image: Tensor, region: Tensor, fill: Tensor) -> Tensor:
    """``image`` with the pixels of ``region`` set to ``fill`` (one value per channel).

    image B,K,H,W ; region B,H,W bool ; fill K -> B,K,H,W"""
    fill = fill.to(device=image.device, dtype=image.dtype)[None, :, None, None]
    return torch.where(region.to(image.device)[:, None], fill, image)


def fill_values(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, Tensor]:
    """The mean pixel as stored in an image file (uint8 RGB, 3) and as the network sees it once the file is
    read and normalised (3 floats, about 0): erasing in memory and erasing the files then agree exactly."""
    pixel = np.array([round(255 * m) for m in mean], np.uint8)
    normalised = (torch.tensor(pixel, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)
    return pixel, normalised


def object_masks(regions: Tensor, tags: Tensor, background: Tensor | None = None, bg_class: int = 0) -> Tensor:
    """Pseudo-masks from the union of the erased regions (uint8 B,H,W):

    - a pixel in one class's region: that class; in the regions of two classes or more: 255 (ambiguous);
    - with a ``background`` map (B,H,W bool, low saliency): ``bg_class`` there, 255 where it meets a region
      (the cues disagree) and where neither cue says anything;
    - without one: ``bg_class`` outside the regions;
    - an image tagged with no object: ``bg_class`` everywhere (as :func:`~.cam.pseudo_masks`).

    regions B,C,H,W bool ; tags B,C -> B,H,W uint8"""
    out = pseudo_masks(regions.float(), tags, 1.0, None, background, bg_class=bg_class)
    conflict = regions.sum(1) > 1
    return out.masked_fill(conflict.to(out.device), IGNORE)


def region_unary(regions: Tensor, classes: Sequence[int], prob: float, background: Tensor | None = None,
                 bg_class: int = 0) -> np.ndarray:
    """The dense CRF's starting probabilities over ``classes`` (the image's tagged classes and ``bg_class``,
    K of them) from the erased regions:

    - a pixel in class c's region: ``prob`` for c, the rest ``1 - prob`` shared by the other K - 1 classes
      (in the regions of several classes, each of them gets ``prob`` before the pixel is renormalised);
    - a pixel in no region: ``prob`` for background, the rest shared; where a ``background`` map is given and
      does not say background there (high saliency), every class 1/K: nothing is known.

    regions C,H,W bool (all classes) ; classes K ids, ``bg_class`` among them ; background H,W bool
    -> K,H,W float32 summing to 1 over K"""
    classes = [int(c) for c in classes]
    if bg_class not in classes or len(classes) < 2:
        raise ValueError(f"region_unary needs background ({bg_class}) and at least one object class, got {classes}")
    k = len(classes)
    low = (1.0 - prob) / (k - 1)
    own = regions[classes].cpu().numpy().astype(bool)  # K,H,W
    objects = own[[j for j, c in enumerate(classes) if c != bg_class]].any(0)  # H,W
    bg = classes.index(bg_class)
    own[bg] = ~objects
    probs = np.where(own, np.float32(prob), np.float32(low))
    if background is not None:
        unknown = ~objects & ~background.cpu().numpy().astype(bool)
        probs[:, unknown] = 1.0 / k
    return (probs / probs.sum(0, keepdims=True)).astype(np.float32)


def crf_object_masks(rgb: np.ndarray, regions: Tensor, tags: Tensor, prob: float, params: CrfParams,
                     background: Tensor | None = None, bg_class: int = 0) -> Tensor:
    """One image's mask from its erased regions by the dense CRF (:func:`~.crf.dense_crf`) over the image:
    the unary of :func:`region_unary`, the label of the CRF's most probable class at every pixel (only the
    image's tags and background can win). An image tagged with no object is background everywhere.

    rgb H,W,3 uint8 ; regions C,H,W bool ; tags C multi-hot ; background H,W bool -> H,W uint8"""
    h, w = regions.shape[-2:]
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"the image is {rgb.shape[1]}x{rgb.shape[0]} but its regions are {w}x{h}")
    classes = sorted({bg_class, *torch.nonzero(tags > 0)[:, 0].tolist()})
    if len(classes) < 2:
        return torch.full((h, w), bg_class, dtype=torch.uint8)
    marginals = dense_crf(rgb, region_unary(regions, classes, prob, background, bg_class), params)
    return torch.tensor(classes, dtype=torch.uint8)[torch.from_numpy(marginals.argmax(0))]


def tag_prior_loss(tag_sum: Tensor, images: int) -> float:
    """The mean multi-label BCE of predicting each class's frequency ``p_c = tag_sum_c / images``: the mean
    binary entropy ``-(p ln p + (1-p) ln(1-p))`` over classes (0 for a class always or never present)."""
    if images <= 0:
        raise ValueError("the tag prior needs at least one image")

    def entropy(p: float) -> float:
        return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)

    return sum(entropy(float(s) / images) for s in tag_sum.tolist()) / len(tag_sum)


def erasing_converged(loss: float, prior_loss: float, stop_loss: float | None) -> bool:
    """The stopping rule: does a step's classifier still reach a low loss on its training images, i.e. is
    its BCE at most ``stop_loss`` x the tag prior's (:func:`tag_prior_loss`)? ``stop_loss`` None: always."""
    return stop_loss is None or loss <= stop_loss * prior_loss


def save_regions(path: Path, regions: Tensor) -> None:
    """One image's regions (C,H,W bool), only the classes that have any, as a compressed ``.npz``."""
    regions = regions.cpu()
    classes = [c for c in range(regions.shape[0]) if bool(regions[c].any())]
    np.savez_compressed(path, shape=np.array(regions.shape), classes=np.array(classes, np.int64),
                        regions=regions[classes].numpy())


def load_regions(path: Path, num_classes: int, size: Sequence[int]) -> Tensor:
    """The regions :func:`save_regions` wrote, C,H,W bool; a file of other classes or another size is an
    error naming it (the images or classes changed under a finished step)."""
    with np.load(path) as f:
        shape, classes, regions = tuple(f["shape"].tolist()), f["classes"], f["regions"]
    if shape != (num_classes, *size):
        raise ValueError(f"{path} holds regions of shape {shape}, expected {(num_classes, *size)}")
    out = torch.zeros(shape, dtype=torch.bool)
    out[torch.from_numpy(classes)] = torch.from_numpy(regions)
    return out


# -- the erasing steps ---------------------------------------------------------------------------------------


def classifier_stage(step: int) -> str:
    """The name of step ``step``'s classifier stage (the first is ``classifier``, as in ``cam``)."""
    return "classifier" if step == 1 else f"classifier{step}"


def erased_classifier_config(cfg: DictConfig, products: dict[str, Path], step: int, shared: dict) -> DictConfig:
    """Step ``step``'s classifier: the first step's (with its ``stages.classifier`` settings ``shared``) on
    the erased images of the step before."""
    d = OmegaConf.to_container(OmegaConf.merge(classifier_config(cfg, products), shared))
    d["data"]["streams"]["labeled"].update(dataset="folder", root=str(products[f"erase{step - 1}"] / ERASED),
                                           split="train", options={})
    return config_mod.from_dict(d)


def write_tags(root: Path, stems: list[str], samples: list) -> None:
    """``image_labels.csv`` of a written folder dataset: every sample's tags."""
    lines = "".join(f"{stem},{';'.join(str(c) for c in s.tags)}\n" for stem, s in zip(stems, samples))
    (root / "image_labels.csv").write_text(lines)


def previous_regions(folder: Path | None, stems: list[str], batch: dict, num_classes: int) -> torch.Tensor:
    """The regions the earlier steps erased in the images of ``batch`` (none at step 1). -> B,C,H,W bool"""
    b, _, h, w = batch["image"].shape
    if folder is None:
        return torch.zeros(b, num_classes, h, w, dtype=torch.bool)
    return torch.stack([load_regions(folder / "regions" / f"{stems[i]}.npz", num_classes, (h, w))
                        for i in batch["index"].tolist()])


@torch.no_grad()
def classifier_loss(ctx: Any, net: torch.nn.Module, batches: Any, previous: Path | None, stems: list[str],
                    fill: torch.Tensor) -> tuple[float, float]:
    """A step's classifier's mean BCE on the images it trained on (the earlier steps' regions erased; no
    augmentation), and the tag prior's BCE (:func:`tag_prior_loss`), over every process's images."""
    autocast = torch.autocast(ctx.device.type, dtype=ctx.amp) if ctx.amp else nullcontext()
    sums = torch.zeros(2, dtype=torch.float64)
    tag_sum = torch.zeros(ctx.num_classes, dtype=torch.float64)
    for batch in batches:
        regions = previous_regions(previous, stems, batch, ctx.num_classes)
        image = erase(batch["image"], regions.any(1), fill).to(ctx.device)
        with autocast:
            logits = net(image)["cls"]
        n = image.shape[0]
        sums += torch.tensor([multilabel_loss(logits, batch["tags"].to(ctx.device)).item() * n, n])
        tag_sum += batch["tags"].double().sum(0)
    sums, tag_sum = ctx.all_reduce_sum(sums.to(ctx.device)).cpu(), ctx.all_reduce_sum(tag_sum.to(ctx.device)).cpu()
    return float(sums[0] / sums[1]), tag_prior_loss(tag_sum, int(sums[1]))


def run_erasing_step(ctx: Any, step: int, last: bool) -> dict:
    """Stage ``erase{step}`` (see the module docstring); returns its masks' quality, the fraction of pixels
    erased, whether it mined regions and its classifier's loss relative to the tag prior."""
    m = ctx.cfg.method
    data, scored = tagged_images(ctx)
    names = [s.name for s in data.samples]
    writer = FolderWriter(ctx.folder, names, ctx.class_names)
    erased = None if last else FolderWriter(ctx.folder / ERASED, names, ctx.class_names)
    if ctx.main:
        writer.clear()  # leftovers of an interrupted stage (erased/ included)
        (ctx.folder / "regions").mkdir()
        if erased is not None:
            erased.clear()
    ctx.barrier()
    previous = ctx.products.get(f"erase{step - 1}")  # (a step after a stop is skipped: the step before mined)
    pixel, fill = fill_values(ctx.cfg.data.mean, ctx.cfg.data.std)

    def batches(desc: str):
        loader = tqdm(ctx.loader("labeled", masks=scored), desc=desc, disable=not ctx.progress, leave=False)
        return same_size_batches(loader, m.cam_batch)

    record: dict = {"step": step}
    mines = True
    net = load_classifier(ctx.products[classifier_stage(step)], ctx.class_names, ctx.device)
    if previous is not None and m.stop_loss is not None:
        loss, prior = classifier_loss(ctx, net, batches(f"step {step}: classifier loss"), previous,
                                      writer.stems, fill)
        mines = erasing_converged(loss, prior, m.stop_loss)
        record.update(classifier_loss=loss, prior_loss=prior, loss_ratio=loss / max(prior, 1e-12))
    saliency = SaliencyMaps(data.source, data.samples, m.saliency, m.saliency_dir) if m.saliency else None
    autocast = torch.autocast(ctx.device.type, dtype=ctx.amp) if ctx.amp else nullcontext()
    counts = torch.zeros(5, dtype=torch.long)
    raw_conf = torch.zeros(ctx.num_classes, ctx.num_classes, dtype=torch.long)  # the masks before the CRF
    params = CrfParams.of(m) if m.mask_crf else None
    area = torch.zeros(2, dtype=torch.float64)  # erased pixels, pixels
    speed = Throughput(ctx.device)
    for batch in batches(f"step {step}: erasing"):
        regions = previous_regions(previous, writer.stems, batch, ctx.num_classes)
        if mines:
            with speed.timing(len(batch["index"])):
                image = erase(batch["image"], regions.any(1), fill).to(ctx.device)
                tags = batch["tags"].to(ctx.device)
                with torch.no_grad(), autocast:
                    cams = multiscale_cams(net.cam, image, tags, list(m.scales), m.flip)
                mined = erase_regions(cams, tags, m.erase_threshold, m.bg_class).cpu()
            regions |= mined
        low = low_saliency(saliency, batch, m.saliency_threshold)
        masks = object_masks(regions, batch["tags"], low, m.bg_class)
        if params is not None:
            if scored:  # (on their labelled pixels, as the written masks are scored)
                raw_conf += confusion_matrix(masks, batch["mask"].masked_fill(masks == IGNORE, IGNORE),
                                             ctx.num_classes)
            if mines:
                masks = torch.stack([
                    crf_object_masks(data.source.read_image(data.samples[i].image), regions[k], batch["tags"][k],
                                     m.mask_crf_prob, params, None if low is None else low[k], m.bg_class)
                    for k, i in enumerate(batch["index"].tolist())])
            else:  # the regions did not grow: the step before's CRF masks of them, not the CRF again
                masks = torch.stack([torch.from_numpy(np.array(Image.open(
                    previous / "masks" / f"{writer.stems[i]}.png"))) for i in batch["index"].tolist()])
        counts += foreground_counts(masks, batch["mask"] if scored else None, m.bg_class)
        erased_px = regions.any(1)
        area += torch.tensor([erased_px.sum().item(), erased_px.numel()], dtype=torch.float64)
        for k, i in enumerate(batch["index"].tolist()):
            sample = data.samples[i]
            writer.write(i, sample.image, masks[k].numpy(), data.source.read_image,
                         true=batch["mask"][k] if scored else None)
            save_regions(ctx.folder / "regions" / f"{writer.stems[i]}.npz", regions[k])
            if erased is not None:
                rgb = data.source.read_image(sample.image).copy()
                rgb[erased_px[k].numpy()] = pixel
                Image.fromarray(rgb).save(erased.root / "images" / f"{erased.stems[i]}.png")
    metrics = finish_masks(ctx, writer, counts.to(ctx.device))
    if params is not None and scored:  # the regions' masks before the CRF, scored like run_refine's raw ones
        add_raw_quality(ctx, metrics, raw_conf, crf=True)
    area = ctx.all_reduce_sum(area.to(ctx.device)).cpu()
    record.update(mined=mines, erased=float(area[0] / area[1]))
    if ctx.main:
        write_tags(ctx.folder, writer.stems, data.samples)
        if erased is not None:
            erased.finish()
            write_tags(erased.root, erased.stems, data.samples)
        (ctx.folder / STATE).write_text(json.dumps(record, indent=1) + "\n")
    ctx.barrier()
    return {**metrics, "erased": record["erased"], "mined": float(mines),
            **({"loss_ratio": record["loss_ratio"]} if "loss_ratio" in record else {}),
            **({"images_per_s": speed.images_per_s(ctx.all_reduce_sum)} if mines else {})}


def erasing_inputs(cfg: DictConfig, last: bool) -> dict:
    """What an erasing step's product depends on besides its classifier and the step before (the CRF's
    settings only where the masks use it)."""
    return {**cam_inputs(cfg, ERASE_KEYS + (CRF_KEYS if cfg.method.mask_crf else ())), "last": last}


def erasing_stopped(products: dict[str, Path], step: int) -> str | None:
    """``Stage.skip`` of step ``step``'s classifier and erasing stage: why the step is unnecessary (the step
    before stopped the erasing, or followed a stop), or None when it is to run."""
    if step == 1:
        return None
    before = f"erase{step - 1}"
    record = json.loads((products[before] / STATE).read_text())
    if record["mined"]:
        return None
    why = (f" (its classifier's loss: {record['loss_ratio']:.2f} x the tag prior's)" if "loss_ratio" in record
           else "")
    return f"the erasing stopped at step {record['step']}{why}"


def erasing_stages(cfg: DictConfig) -> list[Stage]:
    """The first classifier, then ``erase1``, ``classifier2``, ``erase2``, ... up to ``erase{steps}``; from
    step 2 on, a step is skipped once the erasing has stopped (:func:`erasing_stopped`)."""
    if "labeled" not in cfg.data.streams:
        raise ConfigError(f"{cfg.method.name} needs the data stream 'labeled' (the tagged images); data.streams "
                          f"defines {list(cfg.data.streams)}")
    m = cfg.method
    check_saliency(m)
    if m.saliency == "folder" and not Path(m.saliency_dir).is_dir():  # now, not after the first classifier
        raise ConfigError(f"method.saliency_dir {m.saliency_dir} does not exist or is not a folder")
    if m.saliency in DETECTORS:
        check_detectors(m.saliency)
    if m.mask_crf and crf_missing():
        raise ConfigError(f"method.mask_crf: {crf_missing()}; or set method.mask_crf=false (regions and "
                          "saliency, the rest 255)")
    shared = OmegaConf.to_container(cfg.stages["classifier"]) if "classifier" in (cfg.stages or {}) else {}
    stages = [Stage("classifier", config=classifier_config, given=m.classifier_checkpoint)]
    for t in range(1, m.steps + 1):
        stopped = partial(erasing_stopped, step=t) if t > 1 else None
        if t > 1:
            stages.append(Stage(classifier_stage(t), config=partial(erased_classifier_config, step=t,
                                                                    shared=shared), skip=stopped))
        stages.append(Stage(f"erase{t}", run=partial(run_erasing_step, step=t, last=t == m.steps),
                            inputs=partial(erasing_inputs, last=t == m.steps), skip=stopped))
    return stages
