"""FixMatch for segmentation and UniMatch (Yang et al., CVPR 2023; methods-wave2.md section 15).

One network, no EMA teacher. The network's prediction on the weak view of an unlabeled image gives the
pseudo-label ``argmax p_w`` and its confidence ``q = max p_w``; a strongly augmented view (photometric
augmentation + a CutMix box pasted from another image) is trained with CE towards the pseudo-label on the
pixels whose confidence is >= tau, averaged over the valid (non-padding) pixels. FixMatch uses one strong
view and ``L = (L_x + L_s) / 2``; UniMatch two strong views with independent boxes plus a feature-perturbation
stream (``Dropout2d(0.5)`` on the encoder features, decoded next to the clean ones) supervised by the same
pseudo-labels: ``L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` (weights sum to 1).

Choices and departures from the authors' code (section 15):
- The mix source is the next image of the same batch (image i takes from (i+1) mod B, ``mixing.partner``),
  not a second iterator over the same sampler (the same raw image; the author calls it unintended).
- So the pseudo-labels of the main image and of the mix source both come from the one **train-mode** pass
  on the weak views (the authors label the mix source in a separate eval-mode pass): no mode switching.
- One forward per step on ``[x_l, u_w, s_1(, s_2)]`` (lesseg's one-DDP-forward-per-backward rule), whose
  BatchNorm layers normalise the labeled images, the weak views and the strong views apart (``split_bn``,
  on by default; the authors: ``[x_l, u_w]`` and ``[s_1, s_2]``): with the labeled images normalised with the
  weak views, the network ends below SupOnly before any unlabeled loss (docs/benchmarks.md, "The labeled
  images normalised alone").
- The feature perturbation is an explicit ``F.dropout2d(..., training=True)`` (the authors create the
  module inside ``forward``, active in any mode), applied to the weak unlabeled samples only (the authors
  also perturb the labeled ones and discard those outputs) and to every encoder level (DeepLabv3+ reads the
  stride-4 and the last one, the two the authors drop).
- ``align`` (off by default; not in either paper): the weak-view probabilities are aligned to the labeled
  class frequencies before the pseudo-labels and confidences are taken (``common.PriorAlignment``, as
  U2PL's and Mean Teacher's ``align``), against the confident pixels' drift toward background.
- The second strong view: ``image_strong2``, an independent photometric draw on the same geometry
  (``strong_views = 2``: the loader makes both), each with its own CutMix box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ranged
from ..models import build_model
from .base import METHODS, Method, RunInfo
from .common import (
    IGNORE,
    ViewStatsConfig,
    ce_loss,
    forward_groups,
    make_alignment,
    pseudo_label_quality,
    split_outputs,
)
from .mixing import cutmix_box, mix, partner
from .supervised import SupervisedConfig, sup_loss


@dataclass
class FixMatchConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "fixmatch"
    conf_thresh: float = ranged(0.95, "[0, 1]")  # tau: VOC 0.95, Cityscapes 0 (UniMatch README)
    mix_prob: float = ranged(0.5, "[0, 1]")  # per image and strong view: probability of a CutMix box
    box_area: list[float] = ranged([0.02, 0.4], "[0, 1]")  # box area ~ U(lo, hi) x crop area
    box_ratio: list[float] = ranged([0.3, 1 / 0.3], "(0, inf)")  # aspect ratio ~ U(lo, hi)
    strong_weight: float = ranged(1.0, "[0, inf)")  # weight of each strong view's term (inside the / 2)
    # alignment of the unlabeled predictions to the labeled class frequencies (common.PriorAlignment): none |
    # mean (ReMixMatch's) | hard (their argmax's shares)
    align: str = "none"
    # labeled, weak and strong views normalised apart (common.ViewStatsConfig). 300 steps from ImageNet, 1/16,
    # seed 0, shapes / fashion: UniMatch 36.2 / 18.4 against 27.9 / 16.1 with the whole batch's statistics,
    # FixMatch 32.7 / 17.3 against 29.3 / 17.9 (SupOnly 32.4 / 18.3); bench semi's 1,500 steps, 2 seeds: FixMatch
    # 51.1 against 49.1, UniMatch 47.2 against 50.0 (SupOnly 44.0): UniMatch keeps it as the setting that is
    # above SupOnly at both lengths; a long UniMatch run may prefer false (docs/benchmarks.md)
    split_bn: bool = True


@dataclass
class UniMatchConfig(FixMatchConfig):
    name: str = "unimatch"
    strong_weight: float = ranged(0.25, "[0, inf)")  # each of L_s1, L_s2
    fp_weight: float = ranged(0.5, "[0, inf)")  # L_fp
    fp_dropout: float = ranged(0.5, "[0, 1)")  # Dropout2d probability on the encoder features


# ---------------------------------------------------------------------------------------------- pure pieces
def confident_ce(logits: Tensor, pseudo: Tensor, conf: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """``sum_i 1[conf_i >= tau and valid_i] CE_i / #valid`` (section 15 step 6). -> 0-dim float32

    The denominator counts the valid (non-padding) pixels, not the confident ones, so the term shrinks when
    few pixels are confident; a pixel with ``conf == tau`` counts; 0 when no pixel is valid.
    ``logits`` B,C,H,W; ``pseudo`` B,H,W class ids; ``conf`` B,H,W; ``valid`` B,H,W bool.
    """
    target = pseudo.masked_fill(~valid, IGNORE)
    return ce_loss(logits, target, weight=(conf >= threshold).float())


def total_loss(
    loss_x: Tensor,
    losses_s: list[Tensor],
    strong_weight: float,
    loss_fp: Tensor | None = None,
    fp_weight: float = 0.0,
) -> Tensor:
    """``(L_x + w_s sum_k L_sk + w_fp L_fp) / 2`` (UniMatch: w_s 0.25 for two views, w_fp 0.5; FixMatch:
    one view with w_s 1, no L_fp)."""
    total = loss_x + strong_weight * sum(losses_s)
    if loss_fp is not None:
        total = total + fp_weight * loss_fp
    return total / 2


def feature_dropout(start: int, stop: int, p: float) -> Callable[[list[Tensor]], list[Tensor]]:
    """A ``Segmentor.forward`` ``perturb`` that appends ``Dropout2d(p)`` copies of samples [start, stop) of
    every encoder level to the batch (UniMatch's fp stream: clean and dropped features decoded together).
    ``training=True`` explicitly: the perturbation is part of the loss, whatever the module's mode."""

    def perturb(features: list[Tensor]) -> list[Tensor]:
        return [torch.cat([f, F.dropout2d(f[start:stop], p, training=True)]) for f in features]

    return perturb


def confident_share(conf: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """Share of the valid pixels whose confidence is >= ``threshold`` (0-dim; 0 when none is valid)."""
    return ((conf >= threshold) & valid).sum() / valid.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------- methods
@METHODS.register("fixmatch")
class FixMatch(Method):
    """FixMatch for segmentation (UniMatch's ``fixmatch.py``): weak -> one CutMix'ed strong view."""

    Config = FixMatchConfig
    streams = ("labeled", "unlabeled")
    strong_streams = ("unlabeled",)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_unsup": ("net",)}
    n_strong: ClassVar[int] = 1
    feature_perturbation: ClassVar[bool] = False

    def __init__(self, cfg: FixMatchConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)
        self.align = make_alignment(cfg.align, info.num_classes)

    def strong_images(self, unl: dict[str, Tensor]) -> list[Tensor]:
        """The photometric strong views, one per strong term (``image_strong2`` for the second when given)."""
        views = [unl["image_strong"]]
        if self.n_strong == 2:
            views.append(unl.get("image_strong2", unl["image_strong"]))
        return views

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        c = self.cfg
        lab, unl = batch["labeled"], batch["unlabeled"]
        x_l, x_w, valid = lab["image"], unl["image"], unl["valid"]
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        h, w = x_w.shape[-2:]
        boxes = [cutmix_box(n_u, h, w, x_w.device, c.mix_prob, tuple(c.box_area), tuple(c.box_ratio))
                 for _ in range(self.n_strong)]  # fmt: skip
        strong = [mix(s, partner(s), m) for s, m in zip(self.strong_images(unl), boxes)]
        perturb = feature_dropout(n_l, n_l + n_u, c.fp_dropout) if self.feature_perturbation else None
        # groups: labeled, weak, strong views (UniMatch's code: [labeled + weak], [strong]); the fp stream is
        # normalised with the weak views it perturbs
        out = forward_groups(self.net, torch.cat([x_l, x_w, *strong]), [n_l, n_u, n_u * len(strong)], c.split_bn,
                             join=1, perturb=perturb)
        out_l, out_u = split_outputs(out, n_l)
        logits_u = out_u["logits"]  # [u_w, s_1 (, s_2)] (, fp of u_w)
        with torch.no_grad():
            logits_w = logits_u[:n_u].detach().float()  # train-mode pass (see top)
            if self.align is not None:  # pseudo-labels and confidences from the aligned probabilities
                self.align.update(lab["mask"], logits_w.softmax(1), valid, lab.get("pasted"))
                logits_w = self.align(logits_w)
            conf, pseudo = logits_w.softmax(1).max(1)
        loss_sup = sup_loss(out_l, lab["mask"], c)
        losses_s = []
        for k, m in enumerate(boxes):  # targets: the image's own outside the box, the partner's inside
            t = {"pseudo": pseudo, "conf": conf, "valid": valid}
            t = {name: mix(v, partner(v), m) for name, v in t.items()}
            s_logits = logits_u[(k + 1) * n_u:(k + 2) * n_u]
            losses_s.append(confident_ce(s_logits, t["pseudo"], t["conf"], t["valid"], c.conf_thresh))
        if self.feature_perturbation:
            loss_fp = confident_ce(logits_u[(self.n_strong + 1) * n_u:], pseudo, conf, valid, c.conf_thresh)
            loss = total_loss(loss_sup, losses_s, c.strong_weight, loss_fp, c.fp_weight)
            terms = {"loss_s1": losses_s[0], "loss_s2": losses_s[1], "loss_fp": loss_fp}
        else:
            loss = total_loss(loss_sup, losses_s, c.strong_weight)
            terms = {"loss_unsup": losses_s[0]}
        with torch.no_grad():
            hard = pseudo.masked_fill(~valid, IGNORE)
            confident = (conf >= c.conf_thresh) & valid
            quality = pseudo_label_quality(hard, unl, self.info.num_classes)
            if quality:  # the accuracy of the pixels that are trained on
                conf_q = pseudo_label_quality(hard.masked_fill(~confident, IGNORE), unl, self.info.num_classes,
                                              prefix="conf")  # fmt: skip
                quality["conf_acc"] = conf_q["conf_acc"]
            diag = {"conf_frac": confident_share(conf, valid, c.conf_thresh),
                    "mix_frac": torch.stack([m.amax((1, 2, 3)) for m in boxes]).mean()}  # fmt: skip
        return {"loss": loss, "loss_sup": loss_sup, **terms, **diag, **quality}


@METHODS.register("unimatch")
class UniMatch(FixMatch):
    """UniMatch (``unimatch.py``): FixMatch with two strong views and the feature-perturbation stream."""

    Config = UniMatchConfig
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_sup": ("net",), "loss_s1": ("net",), "loss_s2": ("net",), "loss_fp": ("net",),
    }  # fmt: skip
    n_strong: ClassVar[int] = 2
    strong_views: ClassVar[int] = 2  # the loader draws image_strong and image_strong2 independently
    feature_perturbation: ClassVar[bool] = True
