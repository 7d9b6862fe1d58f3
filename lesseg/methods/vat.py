"""VAT for segmentation (Miyato et al., TPAMI 2018; methods-wave2.md section 13), on the input, in the
mean-teacher form French et al. (BMVC 2020, ``train_seg_semisup_vat_mt.py``) ran on segmentation.

Per step:
1. The EMA teacher predicts the weak view of each unlabeled image: the targets ``p_t`` (no gradient).
2. The direction network (the teacher; the student with ``dir_from_student``), in eval mode, predicts the
   view the student will see, ``x_s``: ``p = softmax(f(x_s))``. From ``d ~ N(0, I)`` normalised per image,
   K power iterations ``d <- normalize(grad_r sum_valid KL(p || softmax(f(x_s + r))))`` at ``r = xi d``, by
   ``torch.autograd.grad`` w.r.t. r only; ``r_adv = radius d``, radius ``eps sqrt(C H W)`` or, adaptive,
   ``eps 1/2 ||image gradient of x_s||`` per image; ``xi`` 1e-2 (the authors': ``1e-6 H W / 1000``, below).
3. One student forward on ``[x_l, x_s + r_adv]``: ``L = L_sup + w(t) L_cons`` with
   ``L_cons = sum_valid m KL(p_t || softmax(student)) / #valid``; ``m`` is the teacher-confidence mask
   (``>= conf_thresh``), per pixel, or (French's default) the confident share of the valid pixels for all.
4. EMA update of the teacher. ``ema_decay = 0`` makes the teacher the student itself (Miyato's VAT, the
   Pi-model form), evaluated in eval mode.

Departures from French et al.'s code, and choices:
- The direction network labels the view it perturbs, so the KL is 0 at ``r = 0`` and the power iteration
  estimates the dominant direction of its curvature (Miyato). French et al. take that target from the
  teacher's weak view and perturb the student's colour-augmented view: with two views the gradient at
  ``xi d`` is the first-order disagreement between the views, not VAT's second-order term.
- Eval mode for the direction passes only (French et al. switch the direction network to eval and never
  back, so with ``--vat_dir_from_student`` or ``--model pi`` the student trains in eval mode for the rest of
  each epoch).
- Padding (``valid`` False) is left out of the direction's KL (French: every pixel), of the adaptive
  radius's image gradient (French: the padding's edge counts) and of the consistency mean (French: the
  mean over all pixels).
- The direction passes run in float32 with autocast and TF32 off: the finite difference at ``r = xi d``
  moves the prediction by about ``xi`` relative, far below bf16/TF32 resolution, where the gradient is 0 or
  noise. A zero gradient gives a zero perturbation (``adv_norm`` logs it), not a random one.
- The direction passes call the bare student module (no DDP: they need no parameter gradient), so each
  trainable network still runs one DDP forward per backward.

Precision of the authors' ``xi`` (measured on CPU against float64, random-init ResNet-18 DeepLabv3+, one
321x321 image): the float32 direction at ``xi = 1e-6 H W / 1000 = 1.03e-4`` has cosine 0.09 with the
float64 one (noise); at ``xi = 1e-2`` 0.993, at 1.0 0.997 (the float64 direction barely changes with xi up
to 0.1 at 96x96). So the default is 1e-2, not the authors' value (``method.xi: null`` restores it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import ranged
from ..models import build_model, eval_mode
from .base import METHODS, Method, RunInfo
from .common import (
    ViewStatsConfig,
    batchnorm_train,
    check_teacher_bn,
    ema_phase,
    ema_update,
    forward_groups,
    hard_labels,
    make_teacher,
    pseudo_label_quality,
    rampup_phase,
    run_relative_decay,
    split_outputs,
)  # fmt: skip
from .mean_teacher import sigmoid_rampup
from .supervised import SupervisedConfig, sup_loss


@dataclass
class VATConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "vat"
    cons_weight: float = ranged(0.1, "[0, inf)")  # French et al.'s VOC run (their code default: 1)
    rampup_steps: int | None = ranged(0, "[0, inf)")  # sigmoid ramp-up; 0: none (VOC run); None: 10% of run
    eps: float = ranged(1.0, "[0, inf)")  # radius: eps x (1/2 ||image gradient|| if adaptive, else sqrt(CHW))
    adaptive_radius: bool = True  # VOC run: adaptive, radius 1.0
    # finite-difference step; None: French's 1e-6 H W / 1000, a noise direction in float32 (module docstring)
    xi: float | None = ranged(1e-2, "(0, inf)")
    power_iters: int = ranged(1, "[0, inf)")  # K; 0: the perturbation is random noise of the radius
    dir_from_student: bool = False  # the direction from the student, not the teacher (both in eval mode)
    conf_thresh: float = ranged(0.97, "[0, 1]")  # teacher confidence for the consistency mask (0: none)
    conf_per_pixel: bool = False  # False: each valid pixel weighted by the confident share (French's default)
    strong_view: bool = True  # the student sees (and VAT perturbs) the strong view; False: the weak view
    # French et al.'s teacher_alpha (0.99, the VOC configs); 0: teacher = student (Miyato); None: relative to the
    # run (common.run_relative_decay: 0.99 at 1,500 steps, 0.95 at 300)
    ema_decay: float | None = ranged(None, "[0, 1]")
    teacher_bn: str = "student"  # the teacher's BatchNorm when labeling (common.check_teacher_bn)
    eval_teacher: bool = True  # evaluate (and export) the teacher, as French et al.


# ---------------------------------------------------------------------------------------------- pure pieces
def l2_normalize(d: Tensor) -> Tensor:
    """``d / ||d||`` per sample over all non-batch dims; a zero sample stays zero. B,... -> B,..."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    return d / (norm + 1e-12)


