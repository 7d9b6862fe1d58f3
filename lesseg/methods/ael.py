"""U2PL + AEL: U2PL with Adaptive Equalization Learning (Hu et al., NeurIPS 2021; methods-wave2.md s. 14).

AEL steers training towards the classes the student finds hard. A confidence bank keeps, per class c,
``Conf_c``: an EMA (momentum 0.999) of the student's mean softmax probability of c over the labeled pixels of
class c (0 for a class absent from the step's labels). From it:
- adaptive copy-paste (ACP, labeled): ``acp_classes`` draws from ``softmax(sqrt(1 - Conf))`` over the allowed
  classes; each labeled image, with probability ``acp_prob``, gets every pixel of the drawn classes (image and
  label) of another labeled image pasted on;
- adaptive CutMix (ACM, unlabeled, ``mixing: acm``): per image a class drawn from ``softmax(1 - Conf)``, a
  source image whose teacher prediction holds it (at least ``acm_presence_area`` of the image), and the
  bounding box of one of that class's connected components (more than ``acm_area`` of the image; a random box
  of half the image when there is none) pasted with the teacher outputs, as U2PL pastes its CutMix box;
- equalization sampling and re-weighting of the unsupervised CE: a pixel whose student class is k is kept
  with probability ``s_k = ((1 - Conf_k) / max_j (1 - Conf_j))^gamma2`` and weighted by the teacher's
  confidence ``q^gamma``; ``L = sum w CE / sum w`` over pixels with a pseudo-label. It is applied to the
  unlabeled images (``loss_unsup``) and, against the teacher's own predictions, to the labeled ones
  (``loss_unsup_lab``).
U2PL's terms are unchanged: the supervised CE (OHEM in the Cityscapes configs), the entropy filter that drops
the unreliable pixels (those at or above the (100 - alpha_t) percentile) from the unsupervised CE, and the
contrastive loss (from ``contra_start_epochs``). The unsupervised CE's weighting is AEL's, as in the
authors' U2PL + AEL code.

Departures from the authors' code: the entropy filter drops the least reliable pixels, as U2PL's main branch
(their U2PL + AEL branch drops the most reliable ones); the allowed ACP classes are a per-dataset list
(``acp_exclude``; theirs excludes Cityscapes' road, sidewalk, building, vegetation and sky on every dataset);
the re-weighting denominator counts the pixels with a pseudo-label only (theirs every pixel); the bank starts
at 1/C for every class (theirs random) and is reduced over processes; no division of the losses by the world
size. A method sees only its batches, so ACP pastes from the next labeled image of the batch (not a second
image loaded and rescaled by the dataset) and ACM draws its source among the other unlabeled images of the
batch by their current teacher predictions (not from a dataset-wide class-presence bank).
Implementation: U2PL's step with its hooks (``u2pl.py``): ACM as a mixing (``_mix``), the bank's update
from the supervised predictions (``supervised``), the equalized CEs as the unsupervised terms
(``unsup_terms``), the contrastive start (``contra_start``); ACP edits the labeled batch before U2PL's step
sees it. ACM's connected components run on the CPU (OpenCV), one host copy of the B,H,W teacher classes per
step; everything else stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dist
from ..config import ranged
from ..errors import ConfigError
from ..models import class_map
from .base import METHODS, RunInfo
from .common import IGNORE
from .contrastive import one_hot
from .mixing import box_mask_xor
from .u2pl import U2PL, TeacherPass, U2PLConfig, _nearest


@dataclass
class U2PLAELConfig(U2PLConfig):
    name: str = "u2pl_ael"
    mixing: str = "acm"  # acm | U2PL's cutmix, classmix, cutout, none
    mix_prob: float = ranged(1.0, "[0, 1]")  # AEL mixes every step
    conf_momentum: float = ranged(0.999, "[0, 1]")  # of the confidence bank
    acp: bool = True
    acp_classes: int = ranged(3, "[1, inf)")  # class draws per step (Cityscapes 3, VOC 1)
    acp_prob: float = ranged(0.5, "[0, 1]")  # chance that a labeled image gets a paste
    acp_exclude: list[int] = field(default_factory=list)  # classes never pasted (ids of this dataset)
    acm_area: float = ranged(0.005, "[0, 1]")  # least component area / image (Cityscapes 0.005, VOC 0.03)
    acm_presence_area: float = ranged(0.01, "[0, 1]")  # a source holds a class (Cityscapes 0.01, VOC 0.03)
    sample: bool = True  # equalization sampling of the unsupervised CE
    gamma: float = ranged(2.0, "[0, inf)")  # weight q^gamma
    gamma2: float = ranged(1.0, "[0, inf)")  # sharpness of the sampling rates
    conf_thresh: float = ranged(0.0, "[0, 1]")  # pseudo-labels under this teacher confidence go (VOC 0.7)
    contra_start_epochs: int = ranged(20, "[0, inf)")  # U2PL + AEL starts the contrastive loss at epoch 20


# ---------------------------------------------------------------------------------------------- pure pieces
def class_confidence(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per class c: the sum of p_c over the pixels labeled c, and their count. B,C,H,W ; B,H,W -> C ; C."""
    members = one_hot(labels, probs.shape[1])
    return (probs.float() * members).sum((0, 2, 3)), members.sum((0, 2, 3)).float()


