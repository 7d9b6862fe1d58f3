"""U2PL: semi-supervised segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022; methods.md s. 6).

An EMA teacher labels the unlabeled batch; the student learns from the reliable (low-entropy) pixels with CE
and from every pixel through a contrastive loss whose negatives include the unreliable pixels, kept in a
per-class memory bank. Departures from the authors' code (methods.md lists them): per-image one-hot, each
class paired with its own bank, the paper's negative sets, EMA buffers copied from the student.

Implementation choices: one teacher pass (eval mode, weak views of [labeled, unlabeled]) whose unlabeled
outputs are mixed with the student's mask; percentiles by sorting on the device; no host synchronisation
inside ``training_step``. The memory bank, the anchor/negative sampling and InfoNCE are in ``contrastive.py``.
A subclass changes the step through hooks (U2PL + AEL, ``ael.py``): ``MIXINGS`` and ``_mix`` (its own
mixing), ``supervised`` (what else learns from the labeled predictions), ``unsup_terms`` (the unsupervised
terms from the teacher's pass) and ``contra_start`` (the first step of the contrastive loss).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

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
    entropy,
    forward_groups,
    hard_labels,
    make_alignment,
    make_teacher,
    pseudo_label_quality,
    run_relative_decay,
)  # fmt: skip
from .contrastive import MemoryBank, contrastive_loss
from .mixing import box_mask_one, classmix_mask, cutout, mix, mix_batch, partner
from .supervised import SupervisedConfig, sup_loss

log = logging.getLogger(__name__)


@dataclass
class U2PLConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "u2pl"
    # d_max (U2PL's configs: 0.99); None: relative to the steps after the warm-up (common.run_relative_decay:
    # 1/15 of them, 0.99 over shapes' 1,440, 0.9375 over 240 of a 300-step run)
    ema_decay: float | None = ranged(None, "[0, 1]")
    sup_only_epochs: int = ranged(1, "[0, inf)")  # VOC 1, Cityscapes 0
    # the teacher's unlabeled predictions aligned to the labeled class frequencies before the pseudo-labels,
    # entropies and contrastive priors are taken (common.PriorAlignment): none (the paper) | mean (ReMixMatch's)
    # | hard (ours, the default: their argmax gets the labeled class shares). 300 steps from ImageNet, 1/16,
    # 2 seeds, shapes / fashion: U2PL 33.94 / 19.71 against 27.42 / 18.27 without (SupOnly 31.54 / 18.31);
    # docs/benchmarks.md, "The pseudo-labels' class shares aligned to the labeled masks'"
    align: str = "hard"
    unsup_weight: float = ranged(1.0, "[0, inf)")  # lambda_u
    contra_weight: float = ranged(0.1, "[0, inf)")  # lambda_c (paper; the authors' config leaves the code default 1)
    drop_percent: float = ranged(20.0, "[0, 100]")  # alpha_0: share of unreliable pixels, decays linearly to 0 over the epochs
    mixing: str = "cutmix"  # cutmix | classmix | cutout | none
    mix_prob: float = ranged(0.5, "[0, 1]")  # the whole unlabeled batch is mixed with this probability
    contrastive: bool = True
    num_queries: int = ranged(256, "[1, inf)")  # Q anchors per class
    num_negatives: int = ranged(50, "[1, inf)")  # N negatives per anchor
    temperature: float = ranged(0.5, "(0, inf)")
    delta_p: float = ranged(0.3, "[0, 1]")  # anchors need a teacher probability > delta_p for their class
    low_rank: int = ranged(3, "[1, inf)")  # r_l
    high_rank: int = ranged(20, "[1, inf)")  # r_h
    bank_size: int = ranged(30000, "[1, inf)")  # per class
    bank_size_bg: int = ranged(50000, "[1, inf)")  # class 0 (the authors' code uses 50000 for class 0)
    bank_dtype: str = "bfloat16"  # unit vectors: half the memory, similarities within 4e-3 (fp16: 2e-4)
    # how the teacher's BatchNorm normalises the weak views it labels (common.check_teacher_bn): "student"
    # with the running statistics, the student's (methods.md s. 0; from batches of strongly augmented, mixed
    # unlabeled images); "weak" with each weak batch's own statistics. Evaluated: the student's, either way
    teacher_bn: str = "student"


class TeacherPass(NamedTuple):
    """Steps 1-2 of a semi-supervised step, without gradient: the teacher's outputs on the labeled weak views,
    the strong unlabeled view and the teacher's unlabeled outputs mixed alike, the pseudo-labels of the mixed
    images (255: none), their entropy split, and the pseudo-label scores against hidden masks (``quality``)."""

    logits_l: Tensor  # N,C,H,W
    rep_l: Tensor  # N,D,h,w
    x_u: Tensor  # B,3,H,W
    logits_u: Tensor  # B,C,H,W
    rep_u: Tensor  # B,D,h,w
    pseudo: Tensor  # B,H,W
    valid: Tensor  # B,H,W bool: the pixels with a pseudo-label
    reliable: Tensor  # B,H,W bool
    unreliable: Tensor  # B,H,W bool
    quality: dict[str, Tensor]


# ---------------------------------------------------------------------------------------------- pure pieces
def masked_percentile(x: Tensor, valid: Tensor, q: Sequence[float]) -> Tensor:
    """Percentiles ``q`` (0..100) of ``x[valid]`` with linear interpolation (torch.quantile semantics). -> len(q)

    Sorts on the device (no size limit, no host sync); +inf when no element is valid.
    """
    s = torch.where(valid.flatten(), x.detach().float().flatten(), torch.inf).sort().values  # valid first
    last = (valid.sum() - 1).clamp_min(0)  # index of the largest valid value
    pos = torch.stack([last * (p / 100.0) for p in q])  # len(q) float
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last)
    v_lo, v_hi = s[lo], s[hi]
    val = v_lo + (pos - lo) * (v_hi - v_lo)
    return torch.where(valid.any(), val, torch.inf)


def entropy_split(ent: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Reliable (entropy <= pct(alpha)) and unreliable (entropy >= pct(100 - alpha)) valid pixels. B,H,W bool.

    The unreliable pixels are the ones the unsupervised loss drops ("≥ threshold") and the contrastive
    loss uses as negatives; the reliable ones give its anchors and prototypes.
    """
    low, high = masked_percentile(ent, valid, (alpha, 100.0 - alpha))
    return valid & (ent <= low), valid & (ent >= high)


