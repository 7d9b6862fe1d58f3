"""CCT, Cross-Consistency Training (Ouali, Hudelot, Tami, CVPR 2020; methods-wave2.md section 9).

One segmentation network (encoder + main decoder) and K auxiliary decoders that see *perturbed* copies of
the network's features ``z`` of the unlabeled images. Per step, one forward of ``[x_l, x_u]`` and
``L = L_sup + w_u(t) L_u``: ``L_sup`` CE (or the annealed-bootstrapped CE) on the labeled images,
``L_u = 1/K sum_k sum_{valid pixels, classes} (softmax(g_k(perturb_k(z))) - p)^2 / (C #valid)`` with
``p = softmax(g(z))`` the main prediction, detached (the auxiliary decoders train the encoder to be
invariant), and ``w_u(t) = w exp(-5 (1 - t/T_r)^2)`` for ``t < T_r`` = ``rampup`` x the run's iterations
(``RunInfo.max_iters``), then ``w``.

Perturbations of ``z`` (foreground = valid pixels whose main prediction is not a ``background`` class):
feature noise ``z + z N``, one ``N ~ U(-r, r)`` of shape D,h,w per call for the batch; feature drop (zero
where the channel mean ``a >= gamma max a``, ``gamma ~ U(drop_range)`` per call); channel dropout
``Dropout2d(0.5)``; guided cutout (for each external contour of the foreground with more than
``cutout_min_points`` points, zero a box of 40 % of its bounding box's sides at a random place in it);
context masking (keep the foreground) and object masking (keep the background); VAT on ``z`` through the
decoder alone (``vat.adversarial_direction``: eps 2, one iteration, ``d ~ U(-0.5, 0.5)``, the decoder's own
clean prediction as the KL target, as the authors; xi 1e-2, not their 1e-6: below).

Choices and departures from the authors' code:
- lesseg's network: ``z`` is the end of the encoder as CCT's is: with DeepLabv3+ the ASPP output (``z:
  context``, the default; stride = the output stride: 8 in the VOC configs, as CCT's ResNet-50 + PSP features,
  16 on shapes), and the main decoder is the rest of the head (low-level fusion, classifier, the Segmentor's
  bilinear upsampling); with DeepLabv2 the last encoder feature. ``z: fused`` perturbs the head's ``feat``
  instead, the stride-4 fusion of ASPP and low-level features (lesseg's choice until the twenty-first
  session): the consistency then also trains the fusion, and on shapes at 1,500 steps (ImageNet
  MobileNetV2, 1/16, seed 0) the network painted objects on the background, 35.18 mIoU against 46.94 with
  ``context`` and SupOnly's 48.15 (docs/benchmarks.md, "CCT perturbs the ASPP output"). The auxiliary
  decoders are CCT's (``models/aux_decoders.py``; CCT's main decoder is one more of them). The ASPP output is
  read by a forward hook on the head's ASPP module (``Capture``), so the network still runs in one forward.
- One forward of ``[x_l, x_u]``, and all auxiliary decoders in one forward of their module: one DDP forward
  per backward for each trainable network. BatchNorm normalises the labeled and the unlabeled images apart
  (``split_bn``, as the authors' separate forwards do); ``method.split_bn=false`` normalises them together.
- The auxiliary decoders run in float32 without autocast or TF32: the VAT perturbation (about
  ``eps / sqrt(D h w)`` per element) and its finite difference are below bf16 resolution. Guided cutout
  finds the contours on the host (OpenCV), one transfer of the foreground per step, as the authors.
- VAT's direction by ``torch.autograd.grad`` w.r.t. the perturbation (the authors' ``backward()`` +
  ``zero_grad()`` inside the forward would wipe accumulated gradients); padding left out of its KL.
- Padding (``valid`` False) is never foreground and is left out of ``L_u``'s mean (the authors: all pixels).
- ``background``: the classes guided masking and cutout treat as background (the authors hard-code 0).
- Feature drop's ``gamma ~ U(0.6, 0.9)``: the authors' code (methods-wave2.md writes U(0.7, 0.9)).
- Not offered: the pair-wise auxiliary constraint (off in the authors' configs, and their code never adds it
  to the loss) and the weak-label loss.

The VAT decoders' ``xi`` is 1e-2, not the authors' 1e-6: ``xi`` is the norm of the whole perturbation, so
each of the ``D h w`` features moves by about ``xi / sqrt(D h w)``, and in float32 the direction is noise once
that is below the features' resolution (cosine with the float64 direction, random decoder, CPU: at the
authors' 512 x 40 x 40 features 0.01 at 1e-6, 0.33 at 1e-4, 1.00 at 1e-2; at 256 x 128 x 128, the fused
stride-4 features of a 512 crop (``z: fused``), 0.00, 0.22, 1.00; at 1.0 still 0.999). ``method.vat_xi`` sets
another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ranged
from ..errors import ConfigError
from ..models import Segmentor, build_model, class_map
from ..models.aux_decoders import ShuffleDecoder
from .base import METHODS, Method, RunInfo
from .common import (
    IGNORE,
    ViewStatsConfig,
    ce_loss,
    forward_groups,
    pseudo_label_quality,
    rampup_phase,
    split_outputs,
)
from .mean_teacher import sigmoid_rampup
from .supervised import SupervisedConfig, sup_loss
from .vat import adversarial_direction, full_precision

KINDS = ("vat", "dropout", "cutout", "context_masking", "object_masking", "feature_drop", "feature_noise")
SUP_LOSSES = ("ce", "abce")


@dataclass
class CCTConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "cct"
    unsup_weight: float = ranged(30.0, "[0, inf)")  # w_u after the ramp-up
    rampup: float = ranged(0.1, "[0, 1]")  # T_r, as a share of the run's iterations (sigmoid ramp-up)
    sup_loss: str = "ce"  # ce (the authors' config) | abce (annealed-bootstrapped CE)
    abce_min_kept: int = ranged(1, "[0, inf)")  # abce: pixels kept at least, per labeled image
    conf_mask: bool = False  # L_u only on pixels whose main confidence is > conf_thresh
    conf_thresh: float = ranged(0.5, "[0, 1]")
    background: list[int] = ranged([0], "[0, 255)")  # classes that are not objects for guided masking/cutout
    # the features z the auxiliary decoders perturb (module docstring): context = DeepLabv3+'s ASPP output (the
    # end of the encoder, as the authors' PSP features) | fused = the head's stride-4 fusion of ASPP and
    # low-level features; DeepLabv2 has one z, its last encoder feature
    z: str = "context"
    # labeled and unlabeled images normalised apart (common.ViewStatsConfig; the authors forward them apart):
    # 300 steps from ImageNet, 1/16, seed 0: shapes 31.13 against 24.82 together, fashion 18.87 against 16.28
    # (SupOnly 29.96 / 18.32; docs/benchmarks.md, "Every method with copy-paste at 300 steps")
    split_bn: bool = True
    # auxiliary decoders per perturbation: the authors' VOC config (30 in all)
    aux_vat: int = ranged(2, "[0, inf)")
    aux_dropout: int = ranged(6, "[0, inf)")
    aux_cutout: int = ranged(6, "[0, inf)")
    aux_context_masking: int = ranged(2, "[0, inf)")
    aux_object_masking: int = ranged(2, "[0, inf)")
    aux_feature_drop: int = ranged(6, "[0, inf)")
    aux_feature_noise: int = ranged(6, "[0, inf)")
    dropout_p: float = ranged(0.5, "[0, 1)")  # Dropout2d of the dropout decoders
    cutout_erase: float = ranged(0.4, "[0, 1]")  # cut box side, share of the object's bounding box side
    cutout_min_points: int = ranged(50, "[0, inf)")  # objects whose external contour has more points are cut
    drop_range: list[float] = ranged([0.6, 0.9], "[0, 1]")  # feature drop: gamma ~ U(lo, hi)
    noise_range: float = ranged(0.3, "[0, inf)")  # feature noise: N ~ U(-r, r)
    vat_xi: float = ranged(1e-2, "(0, inf)")  # the authors' 1e-6 gives a noise direction in float32 (above)
    vat_eps: float = ranged(2.0, "[0, inf)")
    vat_iters: int = ranged(1, "[0, inf)")


# ---------------------------------------------------------------------------------------------- pure pieces
def aux_consistency(aux_logits: Sequence[Tensor], target: Tensor, keep: Tensor) -> Tensor:
    """``1/K sum_k sum_{kept pixels, c} (softmax(aux_k) - target)^2 / (C #kept)``: the authors' softmax MSE
    averaged over the kept (valid) pixels and the classes. K x B,C,H,W ; B,C,H,W ; B,H,W bool -> 0-dim"""
    w = keep.unsqueeze(1).float()
    denom = keep.sum().clamp_min(1) * target.shape[1] * len(aux_logits)
    return sum(((a.float().softmax(1) - target.float()).pow(2) * w).sum() for a in aux_logits) / denom


def abce_threshold(step: int, num_classes: int, length: float) -> float:
    """ABCE's annealed threshold ``eta_t = 1/C + (0.9 - 1/C)(1 - exp(-5 min(t, L) / L))``."""
    start = 1.0 / num_classes
    t = min(max(step, 0), length) / length if length > 0 else 1.0
    return start + (0.9 - start) * (1.0 - math.exp(-5.0 * t))


def abce_loss(logits: Tensor, target: Tensor, eta: float, min_kept: int) -> Tensor:
    """Annealed-bootstrapped CE: CE averaged over the labeled pixels whose ground-truth probability is below
    ``max(eta, p_(k))``, ``p_(k)`` the (k+1)-th smallest of them, ``k = min(min_kept B, n - 1)`` (so at least
    ``min_kept B`` pixels count). 0 when no pixel is labeled. B,C,H,W ; B,H,W -> 0-dim"""
    valid = target != IGNORE
    p_gt = logits.detach().float().softmax(1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    ranked = p_gt.masked_fill(~valid, 2.0).flatten().sort().values  # labeled pixels first
    k = torch.clamp(valid.sum() - 1, min=0).clamp(max=min_kept * target.shape[0])
    threshold = torch.clamp(ranked[k], min=eta)
    return ce_loss(logits, target.masked_fill(~(valid & (p_gt < threshold)), IGNORE))


def foreground(pseudo: Tensor, valid: Tensor, background: Sequence[int]) -> Tensor:
    """Valid pixels whose class is not a ``background`` class (padding is never foreground). B,H,W -> bool"""
    return valid & ~torch.isin(pseudo, torch.tensor(list(background), device=pseudo.device))


def feature_noise(z: Tensor, r: float) -> Tensor:
    """``z + z * N``, one ``N ~ U(-r, r)`` of shape D,h,w for the whole batch."""
    return z + z * (torch.rand_like(z[0]) * 2 - 1) * r


def feature_drop(z: Tensor, gamma: float) -> Tensor:
    """Zero the locations whose channel mean ``a`` is ``>= gamma max a`` (max per image). B,D,h,w"""
    a = z.mean(1, keepdim=True)  # B,1,h,w
    return z * (a < gamma * a.flatten(1).max(1).values.view(-1, 1, 1, 1))


def object_boxes(fg: Tensor, min_points: int) -> list[list[tuple[int, int, int, int]]]:
    """Per image, ``(x_min, y_min, width, height)`` of the points of each external contour of the foreground
    (OpenCV, ``CHAIN_APPROX_SIMPLE``) with more than ``min_points`` points. B,H,W bool"""
    import cv2

    boxes = []
    for m in fg.to("cpu", torch.uint8).numpy():
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        ends = [(c.reshape(-1, 2).min(0), c.reshape(-1, 2).max(0)) for c in contours if len(c) > min_points]
        boxes.append([(int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])) for lo, hi in ends])
    return boxes


