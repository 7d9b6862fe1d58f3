"""Pieces shared by several methods (methods.md section 0): safe CE, entropy, EMA teachers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import ConfigError
from ..metrics import confusion_matrix
from ..models import batchnorm_groups, class_map

IGNORE = 255


def ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise CE with ignore 255, averaged over non-ignored pixels; 0 (not NaN) when none is valid.

    ``weight`` (B,H,W) optionally weights each pixel (the mean is still over valid pixels).
    """
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")  # B,H,W
    valid = (target != IGNORE).float()
    if weight is not None:
        per_pixel = per_pixel * weight
    return per_pixel.sum() / valid.sum().clamp_min(1.0)


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000) -> torch.Tensor:
    """Online hard example mining CE: keep pixels whose GT-class probability < ``thresh``, at least ``min_kept``.

    Computed without host synchronisation (kthvalue over a fixed-size tensor).
    """
    valid = target != IGNORE  # B,H,W
    prob = F.softmax(logits.float(), dim=1)
    gt = target.masked_fill(~valid, 0)
    p_gt = prob.gather(1, gt.unsqueeze(1)).squeeze(1).masked_fill(~valid, 2.0)  # invalid sort last
    k = min(min_kept, p_gt.numel())
    kth = p_gt.flatten().kthvalue(max(k, 1)).values
    keep = valid & ((p_gt < thresh) | (p_gt <= kth))
    return ce_loss(logits, target.masked_fill(~keep, IGNORE))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy ``-sum_c p_c ln(p_c + 1e-10)`` over dim 1, in float32. B,C,... -> B,..."""
    p = F.softmax(logits.float(), dim=1)
    return -(p * torch.log(p + 1e-10)).sum(dim=1)


def hard_labels(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One-hot pseudo-labels as class indices, 255 where invalid; never carries gradient. B,C,H,W -> B,H,W"""
    return class_map(scores.detach()).masked_fill(~valid, IGNORE)


def class_counts(label: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor,
                 by_comparison: bool | None = None) -> torch.Tensor:
    """Summed ``weight`` (P,) of the pixels of each class in ``classes`` (C,: 0..C-1) given their ``label`` (P,).
    By comparison on CUDA (``bincount`` would synchronise with the host for its output size), by ``bincount``
    elsewhere (faster on the CPU); ``by_comparison`` forces one. -> C float32"""
    if label.is_cuda if by_comparison is None else by_comparison:
        return ((label[:, None] == classes).float() * weight[:, None].float()).sum(0)
    return torch.bincount(label, weights=weight.float(), minlength=classes.numel())[: classes.numel()].float()


