"""AdvSemSeg: adversarial learning for semi-supervised segmentation (Hung et al., BMVC 2018; methods-wave2.md
section 12).

A fully convolutional discriminator D (:class:`~lesseg.models.discriminator.FCDiscriminator`) maps class
probability maps to per-pixel logits "comes from a label map". With ``P = softmax`` of the segmenter's logits
and BCE on logits averaged over the valid pixels (label 255 and crop padding never count):

- D: ``L_D = 1/2 BCE(D([P_l, P_u]), 0) + 1/2 BCE(D(onehot(y)), 1)``, predictions detached;
- segmenter, labeled: ``CE(P_l, y) + lambda_adv BCE(D(P_l), 1)``;
- segmenter, unlabeled: ``lambda_semi_adv BCE(D(P_u), 1)`` at every step, plus from ``semi_start`` (a share
  of the run: 5000 of 20 000 iterations in the paper) ``lambda_semi CE(P_u, y^)``, ``y^ = argmax P_u`` where
  ``sigmoid(D(P_u)) >= T_semi``, 255 elsewhere.

One optimizer and one backward per step (the trainer's): D is a trainable network of its own, its loss is
computed on detached predictions (it reaches D only), and the segmenter's adversarial terms evaluate D through
``torch.func.functional_call`` with detached copies of its parameters (they reach the segmenter only). So the
summed loss gives each network exactly the gradient of its own objective, both taken at the step's parameters,
as in the authors' loop (their D step uses the predictions made before the segmenter's update).

Choices and departures from the authors' code (section 12):
- D is stepped by the run's optimizer, not by its own Adam (lr 1e-4, betas 0.9/0.99), in a group of its own
  at ``d_lr_mult`` x the base LR (0.4: the paper's 1e-4 next to the segmenter's 2.5e-4) and without weight
  decay (the authors' Adam had none); with the papers' SGD D gets momentum 0.9 and the poly decay. Not the
  paper's optimizer: the closest one the one-optimizer trainer can honour.
- The real label maps are the one-hot masks of the step's labeled batch (the authors draw them from a
  second, separately shuffled loader over the same labeled images).
- The ``lambda_semi_adv`` term is always back-propagated (the authors drop it on steps where no unlabeled
  pixel passes ``T_semi`` after the start); ``T_semi`` counts a pixel at equality.
- One segmenter forward on ``[x_l, x_u]`` (lesseg's one-forward rule) whose BatchNorm normalises the two
  batches apart (``split_bn``, as the authors' separate forwards; ``method.split_bn=false``: together) and
  one D forward on ``[P_l, P_u, onehot(y)]`` (D has no normalization: batching them changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import ranged
from ..models import build_model
from ..models.discriminator import FCDiscriminator
from .base import METHODS, Method, RunInfo
from .common import IGNORE, ViewStatsConfig, ce_loss, forward_groups, pseudo_label_quality, split_outputs
from .supervised import SupervisedConfig, sup_loss


@dataclass
class AdvSemSegConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "advsemseg"
    adv_weight: float = ranged(0.01, "[0, inf)")  # lambda_adv (README's semi runs; the code default: 0.1)
    semi_adv_weight: float = ranged(0.001, "[0, inf)")  # lambda_semi_adv
    semi_weight: float = ranged(0.1, "[0, inf)")  # lambda_semi
    semi_thresh: float = ranged(0.2, "[0, 1]")  # T_semi on sigmoid(D(P_u))
    semi_start: float = ranged(0.25, "[0, 1]")  # share of the run before loss_semi starts (5000 of 20 000)
    d_channels: int = ranged(64, "[1, inf)")  # D's first width (64, 128, 256, 512)
    d_weight: float = ranged(1.0, "[0, inf)")  # L_D's weight (not the paper's; 1)
    # D's learning rate as a multiple of the base (encoder) LR, not of the head's: 0.4 = the paper's D at
    # 1e-4 next to the segmenter's 2.5e-4 (with AdamW from a pretrained encoder at 2e-4: D at 8e-5, near the
    # paper's Adam 1e-4)
    d_lr_mult: float = ranged(0.4, "(0, inf)")
    # labeled and unlabeled images normalised apart (common.ViewStatsConfig), as the authors' separate forwards:
    # 300 steps from ImageNet, 1/16, seed 0: shapes 33.54 against 26.15 together, fashion 18.80 against 17.20
    # (SupOnly 29.96 / 18.32; docs/benchmarks.md, "Every method with copy-paste at 300 steps")
    split_bn: bool = True


# ---------------------------------------------------------------------------------------------- pure pieces
def one_hot_labels(mask: Tensor, num_classes: int) -> Tensor:
    """Label maps as D's "real" input: one-hot B,C,H,W float; a 255 pixel is all zeros. B,H,W -> B,C,H,W"""
    classes = torch.arange(num_classes, device=mask.device)
    return (mask[:, None] == classes[None, :, None, None]).float()


