"""PseudoSeg: pseudo-labels fused from the decoder and a self-attention Grad-CAM (Zou et al., ICLR 2021;
methods-wave2.md section 11, here checked against the authors' code, googleinterns/wss ``train_wss.py`` and
``core/train_utils_core.py``, defaults: soft labels, ``att_v2``, ``logit_norm``, ``pseudo_src=avg``).

Networks: the segmenter and an image-level branch on its encoder (:class:`SGCBranch`): a multi-label
classifier (GAP + bias-free 1x1, sigmoid BCE on the image tags of the labeled masks, background excluded)
and the SGC refiner (:class:`~lesseg.models.sgc.SelfAttentionRefiner`). Per step, on a labeled batch and the
weak and strong views of an unlabeled batch:

1. Grad-CAM of the last encoder feature for the image's tags (labeled: the mask's classes; unlabeled: the
   classes whose sigmoid is >= ``tag_thresh``), ReLU'd and divided by each map's maximum; detached. With a
   GAP + linear classifier the Grad-CAM weights are the classifier's own (``d y_c / d f = w_c / hw``), so it
   equals the max-normalised CAM exactly (:func:`lesseg.methods.weak.cam.class_activation_maps`).
2. SGC logits = the refiner on those maps and the detached last two encoder levels; ``loss_sgc`` = CE of the
   upsampled SGC logits on the labeled masks (it trains the refiner only).
3. Calibrated fusion on the weak view (:func:`calibrated_fusion`): decoder logits ``p`` and SGC logits ``m``
   divided by the root mean square of both together, ``(softmax(p / rms) + softmax(m / rms)) / 2``,
   sharpened with temperature T = 0.5: the soft pseudo-label (no gradient).
4. ``loss_unsup`` = soft CE of the strong view's decoder logits towards it, averaged over the valid pixels
   (crop padding and the strong view's cutout square excluded), its weight ramped up (sigmoid) over the first
   ``rampup`` share of the run (ours; the authors' weight is full from the first step: ``rampup: 0``).

``L = loss_sup + loss_sgc + loss_cls + unsup_weight ramp(t) loss_unsup`` (all weights 1 in the authors' code).

Choices and departures from the authors' code:
- One segmenter forward per step on ``[x_l, u_weak, u_strong]`` in train mode, BatchNorm normalising the
  three apart (``split_bn``; ``method.split_bn=false``: together); the unlabeled Grad-CAM comes from its
  features (the authors run a second, inference-mode encoder pass for it).
- The logit normalisation's root mean square is taken per image (the authors': over the whole per-GPU batch,
  so one image's pseudo-label depended on its batch mates); the fusion and the consistency loss are at the
  input resolution (the authors': the decoder's stride 4, SGC upsampled to it).
- The strong view is lesseg's photometric one plus the authors' cutout: a square of side ``cutout_size`` x
  the crop (their 100 px of 513), centred uniformly, clipped, set to the mean pixel and left out of the loss.
- Attention keys: the unlabeled images' non-padding pixels (the authors'); on labeled images, where lesseg
  keeps no padding map, the labeled pixels (VOC's 255 borders are left out too).
- The authors' Grad-CAM averages the gradient over batch and rows (a list-packing slip in
  ``tf.reduce_mean(tf.gradients(...), axis=(1, 2))``); with a linear head the gradient is constant, so the
  CAM here is what they meant. ``bg_class`` None (Cityscapes: no background class) gives every class a map
  and no background score, as their code does when the maps cover all classes.
- ``weakly``: the unlabeled stream's own image tags (data with tags) replace the predicted ones and also
  train the classifier, next to the labeled images' (the authors then train it on the tagged images only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ranged
from ..errors import ConfigError, LessegError
from ..models import build_model
from ..models.heads import ClassificationHead
from ..models.sgc import SelfAttentionRefiner
from .base import METHODS, Method, RunInfo
from .common import (
    IGNORE,
    ViewStatsConfig,
    ce_loss,
    forward_groups,
    make_alignment,
    pseudo_label_quality,
    rampup_phase,
    split_outputs,
)
from .mean_teacher import sigmoid_rampup
from .supervised import SupervisedConfig, sup_loss
from .weak.cam import class_activation_maps


@dataclass
class PseudoSegConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "pseudoseg"
    unsup_weight: float = ranged(1.0, "[0, inf)")  # weight of loss_unsup (the authors' unlabeled_weight)
    temperature: float = ranged(0.5, "(0, inf)")  # T of the sharpening of the fused pseudo-label
    tag_thresh: float = ranged(0.5, "[0, 1]")  # an unlabeled image's predicted tag: sigmoid(cls) >= this
    attention_dim: int = ranged(128, "[1, inf)")  # query / key channels of the SGC refiner
    bg_class: int | None = ranged(0, "[0, inf)")  # the class without a CAM (background); None: all have one
    cutout_size: float = ranged(0.195, "[0, 1]")  # strong view's cutout side / crop side (100 / 513); 0: off
    weakly: bool = False  # unlabeled images come with tags: CAMs of those, and the classifier learns them
    # sigmoid ramp-up of unsup_weight over this share of the run's iterations (ours, as Mean Teacher's, VAT's and
    # CCT's 10 %; the authors' 0: full weight from the first step, which the VOC and Cityscapes configs keep).
    # 300 steps from ImageNet, 1/16, two seeds: shapes 31.03 / fashion 18.33 against 29.69 / 17.62 without
    # (docs/benchmarks.md, "PseudoSeg's unlabeled term ramped up")
    rampup: float = ranged(0.1, "[0, 1]")
    # the fused pseudo-labels aligned to the labeled class frequencies (common.PriorAlignment; ours): none |
    # mean | hard. hard (the default): their argmax takes the labeled masks' class shares, as CPS's. From ImageNet,
    # 1/16: 300 steps, two seeds, shapes 31.56 / fashion 19.41 against 31.03 / 18.33 with none; 1,500 steps on
    # shapes 56.33 over two seeds (SupOnly 47.10; seed 0 with none 45.09: it drifts to the background)
    # (docs/benchmarks.md, "PseudoSeg's pseudo-labels aligned"). The VOC and Cityscapes configs keep the authors' none.
    align: str = "hard"
    # labeled images, weak and strong views normalised apart (common.ViewStatsConfig): 300 steps from ImageNet,
    # 1/16, seed 0: shapes 29.73 against 26.12 together, fashion 16.81 against 16.83 (SupOnly 29.96 / 18.32;
    # docs/benchmarks.md, "Every method with copy-paste at 300 steps")
    split_bn: bool = True


# ---------------------------------------------------------------------------------------------- pure pieces
def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """``p_c^(1/T) / sum_j p_j^(1/T)`` over dim 1 (T = 1: unchanged; T -> 0: one-hot). B,C,... -> B,C,..."""
    return (probs.float().log() / temperature).softmax(1)


def calibrated_fusion(dec_logits: Tensor, sgc_logits: Tensor, temperature: float) -> Tensor:
    """PseudoSeg's soft pseudo-label: both logit maps divided by one root mean square per image (over both
    maps, all classes and pixels), their softmaxes averaged, then sharpened. B,C,H,W x2 -> B,C,H,W float32"""
    dec, sgc = dec_logits.detach().float(), sgc_logits.detach().float()
    rms = torch.cat([dec, sgc], 1).pow(2).mean((1, 2, 3), keepdim=True).add(1e-8).sqrt()  # B,1,1,1
    return sharpen(((dec / rms).softmax(1) + (sgc / rms).softmax(1)) / 2, temperature)


def soft_ce(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """``-sum_c q_c log softmax(z)_c`` averaged over the ``valid`` pixels; 0 when none is valid.
    logits, target B,C,H,W ; valid B,H,W bool -> 0-dim float32"""
    per_pixel = -(target.float() * logits.float().log_softmax(1)).sum(1)  # B,H,W
    v = valid.float()
    return (per_pixel * v).sum() / v.sum().clamp_min(1.0)


def image_tags(mask: Tensor, num_classes: int, bg_class: int | None) -> Tensor:
    """Multi-hot tags of the classes present in each mask (255 ignored), without ``bg_class``. B,H,W -> B,K"""
    present = torch.zeros(mask.shape[0], 256, dtype=torch.bool, device=mask.device)
    present.scatter_(1, mask.flatten(1), True)
    return drop_background(present[:, :num_classes].float(), bg_class)


def drop_background(per_class: Tensor, bg_class: int | None) -> Tensor:
    """Columns of the classes that have a CAM: all but ``bg_class``. B,C -> B,K"""
    if bg_class is None:
        return per_class
    return torch.cat([per_class[:, :bg_class], per_class[:, bg_class + 1:]], 1)


def cutout_square(b: int, h: int, w: int, size: float, device: torch.device | str) -> Tensor:
    """One square per image (half-sides ``round(size H / 2)``, ``round(size W / 2)``) centred uniformly in
    the image and clipped to it, the authors' ``cutout_with_mask``. -> B,1,H,W float, 1 inside"""
    cy = torch.randint(0, h, (b, 1), device=device)
    cx = torch.randint(0, w, (b, 1), device=device)
    rh, rw = round(size * h / 2), round(size * w / 2)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    rows = (ys >= cy - rh) & (ys < cy + rh)  # B,H
    cols = (xs >= cx - rw) & (xs < cx + rw)  # B,W
    return (rows[:, :, None] & cols[:, None, :]).float().unsqueeze(1)


