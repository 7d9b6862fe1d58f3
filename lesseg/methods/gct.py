"""GCT, Guided Collaborative Training (Ke et al., ECCV 2020; methods-wave2.md s. 10).

Two segmentation networks l and r of one architecture, initialised differently, see the same batch (labeled
images, then unlabeled ones); a flaw detector FD reads an image with a network's softmax prediction and
predicts per pixel how wrong that prediction is. Each network learns
``L = CE(labeled) + fc_weight L_fc + dc_weight ramp(t) L_dc``:
- L_dc, dynamic consistency: MSE between its softmax and a target that is its own prediction where its
  (post-processed) flaw map is not above the other's, the other network's prediction elsewhere; the maps
  saturate to 1 above ``dc_thresh`` (xi). Mean over all pixels, classes and images, labeled included.
- L_fc, flaw correction: ``mean(M * FD(x, p)^2)``, the detector, frozen, evaluated on the live prediction and
  pushed to 0; M = the pixels both networks' maps flag above xi (mode "fc": every pixel).
The detector learns ``fd_weight`` x the MSE between its maps of the labeled images and a target made from
``mu |onehot(y) - p|`` (blurred, ``nu`` x dilated and re-blurred, min-max normalised per image).

One backward and one optimizer step (the trainer's) replace the authors' three updates (l, r, then FD), and
each term reaches exactly the networks it trains (``loss_terms``, checked by the contract test):
- L_dc's targets and masks are built from this step's detached predictions and detached flaw maps, i.e. from
  the networks before any update, which is what the authors' no-grad pre-pass gives (without a second
  forward; the dropout draw is the training pass's);
- L_fc runs the detector through ``torch.func.functional_call`` with detached parameters: its gradient
  reaches the task network through the prediction and never the detector (the authors set requires_grad
  False instead);
- L_fd runs the (DDP-wrapped) detector on detached predictions, so it trains the detector only.
Both networks' predictions go through the detector as one batch (one DDP forward; its BatchNorm sees both).
Each task network normalises the labeled and the unlabeled images apart (``split_bn``; ours: the authors'
mixed batches share their statistics, ``method.split_bn=false``).

Departures from the authors' code: by default each network's unlabeled predictions are aligned to the labeled
class shares before the dynamic-consistency targets are built from them (``align``; the paper's: none); the task
CE averages over valid pixels (theirs divides by every H x W pixel, ignored ones included); the detector is
stepped by the trainer's single optimizer (with the papers' SGD: momentum 0.9 and the poly decay), not by a
separate Adam (lr 1e-4, betas 0.9/0.99), in a group of its own at ``fd_lr_mult`` x the base LR (0.4: the paper's
1e-4 next to the task networks' 2.5e-4) without weight decay (their Adam had none). Only L_fd reaches the
detector, so under SGD its step is ``lr x fd_lr_mult x fd_weight``: the VOC configs' 2.5e-4 x 0.4 x 10 (the
paper's weight) = 1e-3 keeps its loss finite and falling over 40 SGD steps on lesseg's test batches (the paper's
64-wide detector swings for the first ~20), whereas at the head LR (x 10) the same weight sends it to inf within
5 steps. A config with a larger base LR keeps the detector at the paper's 1e-4 through ``fd_lr_mult``
(Cityscapes: 0.01); under AdamW the loss scale hardly matters. The Gaussian blurs are normalised separable
kernels of OpenCV's default sigma for the size with reflection padding (theirs: scipy's filter of a delta, equal
but for the truncated tails), sized from the batch's shorter side (theirs from the crop size); a flaw map zeroed
for a low maximum stays 0 after normalisation (theirs subtracts the minimum measured before zeroing, giving
negative values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import ranged
from ..errors import ConfigError
from ..models import build_model
from ..models.flaw_detector import FlawDetector
from .base import METHODS, Method, RunInfo
from .common import (
    ViewStatsConfig,
    forward_groups,
    hard_labels,
    make_alignment,
    pseudo_label_quality,
    split_outputs,
)
from .contrastive import one_hot
from .mean_teacher import sigmoid_rampup
from .supervised import SupervisedConfig, sup_loss

MODES = ("gct", "dc", "fc")  # both constraints | dynamic consistency only | flaw correction only (M = 1)


@dataclass
class GCTConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "gct"
    mode: str = "gct"
    dc_weight: float = ranged(100.0, "[0, inf)")
    fc_weight: float = ranged(1.0, "[0, inf)")
    fd_weight: float = ranged(10.0, "[0, inf)")  # under SGD also a factor of the detector's step (docstring)
    # the detector's LR / the base LR: 0.4, the paper's Adam lr 1e-4 next to the task networks' SGD lr 2.5e-4
    fd_lr_mult: float = ranged(0.4, "(0, inf)")
    dc_thresh: float = ranged(0.6, "[0, 1]")  # xi
    dc_rampup_epochs: float = ranged(3.0, "[0, inf)")  # sigmoid ramp of L_dc (DeepLabv2 3, PSPNet 5)
    mu: float = ranged(0.5, "(0, inf)")  # scale of |onehot - p| in the detector's target
    nu: int = ranged(1, "[0, inf)")  # dilate + re-blur repetitions in the detector's target
    fd_channels: int = ranged(64, "[1, inf)")  # the detector's first width (the paper's 64)
    # the detector sees inputs upsampled to at least this side (a 64-pixel crop would give it a 1x1 map;
    # the paper's 321-pixel crops need none); models/flaw_detector.py
    fd_min_side: int = ranged(256, "[64, inf)")
    # labeled and unlabeled images normalised apart in each task network (common.ViewStatsConfig; the authors
    # normalise their mixed batches together): 300 steps from ImageNet, 1/16, seed 0: shapes 29.98 against
    # 22.98 together, fashion 18.47 against 15.73 (SupOnly 29.96 / 18.32; docs/benchmarks.md, "Every method
    # with copy-paste at 300 steps")
    split_bn: bool = True
    flaw_clip: float = ranged(0.1, "[0, inf)")  # a flaw map whose (blurred) maximum is <= this is zeroed
    # each network's predictions on the unlabeled images aligned to the labeled class frequencies before the
    # dynamic-consistency targets are built from them (common.PriorAlignment; ours, as U2PL's, CPS's and
    # PseudoSeg's): none (the paper's) | mean | hard. Unaligned, GCT's targets drift to the background on
    # shapes (class-0 share 0.89-0.90 against the truth's 0.78). 300 steps from ImageNet, 1/16, two seeds,
    # shapes / fashion: 33.11 / 19.22 aligned against SupOnly's 32.69 / 18.45 (seed 0 unaligned: 29.71 /
    # 18.87; docs/benchmarks.md, "GCT's predictions aligned")
    align: str = "hard"


# ---------------------------------------------------------------------------------------------- pure pieces
def odd_kernel(side: int, divisor: int) -> int:
    """``int(side / divisor)`` made odd (+1 when even), at least 1: the authors' blur sizes from the crop."""
    k = max(int(side / divisor), 1)
    return k + 1 if k % 2 == 0 else k