def update_confidence(conf: Tensor, sums: Tensor, counts: Tensor, momentum: float) -> Tensor:
    """``m Conf + (1 - m) mean``, the mean being ``sums / counts`` and 0 for a class without pixels. C"""
    mean = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return momentum * conf + (1.0 - momentum) * mean


def difficulty_probs(conf: Tensor, allowed: Tensor | None = None, power: float = 1.0) -> Tensor:
    """Class draw probabilities ``softmax((1 - Conf)^power)`` over the ``allowed`` classes (0 elsewhere). C"""
    score = (1.0 - conf.float()).clamp_min(0.0).pow(power)
    if allowed is not None:
        score = score.masked_fill(~allowed, -torch.inf)
    return score.softmax(0)


def sampling_rates(conf: Tensor, gamma2: float) -> Tensor:
    """Keep probability per class ``((1 - Conf_c) / max_j (1 - Conf_j))^gamma2`` (1: the hardest class). C"""
    hard = (1.0 - conf.float()).clamp_min(0.0)
    return (hard / hard.max().clamp_min(1e-12)).pow(gamma2)


def equalized_ce(logits: Tensor, pseudo: Tensor, weight: Tensor) -> Tensor:
    """``sum w CE / sum w`` over the pixels with a pseudo-label (255: none); 0 when the weights sum to 0.

    logits B,C,H,W ; pseudo B,H,W ; weight B,H,W (no gradient) -> 0-dim.
    """
    ce = F.cross_entropy(logits.float(), pseudo, ignore_index=IGNORE, reduction="none")  # B,H,W
    w = weight.detach().float() * (pseudo != IGNORE)
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def copy_paste(image: Tensor, labels: Tensor, classes: Tensor, apply: Tensor) -> tuple[Tensor, Tensor]:
    """Paste onto each image i with ``apply[i]`` the pixels of image (i+1) mod B labeled one of ``classes``.

    image B,3,H,W ; labels B,H,W ; classes C bool ; apply B bool. An empty ``classes`` changes nothing.
    """
    src_img, src_lab = image.roll(-1, 0), labels.roll(-1, 0)
    known = src_lab != IGNORE
    take = known & classes[src_lab.masked_fill(~known, 0)] & apply.view(-1, 1, 1)  # B,H,W
    return torch.where(take.unsqueeze(1), src_img, image), torch.where(take, src_lab, labels)


