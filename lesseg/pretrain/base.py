"""What the self-supervised methods share: the registry, the student network and the method contract.

A method is an nn.Module holding ``student`` (the encoder and its projection heads: the one trainable part,
the one DDP wraps) and whatever else it keeps (a momentum encoder, memory banks). ``training_step(batch)``
returns ``{"loss": ..., named terms...}`` from a batch of two views (``view0``, ``view1``: B,3,S,S);
``after_step()`` updates what gradients do not. The pretraining's product is ``student.encoder``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import Registry
from .config import PretrainConfig

SSL_METHODS: Registry[type[SSLMethod]] = Registry("pretraining method")


class Student(nn.Module):
    """A timm ``features_only`` encoder and projection heads on its last feature map.

    Forward: ``feat`` (B,hw,C: the last feature map, one row per location), and per head ``global`` (B,D: the
    head on the average-pooled map) and ``dense`` (B,hw,D: the head at every location)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feat = self.encoder(x)[-1].flatten(2).transpose(1, 2)  # B,C,h,w -> B,hw,C
        out = {"feat": feat}
        if "global" in self.heads:
            out["global"] = self.heads["global"](feat.mean(1))  # B,D
        if "dense" in self.heads:
            out["dense"] = self.heads["dense"](feat)  # B,hw,D (the heads are per-vector MLPs)
        return out


def channels(encoder: nn.Module) -> int:
    """Channels of the encoder's last feature map (the heads' input)."""
    return encoder.feature_info.channels()[-1]


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return getattr(net, "module", net)


class SSLMethod(nn.Module):
    """Base class: subclasses build ``self.student`` and implement ``training_step``."""

    student: nn.Module

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def encoder(self) -> nn.Module:
        return unwrap(self.student).encoder

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Updates outside the optimizer step (EMA encoders); nothing by default."""
