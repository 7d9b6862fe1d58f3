"""Mean Teacher for segmentation (methods.md section 2; Tarvainen & Valpola 2017).

The student learns CE on labeled images plus a consistency term between its softmax on the strong view of
each unlabeled image and the softmax of an EMA teacher on the weak view (same geometry, so pixels align).
The consistency weight follows the sigmoid ramp-up ``exp(-5 (1 - t)^2)``. CutMix-Seg (``cutmix_seg.py``)
is this method with mixing as the perturbation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import ranged
from ..errors import ConfigError
from ..models import build_model
from .base import METHODS, Method, RunInfo
from .common import (
    IGNORE,
    ViewStatsConfig,
    batchnorm_train,
    ce_loss,
    check_teacher_bn,
    ema_phase,
    ema_update,
    forward_groups,
    hard_labels,
    make_alignment,
    make_teacher,
    pseudo_label_quality,
    rampup_phase,
    run_relative_decay,
    split_outputs,
)  # fmt: skip
from .supervised import SupervisedConfig, sup_loss

CONSISTENCY = ("mse", "ce", "mse_conf")


@dataclass
class MeanTeacherConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "mean_teacher"
    cons_weight: float = ranged(1.0, "[0, inf)")  # weight of loss_cons at the end of the ramp-up
    rampup_steps: int | None = ranged(None, "[0, inf)")  # sigmoid ramp-up length; None: 10% of the run; 0: no ramp-up
    # mse: squared distance of softmax vectors | ce: confidence-masked CE | mse_conf: the mse scaled by the share
    # of valid pixels whose teacher confidence is >= conf_thresh (French et al.'s code: conf_thresh 0.97 without
    # conf_per_pixel, the default of all their experiments; the weight grows as the teacher grows sure)
    consistency: str = "mse"
    conf_thresh: float = ranged(0.97, "[0, 1]")  # consistency=ce|mse_conf: the teacher confidence that counts
    teacher_bn: str = "student"  # labeling with the running statistics (the student's) or "weak" (batch ones)
    # d_max of the EMA teacher; None: relative to the run (common.run_relative_decay: 0.95 at 300 steps, 0.99
    # at 1,500, methods.md's 0.999 from 15,000 steps on)
    ema_decay: float | None = ranged(None, "[0, 1]")
    eval_teacher: bool = True  # evaluate (and export) the EMA teacher rather than the student
    # alignment of the unlabeled predictions to the labeled class frequencies (common.PriorAlignment): none |
    # mean (ReMixMatch's) | hard (their argmax's shares)
    align: str = "none"
    # labeled images normalised apart from the strong views (common.ViewStatsConfig). Mean Teacher, 1/16, 2 seeds:
    # 300 steps from ImageNet 28.3 against 24.3 with the joint pass on shapes, 17.1 against 16.8 on fashion;
    # bench semi (1,500 steps) 55.6 against 52.1. CutMix-Seg, seed 0: -0.6 / +2.5 (docs/benchmarks.md)
    split_bn: bool = True


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1]; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0) / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_mse(logits: torch.Tensor, target_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared distance between the softmax of ``logits`` and ``target_probs`` (summed over classes),
    averaged over valid pixels; 0 when none is valid. B,C,H,W ; B,C,H,W ; B,H,W bool -> 0-dim."""
    sq = (logits.float().softmax(1) - target_probs.float()).pow(2).sum(1)  # B,H,W
    v = valid.float()
    return (sq * v).sum() / v.sum().clamp_min(1.0)