def mean_shift(labeled: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment as a logit offset: ``log pi_lab - log pi_pred`` (class frequencies,
    each floored at 1e-6). C ; C -> C"""
    return labeled.clamp_min(1e-6).log() - predicted.clamp_min(1e-6).log()


def argmax_shift(logp: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
                 iters: int, max_shift: float = 4.0, decay: float = 1.0) -> torch.Tensor:
    """The per-class offset under which the argmax of ``logp + shift`` over the pixels (weighted by ``weight``,
    counts summed over processes) has the class shares ``target``: damped fixed-point steps
    ``shift += r^k (log target - log share(shift)) / 2`` (step ``k``, ``r`` = ``decay``), each clipped to
    +-``r^k``, from ``start``, the mean kept at 0 and the offset within +-``max_shift``. With ``decay`` 1 (the
    online alignment, whose running average smooths the batches' offsets) the steps keep their size; an
    offline solve shrinks them so the offset settles where the classes' log-probability gaps are narrow.
    logp P,C ; weight P ; target, start C -> C"""
    classes = torch.arange(logp.shape[1], device=logp.device)
    goal = target.clamp_min(1e-4).log()
    shift, size = start, 1.0
    for _ in range(iters):
        counts = dist.all_reduce_sum(class_counts((logp + shift).argmax(1), weight, classes))
        share = counts / counts.sum().clamp_min(1.0)
        shift = shift + 0.5 * (goal - share.clamp_min(1e-4).log()).clamp(-size, size)
        shift = (shift - shift.mean()).clamp(-max_shift, max_shift)
        size *= decay
    return shift


class PriorAlignment(nn.Module):
    """Alignment of a teacher's predictions on unlabeled pixels to the class frequencies of the labeled masks,
    against the pseudo-labels' drift toward the dominant class (background), which a few labeled images and a
    young network start and self-training then confirms (the bias DARS, He et al. 2021, re-distributes).

    ``pi_lab`` is the running class frequency of the labeled masks (pixels that copy-paste pasted left out when
    the batch says where: their classes are drawn uniformly, not by frequency). Two modes, both returning
    shifted logits ``log p + shift`` (a per-class offset; the softmax renormalises):

    - ``"mean"``: ReMixMatch's distribution alignment, ``shift = log pi_lab - log pi_pred`` with ``pi_pred``
      the running mean of the teacher's (unaligned) probabilities on valid unlabeled pixels.
    - ``"hard"``: the shift under which the *argmax* of the batch's valid unlabeled pixels is distributed as
      ``pi_lab`` (ours). Found by damped fixed-point steps ``shift += (log pi_lab - log share(shift)) / 2``
      (each clipped to +-1, ``iters`` of them, from the running shift) on at most ``max_pixels`` pixels per
      process (an even stride), then averaged into the running shift with an EMA of ``shift_momentum``. The
      mean probability is not where the bias lies: a pixel whose probability is spread over six object classes
      stays background under the argmax; matching the argmax's shares moves exactly those pixels.

    Running means use the EMA warm-up of :func:`ema_update` (``m = min(1 - 1/(n+1), momentum)``); under DDP
    the counts of every iteration are summed over processes, so every process aligns with the same shift.
    Saved with the method (exact resume)."""

    MODES = ("mean", "hard")

    def __init__(self, num_classes: int, mode: str = "mean", momentum: float = 0.99, *, shift_momentum: float = 0.9,
                 iters: int = 10, max_pixels: int = 16384, max_shift: float = 4.0) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"alignment mode must be one of {self.MODES}, got {mode!r}")
        self.mode, self.momentum, self.shift_momentum = mode, momentum, shift_momentum
        self.iters, self.max_pixels, self.max_shift = iters, max_pixels, max_shift
        self.register_buffer("labeled", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("predicted", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("shift", torch.zeros(num_classes))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, masks: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor,
               pasted: torch.Tensor | None = None) -> None:
        """``masks`` B,H,W labeled class ids (255 ignored); ``probs`` B,C,H,W teacher probabilities on the
        unlabeled images, ``valid`` their B,H,W valid pixels; ``pasted`` B,H,W: the labeled pixels copy-paste
        pasted (not counted in ``pi_lab``), or None."""
        c = self.labeled.numel()
        counted = masks != IGNORE
        if pasted is not None:
            counted &= ~pasted
        classes = torch.arange(c, device=masks.device)
        lab = class_counts(masks.masked_fill(~counted, 0).reshape(-1).long(), counted.reshape(-1), classes)
        pred = (probs.float() * valid[:, None]).sum((0, 2, 3))
        both = dist.all_reduce_sum(torch.cat([lab, pred]))  # every process aligns with the same priors
        lab, pred = both[:c], both[c:]
        warm = 1.0 - 1.0 / (self.updates + 1)  # the EMA warm-up, on the device: no read of the counter
        m = warm.clamp_max(self.momentum)
        for running, counts in ((self.labeled, lab), (self.predicted, pred)):  # a batch without any: unchanged
            total = counts.sum()
            moved = running * m + counts / total.clamp_min(1e-12) * (1 - m)
            running.copy_(torch.where(total > 0, moved, running))  # no host sync on the training step
        if self.mode == "mean":
            self.shift.copy_(mean_shift(self.labeled, self.predicted))
        else:
            solved = self.solve(probs, valid)
            m = warm.clamp_max(self.shift_momentum)
            self.shift.copy_(self.shift * m + solved * (1 - m))
        self.updates += 1

    def solve(self, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The shift (C,) under which the argmax of the valid pixels of ``probs`` (summed over processes) is
        distributed as ``pi_lab``; mean 0, within +-``max_shift``. Every ``k``-th pixel of the batch
        (``k`` = pixels / ``max_pixels``, rounded up), the invalid ones weighted 0: no host synchronisation."""
        c = self.labeled.numel()
        flat = probs.movedim(1, -1).reshape(-1, c)  # P,C
        stride = max(1, -(-flat.shape[0] // self.max_pixels))
        logp = flat[::stride].float().clamp_min(1e-12).log()
        weight = valid.reshape(-1)[::stride].float()
        return argmax_shift(logp, weight, self.labeled, self.shift.clone(), self.iters, self.max_shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint saved before the shift was a buffer (``align: true``, the mean mode) resumes: its shift
        is what the mean mode derives from the running frequencies it has (the hard mode starts from 0)."""
        if prefix + "shift" not in state_dict and prefix + "labeled" in state_dict:
            lab, pred = state_dict[prefix + "labeled"], state_dict.get(prefix + "predicted", self.predicted)
            state_dict[prefix + "shift"] = mean_shift(lab, pred) if self.mode == "mean" else torch.zeros_like(lab)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Aligned logits (B,C,H,W): ``logits + shift`` (in the mean mode the softmax is ``p * pi_lab / pi_pred``,
        renormalised)."""
        return logits.float() + self.shift.view(1, -1, 1, 1)


ALIGN_MODES = ("none", "mean", "hard")


def make_alignment(mode: str, num_classes: int) -> PriorAlignment | None:
    """``method.align``: ``"none"`` (no alignment: None), ``"mean"`` or ``"hard"`` (:class:`PriorAlignment`)."""
    if mode not in ALIGN_MODES:
        raise ConfigError(f"method.align must be one of {', '.join(ALIGN_MODES)}, got {mode!r}"
                          + (" (true was the mean alignment: mean)" if str(mode).lower() == "true" else ""))
    return None if mode == "none" else PriorAlignment(num_classes, mode)


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student (never receives gradients, never wrapped in DDP)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# the EMA teacher's averaging horizon 1/(1-d) as a share of the steps it is updated over, when a config gives
# no decay: measured best at both lengths tried (docs/benchmarks.md, "A teacher decay relative to the run"):
# 0.99 over 1,500 steps (against 0.999) and 0.95 over 300 (against 0.99), on shapes and on fashion
EMA_HORIZON_SHARE = 1 / 15
EMA_DECAY_CAP = 0.999  # methods.md's d_max: paper-length runs get the papers' decay


def run_relative_decay(decay: float | None, steps: int) -> float:
    """``decay`` when a config sets it; None: the decay whose horizon is ``EMA_HORIZON_SHARE`` of ``steps``
    (the steps the teacher is updated over), ``1 - 15 / steps``, between 0 and ``EMA_DECAY_CAP``: 0.95 for a
    300-step run, 0.99 for 1,500 steps, 0.999 from 15,000 steps on."""
    if decay is not None:
        return decay
    return min(EMA_DECAY_CAP, max(0.0, 1.0 - 1.0 / (EMA_HORIZON_SHARE * max(steps, 1))))


def ema_horizon(decay: float) -> int | str:
    """The number of steps an EMA of this decay averages over, ``1 / (1 - d)`` ("all" for d = 1)."""
    return round(1.0 / (1.0 - decay)) if decay < 1.0 else "all"


def ema_phase(decay: float, start: int, end: int) -> tuple[str, int, int]:
    """The EMA teacher's entry of ``Method.phases``: its decay and how many steps it averages over."""
    return f"EMA teacher, decay {decay:.4g} (averaging over ~{ema_horizon(decay)} steps)", start, end


def rampup_phase(label: str, steps: int, max_iters: int) -> list[tuple[str, int, int]]:
    """A sigmoid ramp-up's entry of ``Method.phases`` (from step 0, at most the run); none for 0 steps."""
    n = min(steps, max_iters)
    return [(label, 0, n)] if n else []


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step_since_start: int, d_max: float) -> None:
    """``theta_t <- d theta_t + (1-d) theta_s`` with warm-up ``d = min(1 - 1/(i+1), d_max)``.

    Buffers (BatchNorm running statistics) are copied from the student, not averaged (methods.md section 0),
    whatever the teacher's ``teacher_bn`` policy: they are what the teacher uses when it is evaluated.
    """
    d = min(1.0 - 1.0 / (step_since_start + 1), d_max)
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, d)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - d)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


TEACHER_BN = ("student", "weak")  # the statistics an EMA teacher normalises with when labeling (method.teacher_bn)


def check_teacher_bn(value: str) -> None:
    """How an EMA teacher's BatchNorm layers normalise the weak views it labels while training. ``student``:
    with the running statistics, copied from the student after every EMA step (methods.md s. 0); ``weak``:
    with each weak batch's own statistics (``batchnorm_train``). Either way the running statistics are the
    student's, and the evaluated (exported) teacher uses them: its weights are an average of the student's,
    which were trained under the student's statistics (docs/benchmarks.md, "The evaluated teacher's
    BatchNorm statistics": the teacher's own weak-view statistics cost it up to 10 mIoU points on shapes)."""
    if value not in TEACHER_BN:
        from ..errors import ConfigError

        raise ConfigError(f"method.teacher_bn must be one of {', '.join(TEACHER_BN)}, got {value!r}")


def batchnorm_train(net: nn.Module, mode: bool) -> None:
    """Put only the BatchNorm layers of ``net`` in training mode (batch statistics, running statistics
    updated) or back in eval mode; dropout and everything else keep their mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(mode)


@dataclass
class ViewStatsConfig:
    """The setting of the methods whose student forwards differently augmented views in one pass."""

    # BatchNorm statistics per view group in that pass (``forward_groups``): true: the labeled images are
    # normalised alone, and apart from them each kind of unlabeled view (weak; strong / mixed / perturbed), as
    # if each group were forwarded alone; false: with the whole batch's statistics (as the U2PL authors' code).
    # The default is the measured better one per method (docs/benchmarks.md, "BatchNorm statistics per view"
    # "The labeled images normalised alone", "Every method with copy-paste at 300 steps"): Mean Teacher,
    # CutMix-Seg, FixMatch, UniMatch, CCT, AdvSemSeg, GCT and PseudoSeg true; U2PL, CPS and VAT false (worse or
    # no better split); RIPU true (its groups: the source and the target images, "The two domains normalised
    # apart")
    split_bn: bool = False


def forward_groups(net: nn.Module, x: torch.Tensor, sizes: Sequence[int], split_bn: bool, join: int = 0,
                   **kwargs) -> dict[str, torch.Tensor]:
    """``net(x, **kwargs)`` in one forward (one DDP forward per backward) on a batch made of groups of ``sizes``
    consecutive samples; with ``split_bn`` the BatchNorm layers normalise each group with its own statistics
    (``models.batchnorm_groups``). A group holds the views that share a distribution: the labeled images are
    a group of their own, so what the labeled loss sees never depends on the unlabeled images. Samples the
    network appends (a feature-perturbation stream of some images of group ``join``) are normalised with group
    ``join``."""
    if not split_bn or len(sizes) < 2:
        return net(x, **kwargs)
    with batchnorm_groups(net, sizes, join):
        return net(x, **kwargs)


def split_outputs(
    out: dict[str, torch.Tensor], n: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of a joint forward split into the first ``n`` samples and the rest.

    Methods run each trainable net once per step on ``cat([labeled, unlabeled])``: one DDP forward per
    backward, and BatchNorm statistics over the whole batch.
    """
    return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}


def pseudo_label_quality(
    pseudo: torch.Tensor, batch: dict[str, torch.Tensor], num_classes: int, prefix: str = "pl"
) -> dict[str, torch.Tensor]:
    """How good pseudo-labels are, against the unlabeled stream's hidden masks (``true_masks``); else ``{}``.

    ``pseudo`` B,H,W class ids on the unlabeled images as the stream gives them (before mixing), 255 where
    none. Scores pixels where both are valid: ``<prefix>_acc`` (pixel accuracy), ``<prefix>_miou`` (mIoU of
    the batch over the classes present in either map), ``<prefix>_c0`` and ``true_c0`` (share of class 0,
    the background of VOC and shapes: a method drifting to background shows ``pl_c0`` rising above
    ``true_c0``). 0-dim float tensors computed on the device (no host sync).
    """

    true = batch.get("true_mask")
    if true is None:
        return {}
    scored = true.masked_fill(pseudo == IGNORE, IGNORE)  # pixels without a pseudo-label are not scored
    conf = confusion_matrix(pseudo, scored, num_classes).float()
    n = conf.sum().clamp_min(1)
    hits, rows, cols = conf.diagonal(), conf.sum(1), conf.sum(0)
    union = rows + cols - hits
    present = union > 0
    iou = hits / union.clamp_min(1)
    return {
        f"{prefix}_acc": hits.sum() / n,
        f"{prefix}_miou": torch.where(present, iou, 0.0).sum() / present.sum().clamp_min(1),
        f"{prefix}_c0": cols[0] / n,
        "true_c0": rows[0] / n,
    }