def gaussian_blur(x: Tensor, k: int) -> Tensor:
    """Separable Gaussian blur of B,1,H,W maps, ``k`` odd, sigma = 0.3((k-1)/2 - 1) + 0.8 (OpenCV's default
    for the size), normalised kernel, reflection padding; float32 even under autocast."""
    if k == 1:
        return x.float()
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = torch.arange(k, device=x.device, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    p = k // 2
    with torch.autocast(x.device.type, enabled=False):
        y = F.pad(x.float(), (p, p, p, p), mode="reflect")
        y = F.conv2d(y, g.view(1, 1, 1, k))
        return F.conv2d(y, g.view(1, 1, k, 1))


def dilate(x: Tensor) -> Tensor:
    """3x3 max filter with reflection padding. B,1,H,W"""
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


def _minmax(x: Tensor) -> Tensor:
    """Per-image min-max normalisation to [0, 1] (``(x - min) / (max - min + 1e-9)``). B,1,H,W"""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo + 1e-9)


def flaw_target(prob: Tensor, labels: Tensor, mu: float, nu: int, side: int) -> Tensor:
    """The detector's target on labeled images (the authors' FDGTGenerator). B,C,H,W ; B,H,W -> B,1,H,W.

    ``mu * sum_c |onehot(y)_c - p_c|`` (all-zero one-hot at ignored pixels), blurred (kernel side/8), then
    ``nu`` times dilated and blurred (kernel side/4), then min-max normalised per image (to [0, 1]).
    """
    with torch.no_grad():
        d = mu * (one_hot(labels, prob.shape[1]).float() - prob.detach().float()).abs().sum(1, keepdim=True)
        d = gaussian_blur(d, odd_kernel(side, 8))
        for _ in range(nu):
            d = gaussian_blur(dilate(d), odd_kernel(side, 4))
        return _minmax(d)