def acm_boxes(pred: Tensor, classes: Tensor, min_area: float, presence_area: float) -> tuple[Tensor, Tensor]:
    """ACM's paste boxes and source images. pred B,H,W class ids (255: none) ; classes B -> B,1,H,W ; B long.

    For image i and its class c: the source is drawn among the other images whose map holds at least
    ``presence_area`` of the image in c (among all other images when none does; itself when B = 1); the box
    is the bounding box of a random 8-connected component of c in the source with more than ``min_area`` of
    the image, or a random box of half the image when there is none. Random draws from torch's CPU generator.
    """
    b, h, w = pred.shape
    maps, cls = pred.cpu().numpy(), classes.cpu().tolist()
    mask = torch.zeros(b, 1, h, w)
    src = torch.zeros(b, dtype=torch.long)
    for i, c in enumerate(cls):
        others = [j for j in range(b) if j != i] or [i]
        holders = [j for j in others if (maps[j] == c).sum() >= presence_area * h * w]
        pool = holders or others
        j = pool[int(torch.randint(len(pool), ()))]
        n, _, stats, _ = cv2.connectedComponentsWithStats((maps[j] == c).astype(np.uint8), connectivity=8)
        big = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] > min_area * h * w]
        if big:
            x0, y0, bw, bh = stats[big[int(torch.randint(len(big), ()))], :4].tolist()
            mask[i, 0, y0 : y0 + bh, x0 : x0 + bw] = 1.0
        else:
            mask[i] = box_mask_xor(1, h, w, "cpu", n_boxes=1, area_range=(0.5, 0.5))[0]
        src[i] = j
    return mask.to(pred.device), src.to(pred.device)


