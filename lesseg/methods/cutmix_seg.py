"""CutMix-Seg (methods.md section 3; French et al., BMVC 2020): Mean Teacher with mixing as the perturbation.

The teacher predicts the unlabeled batch on its weak view; its probabilities, the images and the valid maps
are mixed with the authors' CutMix mask, one box of half the image's area with a random aspect ratio (their
``--mask_prop_range=0.5`` with one box, the default of ``--boxmask_n_boxes``, in every CutMix experiment of
theirs; CPS's configs later drew three XOR'ed boxes of 0.25-0.5 from the same generator, which lesseg used for
CutMix-Seg until the nineteenth session), image i taking it from image i+1; the student predicts the mixed
images and is pulled towards the mixed teacher output. Mixing teacher probabilities of the two sources is
the same as running the teacher on each source, so one teacher forward suffices. The student sees the mixed
strong views (``student_view: strong``): the authors' code since their colour-augmentation paper (French &
Mackiewicz 2021, ``--aug_strong_colour`` in every run script) colour-jitters and greys the student's images
before mixing, the teacher's not; ``weak`` is the BMVC paper's, mixing alone. The consistency is the
authors' code's: the squared distance of the softmax vectors on every valid pixel, scaled by the batch's
share of pixels whose teacher confidence is >= 0.97, with no ramp-up (``consistency: mse_conf``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ranged
from ..errors import ConfigError
from .base import METHODS, RunInfo
from .common import hard_labels
from .mean_teacher import MeanTeacher, MeanTeacherConfig
from .mixing import box_mask_xor, check_pair_mask, classmix_mask, mix_batch


@dataclass
class CutMixSegConfig(MeanTeacherConfig):
    name: str = "cutmix_seg"
    # the authors' weighting (their code's default for every experiment: MSE, conf_thresh 0.97 without
    # conf_per_pixel, no ramp-up, which their code allows only without a threshold): the squared error on every
    # pixel, scaled by the batch's share of pixels the teacher is >= 97 % sure of, so the term grows with the
    # teacher instead of with a schedule. 300 steps from ImageNet, 1/16, two seeds: shapes 30.44 / fashion 17.74
    # against 30.59 / 16.86 with Mean Teacher's 10 % sigmoid ramp-up (docs/benchmarks.md, "CutMix-Seg's own
    # loss weighting")
    consistency: str = "mse_conf"
    rampup_steps: int | None = ranged(0, "[0, inf)")
    # the mask that mixes two unlabeled images: cutmix (the authors': one box of half the image, BOX_AREA) |
    # classmix (Olsson et al., WACV 2021: the pixels of half the classes the teacher predicts in the partner
    # image, so pasted objects stay whole)
    mixing: str = "cutmix"
    # the student's images before mixing: strong (the weak view + lesseg's strong photometric perturbation, as
    # the authors' --aug_strong_colour, their run scripts' setting since French & Mackiewicz 2021) | weak (the
    # BMVC 2020 paper's: the mixing is the only perturbation). The teacher always labels the weak views. 300 steps
    # from ImageNet, 1/16, two seeds, shapes / fashion: 30.70 / 18.31 against 30.43 / 17.48 weak; with ClassMix's
    # mask 34.07 / 18.45 against 33.34 / 17.95 (docs/benchmarks.md, "CutMix-Seg's student sees the strong views")
    student_view: str = "strong"


STUDENT_VIEWS = ("strong", "weak")

# the authors' CutMix box (Britefury/cutmix-semisup-seg run scripts: --mask_prop_range=0.5, one box): its area
# is this share of the image, its aspect ratio random, inside the image
BOX_AREA = 0.5


@METHODS.register("cutmix_seg")
class CutMixSeg(MeanTeacher):
    Config = CutMixSegConfig

    @classmethod
    def strong_streams_for(cls, cfg) -> tuple[str, ...]:
        return ("unlabeled",) if cfg.student_view == "strong" else ()

    def __init__(self, cfg: CutMixSegConfig, model_cfg, info: RunInfo) -> None:
        check_pair_mask(cfg.mixing)
        if cfg.student_view not in STUDENT_VIEWS:
            raise ConfigError(f"method.student_view must be one of {STUDENT_VIEWS}, not {cfg.student_view!r}")
        super().__init__(cfg, model_cfg, info)

    def unlabeled_views(
        self, unl: dict[str, torch.Tensor], probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixed student images (strong or weak views), mixed teacher probabilities and mixed valid map (one
        mask for all three: a box, or ClassMix's from the teacher's classes)."""
        x = unl["image_strong" if self.cfg.student_view == "strong" else "image"]  # B,3,H,W
        b, _, h, w = x.shape
        if self.cfg.mixing == "classmix":
            m = classmix_mask(hard_labels(probs, unl["valid"]))
        else:
            m = box_mask_xor(b, h, w, x.device, n_boxes=1, area_range=(BOX_AREA, BOX_AREA))  # B,1,H,W
        mixed = mix_batch({"image": x, "prob": probs, "valid": unl["valid"]}, m)
        return mixed["image"], mixed["prob"], mixed["valid"]