def kl_pixels(target: Tensor, logits: Tensor) -> Tensor:
    """``KL(target || softmax(logits))`` per pixel, summed over classes, in float32 or wider (``0 log 0 =
    0``). B,C,H,W probabilities ; B,C,H,W -> B,H,W"""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    t = target.to(dtype)
    return (torch.xlogy(t, t) - t * logits.to(dtype).log_softmax(1)).sum(1)


def consistency_kl(logits: Tensor, target: Tensor, valid: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """``sum_valid weight KL(target || softmax(logits)) / #valid`` (0 when nothing is valid). -> 0-dim
    ``weight``: B,H,W per-pixel factors or one number."""
    v = valid.float()
    return (kl_pixels(target, logits) * v * weight).sum() / v.sum().clamp_min(1.0)


def confidence_weight(
    probs: Tensor, valid: Tensor, threshold: float, per_pixel: bool
) -> tuple[Tensor, Tensor]:
    """The consistency weight from the teacher's ``probs`` (B,C,H,W) and the confident share of the valid
    pixels (0-dim): per pixel ``1[max p >= threshold]`` (B,H,W), or that share for every pixel (French et
    al.'s default, ``conf_per_pixel`` off). Threshold 0: weight 1."""
    confident = (probs.max(1).values >= threshold) & valid
    share = confident.sum() / valid.sum().clamp_min(1)
    return (confident.float() if per_pixel else share), share


def adversarial_direction(
    f: Callable[[Tensor], Tensor], x: Tensor, target: Tensor, valid: Tensor, d0: Tensor, xi: float, iters: int
) -> Tensor:
    """VAT's power iteration: unit-norm (per sample) direction of ``x`` along which ``f`` departs fastest
    from ``target``. ``d = normalize(d0)``; ``iters`` times ``d <- normalize(grad_r sum_valid KL(target ||
    softmax(f(x + r))))`` at ``r = xi d``. ``f`` maps x to logits at the resolution of ``valid`` (B,H,W);
    only ``r`` is differentiated (no parameter gradient). 0 iterations: ``normalize(d0)``. Detached."""
    x = x.detach()
    d = l2_normalize(d0.to(x.dtype))
    for _ in range(iters):
        r = (xi * d).requires_grad_(True)
        div = (kl_pixels(target, f(x + r)) * valid.float()).sum()
        if not div.requires_grad:  # a network that ignores its input: no direction
            return torch.zeros_like(d)
        d = l2_normalize(torch.autograd.grad(div, r)[0])
    return d.detach()


def image_gradient_norm(x: Tensor, valid: Tensor) -> Tensor:
    """French et al.'s adaptive VAT scale: ``1/2 sqrt(sum (x[y+1] - x[y-1])^2 + (x[:, x+1] - x[:, x-1])^2)``
    per image, the central differences whose both ends are valid. B,C,H,W ; B,H,W -> B"""
    v = valid.unsqueeze(1).float()
    dv = (x[:, :, 2:] - x[:, :, :-2]) * v[:, :, 2:] * v[:, :, :-2]
    dh = (x[..., 2:] - x[..., :-2]) * v[..., 2:] * v[..., :-2]
    return 0.5 * (dv.pow(2).flatten(1).sum(1) + dh.pow(2).flatten(1).sum(1)).sqrt()


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """float32 without autocast and without TF32 (CUDA convolutions and matmuls), restored afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("vat")
class VAT(Method):
    Config = VATConfig
    streams = ("labeled", "unlabeled")
    strong_streams = ("unlabeled",)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_cons": ("net",)}

    def __init__(self, cfg: VATConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        check_teacher_bn(cfg.teacher_bn)
        self.net = build_model(model_cfg, info.num_classes)
        self.teacher = make_teacher(self.net)
        self.rampup_steps = round(0.1 * info.max_iters) if cfg.rampup_steps is None else cfg.rampup_steps
        self.ema_decay = run_relative_decay(cfg.ema_decay, info.max_iters)

    def eval_net(self) -> nn.Module:
        return self.teacher if self.cfg.eval_teacher else self.net

    def phases(self) -> list[tuple[str, int, int]]:
        ramp = rampup_phase("consistency weight ramp-up (sigmoid)", self.rampup_steps, self.info.max_iters)
        return [*ramp, ema_phase(self.ema_decay, 0, self.info.max_iters)]

    def train(self, mode: bool = True) -> VAT:
        """The teacher labels in eval mode, except its BatchNorm layers with ``teacher_bn="weak"``."""
        super().train(mode)
        self.teacher.eval()
        batchnorm_train(self.teacher, mode and self.cfg.teacher_bn == "weak")
        return self

    def perturbation(self, x: Tensor, valid: Tensor) -> Tensor:
        """``r_adv`` for the student's view ``x`` (B,3,H,W), from the direction network in eval mode."""
        c = self.cfg
        b, ch, h, w = x.shape
        net = self.net if c.dir_from_student else self.teacher
        net = getattr(net, "module", net)  # the bare student: the direction needs no DDP gradient sync
        xi = c.xi if c.xi is not None else 1e-6 * h * w / 1000
        with eval_mode(net), full_precision(x.device):
            x = x.float()
            with torch.no_grad():
                target = net(x)["logits"].float().softmax(1)
            d0 = torch.randn_like(x)
            d = adversarial_direction(lambda t: net(t)["logits"], x, target, valid, d0, xi, c.power_iters)
        fixed = x.new_full((b,), math.sqrt(ch * h * w))
        radius = image_gradient_norm(x, valid) if c.adaptive_radius else fixed
        return d * (c.eps * radius.to(d)).view(b, 1, 1, 1)

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        c = self.cfg
        lab, unl = batch["labeled"], batch["unlabeled"]
        valid = unl["valid"]
        with torch.no_grad():
            probs = self.teacher(unl["image"])["logits"].float().softmax(1)  # B,C,H,W
        x_s = unl["image_strong"] if c.strong_view else unl["image"]
        r_adv = self.perturbation(x_s, valid)
        x = torch.cat([lab["image"], x_s + r_adv.to(x_s.dtype)])  # one pass: [x_l, x_s + r_adv]
        n_l = lab["image"].shape[0]
        out = forward_groups(self.net, x, [n_l, x_s.shape[0]], c.split_bn)
        out_l, out_u = split_outputs(out, n_l)
        loss_sup = sup_loss(out_l, lab["mask"], c)
        weight, share = confidence_weight(probs, valid, c.conf_thresh, c.conf_per_pixel)
        loss_cons = consistency_kl(out_u["logits"], probs, valid, weight)
        loss = loss_sup + c.cons_weight * sigmoid_rampup(step, self.rampup_steps) * loss_cons
        quality = pseudo_label_quality(hard_labels(probs, valid), unl, self.info.num_classes)
        adv_norm = r_adv.flatten(1).norm(dim=1).mean()
        return {"loss": loss, "loss_sup": loss_sup, "loss_cons": loss_cons, "conf_frac": share,
                "adv_norm": adv_norm, **quality}  # fmt: skip

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, getattr(self.net, "module", self.net), step, self.ema_decay)