def cutout_mask(boxes: list[list[tuple[int, int, int, int]]], size: Sequence[int], erase: float) -> Tensor:
    """Ones with, inside each object box ``(x0, y0, w, h)``, a box of ``int(erase w) x int(erase h)`` zeroed
    at offsets ``U{0..int((1 - erase) w)}``, ``U{0..int((1 - erase) h)}`` (torch's CPU generator).
    -> B,1,H,W"""
    mask = torch.ones(len(boxes), 1, *size)
    for i, image in enumerate(boxes):
        for x0, y0, w, h in image:
            u = torch.rand(2)
            dx, dy = int(u[0] * (int(w * (1 - erase)) + 1)), int(u[1] * (int(h * (1 - erase)) + 1))
            mask[i, :, y0 + dy : y0 + dy + int(h * erase), x0 + dx : x0 + dx + int(w * erase)] = 0
    return mask


def nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """B,H,W or B,1,H,W map (any dtype) -> B,1,h,w float, nearest."""
    return F.interpolate(x.view(x.shape[0], 1, *x.shape[-2:]).float(), size=tuple(size), mode="nearest")


class Capture:
    """The last output of a module, kept by a forward hook; with grad, as the forward made it. ``take`` hands it
    over and lets it go (so no step's or evaluation's output is held until the next forward)."""

    def __init__(self, module: nn.Module) -> None:
        self.out: Tensor | None = None
        module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self.out = out

    def take(self) -> Tensor:
        out, self.out = self.out, None
        return out


