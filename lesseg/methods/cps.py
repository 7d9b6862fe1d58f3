"""CPS, Cross Pseudo Supervision (methods.md section 5; Chen et al., CVPR 2021).

Two networks of one architecture, initialised differently, each learn CE on labeled images and CE towards
the other's one-hot prediction: ``L = L_sup1 + L_sup2 + lambda (CE(P1, argmax P2) + CE(P2, argmax P1))``.
Without CutMix the cross term covers labeled and unlabeled images; with CutMix the pseudo-labels come from
each network's predictions on the two source images, mixed with the box mask (``mixing: classmix``: ClassMix's
mask of whole predicted classes instead), and the cross term covers the mixed unlabeled images only. Pixels without content (crop padding: ``valid`` False on unlabeled images,
label 255 on labeled ones, where padding cannot be told apart from VOC's ignore borders) are left out.
``threshold`` (ours, 0 by default: the paper's) leaves out the pseudo-labels whose probability is under it, the
cross term's mean staying over every valid pixel (FixMatch's weighting).
"""

from __future__ import annotations

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
    ce_loss,
    forward_groups,
    hard_labels,
    make_alignment,
    pseudo_label_quality,
    rampup_phase,
    split_outputs,
)
from .mean_teacher import sigmoid_rampup
from .mixing import box_mask_xor, check_pair_mask, classmix_mask, mix_batch
from .supervised import SupervisedConfig, sup_loss


@dataclass
class CPSConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "cps"
    cps_weight: float = ranged(1.5, "[0, inf)")  # lambda (paper: VOC 1.5, 1.0 with CutMix; Cityscapes 6, 5 with CutMix)
    cutmix: bool = False  # cross term on CutMix-ed unlabeled images (pseudo-labels mixed with the box mask)
    # with cutmix, the mask: cutmix (the paper's box) | classmix (the pixels of half the classes the two
    # networks' mean prediction finds in the partner image: pasted objects stay whole; Olsson et al. 2021)
    mixing: str = "cutmix"
    # sigmoid ramp-up of the cross term over this share of the run (ours; the paper has none); 0: full from step 0
    rampup: float = ranged(0.0, "[0, 1]")
    # each network's unlabeled predictions aligned to the labeled class frequencies before its pseudo-labels are
    # taken (common.PriorAlignment; ours): none (the paper's) | mean | hard. Unaligned, the two networks from
    # ImageNet teach each other background on every pixel (class-0 share 1.00 from step 75 of 300). 300 steps,
    # 1/16, two seeds: aligned at lambda 1.0, shapes 29.78 / fashion 16.25, against 26.26 / 13.46 unaligned at
    # the 1.5 the shapes configs had (docs/benchmarks.md, "CPS's cross term"). VOC and Cityscapes keep the paper's.
    align: str = "hard"
    # pseudo-labels whose (aligned) probability is under this are left out of the cross term, whose mean stays
    # over every valid pixel (FixMatch's weighting, so the term grows as the partner becomes sure); ours, the
    # paper has none (0: every pixel, the paper's). 1/16 from ImageNet, 0.95 with split_bn against the defaults:
    # 300 steps, two seeds, shapes 31.29 against 29.78; 1,500 steps, seed 0, shapes 46.12 against 53.43, fashion
    # 23.55 against 23.32: an option (docs/benchmarks.md, "CPS's threshold at 1,500 steps")
    threshold: float = ranged(0.0, "[0, 1]")


