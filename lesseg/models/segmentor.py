"""Segmentor = timm feature encoder + decode head + optional representation/classification/auxiliary heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lesseg.errors import ConfigError
from lesseg.models.heads import (
    ClassificationHead,
    DeepLabV2Head,
    DeepLabV3PlusHead,
    FCNHead,
    RepresentationHead,
)
from lesseg.models.pretrained import load_pretrained
from lesseg.registry import Registry

if TYPE_CHECKING:
    from lesseg.config import ModelConfig

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # DeepLab-v3: rates double when the output stride halves

HeadFactory = Callable[["ModelConfig", list[int], list[int], int], nn.Module]
HEADS: Registry[HeadFactory] = Registry("segmentation head")


@HEADS.register("deeplabv3plus")
def _deeplabv3plus(
    cfg: ModelConfig, channels: list[int], reductions: list[int], num_classes: int
) -> nn.Module:
    if 4 not in reductions:
        raise ConfigError(
            f"model.head=deeplabv3plus needs a stride-4 feature; encoder {cfg.encoder!r} has strides {reductions}"
        )
    low = max(i for i, r in enumerate(reductions) if r == 4)
    return DeepLabV3PlusHead(
        channels[-1],
        channels[low],
        low,
        num_classes,
        channels=cfg.decoder_channels,
        rates=ASPP_RATES[cfg.output_stride],
        dropout=cfg.dropout,
    )


@HEADS.register("deeplabv2")
def _deeplabv2(cfg: ModelConfig, channels: list[int], reductions: list[int], num_classes: int) -> nn.Module:
    return DeepLabV2Head(channels[-1], num_classes)


def class_map(scores: Tensor) -> Tensor:
    """Per-pixel class of B,C,H,W scores (logits or probabilities) -> B,H,W, the first maximum on ties.

    ``max(1).indices`` rather than ``argmax(1)``: the same result, but torch's CPU argmax over a dimension
    that is not the innermost is about 12x slower (10.5 vs 0.9 ms for 16x7x64x64).
    """
    return scores.max(1).indices


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Segmentor(nn.Module):
    """Encoder + decode head; `forward` returns a dict of named outputs.

    Keys: `logits` (B,C,H,W at input size), `feat` (B,D,h,w decoder features before the classifier), and
    when the heads exist `rep` (B,rep_dim,h,w), `cls` (B,C image logits), `aux` (B,C,H,W from stage 3).
    `freeze_bn` keeps the encoder's BatchNorm layers in eval mode with frozen affine parameters (DeepLab-v2 /
    RIPU); the heads' BatchNorm layers start from random statistics and always train.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        num_classes: int,
        *,
        rep_head: RepresentationHead | None = None,
        cls_head: ClassificationHead | None = None,
        aux_head: FCNHead | None = None,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.rep_head = rep_head
        self.cls_head = cls_head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for bn in self._encoder_batchnorms():
                bn.requires_grad_(False)

    def _encoder_batchnorms(self) -> list[nn.Module]:
        return [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> Segmentor:
        """Set train/eval mode; with `freeze_bn` the encoder's BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for bn in self._encoder_batchnorms():
                bn.eval()
        return self

    def forward(
        self, x: Tensor, perturb: Callable[[list[Tensor]], list[Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """``perturb``: applied to the encoder features before the heads (feature perturbation, UniMatch); it
        may append perturbed copies to the batch, and every output then has its batch size."""
        size = (x.shape[-2], x.shape[-1])  # x: B,3,H,W
        features = self.encoder(x)  # list of B,K_i,h_i,w_i, shallow to deep
        if perturb is not None:
            features = perturb(features)
        feat, logits = self.head(features)  # B,D,h,w ; B,C,h,w
        out = {"logits": _upsample(logits, size), "feat": feat}
        if self.rep_head is not None:
            out["rep"] = self.rep_head(feat)  # B,rep_dim,h,w
        if self.cls_head is not None:
            out["cls"] = self.cls_head(features[-1])  # B,C
        if self.aux_head is not None:
            out["aux"] = _upsample(self.aux_head(features[-2]), size)  # B,C,H,W
        return out

    def cam(self, x: Tensor) -> Tensor:
        """Raw class activation maps of the classification head on the last encoder feature, B,C,h,w."""
        if self.cls_head is None:
            raise ConfigError("class activation maps need the classification head (model.cls_head=true)")
        return self.cls_head.cam(self.encoder(x)[-1])

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the pretrained encoder (base learning rate)."""
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the encoder (the trainer gives them `lr x head_lr_mult`)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]


