"""A toy active-learning method for the engine's rounds contract: at each round it labels, in every target
image, the ``per_image`` most uncertain pixels not labeled yet, copying their labels from the ground truth,
and trains on the labeled stream plus the target pixels labeled so far.

Importing this module registers it as ``toy_active``; ``python tests/toy_active.py ARGS`` runs the lesseg
command line with it registered (the two-process test launches it under torchrun).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from lesseg.data.label_store import LabelStore
from lesseg.methods.base import METHODS, Method, RunInfo
from lesseg.methods.common import ce_loss
from lesseg.methods.supervised import SupervisedConfig
from lesseg.models import build_model


@dataclass
class ToyActiveConfig(SupervisedConfig):
    name: str = "toy_active"
    rounds: list[float] | None = None  # fractions of the run; None: [0.25, 0.5]
    per_image: int = 5


if "toy_active" not in METHODS:

    @METHODS.register("toy_active")
    class ToyActive(Method):
        Config = ToyActiveConfig
        streams = ("labeled", "target")
        label_store_streams = ("target",)
        loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss_sup": ("net",), "loss_target": ("net",)}

        def __init__(self, cfg: ToyActiveConfig, model_cfg, info: RunInfo) -> None:
            super().__init__(cfg, model_cfg, info)
            self.net = build_model(model_cfg, info.num_classes)
            self.label_store = LabelStore(info.stream_sizes.get("target", 0))  # 0: sized by a checkpoint

        def round_steps(self) -> list[int]:
            return [round(f * self.info.max_iters) for f in (self.cfg.rounds or [0.25, 0.5])]

        def run_round(self, index: int, ctx) -> dict:
            picks = []
            for item in ctx.loader("target", masks=True):
                i, image, mask = int(item["index"]), item["image"], item["mask"][0]
                size = tuple(image.shape[-2:])
                probs = ctx.predict(self.net, image)[0]  # C,H,W
                entropy = -(probs * probs.clamp_min(1e-8).log()).sum(0).cpu()
                entropy[ctx.label_store.labeled(i, size)] = -1.0  # nothing twice
                entropy[mask == 255] = -1.0
                pixels = entropy.flatten().topk(self.cfg.per_image, sorted=True).indices  # ties: lower index
                picks.append((i, pixels, mask.flatten()[pixels].to(torch.uint8), size))
            added = 0
            for shard in ctx.gather(picks):  # every process adds every pick: the stores stay equal
                for i, pixels, labels, size in shard:
                    added += ctx.label_store.add(i, pixels, labels, index, size)
            return {"pixels": added, "labeled_total": ctx.label_store.count()}

        def training_step(self, batch, step):
            lab, tgt = batch["labeled"], batch["target"]
            n = lab["image"].shape[0]
            logits = self.net(torch.cat([lab["image"], tgt["image"]]))["logits"]
            loss_sup = ce_loss(logits[:n], lab["mask"])
            loss_target = ce_loss(logits[n:], tgt["mask"])  # 0 while no target pixel is labeled
            return {"loss": loss_sup + loss_target, "loss_sup": loss_sup, "loss_target": loss_target}


if __name__ == "__main__":
    from lesseg.cli import main

    sys.exit(main(sys.argv[1:]))