def _at(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A B,H,W bool map at another resolution (nearest)."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


class SGCBranch(nn.Module):
    """The image-level branch: classifier logits, the tags used, and SGC logits of a batch (one forward)."""

    def __init__(self, channels: list[int], num_classes: int, cfg: PseudoSegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cam_classes = num_classes - (cfg.bg_class is not None)
        self.cls_head = ClassificationHead(channels[-1], cam_classes)
        self.refiner = SelfAttentionRefiner(sum(channels[-2:]), num_classes, cfg.bg_class, cfg.attention_dim)

    def forward(
        self, features: list[Tensor], valid: Tensor, tags: Tensor, known: Tensor
    ) -> dict[str, Tensor]:
        """``features``: the encoder levels; ``valid`` B,H,W attendable pixels; ``tags`` B,K used where
        ``known`` (B bool), elsewhere the classifier's own prediction."""
        last = features[-1]  # B,K',h,w
        size = last.shape[-2:]
        cls = self.cls_head(last)  # B,K
        predicted = (cls.detach().float().sigmoid() >= self.cfg.tag_thresh).float()
        tags = torch.where(known[:, None], tags, predicted)
        cams = class_activation_maps(last.detach(), self.cls_head.classifier.weight.detach(), tags, size)
        hyper = torch.cat([F.interpolate(f.detach(), size=size, mode="bilinear", align_corners=False)
                           for f in features[-2:]], 1)  # fmt: skip
        return {"cls": cls, "tags": tags, "sgc": self.refiner(hyper, cams, _at(valid, size))}

    def encoder_parameters(self) -> list[nn.Parameter]:
        return []  # the branch is all head (the encoder is the segmenter's)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("pseudoseg")
class PseudoSeg(Method):
    Config = PseudoSegConfig
    streams = ("labeled", "unlabeled")
    strong_streams = ("unlabeled",)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_sup": ("net",), "loss_cls": ("net", "sgc"), "loss_sgc": ("sgc",), "loss_unsup": ("net",),
    }  # fmt: skip

    def __init__(self, cfg: PseudoSegConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.bg_class is not None and cfg.bg_class >= info.num_classes:
            raise ConfigError(f"method.bg_class {cfg.bg_class} is not a class of this data "
                              f"(0..{info.num_classes - 1}); null: every class has a CAM")  # fmt: skip
        self.net = build_model(model_cfg, info.num_classes)
        self.align = make_alignment(cfg.align, info.num_classes)
        self.sgc = SGCBranch(self.net.encoder.feature_info.channels(), info.num_classes, cfg)
        self.rampup_steps = round(cfg.rampup * info.max_iters)

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"net": self.net, "sgc": self.sgc}

    def phases(self) -> list[tuple[str, int, int]]:
        label = f"unsupervised weight ramp-up (sigmoid, to {self.cfg.unsup_weight:g})"
        return rampup_phase(label, self.rampup_steps, self.info.max_iters)

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        c, num_classes = self.cfg, self.info.num_classes
        lab, unl = batch["labeled"], batch["unlabeled"]
        y, valid_u = lab["mask"], unl["valid"]
        n_l, n_u = y.shape[0], valid_u.shape[0]
        h, w = y.shape[-2:]
        x_s, valid_s = unl["image_strong"], valid_u
        if c.cutout_size > 0:
            box = cutout_square(n_u, h, w, c.cutout_size, x_s.device)
            x_s, valid_s = x_s * (1 - box), valid_u & (box[:, 0] == 0)  # normalised 0 = the mean pixel

        kept: dict[str, list[Tensor]] = {}

        def keep(features: list[Tensor]) -> list[Tensor]:  # the encoder levels, for the image-level branch
            kept["features"] = features
            return features

        x = torch.cat([lab["image"], unl["image"], x_s])
        out = forward_groups(self.net, x, [n_l, n_u, x_s.shape[0]], c.split_bn, perturb=keep)
        out_l, out_u = split_outputs(out, n_l)
        logits_w, logits_s = out_u["logits"][:n_u], out_u["logits"][n_u:]

        tags_l = image_tags(y, num_classes, c.bg_class)
        if not c.weakly:  # the branch predicts the unlabeled images' tags
            tags_u = tags_l.new_zeros(n_u, tags_l.shape[1])
        elif "tags" in unl:
            tags_u = drop_background(unl["tags"], c.bg_class)
        else:
            raise LessegError("pseudoseg: method.weakly needs image tags on the unlabeled stream's images")
        known = torch.tensor([True] * n_l + [c.weakly] * n_u, device=y.device)
        branch = self.sgc([f[: n_l + n_u] for f in kept["features"]], torch.cat([y != IGNORE, valid_u]),
                          torch.cat([tags_l, tags_u]), known)  # fmt: skip
        sgc = F.interpolate(branch["sgc"], size=(h, w), mode="bilinear", align_corners=False)  # N+B,C,H,W

        loss_sup = sup_loss(out_l, y, c)
        loss_sgc = ce_loss(sgc[:n_l], y)
        n_cls = n_l + n_u if c.weakly else n_l
        loss_cls = F.binary_cross_entropy_with_logits(branch["cls"][:n_cls].float(), branch["tags"][:n_cls])
        pseudo = calibrated_fusion(logits_w, sgc[n_l:], c.temperature)  # B,C,H,W, no gradient
        if self.align is not None:
            self.align.update(y, pseudo, valid_u, lab.get("pasted"))
            pseudo = self.align(pseudo.clamp_min(1e-12).log()).softmax(1)
        loss_unsup = soft_ce(logits_s, pseudo, valid_s)
        loss = loss_sup + loss_sgc + loss_cls + c.unsup_weight * sigmoid_rampup(step, self.rampup_steps) * loss_unsup

        with torch.no_grad():
            maps = {"pl": pseudo, "dec": logits_w, "sgc": sgc[n_l:]}  # the fused label and each source alone
            hard = {k: v.max(1).indices.masked_fill(~valid_u, IGNORE) for k, v in maps.items()}
            quality = pseudo_label_quality(hard["pl"], unl, num_classes)
            if quality:
                for k in ("dec", "sgc"):
                    quality[f"{k}_acc"] = pseudo_label_quality(hard[k], unl, num_classes, k)[f"{k}_acc"]
            diag = {"pl_conf": (pseudo.max(1).values * valid_u).sum() / valid_u.sum().clamp_min(1),
                    "tag_frac": branch["tags"][n_l:].mean()}  # fmt: skip
        return {"loss": loss, "loss_sup": loss_sup, "loss_cls": loss_cls, "loss_sgc": loss_sgc,
                "loss_unsup": loss_unsup, **diag, **quality}  # fmt: skip
