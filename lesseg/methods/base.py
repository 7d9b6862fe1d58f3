"""The Method contract: an nn.Module that owns its networks and returns its losses.

The trainer owns devices, DDP, autocast, the optimizer step, the LR schedule, logging, evaluation and
checkpoints; a method only computes losses (``training_step``) and updates non-gradient state
(``after_step``: EMA teachers). Everything a method must persist (teachers, memory banks, label stores)
is a submodule or buffer, so it is saved with ``state_dict``.

Two hooks reach beyond one training (the engine runs them; a method never imports the engine):
- ``pipeline(cfg)``: the method as a list of :class:`Stage` s (train a network, write a dataset, train
  again); one training stage by default.
- ``round_steps()`` / ``run_round(index, ctx)``: work at given steps inside a training (active learning's
  selection rounds), with an engine context that lends loaders, the device, predictions and all-gathers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry


@dataclass
class MethodConfig:
    name: str = "supervised"


@dataclass
class RunInfo:
    """Facts about the run a method may need, derived by the trainer (not configured twice)."""

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    max_iters: int = 1
    iters_per_epoch: int = 1
    stream_sizes: dict[str, int] = field(default_factory=dict)  # images per training stream


@dataclass
class Stage:
    """One step of a method's pipeline.

    A *training* stage (``run`` is None) trains the config ``config(cfg, products)`` returns; its product is
    the checkpoint ``last.pt`` of its folder. A *task* stage calls ``run(ctx)`` with an engine context
    (``ctx.folder``, ``ctx.products``, ``ctx.cfg``, loaders, networks of earlier products, predictions) and
    its product is its folder (a dataset in the folder format, say); ``run`` may return the product's
    quality (``{"pseudo_miou": ...}``), kept in the done marker and ``stages.json``. ``given``: a product made elsewhere
    (a checkpoint path): the stage is not run. ``inputs(cfg)``: the settings the product depends on, kept
    in its done marker; a finished stage whose inputs changed (or whose upstream products were remade) is
    run again. None: the whole stage config. ``skip(products)``: given the earlier stages' products, why
    this stage is unnecessary (a sentence for ``stages.json``), or None to run it (AE: once the erasing has
    stopped, the later steps). A skipped stage is not run; its product becomes a symbolic link to the
    product of the last earlier stage of its kind (training or task) that was not skipped, so later stages
    and the run's stored configs find it by the usual name. The last stage cannot be skipped.
    """

    name: str
    config: Callable[[Any, dict[str, Path]], Any] | None = None
    run: Callable[[Any], dict | None] | None = None
    given: str | None = None
    inputs: Callable[[Any], dict] | None = None
    skip: Callable[[dict[str, Path]], str | None] | None = None

    @property
    def trains(self) -> bool:
        return self.run is None


def stage_folder(out: str | Path, stages: list[Stage], k: int) -> Path:
    """Where stage ``k`` of a pipeline works: the run folder itself for the last stage (the run's product),
    ``<out>/<name>`` for the others."""
    return Path(out) if k == len(stages) - 1 else Path(out) / stages[k].name


def stage_product(out: str | Path, stages: list[Stage], k: int) -> Path:
    """The product of stage ``k``: its given checkpoint, its ``last.pt``, or its folder (task stages)."""
    stage = stages[k]
    if stage.given is not None:
        return Path(stage.given)
    folder = stage_folder(out, stages, k)
    return folder / "last.pt" if stage.trains else folder


def stage_config(cfg: Any, stages: list[Stage], k: int, products: dict[str, Path]) -> Any:
    """The config stage ``k`` runs with: its own (a training stage's ``config``, else the run's), then the
    user's ``stages.<name>`` overrides, in the stage's folder, with no stages of its own."""
    from omegaconf import OmegaConf

    from .. import config as config_mod
    from ..errors import ConfigError

    stage = stages[k]
    bare = cfg
    if cfg.stages:  # what a stage's own config derives from: the run's, without the per-stage overrides
        bare = config_mod.from_dict({**OmegaConf.to_container(cfg), "stages": {}})
    base = stage.config(bare, products) if stage.trains else bare
    d = OmegaConf.to_container(base)
    own = cfg.stages.get(stage.name) if cfg.stages else None
    if own is not None:
        d = OmegaConf.to_container(OmegaConf.merge(d, own))
    d["stages"] = {}
    d["out"] = str(stage_folder(cfg.out, stages, k))
    try:
        return config_mod.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name!r}: {e}") from None


class Method(nn.Module):
    Config: ClassVar[type] = MethodConfig
    streams: ClassVar[tuple[str, ...]] = ("labeled",)  # data streams training_step reads
    strong_streams: ClassVar[tuple[str, ...]] = ()  # streams that need a strong view
    strong_views: ClassVar[int] = 1  # independent strong views of those streams (image_strong, image_strong2)
    # the streams a user's config must define (a multi-stage method's first stages may read others)
    config_streams: ClassVar[tuple[str, ...] | None] = None  # None: ``streams``
    stage_names: ClassVar[tuple[str, ...]] = ("train",)  # the names ``pipeline`` uses (``stages.<name>.*`` keys)
    # streams whose masks come from the method's ``label_store`` (a LabelStore submodule), read afresh after
    # every round; the stream itself reads no masks from disk (``labeled: false``)
    label_store_streams: ClassVar[tuple[str, ...]] = ()
    # loss term -> the trainable networks (trainable_nets names) it must give gradient to; the contract test
    # checks each, so a term that is identically 0 or detached by mistake fails it
    loss_terms: ClassVar[dict[str, tuple[str, ...]]] = {"loss": ("net",)}
    # how the evaluated network is scored (lesseg.engine.evaluate.EVALUATORS): segmentation mIoU, or "tags"
    # (multi-label mAP of a classifier stage's ``cls`` output)
    evaluation: ClassVar[str] = "segmentation"

    @classmethod
    def strong_streams_for(cls, cfg: Any) -> tuple[str, ...]:
        """The streams that need a strong view in a run whose ``method`` section is ``cfg``: by default
        ``strong_streams``; a method whose strong view is an option narrows it here."""
        return cls.strong_streams

    @classmethod
    def pipeline(cls, cfg: Any) -> list[Stage]:
        """The stages of a run of ``cfg``; the last is the run's own training (in the run folder)."""
        return [Stage("train", config=lambda c, products: c)]

    def phases(self) -> list[tuple[str, int, int]]:
        """The schedule-dependent phases of this run, ``(description, first step, end step)``, that the
        trainer announces when training starts (warm-ups, ramp-ups), so nobody has to guess them."""
        return []

    def round_steps(self) -> list[int]:
        """Steps (optimizer steps done) after which ``run_round`` is called, increasing, below max_iters."""
        return []

    def run_round(self, index: int, ctx: Any) -> dict:
        """Round ``index`` (0-based) at step ``ctx.step``; returns numbers to log. The engine then rebuilds the
        training loaders (datasets read the label store anew) and checkpoints."""
        raise NotImplementedError(f"{type(self).__name__} declares rounds but does not implement run_round")

    def waiting(self) -> str | None:
        """What the method waits for from outside before training can go on (e.g. a round's regions that a
        person must label), or None. After a round the trainer checkpoints and pauses while this is set; a
        resume refuses to start until it clears (``lesseg active import``)."""
        return None

    def __init__(self, cfg: Any, model_cfg: Any, info: RunInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.info = info

    @classmethod
    def final_config(cls, cfg: Any) -> Any:
        """The config of the pipeline's last stage (the one the run's checkpoints store), without running any
        stage: what a finished run of ``cfg`` is compared with."""
        stages = cls.pipeline(cfg)
        products = {s.name: stage_product(cfg.out, stages, k) for k, s in enumerate(stages)}
        return stage_config(cfg, stages, len(stages) - 1, products)

    def trainable_nets(self) -> dict[str, nn.Module]:
        """Attribute name -> network trained by gradient (these, and only these, are wrapped in DDP). A stage
        that trains part of a network returns only that part (the classifier method: encoder + classification
        head, no decode head), so every wrapped parameter gets gradient and DDP never needs
        ``find_unused_parameters`` (lesseg never sets it)."""
        return {"net": self.net}

    def eval_net(self) -> nn.Module:
        """The network evaluated, exported and used for prediction."""
        return self.net

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        """Losses for one step: ``{"loss": total, <named terms>...}`` (0-dim tensors)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimizer step (EMA updates, schedules)."""

    def param_groups(self) -> list[dict]:
        """Encoder parameters at the base LR, everything else at ``head_lr_mult`` x (set by the trainer). A
        group may carry its own ``lr_mult``: the trainer multiplies it by ``head_lr_mult`` where ``head`` is
        true, and uses it as it is otherwise."""
        groups = []
        own = self.group_options()
        for name, net in self.trainable_nets().items():
            net = getattr(net, "module", net)  # DDP-wrapped
            enc = [p for p in net.encoder_parameters() if p.requires_grad]
            head = [p for p in net.head_parameters() if p.requires_grad]
            pair = [{"params": enc, "lr_mult": 1.0, "head": False}, {"params": head, "head": True}]
            groups += [{**g, **own.get(name, {})} for g in pair]
        return [g for g in groups if g["params"]]

    def group_options(self) -> dict[str, dict]:
        """Optimizer settings of particular trainable networks (``trainable_nets`` name -> options for all its
        parameter groups), e.g. a discriminator's ``{"lr_mult": 0.4, "head": False, "weight_decay": 0.0}``:
        its own learning rate as a multiple of the base LR and no weight decay."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")