def handle_flawmap(flaw: Tensor, side: int, clip: float = 0.1) -> Tensor:
    """Post-processed flaw map (the authors' FlawmapHandler): negatives zeroed, blurred (kernel side/16), the
    whole map zeroed if its maximum is <= ``clip``, min-max normalised per image. B,1,H,W, no gradient."""
    with torch.no_grad():
        f = gaussian_blur(flaw.detach().float().clamp_min(0.0), odd_kernel(side, 16))
        f = f * (f.amax(dim=(1, 2, 3), keepdim=True) > clip)
        return _minmax(f)


def dc_targets(
    p_l: Tensor, p_r: Tensor, map_l: Tensor, map_r: Tensor, thresh: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic-consistency targets of l and r and the both-flawed mask (the authors' DCGTGenerator).

    Maps above ``thresh`` count as 1; l keeps its own prediction where ``map_l <= map_r`` and takes r's
    elsewhere (symmetric for r). p B,C,H,W (detached); maps B,1,H,W post-processed -> B,C,H,W ; B,C,H,W ;
    B,1,H,W float (both maps above ``thresh``).
    """
    bad_l, bad_r = map_l > thresh, map_r > thresh
    m_l, m_r = map_l.masked_fill(bad_l, 1.0), map_r.masked_fill(bad_r, 1.0)
    target_l = torch.where(m_l <= m_r, p_l, p_r)
    target_r = torch.where(m_r <= m_l, p_r, p_l)
    return target_l.detach(), target_r.detach(), (bad_l & bad_r).float()


def dc_loss(prob: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of softmax and target over every pixel, class and image. 0-dim"""
    return F.mse_loss(prob.float(), target.float())


def fc_loss(flaw: Tensor, mask: Tensor) -> Tensor:
    """``mean(M * F^2)`` over every pixel and image: the flaw map pushed to 0 where ``mask`` is 1. 0-dim"""
    return (mask * flaw.float().pow(2)).mean()


def fd_loss(flaw: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of the detector's maps and their targets (per image, then over images). 0-dim"""
    return F.mse_loss(flaw.float(), target.float())


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("gct")
class GCT(Method):
    Config = GCTConfig
    streams = ("labeled", "unlabeled")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_sup": ("net_l", "net_r"), "loss_dc": ("net_l", "net_r"), "loss_fc": ("net_l", "net_r"),
        "loss_fd": ("fd",),
    }  # fmt: skip

    def __init__(self, cfg: GCTConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.mode not in MODES:
            raise ConfigError(f"method.mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
        c = info.num_classes
        self.net_l = build_model(model_cfg, c)
        # r under the next seed (the same on every process), in a forked RNG: l and everything drawn later
        # are as in a one-network run (as CPS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + 1) % 2**63)
            self.net_r = build_model(model_cfg, c)
        self.fd = FlawDetector(3 + c, cfg.fd_channels, cfg.fd_min_side)
        self.align_l, self.align_r = make_alignment(cfg.align, c), make_alignment(cfg.align, c)
        self.rampup_steps = round(cfg.dc_rampup_epochs * info.iters_per_epoch)

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"net_l": self.net_l, "net_r": self.net_r, "fd": self.fd}

    def eval_net(self) -> nn.Module:
        return self.net_l

    def group_options(self) -> dict[str, dict]:
        """The flaw detector at ``fd_lr_mult`` x the base LR without weight decay (the authors' Adam for it had
        none); the task networks as usual."""
        return {"fd": {"lr_mult": self.cfg.fd_lr_mult, "head": False, "weight_decay": 0.0}}

    def phases(self) -> list[tuple[str, int, int]]:
        n = min(self.rampup_steps, self.info.max_iters)
        if self.cfg.mode == "fc" or not n:
            return []
        return [(f"dynamic consistency ramp-up (sigmoid, {self.cfg.dc_rampup_epochs:g} epochs)", 0, n)]

    @torch.no_grad()
    def aligned(self, p_l: Tensor, p_r: Tensor, lab: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
        """Each network's probabilities (N+B,C,H,W, labeled first) with the unlabeled part aligned by its own
        :class:`PriorAlignment` (unchanged without); the labeled part stays as predicted."""
        if self.align_l is None:
            return p_l, p_r
        n, out = lab["image"].shape[0], []
        for a, p in ((self.align_l, p_l), (self.align_r, p_r)):
            a.update(lab["mask"], p[n:], valid, lab.get("pasted"))
            out.append(torch.cat([p[:n], a(p[n:].clamp_min(1e-12).log()).softmax(1)]))
        return out[0], out[1]

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        lab, unl = batch["labeled"], batch["unlabeled"]
        n = lab["image"].shape[0]
        x = torch.cat([lab["image"], unl["image"]])  # N+B,3,H,W: the same batch for both networks
        side = min(x.shape[-2:])
        sizes = [n, x.shape[0] - n]
        out_l, out_r = (forward_groups(net, x, sizes, cfg.split_bn) for net in (self.net_l, self.net_r))
        p_l, p_r = out_l["logits"].float().softmax(1), out_r["logits"].float().softmax(1)
        loss_sup = sum(sup_loss(split_outputs(o, n)[0], lab["mask"], cfg) for o in (out_l, out_r))

        # the detector on detached predictions: its own loss (labeled maps), and the maps L_dc compares
        x2, p = torch.cat([x, x]), torch.cat([p_l, p_r])
        flaw_l, flaw_r = self.fd(x2, p.detach()).float().chunk(2)  # N+B,1,H,W each
        fd_l, fd_r = (flaw_target(q[:n], lab["mask"], cfg.mu, cfg.nu, side) for q in (p_l, p_r))
        loss_fd = (fd_loss(flaw_l[:n], fd_l) + fd_loss(flaw_r[:n], fd_r)) / 2
        with torch.no_grad():
            map_l, map_r = (handle_flawmap(f, side, cfg.flaw_clip) for f in (flaw_l, flaw_r))
            q_l, q_r = self.aligned(p_l.detach(), p_r.detach(), lab, unl["valid"])
            target_l, target_r, both = dc_targets(q_l, q_r, map_l, map_r, cfg.dc_thresh)

        zero = loss_sup.new_zeros(())
        loss_dc = zero if cfg.mode == "fc" else dc_loss(p_l, target_l) + dc_loss(p_r, target_r)
        if cfg.mode == "dc":
            loss_fc = zero
        else:  # the detector frozen (detached parameters): gradient reaches the networks only
            fd = getattr(self.fd, "module", self.fd)
            frozen = {k: v.detach() for k, v in fd.named_parameters()}
            live_l, live_r = functional_call(fd, frozen, (x2, p)).float().chunk(2)
            mask = both if cfg.mode == "gct" else torch.ones_like(both)
            loss_fc = fc_loss(live_l, mask) + fc_loss(live_r, mask)

        ramp = sigmoid_rampup(step, self.rampup_steps)
        loss = loss_sup + cfg.dc_weight * ramp * loss_dc + cfg.fc_weight * loss_fc + cfg.fd_weight * loss_fd
        valid = unl["valid"]
        return {
            "loss": loss, "loss_sup": loss_sup, "loss_dc": loss_dc, "loss_fc": loss_fc, "loss_fd": loss_fd,
            "dc_ramp": torch.full((), ramp, device=loss.device),
            # share of pixels where l learns r's (differing) prediction instead of its own (aligned) one, and
            # where both are flagged
            "dc_switch": (target_l != q_l).any(1).float().mean(), "both_flawed": both.mean(),
            # l's dynamic-consistency target on the unlabeled images, scored as a pseudo-label
            **pseudo_label_quality(hard_labels(target_l[n:], valid), unl, self.info.num_classes),
        }  # fmt: skip