def feature_stride(net: Segmentor, capture: Capture | None = None) -> int:
    """The stride of the network's ``feat`` output (or of ``capture``'s module), from one eval-mode forward on a
    blank image."""
    size = 8 * net.encoder.feature_info.reduction()[-1]
    was = net.training
    with torch.no_grad():
        feat = net.eval()(torch.zeros(1, 3, size, size, device=next(net.parameters()).device))["feat"]
    net.train(was)
    return size // (capture.take() if capture is not None else feat).shape[-1]


# ------------------------------------------------------------------------------------------------- networks
class PerturbedDecoders(nn.Module):
    """CCT's auxiliary decoders, each behind its perturbation of ``z``; one forward decodes all of them."""

    def __init__(
        self, kinds: Sequence[str], in_channels: int, num_classes: int, upscale: int, cfg: CCTConfig
    ) -> None:
        super().__init__()
        self.kinds, self.cfg = list(kinds), cfg
        self.decoders = nn.ModuleList(ShuffleDecoder(in_channels, num_classes, upscale) for _ in self.kinds)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, z: Tensor, fg: Tensor, valid: Tensor) -> list[Tensor]:
        """``z`` B,D,h,w features of the unlabeled images; ``fg``, ``valid`` B,H,W bool -> K x B,C,H,W"""
        c, size = self.cfg, tuple(valid.shape[-2:])
        with full_precision(z.device):
            z = z.float()
            fg_z = nearest(fg, z.shape[-2:])  # B,1,h,w
            boxes = object_boxes(fg, c.cutout_min_points) if "cutout" in self.kinds else []
            outs = []
            for kind, dec in zip(self.kinds, self.decoders):
                if kind == "vat":
                    outs.append(dec(z + self.vat_perturbation(dec, z, valid), size))
                else:
                    outs.append(dec(self.perturb(kind, z, fg_z, boxes, size), size))
        return outs

    def perturb(self, kind: str, z: Tensor, fg_z: Tensor, boxes: list, size: tuple[int, int]) -> Tensor:
        """``z`` (B,D,h,w) perturbed by ``kind`` (not VAT); ``fg_z`` the foreground at h,w (B,1,h,w),
        ``boxes`` the objects of ``object_boxes`` at the input ``size``."""
        c = self.cfg
        if kind == "dropout":
            return F.dropout2d(z, c.dropout_p, training=True)  # part of the loss, whatever the mode
        if kind == "cutout":
            return z * nearest(cutout_mask(boxes, size, c.cutout_erase), z.shape[-2:]).to(z.device)
        if kind == "context_masking":
            return z * fg_z
        if kind == "object_masking":
            return z * (1 - fg_z)
        if kind == "feature_drop":
            lo, hi = c.drop_range
            return feature_drop(z, lo + (hi - lo) * torch.rand(()).item())
        return feature_noise(z, c.noise_range)

    def vat_perturbation(self, dec: ShuffleDecoder, z: Tensor, valid: Tensor) -> Tensor:
        """``eps d``, d from one power iteration through ``dec`` alone on the detached features."""
        c, size = self.cfg, tuple(valid.shape[-2:])
        z0 = z.detach()
        with torch.no_grad():
            target = dec(z0, size).softmax(1)
        d0 = torch.rand_like(z0) - 0.5
        d = adversarial_direction(lambda t: dec(t, size), z0, target, valid, d0, c.vat_xi, c.vat_iters)
        return c.vat_eps * d


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("cct")
class CCT(Method):
    Config = CCTConfig
    streams = ("labeled", "unlabeled")
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_unsup": ("net", "aux")}

    def __init__(self, cfg: CCTConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.sup_loss not in SUP_LOSSES:
            raise ConfigError(f"method.sup_loss must be one of {', '.join(SUP_LOSSES)}, got {cfg.sup_loss!r}")
        if cfg.sup_loss == "abce" and cfg.ohem:
            raise ConfigError("method.sup_loss=abce and method.ohem both pick hard pixels: choose one")
        kinds = [kind for kind in KINDS for _ in range(getattr(cfg, f"aux_{kind}"))]
        if not kinds:
            raise ConfigError(f"CCT needs at least one auxiliary decoder (method.aux_{{{','.join(KINDS)}}})")
        self.kinds = kinds  # here too: under DDP ``self.aux`` is the wrapper
        if cfg.z not in ("fused", "context"):
            raise ConfigError(f"method.z must be fused or context, got {cfg.z!r}")
        self.net = build_model(model_cfg, info.num_classes)
        aspp = getattr(self.net.head, "aspp", None)
        self.context = Capture(aspp) if cfg.z == "context" and aspp is not None else None
        self.aux = PerturbedDecoders(kinds, self.net.head.out_channels, info.num_classes,
                                     feature_stride(self.net, self.context), cfg)  # fmt: skip
        self.rampup_steps = round(cfg.rampup * info.max_iters)

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"net": self.net, "aux": self.aux}

    def phases(self) -> list[tuple[str, int, int]]:
        label = f"unsupervised weight ramp-up (sigmoid, to {self.cfg.unsup_weight:g})"
        return rampup_phase(label, self.rampup_steps, self.info.max_iters)

    def supervised_loss(self, out: dict[str, Tensor], mask: Tensor, step: int) -> Tensor:
        """``sup_loss`` (CE or OHEM, + the auxiliary head), or ABCE with ``eta_t`` over 40 % of the run."""
        c = self.cfg
        if c.sup_loss == "ce":
            return sup_loss(out, mask, c)
        eta = abce_threshold(step, self.info.num_classes, 0.4 * self.info.max_iters)
        loss = abce_loss(out["logits"], mask, eta, c.abce_min_kept)
        if "aux" in out:
            loss = loss + c.aux_weight * abce_loss(out["aux"], mask, eta, c.abce_min_kept)
        return loss

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        c = self.cfg
        lab, unl = batch["labeled"], batch["unlabeled"]
        valid = unl["valid"]
        n_l = lab["image"].shape[0]
        out = forward_groups(self.net, torch.cat([lab["image"], unl["image"]]), [n_l, unl["image"].shape[0]], c.split_bn)
        out_l, out_u = split_outputs(out, n_l)
        loss_sup = self.supervised_loss(out_l, lab["mask"], step)
        with torch.no_grad():
            target = out_u["logits"].detach().float().softmax(1)  # B,C,H,W
            conf, pseudo = target.max(1)
            fg = foreground(pseudo, valid, c.background)
            keep = valid & (conf > c.conf_thresh) if c.conf_mask else valid
        z = out_u["feat"] if self.context is None else self.context.take()[n_l:]
        aux = self.aux(z, fg, valid)
        loss_unsup = aux_consistency(aux, target, keep)
        w_u = c.unsup_weight * sigmoid_rampup(step, self.rampup_steps)
        with torch.no_grad():
            hard = pseudo.masked_fill(~valid, IGNORE)
            agree = {}
            for kind in dict.fromkeys(self.kinds):
                hits = [(class_map(a) == hard).sum() for a, k in zip(aux, self.kinds) if k == kind]
                agree[f"agree_{kind}"] = sum(hits) / (len(hits) * valid.sum().clamp_min(1))
            diag = {"fg_frac": fg.sum() / valid.sum().clamp_min(1),
                    "unsup_weight": torch.full((), w_u, device=loss_sup.device), **agree}  # fmt: skip
        return {"loss": loss_sup + w_u * loss_unsup, "loss_sup": loss_sup, "loss_unsup": loss_unsup, **diag,
                **pseudo_label_quality(hard, unl, self.info.num_classes)}  # fmt: skip
