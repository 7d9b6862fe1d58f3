"""Adversarial erasing and prohibitive segmentation learning (Wei et al., CVPR 2017; methods.md section 7):
the methods ``ae`` and ``psl`` (AE-PSL, and PSL+ with ``method.plus``), pipelines of stages run by one
``lesseg train`` on the tagged images of the stream ``labeled``.

Erasing (both methods, :mod:`.weak.erasing`): ``classifier`` (as ``cam``'s, or
``method.classifier_checkpoint``), then ``erase1``, ``classifier2``, ``erase2``, ... ``erase{steps}``: each
step erases (sets to the mean pixel) the pixels whose normalised CAM of a tagged class is >= ``erase_threshold``
and the next classifier trains on the erased images; from step 2 on, a step whose classifier no longer reaches
a low loss (``stop_loss``) ends the erasing, and the later steps' stages are skipped (``stages.json``:
``skipped``; their classifiers do not train, their products are links to the stopping step's). The union of
each class's regions makes the objects of the masks, low saliency their background, 255 the rest (with
``mask_crf``: the dense CRF over the image from the regions labels every pixel); each step's masks are scored
(``erase{t}/quality.json``). Every step is a stage: a killed run resumes in the step it was
in. ``stages.classifier.*`` applies to every step's classifier, ``stages.classifier{t}.*`` to one.

``ae``: the last stage trains a segmentation network with CE on the masks of the last step.
``psl``: the segmentation network has a classification branch (GAP + 1x1, BCE on the tags); at every training
step its online masks are the argmax of its softmax x the image-level weights of :func:`psl_weights` (classes
absent from the tags suppressed), and the loss is CE on the AE masks + CE on the online masks + the BCE. With ``plus`` (PSL+):
stage ``psl`` trains it on the AE masks, ``refine`` predicts the training images (the evaluation settings),
keeps the tagged classes and background, refines with the dense CRF (``crf``, :mod:`.weak.crf`), scores raw
and refined masks apart and writes the refined ones; the last stage trains a fresh PSL network on them.

Departures and choices (the authors released no code, so none copies or departs from it):
- the stop threshold is ours: the paper only says "no longer converges to a low loss"; the loss is measured
  on the un-augmented training images in eval mode, relative to the tag prior's (``stop_loss``);
- step t's classifier starts from ``model.pretrained`` like step 1's (the paper retrains, not saying from what);
- the online masks also label crop padding (labeled streams carry no padding map);
- ``psl_rampup`` and ``psl_threshold`` (ours, off by default as in the paper) ramp the online masks' weight up
  and keep only their confident pixels: a young network's own argmax teaches it background where the
  AE masks are uncertain (docs/benchmarks.md, "The segmentation network starts from the tag classifier");
- ``mask_crf`` (ours, off by default): the erasing masks by the dense CRF; the paper's background cue is a deep
  salient-object detector's maps, and the classical detectors available here are low inside flat objects;
- evaluation scores the segmentation output alone; the paper also multiplies test outputs by the
  classification branch's scores (the evaluator sees ``logits`` only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import config as config_mod
from ..config import ranged
from ..data.writer import FolderWriter
from ..errors import ConfigError
from ..metrics import confusion_matrix
from ..models import build_model, class_map
from .base import METHODS, Method, RunInfo, Stage
from .cam import (
    CAM,
    CamSettings,
    add_raw_quality,
    cam_inputs,
    finish_masks,
    pseudo_train_config,
    tagged_images,
)
from .classifier import multilabel_loss
from .common import IGNORE, rampup_phase
from .mean_teacher import sigmoid_rampup
from .supervised import sup_loss
from .weak.cam import foreground_counts
from .weak.crf import CrfParams, crf_missing, dense_crf
from .weak.erasing import ERASE_STAGES, MAX_STEPS, erasing_stages, write_tags


@dataclass
class AeConfig(CamSettings):
    name: str = "ae"
    scales: list[float] = ranged([1.0], "(0, inf)")  # the paper: plain CAM, one view
    flip: bool = False
    # background cue of the masks; the paper: a deep salient-object detector's maps (saliency: folder)
    saliency: str | None = "spectral_residual"
    steps: int = ranged(MAX_STEPS, f"[1, {MAX_STEPS}]")  # erasing steps at most (the stop rule may end sooner)
    erase_threshold: float = ranged(0.5, "(0, 1]")  # a tagged class's normalised CAM >= this: erased
    # stop rule: step t >= 2 mines only if its classifier's BCE <= stop_loss x the tag prior's; None: never stop
    stop_loss: float | None = ranged(0.5, "(0, inf)")
    # the masks by the dense CRF over the image (ours; the paper: regions + saliency, the rest 255): its unary
    # puts mask_crf_prob on a region's class and on background outside every region (and, with a saliency
    # cue, spreads it evenly where saliency is high); every pixel gets the CRF's label (:func:`crf_object_masks`)
    mask_crf: bool = False
    mask_crf_prob: float = ranged(0.7, "(0, 1)")
    # the dense CRF's settings (the masks' with mask_crf; PSL+'s refinement): DeepLab-CRF-LargeFOV's kernels
    crf_iters: int = ranged(10, "[0, inf)")  # mean-field steps
    crf_pos_xy: float = ranged(3.0, "(0, inf)")
    crf_pos_w: float = ranged(3.0, "[0, inf)")
    crf_bi_xy: float = ranged(121.0, "(0, inf)")
    crf_bi_rgb: float = ranged(5.0, "(0, inf)")
    crf_bi_w: float = ranged(4.0, "[0, inf)")


@dataclass
class PslConfig(AeConfig):
    name: str = "psl"
    plus: bool = True  # PSL+: predict the training images, refine (tags, CRF), train again
    crf: bool = True  # refine with the dense CRF (pydensecrf2, the crf_* settings); false: tags only
    psl_weight: float = ranged(1.0, "[0, inf)")  # CE on the online masks (the paper adds the terms)
    # sigmoid ramp-up of the online masks' weight over this share of the run (ours: the paper only says their
    # quality rises as training proceeds); 0: full weight from the first step
    psl_rampup: float = ranged(0.0, "[0, 1]")
    # online masks only where the tag-weighted probability, renormalised over the classes, reaches this (ours:
    # the paper labels every pixel); the others are ignored. 0: every pixel
    psl_threshold: float = ranged(0.0, "[0, 1)")
    cls_weight: float = ranged(1.0, "[0, inf)")  # BCE of the classification branch


# -- the loss terms of PSL -----------------------------------------------------------------------------------


def psl_weights(cls_logits: torch.Tensor, tags: torch.Tensor, bg_class: int = 0) -> torch.Tensor:
    """Image-level class weights of the online masks: the classification branch's confidence
    ``sigmoid(logit_c)`` for the tagged classes, 0 for the classes absent from the tags (prohibited), 1 for
    background (always possible). Never carries gradient. B,C ; B,C multi-hot -> B,C float32"""
    w = torch.sigmoid(cls_logits.detach().float()) * (tags > 0).float()
    w[:, bg_class] = 1.0
    return w


def online_masks(logits: torch.Tensor, weights: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """PSL's online segmentation masks: ``argmax_c softmax(logits)_c x weights_c`` (the first class on ties);
    with ``threshold`` > 0, pixels whose winning share of ``sum_c softmax_c x weights_c`` is below it are 255.

    logits B,C,H,W ; weights B,C -> B,H,W long (no gradient)"""
    probs = F.softmax(logits.detach().float(), dim=1) * weights[:, :, None, None]
    if threshold <= 0:
        return class_map(probs)
    best = probs.max(1)  # class_map's maximum, its value kept for the share
    masks = best.indices
    masks[best.values < threshold * probs.sum(1)] = IGNORE
    return masks


def tag_filter(probs: torch.Tensor, tags: torch.Tensor, bg_class: int = 0) -> torch.Tensor:
    """PSL+'s use of the tags: probabilities of the classes absent from the image's tags set to 0 (background
    kept), renormalised over the rest. probs B,C,H,W ; tags B,C -> B,C,H,W"""
    keep = (tags > 0).float()
    keep[:, bg_class] = 1.0
    kept = probs.float() * keep[:, :, None, None]
    return kept / kept.sum(1, keepdim=True).clamp_min(1e-12)


# -- the pipelines -------------------------------------------------------------------------------------------


def checked(cfg: DictConfig, stages: list[Stage]) -> list[Stage]:
    """``stages``, refusing ``stages.<name>`` settings of a stage this run does not have (fewer steps, no
    PSL+), which would otherwise be ignored."""
    unused = sorted(set(cfg.stages or {}) - {s.name for s in stages})
    if unused:
        raise ConfigError(f"stages.{unused[0]}: this run of {cfg.method.name} has no such stage; its stages "
                          f"are {', '.join(s.name for s in stages)}")
    return stages


def seg_config(cfg: DictConfig, products: dict[str, Path], source: str, psl: bool) -> DictConfig:
    """A segmentation stage on the masks of stage ``source`` (PSL: with the classification branch)."""
    start = products["classifier"] if cfg.method.init_from_classifier else None
    return pseudo_train_config(cfg, products[source], start, {"cls_head": True} if psl else None)


@METHODS.register("ae")
class AE(CAM):
    """The last stage: a segmentation network, CE (or OHEM, aux head) on the erasing masks."""

    Config = AeConfig
    stage_names = (*ERASE_STAGES, "train")

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        last = f"erase{cfg.method.steps}"
        return checked(cfg, [*erasing_stages(cfg), Stage("train", config=partial(seg_config, source=last,
                                                                                   psl=False))])


# -- PSL+ refinement -----------------------------------------------------------------------------------------


def run_refine(ctx: Any) -> dict:
    """Stage ``refine`` (PSL+): the ``psl`` network's predictions of the tagged images (the evaluation
    settings), absent classes removed (:func:`tag_filter`), refined by the dense CRF over the image's classes
    with ``crf``; written as a folder dataset with the tags. Raw and refined masks are scored apart where
    true masks exist (``quality.json``: the written masks' numbers, and ``raw``)."""
    m = ctx.cfg.method
    data, scored = tagged_images(ctx)
    writer = FolderWriter(ctx.folder, [s.name for s in data.samples], ctx.class_names)
    if ctx.main:
        writer.clear()
    ctx.barrier()
    d = OmegaConf.to_container(ctx.cfg)
    d["model"]["cls_head"] = True  # the psl stage's network has its classification branch
    net = dataclasses.replace(ctx, cfg=config_mod.from_dict(d)).network("psl")
    params = CrfParams.of(m)
    raw_conf = torch.zeros(ctx.num_classes, ctx.num_classes, dtype=torch.long)
    counts = torch.zeros(5, dtype=torch.long)
    for item in tqdm(ctx.loader("labeled", masks=scored), desc="PSL+ masks", disable=not ctx.progress,
                     leave=False):
        i = int(item["index"])
        probs = tag_filter(ctx.predict(net, item["image"]).cpu(), item["tags"], m.bg_class)[0]  # C,H,W
        raw = class_map(probs[None])[0]
        mask = raw
        present = torch.nonzero((item["tags"][0] > 0) | (torch.arange(ctx.num_classes) == m.bg_class))[:, 0]
        if m.crf and len(present) > 1:  # (an image of background alone has nothing to refine)
            rgb = data.source.read_image(data.samples[i].image)
            refined = dense_crf(rgb, probs[present].numpy(), params)
            mask = present[torch.from_numpy(refined.argmax(0))]
        true = item["mask"] if scored else None
        if scored:
            raw_conf += confusion_matrix(raw[None], true, ctx.num_classes)
        counts += foreground_counts(mask[None], true, m.bg_class)
        writer.write(i, data.samples[i].image, mask.numpy().astype(np.uint8), data.source.read_image,
                     true=true[0] if scored else None)
    metrics = finish_masks(ctx, writer, counts.to(ctx.device))
    if scored:
        add_raw_quality(ctx, metrics, raw_conf, m.crf)
    if ctx.main:
        write_tags(ctx.folder, writer.stems, data.samples)
    ctx.barrier()
    return metrics


def refine_inputs(cfg: DictConfig) -> dict:
    """What the PSL+ masks depend on besides the psl network: the images, tags, prediction and CRF settings
    (``data.crop_size`` too: the prediction's window where ``eval.crop_size`` is unset)."""
    keys = ("bg_class", "crf", *(f.name for f in dataclasses.fields(PslConfig) if f.name.startswith("crf_")))
    return {**cam_inputs(cfg, keys), "eval": OmegaConf.to_container(cfg.eval),
            "crop_size": list(cfg.data.crop_size)}


@METHODS.register("psl")
class PSL(Method):
    """A segmentation network with a classification branch, trained with CE on the stream ``pseudo``'s masks,
    CE on its own online masks and BCE on the tags (the module docstring)."""

    Config = PslConfig
    streams = ("pseudo",)
    config_streams = ("labeled",)
    stage_names = (*ERASE_STAGES, "psl", "refine", "train")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_ae": ("net",), "loss_psl": ("net",),
                                                        "loss_cls": ("net",)}

    def __init__(self, cfg: PslConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(OmegaConf.merge(model_cfg, {"cls_head": True}), info.num_classes)
        self.rampup_steps = round(cfg.psl_rampup * info.max_iters)

    def phases(self) -> list[tuple[str, int, int]]:
        label = f"online masks' weight ramp-up (sigmoid, to {self.cfg.psl_weight:g})"
        return rampup_phase(label, self.rampup_steps, self.info.max_iters)

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        m = cfg.method
        stages = erasing_stages(cfg)
        masks = f"erase{m.steps}"
        if not m.plus:
            return checked(cfg, [*stages, Stage("train", config=partial(seg_config, source=masks, psl=True))])
        missing = crf_missing() if m.crf else None
        if missing:
            raise ConfigError(f"method.crf: {missing}; or set method.crf=false (PSL+ with the tags only)")
        return checked(cfg, [*stages, Stage("psl", config=partial(seg_config, source=masks, psl=True)),
                             Stage("refine", run=run_refine, inputs=refine_inputs),
                             Stage("train", config=partial(seg_config, source="refine", psl=True))])

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        pse = batch["pseudo"]
        if "tags" not in pse:
            raise ConfigError("psl trains its classification branch on image tags: every image of the stream "
                              "'pseudo' needs them (image_labels.csv)")
        out = self.net(pse["image"])
        online = online_masks(out["logits"], psl_weights(out["cls"], pse["tags"], self.cfg.bg_class),
                              self.cfg.psl_threshold)
        loss_ae = sup_loss(out, pse["mask"], self.cfg)
        loss_psl = sup_loss(out, online, self.cfg)
        loss_cls = multilabel_loss(out["cls"], pse["tags"])
        w_psl = self.cfg.psl_weight * sigmoid_rampup(step, self.rampup_steps)
        loss = loss_ae + w_psl * loss_psl + self.cfg.cls_weight * loss_cls
        known = (pse["mask"] != IGNORE) & (online != IGNORE)
        agree = ((online == pse["mask"]) & known).sum() / known.sum().clamp_min(1)
        return {"loss": loss, "loss_ae": loss_ae, "loss_psl": loss_psl, "loss_cls": loss_cls,
                "online_agree": agree.float(), "online_kept": (online != IGNORE).float().mean()}


__all__ = ["AE", "PSL", "AeConfig", "PslConfig", "online_masks", "psl_weights", "run_refine", "tag_filter"]