def unsup_loss(logits: Tensor, pseudo: Tensor, unreliable: Tensor, valid: Tensor) -> Tensor:
    """``w * CE(logits, pseudo on kept pixels)``, kept = valid and not unreliable, ``w = #pixels / #kept``.

    CE is the mean over kept pixels (``ce_loss``) and #pixels counts the whole batch (B*H*W, padding
    included), so the loss is ``sum_kept(CE) * B*H*W / #kept**2`` -- exactly the authors'
    ``weight * F.cross_entropy(pred, target, ignore_index=255)``. 0 when nothing is kept.
    """
    keep = valid & ~unreliable
    target = pseudo.masked_fill(~keep, IGNORE)
    weight = pseudo.numel() / keep.sum().clamp_min(1)
    return weight * ce_loss(logits, target)


def clamp_ranks(low: int, high: int, num_classes: int) -> tuple[int, int]:
    """``r_l = min(r_l, C-1)``, ``r_h = min(r_h, C)`` so few-class tasks (C=2: ranks [1, 2)) keep negatives.

    Warns when r_l changes (r_h > C changes nothing: ranks stop at C-1).
    """
    low_c, high_c = min(low, num_classes - 1), min(high, num_classes)
    if low_c != low:
        log.warning(
            "u2pl: %d classes, so the negative ranks [low_rank=%d, high_rank=%d) are clamped to [%d, %d)",
            num_classes, low, high, low_c, high_c,
        )  # fmt: skip
    return low_c, high_c