def cps_loss(
    logits1: torch.Tensor, logits2: torch.Tensor, labels1: torch.Tensor, labels2: torch.Tensor,
    weight1: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CE(P1, labels2) + CE(P2, labels1)``: each network learns the other's pseudo-labels (255 = skip);
    ``weight1`` / ``weight2`` (B,H,W) weight the pixels of ``labels1`` / ``labels2`` (the mean stays over
    their non-skipped pixels)."""
    return ce_loss(logits1, labels2, weight2) + ce_loss(logits2, labels1, weight1)


def confident(probs: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """1 where the top probability is >= ``threshold``, else 0 (float B,H,W); None for threshold 0 (every
    pixel). ``probs`` B,C,H,W."""
    return None if threshold <= 0 else (probs.max(1).values >= threshold).float()


def prediction_overlap(labels1: torch.Tensor, labels2: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fraction of valid pixels where the two networks predict the same class (CPS Figure 7). 0-dim."""
    agree = ((labels1 == labels2) & valid).float().sum()
    return agree / valid.float().sum().clamp_min(1.0)


def kept_share(w1: torch.Tensor, w2: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The share of the valid unlabeled pixels (``valid`` B,H,W: the last B of the weights' batch) whose
    pseudo-labels the threshold keeps, over both networks. 0-dim"""
    kept = (w1[-valid.shape[0]:] + w2[-valid.shape[0]:]) / 2 * valid.float()
    return kept.sum() / valid.float().sum().clamp_min(1.0)


@METHODS.register("cps")
class CPS(Method):
    Config = CPSConfig
    streams = ("labeled", "unlabeled")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net1", "net2"), "loss_cps": ("net1", "net2")}

    def __init__(self, cfg: CPSConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        check_pair_mask(cfg.mixing)
        if cfg.mixing != "cutmix" and not cfg.cutmix:
            raise ConfigError(f"method.mixing={cfg.mixing} is the mask of CPS's CutMix: it needs method.cutmix=true")
        self.net1 = build_model(model_cfg, info.num_classes)
        # net2 is initialised under the next seed (the same on every process), in a forked RNG so that net1
        # and everything drawn later are as in a single-network run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + 1) % 2**63)
            self.net2 = build_model(model_cfg, info.num_classes)
        self.rampup_steps = round(cfg.rampup * info.max_iters)
        self.align1 = make_alignment(cfg.align, info.num_classes)
        self.align2 = make_alignment(cfg.align, info.num_classes)

    def phases(self) -> list[tuple[str, int, int]]:
        label = f"cross term's weight ramp-up (sigmoid, to {self.cfg.cps_weight:g})"
        return rampup_phase(label, self.rampup_steps, self.info.max_iters)

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"net1": self.net1, "net2": self.net2}

    def eval_net(self) -> nn.Module:
        return self.net1

    @torch.no_grad()
    def aligned(self, logits1: torch.Tensor, logits2: torch.Tensor, lab: dict[str, torch.Tensor],
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each network's unlabeled logits aligned by its own :class:`PriorAlignment` (unchanged without)."""
        if self.align1 is None:
            return logits1, logits2
        out = []
        for a, logits in ((self.align1, logits1), (self.align2, logits2)):
            a.update(lab["mask"], logits.float().softmax(1), valid, lab.get("pasted"))
            out.append(a(logits))
        return out[0], out[1]

    @torch.no_grad()
    def mixed_pseudo_labels(self, unl: dict[str, torch.Tensor],
                            lab: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Mixed images and each network's pseudo-labels of the mixed images, from its (aligned) predictions
        on the source images mixed with the box mask; the mixed valid map; net1's pseudo-labels before
        mixing; each network's pixel weights (``method.threshold``; None without)."""
        x = unl["image"]  # B,3,H,W
        b, _, h, w = x.shape
        m = box_mask_xor(b, h, w, x.device) if self.cfg.mixing == "cutmix" else None  # B,1,H,W
        logits1, logits2 = self.aligned(self.net1(x)["logits"], self.net2(x)["logits"], lab, unl["valid"])
        p1, p2 = logits1.float().softmax(1), logits2.float().softmax(1)
        if m is None:  # classmix, from the two networks' mean prediction
            m = classmix_mask(hard_labels(p1 + p2, unl["valid"]))
        mixed = mix_batch({"image": x, "p1": p1, "p2": p2, "valid": unl["valid"]}, m)
        valid = mixed["valid"]
        y1, y2 = hard_labels(mixed["p1"], valid), hard_labels(mixed["p2"], valid)
        w1, w2 = (confident(mixed[k], self.cfg.threshold) for k in ("p1", "p2"))
        return mixed["image"], y1, y2, valid, hard_labels(p1, unl["valid"]), w1, w2

    def training_step(self, batch, step):
        lab, unl = batch["labeled"], batch["unlabeled"]
        n = lab["image"].shape[0]
        if self.cfg.cutmix:
            x_u, y1_u, y2_u, valid_u, raw1, w1, w2 = self.mixed_pseudo_labels(unl, lab)
        else:
            x_u, valid_u = unl["image"], unl["valid"]
        x = torch.cat([lab["image"], x_u])  # N+B,3,H,W: one forward per network and step
        sizes = [n, x_u.shape[0]] if self.cfg.cutmix else [n + x_u.shape[0]]  # CutMix'ed images: a view apart
        out1, out2 = (forward_groups(net, x, sizes, self.cfg.split_bn) for net in (self.net1, self.net2))
        (out1_l, out1_u), (out2_l, out2_u) = split_outputs(out1, n), split_outputs(out2, n)
        loss_sup = sup_loss(out1_l, lab["mask"], self.cfg) + sup_loss(out2_l, lab["mask"], self.cfg)
        if self.cfg.cutmix:
            loss_cps = cps_loss(out1_u["logits"], out2_u["logits"], y1_u, y2_u, w1, w2)
        else:
            valid = torch.cat([lab["mask"] != IGNORE, valid_u])  # N+B,H,W
            a1, a2 = self.aligned(out1["logits"][n:].detach(), out2["logits"][n:].detach(), lab, valid_u)
            l1 = torch.cat([out1["logits"][:n].detach().float(), a1.float()])
            l2 = torch.cat([out2["logits"][:n].detach().float(), a2.float()])
            y1, y2 = hard_labels(l1, valid), hard_labels(l2, valid)
            t = self.cfg.threshold  # the softmax only when a threshold needs it (argmax is the logits')
            w1, w2 = (confident(l.softmax(1), t) for l in (l1, l2)) if t > 0 else (None, None)
            loss_cps = cps_loss(out1["logits"], out2["logits"], y1, y2, w1, w2)
            y1_u, y2_u = y1[n:], y2[n:]
            raw1 = y1_u
        loss = loss_sup + self.cfg.cps_weight * sigmoid_rampup(step, self.rampup_steps) * loss_cps
        return {
            "loss": loss,
            "loss_sup": loss_sup,
            "loss_cps": loss_cps,
            "overlap": prediction_overlap(y1_u, y2_u, valid_u),
            **({} if w1 is None else {"confident": kept_share(w1, w2, valid_u)}),
            **pseudo_label_quality(raw1, unl, self.info.num_classes),  # net1's, the evaluated network
        }