def valid_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the ``valid`` pixels (0 when none), without a host sync. B,H,W -> 0-dim"""
    v = valid.float()
    return (values * v).sum() / v.sum().clamp_min(1.0)


def bce_map(logits: Tensor, target: float, valid: Tensor) -> Tensor:
    """BCE-with-logits of a B,1,H,W map towards the constant ``target``, averaged over the ``valid`` (B,H,W)
    pixels; 0 (not NaN) when none is valid. -> 0-dim float32"""
    target_map = torch.full(valid.shape, target, device=valid.device)  # B,H,W float32
    per_pixel = F.binary_cross_entropy_with_logits(logits.float().squeeze(1), target_map, reduction="none")
    return valid_mean(per_pixel, valid)


def discriminator_loss(d_fake: Tensor, valid_fake: Tensor, d_real: Tensor, valid_real: Tensor) -> Tensor:
    """``L_D = 1/2 BCE(D(fake), 0) + 1/2 BCE(D(real), 1)``, each averaged over its valid pixels."""
    return 0.5 * bce_map(d_fake, 0.0, valid_fake) + 0.5 * bce_map(d_real, 1.0, valid_real)


def trusted_pseudo_labels(logits: Tensor, d_logits: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """``argmax P_u`` where ``sigmoid(D(P_u)) >= T_semi`` and the pixel is valid, 255 elsewhere; no gradient.
    logits B,C,H,W ; d_logits B,1,H,W ; valid B,H,W -> B,H,W"""
    trusted = (torch.sigmoid(d_logits.detach().float().squeeze(1)) >= threshold) & valid
    return logits.detach().max(1).indices.masked_fill(~trusted, IGNORE)


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("advsemseg")
class AdvSemSeg(Method):
    Config = AdvSemSegConfig
    streams = ("labeled", "unlabeled")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_sup": ("net",), "loss_adv": ("net",), "loss_semi_adv": ("net",), "loss_semi": ("net",),
        "loss_d": ("disc",),
    }  # fmt: skip

    def __init__(self, cfg: AdvSemSegConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)
        self.disc = FCDiscriminator(info.num_classes, cfg.d_channels)
        self.semi_start_step = round(cfg.semi_start * info.max_iters)

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"net": self.net, "disc": self.disc}

    def group_options(self) -> dict[str, dict]:
        """D at ``d_lr_mult`` x the base LR without weight decay (the authors' Adam for D had none); the
        segmenter as usual."""
        return {"disc": {"lr_mult": self.cfg.d_lr_mult, "head": False, "weight_decay": 0.0}}

    def phases(self) -> list[tuple[str, int, int]]:
        n = min(self.semi_start_step, self.info.max_iters)
        what = f"no self-training on D-trusted pixels yet (loss_semi from semi_start={self.cfg.semi_start})"
        return [(what, 0, n)] if n else []

    def frozen_disc(self, probs: Tensor) -> Tensor:
        """D's logits for the segmenter's terms: D's parameters detached, so only the input gets gradient."""
        disc = getattr(self.disc, "module", self.disc)
        params = {k: p.detach() for k, p in disc.named_parameters()}
        return functional_call(disc, params, (probs,))

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        c = self.cfg
        lab, unl = batch["labeled"], batch["unlabeled"]
        y, valid_u = lab["mask"], unl["valid"]
        n = y.shape[0]
        out = forward_groups(self.net, torch.cat([lab["image"], unl["image"]]), [n, unl["image"].shape[0]], c.split_bn)
        out_l, out_u = split_outputs(out, n)
        probs = out["logits"].float().softmax(1)  # N+B,C,H,W
        valid_l = y != IGNORE

        d_g = self.frozen_disc(probs)  # N+B,1,H,W: the segmenter's adversarial terms
        loss_sup = sup_loss(out_l, y, c)
        loss_adv = bce_map(d_g[:n], 1.0, valid_l)
        loss_semi_adv = bce_map(d_g[n:], 1.0, valid_u)
        pseudo = trusted_pseudo_labels(out_u["logits"], d_g[n:], valid_u, c.semi_thresh)
        loss_semi = ce_loss(out_u["logits"], pseudo)
        semi_on = float(step >= self.semi_start_step)

        real = one_hot_labels(y, self.info.num_classes)
        d_all = self.disc(torch.cat([probs.detach(), real]))  # one D forward: [fake_l, fake_u, real]
        fake_valid = torch.cat([valid_l, valid_u])
        loss_d = discriminator_loss(d_all[: probs.shape[0]], fake_valid, d_all[probs.shape[0]:], valid_l)

        loss = (loss_sup + c.adv_weight * loss_adv + c.semi_adv_weight * loss_semi_adv
                + semi_on * c.semi_weight * loss_semi + c.d_weight * loss_d)  # fmt: skip
        with torch.no_grad():
            hard = out_u["logits"].max(1).indices.masked_fill(~valid_u, IGNORE)
            quality = pseudo_label_quality(hard, unl, self.info.num_classes)
            if quality:  # the accuracy of the pixels D trusts (the ones loss_semi trains on)
                trusted = pseudo_label_quality(pseudo, unl, self.info.num_classes, "semi")
                quality["semi_acc"] = trusted["semi_acc"]
            d_prob = torch.sigmoid(d_all.float().squeeze(1))  # D's belief "label map", per pixel
            diag = {"semi_frac": (pseudo != IGNORE).sum() / valid_u.sum().clamp_min(1),
                    "d_fake": valid_mean(d_prob[: probs.shape[0]], fake_valid),
                    "d_real": valid_mean(d_prob[probs.shape[0]:], valid_l)}  # fmt: skip
        return {"loss": loss, "loss_sup": loss_sup, "loss_adv": loss_adv, "loss_semi_adv": loss_semi_adv,
                "loss_semi": loss_semi * semi_on, "loss_d": loss_d, **diag, **quality}  # fmt: skip