def _take(x: Tensor, src: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the masked pixels of image i taken from image ``src[i]``. B,C,H,W or B,H,W ; B ; B,1,H,W."""
    m = mask.bool() if x.dim() == 4 else mask.bool().squeeze(1)
    return torch.where(m, x[src], x)


# ------------------------------------------------------------------------------------------------- method
@METHODS.register("u2pl_ael")
class U2PLAEL(U2PL):
    Config = U2PLAELConfig
    MIXINGS: ClassVar[tuple[str, ...]] = ("acm", *U2PL.MIXINGS)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {**U2PL.loss_terms, "loss_unsup_lab": ("student",)}

    def __init__(self, cfg: U2PLAELConfig, model_cfg, info: RunInfo) -> None:
        c = info.num_classes
        bad = [k for k in cfg.acp_exclude if not 0 <= k < c]
        if bad or len(set(cfg.acp_exclude)) == c:
            what = f"{bad} are not class ids of this {c}-class dataset" if bad else "excludes every class"
            raise ConfigError(f"method.acp_exclude: {what}")
        super().__init__(cfg, model_cfg, info)
        self.register_buffer("class_conf", torch.full((c,), 1.0 / c))  # the confidence bank, checkpointed
        allowed = torch.ones(c, dtype=torch.bool)
        allowed[cfg.acp_exclude] = False
        self.register_buffer("acp_allowed", allowed, persistent=False)
        self.contra_start = cfg.contra_start_epochs * info.iters_per_epoch

    def phases(self) -> list[tuple[str, int, int]]:
        start = max(self.sup_only_steps, min(self.contra_start, self.info.max_iters))
        if not self.cfg.contrastive or start == self.sup_only_steps:
            return super().phases()
        what = f"no contrastive loss yet (contra_start_epochs={self.cfg.contra_start_epochs})"
        return [*super().phases(), (what, self.sup_only_steps, start)]

    @torch.no_grad()
    def _update_conf(self, logits: Tensor, labels: Tensor) -> None:
        """The confidence bank's step, from the student's labeled predictions (summed over processes)."""
        sums, counts = class_confidence(logits.detach().float().softmax(1), labels)
        both = dist.all_reduce_sum(torch.cat([sums, counts]))
        c = self.class_conf.numel()
        self.class_conf.copy_(update_confidence(self.class_conf, both[:c], both[c:], self.cfg.conf_momentum))

    def _copy_paste(self, image: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        probs = difficulty_probs(self.class_conf, self.acp_allowed, power=0.5)
        drawn = torch.multinomial(probs, self.cfg.acp_classes, replacement=True)
        classes = torch.zeros_like(self.acp_allowed).index_fill_(0, drawn, True)
        apply = torch.rand(image.shape[0], device=image.device) < self.cfg.acp_prob
        return copy_paste(image, labels, classes, apply)

    def _mix(self, x_s: Tensor, logits_t: Tensor, rep_t: Tensor, pseudo: Tensor, true: Tensor | None):
        """ACM (``mixing: acm``), the whole batch mixed with probability ``mix_prob``; U2PL's otherwise."""
        if self.cfg.mixing != "acm":
            return super()._mix(x_s, logits_t, rep_t, pseudo, true)
        drawn = torch.multinomial(difficulty_probs(self.class_conf), x_s.shape[0], replacement=True)
        mask, src = acm_boxes(pseudo, drawn, self.cfg.acm_area, self.cfg.acm_presence_area)
        mask = mask * (torch.rand(1, device=x_s.device) < self.cfg.mix_prob)
        rep_t = _take(rep_t, src, _nearest(mask, rep_t.shape[-2:]))
        true = None if true is None else _take(true, src, mask)
        return _take(x_s, src, mask), _take(logits_t, src, mask), rep_t, _take(pseudo, src, mask), true

    def _equalized(self, logits_s: Tensor, logits_t: Tensor, pseudo: Tensor, rates: Tensor | None) -> Tensor:
        """AEL's CE of the student against teacher pseudo-labels (255 kept), re-weighted and sampled."""
        q = logits_t.float().softmax(1).amax(1)  # B,H,W teacher confidence
        pseudo = pseudo.masked_fill(q < self.cfg.conf_thresh, IGNORE)
        weight = q.pow(self.cfg.gamma)
        if rates is not None:  # keep pixel i with probability s of its student class
            weight = weight * (torch.rand_like(q) < rates[class_map(logits_s.detach())])
        return equalized_ce(logits_s, pseudo, weight)

    def training_step(self, batch: dict[str, dict[str, Tensor]], step: int) -> dict[str, Tensor]:
        """ACP on the labeled batch, U2PL's step (with the hooks below), the bank's statistics."""
        if self.cfg.acp:
            lab = batch["labeled"]
            image, mask = self._copy_paste(lab["image"], lab["mask"])
            batch = {**batch, "labeled": {**lab, "image": image, "mask": mask}}
        terms = super().training_step(batch, step)
        # U2PL's warm-up has no teacher: no labeled term either
        terms.setdefault("loss_unsup_lab", torch.zeros_like(terms["loss_unsup"]))
        return {**terms, **self._bank_stats()}

    def supervised(self, out: dict[str, Tensor], y_l: Tensor) -> Tensor:
        """U2PL's supervised loss; the confidence bank learns from the same predictions (from the start)."""
        self._update_conf(out["logits"], y_l)
        return super().supervised(out, y_l)

    def unsup_terms(self, logits: Tensor, t: TeacherPass) -> dict[str, Tensor]:
        """AEL's equalized CE in place of U2PL's: on the mixed unlabeled images against the pseudo-labels
        less the unreliable pixels (``loss_unsup``), and on the labeled images against the teacher's own
        predictions (``loss_unsup_lab``); both sampled by the bank's rates of this step."""
        n_l = t.logits_l.shape[0]
        rates = sampling_rates(self.class_conf, self.cfg.gamma2) if self.cfg.sample else None
        pseudo = t.pseudo.masked_fill(t.unreliable, IGNORE)
        return {
            "loss_unsup": self._equalized(logits[n_l:], t.logits_u, pseudo, rates),
            "loss_unsup_lab": self._equalized(logits[:n_l], t.logits_l, class_map(t.logits_l), rates),
        }

    def _bank_stats(self) -> dict[str, Tensor]:
        """The confidence bank's lowest and mean class confidence (how unequal the classes are)."""
        return {"conf_min": self.class_conf.min(), "conf_mean": self.class_conf.mean()}