def create_encoder(name: str, output_stride: int) -> nn.Module:
    """A timm `features_only` encoder (random init) whose last stages are dilated to `output_stride`."""
    import timm  # here, not at the top: commands that build no network (data stats|check) skip its import

    if output_stride not in ASPP_RATES:
        raise ConfigError(f"model.output_stride must be 8 or 16, got {output_stride}")
    if not timm.is_model(name):
        raise ConfigError(f"model.encoder {name!r} is not a timm model name")
    try:
        encoder = timm.create_model(name, features_only=True, output_stride=output_stride, pretrained=False)
    except Exception as e:  # timm signals "no features_only / no dilation" with several exception types
        raise ConfigError(
            f"timm cannot build encoder {name!r} with features_only=True, output_stride={output_stride}: {e}"
        ) from e
    if encoder.feature_info.reduction()[-1] != output_stride:
        raise ConfigError(
            f"encoder {name!r} ignores output_stride={output_stride}: "
            f"its feature strides are {encoder.feature_info.reduction()}"
        )
    return encoder


def build_model(cfg: ModelConfig, num_classes: int) -> Segmentor:
    """Build the Segmentor described by `cfg` for `num_classes` classes, loading `cfg.pretrained` if set."""
    if cfg.head not in HEADS:
        raise ConfigError(f"unknown model.head {cfg.head!r}; known: {', '.join(HEADS.names())}")
    encoder = create_encoder(cfg.encoder, cfg.output_stride)
    load_pretrained(encoder, cfg)
    channels = encoder.feature_info.channels()
    reductions = encoder.feature_info.reduction()
    head = HEADS.get(cfg.head)(cfg, channels, reductions, num_classes)
    return Segmentor(
        encoder,
        head,
        num_classes,
        rep_head=RepresentationHead(head.out_channels, cfg.rep_dim) if cfg.rep_head else None,
        cls_head=ClassificationHead(channels[-1], num_classes) if cfg.cls_head else None,
        aux_head=FCNHead(channels[-2], num_classes, cfg.decoder_channels, cfg.dropout)
        if cfg.aux_head
        else None,
        freeze_bn=cfg.freeze_bn,
    )


@contextmanager
def eval_mode(net: nn.Module):
    """``net.eval()`` for the block, then every submodule back in its own mode: a network whose modes are
    mixed (an EMA teacher in eval mode with BatchNorm layers training) comes back mixed, not all one way."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def batchnorm_groups(net: nn.Module, sizes: Sequence[int], join: int = 0):
    """For the block, every training BatchNorm layer of ``net`` normalises each group of consecutive samples
    (``sizes`` along dim 0) with that group's own batch statistics and updates its running statistics once per
    group: what forwarding each group alone would do, in one forward call (one DDP forward per backward; a
    SyncBatchNorm layer syncs each group's statistics). Samples a network appends beyond ``sum(sizes)`` (a
    feature-perturbation stream of some of group ``join``'s images, concatenated inside the decoder) join
    group ``join``, as when the perturbed features are decoded with their clean ones (UniMatch's code); a
    layer seeing fewer samples than ``sum(sizes)`` is an error. Layers in eval mode (running statistics) are
    unchanged.

    Semi-supervised methods forward ``[labeled, unlabeled views]`` together: normalised with the whole
    batch's statistics, the labeled images take statistics shifted by the strongly augmented unlabeled ones
    (docs/benchmarks.md, "BatchNorm statistics per view")."""
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batchnorm_groups needs positive group sizes, got {sizes}")
    if not 0 <= join < len(sizes):
        raise ValueError(f"batchnorm_groups: join={join} names no group of {sizes}")
    patched = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            previous = m.__dict__.get("forward")  # an enclosing batchnorm_groups' patch, if any
            m.forward = _grouped_forward(m, previous or type(m).forward.__get__(m), sizes, join)
            patched.append((m, previous))
    try:
        yield net
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def _grouped_forward(module: nn.Module, forward: Callable[[Tensor], Tensor], sizes: list[int], join: int):
    total = sum(sizes)

    def run(x: Tensor) -> Tensor:
        if not module.training or len(sizes) == 1:
            return forward(x)
        n = x.shape[0]
        if n < total:
            raise ValueError(f"{type(module).__name__}: batch of {n} samples, fewer than the groups {sizes}")
        parts = list(x.split(sizes + [n - total]))
        extra = parts.pop()
        outs = []
        for k, p in enumerate(parts):
            if k == join and extra.shape[0]:  # appended samples: normalised with group ``join``
                both = forward(torch.cat([p, extra]))
                outs.append(both[: sizes[k]])
                extra = both[sizes[k]:]
            else:
                outs.append(forward(p))
        return torch.cat([*outs, extra])

    return run