def confident_share(target_probs: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of the valid pixels whose target confidence (max probability) is >= ``threshold``; 0 when none is
    valid. B,C,H,W ; B,H,W bool -> 0-dim (no gradient: the targets are the teacher's)."""
    conf = (target_probs.detach().float().max(1).values >= threshold) & valid
    return conf.float().sum() / valid.float().sum().clamp_min(1.0)


def confident_ce(
    logits: torch.Tensor, target_probs: torch.Tensor, valid: torch.Tensor, threshold: float
) -> torch.Tensor:
    """CE to ``argmax target_probs`` on pixels whose target confidence is >= ``threshold``, averaged over
    all valid pixels (unconfident ones count as 0, so the term shrinks when few pixels are confident)."""
    conf, pseudo = target_probs.float().max(1)  # B,H,W
    return ce_loss(logits, pseudo.masked_fill(~valid, IGNORE), weight=(conf >= threshold).float())


@METHODS.register("mean_teacher")
class MeanTeacher(Method):
    Config = MeanTeacherConfig
    streams = ("labeled", "unlabeled")
    strong_streams = ("unlabeled",)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_cons": ("net",)}

    def __init__(self, cfg: MeanTeacherConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.consistency not in CONSISTENCY:
            raise ConfigError(f"method.consistency must be one of {CONSISTENCY}, not {cfg.consistency!r}")
        check_teacher_bn(cfg.teacher_bn)
        self.net = build_model(model_cfg, info.num_classes)
        self.teacher = make_teacher(self.net)
        self.rampup_steps = round(0.1 * info.max_iters) if cfg.rampup_steps is None else cfg.rampup_steps
        self.ema_decay = run_relative_decay(cfg.ema_decay, info.max_iters)
        self.align = make_alignment(cfg.align, info.num_classes)

    def eval_net(self) -> nn.Module:
        return self.teacher if self.cfg.eval_teacher else self.net

    def phases(self) -> list[tuple[str, int, int]]:
        ramp = rampup_phase("consistency weight ramp-up (sigmoid)", self.rampup_steps, self.info.max_iters)
        return [*ramp, ema_phase(self.ema_decay, 0, self.info.max_iters)]

    def train(self, mode: bool = True) -> MeanTeacher:
        """The teacher predicts in eval mode (no dropout; BatchNorm running statistics, copied from the
        student), except its BatchNorm layers while training with ``teacher_bn="weak"``."""
        super().train(mode)
        self.teacher.eval()
        batchnorm_train(self.teacher, mode and self.cfg.teacher_bn == "weak")
        return self

    @torch.no_grad()
    def teacher_probs(self, image: torch.Tensor) -> torch.Tensor:
        """Teacher softmax in float32. B,3,H,W -> B,C,H,W"""
        return self.teacher(image)["logits"].float().softmax(1)

    def unlabeled_views(
        self, unl: dict[str, torch.Tensor], probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student input, teacher target probabilities and valid map from the teacher's ``probs`` on the weak
        view: here the strong view against ``probs``."""
        return unl["image_strong"], probs, unl["valid"]

    def consistency_loss(
        self, logits: torch.Tensor, target_probs: torch.Tensor, valid: torch.Tensor,
        share: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The configured consistency; ``share``: :func:`confident_share` of the targets when already taken."""
        if self.cfg.consistency == "ce":
            return confident_ce(logits, target_probs, valid, self.cfg.conf_thresh)
        loss = consistency_mse(logits, target_probs, valid)
        if self.cfg.consistency == "mse_conf":
            loss = loss * (confident_share(target_probs, valid, self.cfg.conf_thresh) if share is None else share)
        return loss

    def training_step(self, batch, step):
        lab, unl = batch["labeled"], batch["unlabeled"]
        probs = self.teacher_probs(unl["image"])
        if self.align is not None:
            self.align.update(lab["mask"], probs, unl["valid"], lab.get("pasted"))
            probs = self.align(probs.clamp_min(1e-12).log()).softmax(1)
        x_u, target_probs, valid = self.unlabeled_views(unl, probs)
        n_l = lab["image"].shape[0]
        out = forward_groups(self.net, torch.cat([lab["image"], x_u]), [n_l, x_u.shape[0]], self.cfg.split_bn)
        out_l, out_u = split_outputs(out, n_l)
        loss_sup = sup_loss(out_l, lab["mask"], self.cfg)
        # the share of the pixels the thresholded terms count: logged, and mse_conf's factor (taken once)
        share = None if self.cfg.consistency == "mse" else confident_share(target_probs, valid, self.cfg.conf_thresh)
        loss_cons = self.consistency_loss(out_u["logits"], target_probs, valid, share)
        weight = self.cfg.cons_weight * sigmoid_rampup(step, self.rampup_steps)
        loss = loss_sup + weight * loss_cons
        quality = pseudo_label_quality(hard_labels(probs, unl["valid"]), unl, self.info.num_classes)
        if share is not None:
            quality["conf_rate"] = share
        return {"loss": loss, "loss_sup": loss_sup, "loss_cons": loss_cons, **quality}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, getattr(self.net, "module", self.net), step, self.ema_decay)
