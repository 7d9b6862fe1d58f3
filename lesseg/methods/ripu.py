"""RIPU: active domain adaptation by region impurity and prediction uncertainty (methods.md section 8; Xie et
al., CVPR 2022).

One network trained on a labeled source stream and a target stream whose labels come only from the label
store: at 5 rounds inside the training (the authors: 10k, 12k, 14k, 16k, 18k of 40k steps, i.e. 25 % to
45 % of the run), every target image is scored and its best regions (RA: (2k+1)^2 squares) or pixels (PA)
are selected (lesseg.methods.active.selection) and labeled by the annotator: ``gt`` copies the target
ground truth (the paper's simulation); ``human`` pauses the run after the round's checkpoint until a person's
labels of the requested regions are imported (``lesseg active export`` / ``import``, engine/annotation.py). Loss: source CE + target CE on the labeled pixels + 0.1 local
consistency on source boundaries + 1.0 negative learning on target pixels. The source and target images go
through one forward with BatchNorm statistics per domain (``split_bn``: what the authors' two forwards do).
``score`` also gives the paper's baselines at the same budget (random, entropy-only, impurity-only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import ranged
from ..data.label_store import LabelStore
from ..errors import ConfigError
from ..models import build_model
from .active.losses import local_consistency, negative_learning
from .active.pictures import round_picture
from .active.selection import (
    baseline_scores,
    pixel_budget,
    pixel_scores,
    region_budget,
    region_scores,
    select_pixels,
    select_regions,
    tie_ranks,
)
from .active.superpixels import select_superpixels, slic_segments, superpixel_scores
from .base import METHODS, Method, RunInfo
from .common import ViewStatsConfig, ce_loss, forward_groups, split_outputs
from .supervised import SupervisedConfig, sup_loss

SCORES = ("ripu", "random", "entropy", "impurity")
TIES = ("random", "index")
ANNOTATORS = ("gt", "human")


@dataclass
class RIPUConfig(SupervisedConfig, ViewStatsConfig):
    name: str = "ripu"
    mode: str = "region"  # region (RA) | pixel (PA: single pixels)
    regions: str = "square"  # RA: square ((2k+1)^2, the paper's) | superpixel (SLIC: regions a person can label)
    superpixel_size: int = ranged(0, "[0, inf)")  # pixels per superpixel; 0: an eighth of a round's budget (>= 9)
    margin: int = ranged(0, "[0, inf)")  # RA/PA: no centre within this many pixels of the border (0: the paper)
    pictures: int = ranged(4, "[0, inf)")  # target images drawn per round into <out>/rounds/round<i>.png
    ratio: float = ranged(0.022, "(0, 1]")  # RA: share of each target image's pixels labeled over all rounds
    pixels: float = ranged(40.0, "[0, inf)")  # PA: pixels per 1280x640 image over all rounds (scaled; 0: none)
    k: int = ranged(1, "[0, inf)")  # RA: region radius (squares of (2k+1)^2)
    pa_k: int = ranged(32, "[0, inf)")  # PA: radius of the impurity window of the score
    pa_radius: int = ranged(1, "[0, inf)")  # PA: suppression radius around a labeled pixel
    rounds: list[float] = field(default_factory=lambda: [0.25, 0.30, 0.35, 0.40, 0.45])  # fractions of the run
    score: str = "ripu"  # ripu | random | entropy | impurity (the paper's baselines)
    log_norm: float | None = None  # normaliser of P and U; None: ln C (the authors use ln 19 everywhere)
    # equal scores (score 0 wherever one class is predicted around a pixel): random (seeded; they spread over
    # the image) | index (the upper-left first, as the authors' argmax: an image predicted as one class gets
    # its squares in a row along the top border; docs/benchmarks.md, "Active domain adaptation on shapes")
    ties: str = "random"
    annotator: str = "gt"  # gt: labels copied from the target ground truth (simulation); human: a person
    lc_weight: float = ranged(0.1, "[0, inf)")  # local consistency on source semantic boundaries
    nl_weight: float = ranged(1.0, "[0, inf)")  # negative learning on target pixels
    nl_tau: float = ranged(0.05, "(0, 1)")
    # BatchNorm statistics per domain in the joint forward (common.ViewStatsConfig: the groups are the source and
    # the target images): true: normalised apart, as the authors' two forward calls do (their DeepLab-v2 freezes the
    # encoder's BatchNorm; the decoder's still normalises per call); false: with the whole batch's statistics, where
    # the target images took statistics half from the source domain and the network labeled 83 % of them as one
    # class (shapes, 600 steps: source only 1.2 mIoU against 38.4 split; docs/benchmarks.md, "Active domain
    # adaptation on shapes")
    split_bn: bool = True


@METHODS.register("ripu")
class RIPU(Method):
    Config = RIPUConfig
    streams = ("source", "target")
    label_store_streams = ("target",)
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_src": ("net",), "loss_tgt": ("net",), "loss_lc": ("net",), "loss_nl": ("net",)}

    def __init__(self, cfg: RIPUConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        if cfg.mode not in ("region", "pixel"):
            raise ConfigError(f"method.mode must be region or pixel, not {cfg.mode!r}")
        if cfg.regions not in ("square", "superpixel"):
            raise ConfigError(f"method.regions must be square or superpixel, not {cfg.regions!r}")
        if cfg.regions == "superpixel" and cfg.mode != "region":
            raise ConfigError("method.regions=superpixel selects regions: it needs method.mode=region")
        if cfg.score not in SCORES:
            raise ConfigError(f"method.score must be one of {SCORES}, not {cfg.score!r}")
        if cfg.ties not in TIES:
            raise ConfigError(f"method.ties must be one of {TIES}, not {cfg.ties!r}")
        if cfg.annotator not in ANNOTATORS:
            raise ConfigError(f"method.annotator must be one of {ANNOTATORS}, not {cfg.annotator!r}")
        if not cfg.rounds or any(not 0 < f < 1 for f in cfg.rounds):
            raise ConfigError(f"method.rounds {cfg.rounds}: fractions of the run, each in (0, 1)")
        self.net = build_model(model_cfg, info.num_classes)
        self.label_store = LabelStore(info.stream_sizes.get("target", 0))  # 0: sized by a checkpoint

    def round_steps(self) -> list[int]:
        return [round(f * self.info.max_iters) for f in self.cfg.rounds]

    def phases(self) -> list[tuple[str, int, int]]:
        c = self.cfg
        shape = "superpixels" if c.regions == "superpixel" else f"{c.k * 2 + 1}x{c.k * 2 + 1} regions"
        unit = (f"{100 * c.ratio:g} % of each target image's pixels in {shape}" if c.mode == "region"
                else f"{c.pixels:g} pixels per 1280x640 target image")
        return [(f"target labels: {unit}, split over {len(self.cfg.rounds)} rounds", 0, self.info.max_iters)]

    # -- selection -----------------------------------------------------------------------------------
    def score_map(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The configured per-pixel score of one image. C,H,W logits -> H,W"""
        c = self.cfg
        if c.score != "ripu":
            return baseline_scores(c.score, logits, c.k, generator)
        if c.mode == "pixel":
            return pixel_scores(logits, c.pa_k, c.log_norm)
        return region_scores(logits, c.k, c.log_norm)[0]

    def tie_break(self, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor | None:
        """The ranks ordering equal scores (``method.ties``): a seeded random permutation, or None (index)."""
        return tie_ranks(shape, generator, device) if self.cfg.ties == "random" else None

    def select(self, score: torch.Tensor, active: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
        """H,W int64 map of the regions to label in this round of one image: region id (0, 1, ... in the order
        picked) on the selected pixels, -1 elsewhere. A PA pixel is a region of its own. ``tiebreak``: H,W ranks
        ordering equal scores (None: row-major)."""
        c, (h, w) = self.cfg, score.shape
        if c.margin:  # the network is least certain at the zero-padded border: squares there are clipped too
            m = c.margin
            inner = torch.full_like(score, -torch.inf)
            inner[m : h - m, m : w - m] = score[m : h - m, m : w - m]
            score = inner
        if c.mode == "pixel":
            picks = select_pixels(score, pixel_budget(c.pixels, len(c.rounds), (h, w)), c.pa_radius, active,
                                  tiebreak)[0]
            return _region_map(picks, 0, h, w)
        picks = select_regions(score, region_budget(h, w, c.ratio, len(c.rounds), c.k), c.k, active, tiebreak)[0]
        return _region_map(picks, c.k, h, w)

    def superpixel_size(self, h: int, w: int) -> int:
        c = self.cfg
        return c.superpixel_size or max(9, math.ceil(h * w * c.ratio / len(c.rounds) / 8))

    def pick(self, logits: torch.Tensor, active: torch.Tensor, generator: torch.Generator,
             rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's regions of this round (H,W ids, -1 elsewhere) and its H,W score map (for pictures).
        Superpixels (SLIC on ``rgb``) are scored by impurity x uncertainty over the superpixel (or the
        baseline's share of it) and taken greedily up to the round's pixel budget."""
        c, (h, w) = self.cfg, logits.shape[1:]
        if not (c.mode == "region" and c.regions == "superpixel"):
            score = self.score_map(logits, generator)
            return self.select(score, active, self.tie_break(score.shape, generator, score.device)), score
        segments = slic_segments(rgb, self.superpixel_size(h, w)).to(logits.device)
        ripu, impurity, uncertainty = superpixel_scores(logits, segments, c.log_norm)
        score = {"ripu": ripu, "impurity": impurity, "entropy": uncertainty}.get(c.score)
        if score is None:  # random
            score = torch.rand(ripu.shape, generator=generator, device=ripu.device)
        ids = select_superpixels(score, segments, math.ceil(h * w * c.ratio / len(c.rounds)), active,
                                 self.tie_break(score.shape, generator, score.device))[0]
        order = torch.full_like(score, -1, dtype=torch.long)
        order[ids] = torch.arange(ids.numel(), device=ids.device)
        return order[segments], score[segments]

    def run_round(self, index: int, ctx: Any) -> dict:
        """Score every target image (each process its shard), select, then on every process: store the gt
        annotator's labels, or the requests a person will label (the run then pauses, ``waiting``)."""
        store, picks, seconds, drawn, flat = ctx.label_store, [], 0.0, [], 0
        human = self.cfg.annotator == "human"
        generator = torch.Generator(device=ctx.device).manual_seed(round_seed(ctx.cfg.train.seed, ctx.step, index))
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (ctx.cfg.data.mean, ctx.cfg.data.std))
        for item in ctx.loader("target", masks=not human):
            i, image = int(item["index"]), item["image"]
            size = tuple(image.shape[-2:])
            rgb = ((image[0] * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            logits = ctx.predict(self.net, image)[0].clamp_min(1e-12).log()  # C,H,W (log-probabilities)
            t = time.perf_counter()
            regions, score = self.pick(logits, store.labeled(i, size).to(ctx.device), generator, rgb)
            seconds += time.perf_counter() - t
            flat += int(bool(score.max() == score.min()))  # no preference anywhere: its picks are the tie rule's
            if len(drawn) < self.cfg.pictures and ctx.main and ctx.folder is not None:
                drawn.append((rgb, score.float().cpu().numpy(), (regions >= 0).cpu().numpy()))
            regions = regions.flatten().cpu()
            pixels = (regions >= 0).nonzero().flatten()
            given = regions[pixels] if human else item["mask"][0].flatten()[pixels].to(torch.uint8)  # gt labels
            picks.append((i, pixels, given, size))
        added, images, area, total_seconds, flat_images = 0, 0, 0, 0.0, 0
        for shard, secs, n_flat in ctx.gather((picks, seconds, flat)):
            total_seconds += secs
            flat_images += n_flat
            for i, pixels, given, size in shard:
                write = store.request if human else store.add
                added += write(i, pixels, given, index, size)
                images += 1
                area += size[0] * size[1]
        if drawn:
            c = self.cfg
            what = "pixels" if c.mode == "pixel" else "superpixels" if c.regions == "superpixel" else "squares"
            round_picture(*map(list, zip(*drawn)), ctx.folder / "rounds" / f"round{index}.png",
                          f"round {index} at step {ctx.step}: {c.score} score, {what}")
        # images whose score map is one value (a network predicting one class over the whole image): RIPU
        # has nothing to prefer there and their regions follow method.ties
        record = {"images": images, "flat_score_images": flat_images,
                  "select_s_per_image": total_seconds / max(images, 1)}
        if human:
            return {**record, "requested_pixels": added, "requested_regions": (store.pending() or {}).get("regions", 0)}
        # the budget actually spent (the per-image budget is rounded up: on small images it exceeds the ratio)
        return {**record, "pixels": added, "labeled_pixels": store.count(),
                "labeled_share": store.count() / max(area, 1)}

    def waiting(self) -> str | None:
        p = self.label_store.pending()
        if p is None:
            return None
        return (f"selection round {p['round']} asks a person to label {p['regions']} regions ({p['pixels']} pixels) "
                f"in {p['images']} target images")

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch, step):
        src, tgt = batch["source"], batch["target"]
        n_s, n_t = src["image"].shape[0], tgt["image"].shape[0]
        out = forward_groups(self.net, torch.cat([src["image"], tgt["image"]]), [n_s, n_t], self.cfg.split_bn)
        out_s, out_t = split_outputs(out, n_s)
        loss_src = sup_loss(out_s, src["mask"], self.cfg)
        loss_tgt = ce_loss(out_t["logits"], tgt["mask"])  # 0 until a round has labeled target pixels
        loss_lc = local_consistency(out_s["logits"].float().softmax(1), src["mask"])
        loss_nl = negative_learning(out_t["logits"].float().softmax(1), tgt["valid"], self.cfg.nl_tau)
        loss = loss_src + loss_tgt + self.cfg.lc_weight * loss_lc + self.cfg.nl_weight * loss_nl
        return {"loss": loss, "loss_src": loss_src, "loss_tgt": loss_tgt, "loss_lc": loss_lc, "loss_nl": loss_nl}


def round_seed(seed: int, step: int, index: int) -> int:
    """The seed of a round's random draws (the random baseline's scores, the tie ranks): a function of the
    run's seed, the step and the round. Seed 0 keeps the value from before the run's seed entered it (until
    then every seed drew the same random regions); torch's CPU generator reads 32 bits of it."""
    base = 1000 * step + index
    return base if seed == 0 else int(np.random.SeedSequence([seed, base]).generate_state(1)[0])


def _region_map(centres: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """H,W region ids of the clipped (2k+1)^2 squares around ``centres`` (flat indices, in the order picked;
    id = position in that order), -1 outside. The selection keeps centres more than 2k apart, so no pixel is
    within k of two centres: a max-pool of ``id + 1`` placed at the centres gives each square its id."""
    ids = torch.zeros(h * w, device=centres.device)
    ids[centres] = torch.arange(1, centres.numel() + 1, device=centres.device, dtype=ids.dtype)
    if k:
        ids = torch.nn.functional.max_pool2d(ids.view(1, 1, h, w), 2 * k + 1, 1, k).flatten()
    return ids.view(h, w).long() - 1
