"""Methods registry. Each method lives in one file and registers itself; importing them here fills it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from . import (  # noqa: F401  (registers)
    advsemseg,
    ael,
    cam,
    cct,
    classifier,
    cps,
    cutmix_seg,
    fixmatch,
    gct,
    mean_teacher,
    mil,
    pseudoseg,
    psl,
    ripu,
    self_training,
    stc,
    supervised,
    u2pl,
    vat,
)
from .base import METHODS, Method, MethodConfig, RunInfo

__all__ = ["METHODS", "Method", "MethodConfig", "RunInfo", "build_method", "method_schema"]


def method_schema(name: str) -> DictConfig:
    """The structured config of the method called ``name`` (KeyError naming the known ones otherwise)."""
    return OmegaConf.structured(METHODS.get(name).Config)


def build_method(cfg: DictConfig, info: RunInfo) -> Method:
    method_cfg = OmegaConf.to_object(cfg.method)
    return METHODS.get(cfg.method.name)(method_cfg, cfg.model, info)