def _accuracy(pseudo: Tensor, true: Tensor, where: Tensor) -> Tensor:
    """Share of the pixels in ``where`` (with a valid true label) whose pseudo-label is right; 0-dim."""
    scored = where & (true != IGNORE)
    return (scored & (pseudo == true)).sum() / scored.sum().clamp_min(1)


def _nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest resizing of a B,H,W or B,C,H,W map of any dtype to ``size``."""
    y = F.interpolate(x.unsqueeze(1).float() if x.dim() == 3 else x.float(), size=tuple(size), mode="nearest")
    return (y.squeeze(1) if x.dim() == 3 else y).to(x.dtype)


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("u2pl")
class U2PL(Method):
    Config = U2PLConfig
    streams = ("labeled", "unlabeled")
    strong_streams = ("unlabeled",)
    MIXINGS: ClassVar[tuple[str, ...]] = ("cutmix", "classmix", "cutout", "none")  # method.mixing (_mix)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("student",), "loss_unsup": ("student",), "loss_contra": ("student",)}

    def __init__(self, cfg: U2PLConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.mixing not in self.MIXINGS:
            raise ConfigError(f"method.mixing must be one of {', '.join(self.MIXINGS)}, got {cfg.mixing!r}")
        check_teacher_bn(cfg.teacher_bn)
        if cfg.bank_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(
                f"method.bank_dtype must be float16, bfloat16 or float32, got {cfg.bank_dtype!r}"
            )
        c = info.num_classes
        model_cfg = OmegaConf.merge(model_cfg, {"rep_head": True})
        self.student = build_model(model_cfg, c)
        self.teacher = make_teacher(self.student)
        self.bank = MemoryBank(
            [cfg.bank_size_bg] + [cfg.bank_size] * (c - 1), model_cfg.rep_dim, getattr(torch, cfg.bank_dtype)
        )
        self.low_rank, self.high_rank = clamp_ranks(cfg.low_rank, cfg.high_rank, c)
        self.sup_only_steps = cfg.sup_only_epochs * info.iters_per_epoch
        self.ema_decay = run_relative_decay(cfg.ema_decay, info.max_iters - self.sup_only_steps)
        self.contra_start = 0  # the first step of the contrastive loss (AEL starts it later)
        self.align = make_alignment(cfg.align, c)
        self.register_buffer("semi_started", torch.tensor(False))  # checkpointed: eval_net after a resume

    def trainable_nets(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def phases(self) -> list[tuple[str, int, int]]:
        n = min(self.sup_only_steps, self.info.max_iters)
        what = (f"supervised only (sup_only_epochs={self.cfg.sup_only_epochs} x {self.info.iters_per_epoch} "
                "steps per epoch of the longest stream)")
        return [*([(what, 0, n)] if n else []), ema_phase(self.ema_decay, n, self.info.max_iters)]

    def eval_net(self) -> nn.Module:
        """The teacher once the semi-supervised phase has begun (as the authors evaluate), else the student."""
        return self.teacher if bool(self.semi_started) else self.student

    def train(self, mode: bool = True) -> U2PL:
        """The teacher runs in eval mode (no dropout; BatchNorm running statistics), except its BatchNorm
        layers while training with ``teacher_bn="weak"`` (batch statistics of the weak views it labels)."""
        super().train(mode)
        self.teacher.eval()
        batchnorm_train(self.teacher, mode and self.cfg.teacher_bn == "weak")
        return self

    def drop_percent(self, step: int) -> float:
        """alpha_t = alpha_0 (1 - t/T), t the epoch, T the number of epochs."""
        epochs = self.info.max_iters / self.info.iters_per_epoch
        return self.cfg.drop_percent * (1.0 - (step // self.info.iters_per_epoch) / epochs)

    def _mix(self, x_s: Tensor, logits_t: Tensor, rep_t: Tensor, pseudo: Tensor, true: Tensor | None):
        """Mix (or cut out) the strong view, the teacher outputs, the pseudo-labels and the hidden masks
        (``true``, diagnostics only; may be None) with one mask."""
        mode = self.cfg.mixing
        if mode == "none":
            return x_s, logits_t, rep_t, pseudo, true
        b, _, h, w = x_s.shape
        mask = classmix_mask(pseudo) if mode == "classmix" else box_mask_one(b, h, w, x_s.device)
        mask = mask * (torch.rand(1, device=x_s.device) < self.cfg.mix_prob)  # whole batch or nothing
        if mode == "cutout":
            x_s, pseudo = cutout(x_s, pseudo, mask)
            return x_s, logits_t, rep_t, pseudo, true
        m = mix_batch({"x": x_s, "logits": logits_t, "pseudo": pseudo}, mask)
        rep_t = mix(rep_t, partner(rep_t), _nearest(mask, rep_t.shape[-2:]))
        if true is not None:
            true = mix(true, partner(true), mask)
        return m["x"], m["logits"], rep_t, m["pseudo"], true

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        lab, unl = batch["labeled"], batch["unlabeled"]
        x_l, y_l = lab["image"], lab["mask"]
        n_l = x_l.shape[0]
        alpha = self.drop_percent(step)
        if step < self.sup_only_steps:  # supervised warm-up; 0 * rep keeps the rep head in the DDP graph
            out = self.student(x_l)
            zero = out["logits"].new_zeros((), dtype=torch.float32)
            loss_sup = self.supervised(out, y_l)
            return self._terms(loss_sup, {"loss_unsup": zero}, 0.0 * out["rep"].sum(), alpha, zero, zero, {})
        if step == self.sup_only_steps:
            self.teacher.load_state_dict(getattr(self.student, "module", self.student).state_dict())
            self.semi_started.fill_(True)

        t = self._teacher_pass(x_l, y_l, unl, alpha, lab.get("pasted"))  # 1-2
        out = forward_groups(self.student, torch.cat([x_l, t.x_u]), [n_l, t.x_u.shape[0]], self.cfg.split_bn)  # 3
        loss_sup = self.supervised({k: v[:n_l] for k, v in out.items()}, y_l)  # 4
        unsup = self.unsup_terms(out["logits"], t)  # 5
        kept = (t.valid & ~t.unreliable).sum() / t.valid.sum().clamp_min(1)
        if self.cfg.contrastive and step >= self.contra_start:  # 6
            loss_contra, n_used = self._contrastive(out["rep"], y_l, t)
        else:  # 0 * rep keeps the rep head in the DDP graph
            loss_contra, n_used = 0.0 * out["rep"].sum(), torch.zeros_like(kept)
        return self._terms(loss_sup, unsup, loss_contra, alpha, kept, n_used.float(), t.quality)

    @torch.no_grad()
    def _teacher_pass(self, x_l: Tensor, y_l: Tensor, unl: dict[str, Tensor], alpha: float,
                      pasted: Tensor | None = None) -> TeacherPass:
        """1-2: the teacher on the weak views [labeled, unlabeled], its unlabeled outputs mixed like the strong
        view (``_mix``), the pseudo-labels split by the entropy percentiles of ``alpha``."""
        n_l = x_l.shape[0]
        t_out = self.teacher(torch.cat([x_l, unl["image"]]))
        logits_t, rep_t = t_out["logits"].float(), t_out["rep"].float()
        if self.align is not None:  # pseudo-labels, entropies and contrastive priors from aligned outputs
            self.align.update(y_l, logits_t[n_l:].softmax(1), unl["valid"], pasted)
            logits_t = torch.cat([logits_t[:n_l], self.align(logits_t[n_l:])])
        pseudo = hard_labels(logits_t[n_l:], unl["valid"])  # B,H,W
        quality = pseudo_label_quality(pseudo, unl, self.info.num_classes)
        x_u, logits_u, rep_u, pseudo, true = self._mix(
            unl["image_strong"], logits_t[n_l:], rep_t[n_l:], pseudo, unl.get("true_mask")
        )
        valid = pseudo != IGNORE
        reliable, unreliable = entropy_split(entropy(logits_u), valid, alpha)
        if true is not None:  # the paper's premise: reliable pseudo-labels are right more often
            quality |= {"rel_acc": _accuracy(pseudo, true, reliable),
                        "unrel_acc": _accuracy(pseudo, true, unreliable)}  # fmt: skip
        return TeacherPass(
            logits_t[:n_l], rep_t[:n_l], x_u, logits_u, rep_u, pseudo, valid, reliable, unreliable, quality
        )

    def supervised(self, out: dict[str, Tensor], y_l: Tensor) -> Tensor:
        """4: the supervised loss of the student's outputs on the labeled images (warm-up included). A hook:
        a subclass may learn more from these predictions (AEL's confidence bank)."""
        return sup_loss(out, y_l, self.cfg)

    def unsup_terms(self, logits: Tensor, t: TeacherPass) -> dict[str, Tensor]:
        """5: the unsupervised terms from the student's logits on [labeled, mixed unlabeled] and the teacher's
        pass, each weighted by ``unsup_weight``: U2PL's ``loss_unsup`` (``unsup_loss``). A hook: a subclass
        returns its own ``loss_unsup`` and may add terms (AEL's)."""
        n_l = t.logits_l.shape[0]
        return {"loss_unsup": unsup_loss(logits[n_l:], t.pseudo, t.unreliable, t.valid)}

    def _contrastive(self, rep: Tensor, y_l: Tensor, t: TeacherPass) -> tuple[Tensor, Tensor]:
        """6: the contrastive loss of the student's representations of [labeled, mixed unlabeled]: labeled
        pixels by their masks, unlabeled ones by their reliable pseudo-labels, the unreliable ones as
        negatives. -> the loss and the number of classes it used (0-dim each)."""
        n_l = y_l.shape[0]
        size = rep.shape[-2:]
        with torch.no_grad():
            labels = _nearest(torch.cat([y_l, t.pseudo.masked_fill(~t.reliable, IGNORE)]), size)
            unsure = _nearest(torch.cat([torch.zeros_like(y_l, dtype=torch.bool), t.unreliable]), size)
            prob_t = torch.cat([_nearest(t.logits_l, size), _nearest(t.logits_u, size)]).softmax(1)
        return contrastive_loss(
            rep, torch.cat([t.rep_l, t.rep_u]), prob_t, labels, unsure, n_l, self.bank,
            num_queries=self.cfg.num_queries, num_negatives=self.cfg.num_negatives,
            temperature=self.cfg.temperature, delta_p=self.cfg.delta_p,
            low_rank=self.low_rank, high_rank=self.high_rank,
        )  # fmt: skip

    def _terms(
        self,
        loss_sup: Tensor,
        unsup: dict[str, Tensor],
        loss_contra: Tensor,
        alpha: float,
        kept: Tensor,
        n_used: Tensor,
        quality: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """7: the weighted total, the terms (attached, unweighted) and diagnostics, all 0-dim tensors
        (``unsup``: ``loss_unsup`` and a subclass's further unsupervised terms, each weighted by
        ``unsup_weight``; ``quality``: pseudo-label scores against hidden masks, when the stream has them)."""
        c = self.cfg
        loss = loss_sup + c.unsup_weight * unsup["loss_unsup"] + c.contra_weight * loss_contra
        for name, term in unsup.items():
            if name != "loss_unsup":
                loss = loss + c.unsup_weight * term
        return {
            "loss": loss, "loss_sup": loss_sup, **unsup, "loss_contra": loss_contra,
            "drop_percent": torch.full((), alpha, device=loss_sup.device), "reliable_frac": kept,
            "contra_classes": n_used, **quality,
        }  # fmt: skip

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """8: EMA of the teacher with warm-up counted from the start of the semi-supervised phase."""
        if step >= self.sup_only_steps:
            student = getattr(self.student, "module", self.student)
            ema_update(self.teacher, student, step - self.sup_only_steps, self.ema_decay)
