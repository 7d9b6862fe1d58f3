"""The config of ``lesseg pretrain``: a lesseg config (``data``, ``model``, ``train``, ... as ``lesseg train``
reads them, so a training config works as it is) plus a ``pretrain`` section, validated alike: an unknown key,
a wrongly typed value or a number outside its range is one ConfigError naming it.

What the pretraining reads from the other sections: ``data`` (dataset, root, options, mean/std, workers,
check; ``data.aug``: flips, rotation and photometric strengths of the views), ``model`` (encoder,
output_stride, and ``pretrained``: weights to start from), ``train`` (device, seed, deterministic, amp,
sync_bn, progress) and ``out`` (the run folder). Everything else is the ``pretrain`` section's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import config
from ..config import Config, ranged
from ..errors import ConfigError


@dataclass
class PretrainConfig:
    method: str = "densecl"  # simclr (image-level) | densecl (image- and pixel-level, momentum encoder)
    # the images: data.streams.<stream>'s dataset, root, options and split; None: data.dataset/root/options
    stream: str | None = None
    split: str | None = (
        None  # a split name or split file (labeled or not); None: the stream's split, else train
    )
    iters: int = ranged(0, "[0, inf)")  # optimizer steps; 0: use epochs
    epochs: int = ranged(0, "[0, inf)")  # passes over the images (used when iters == 0)
    batch_size: int = ranged(32, "[2, inf)")  # images per process, two views each
    image_size: int = ranged(64, "[16, inf)")  # side of the square views (random resized crops)
    min_scale: float = ranged(0.2, "(0, 1]")  # smallest crop area, as a fraction of the image
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = ranged(1e-3, "(0, inf)")
    weight_decay: float = ranged(1e-4, "[0, inf)")
    sgd_momentum: float = ranged(0.9, "[0, 1)")
    warmup_iters: int = ranged(0, "[0, inf)")  # linear warmup, then cosine decay
    temperature: float = ranged(0.2, "(0, inf)")
    proj_dim: int = ranged(128, "[1, inf)")  # output of the projection heads
    # densecl: negatives kept in each memory bank; 0: the batch's; None: an eighth of the images, at most 4096
    # (``queue_for``: a bank as large as the image set holds older keys of each image, negatives of itself)
    queue_size: int | None = ranged(None, "[0, inf)")
    ema: float = ranged(0.99, "[0, 1]")  # densecl: momentum of the key encoder
    dense_weight: float = ranged(0.5, "[0, 1]")  # densecl: weight of the dense term (0: MoCo v2, image-level)
    log_every: int = ranged(10, "[1, inf)")
    ckpt_every: int = ranged(0, "[0, inf)")  # 0: at the end only


@dataclass
class PretrainRun(Config):
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


OPTIMIZERS = ("adamw", "sgd")
QUEUE_MAX, QUEUE_SHARE = 4096, 8


def queue_for(queue_size: int | None, images: int) -> int:
    """The memory bank's size: ``queue_size`` when set, else ``images // 8`` capped at 4,096 (MoCo's and
    DenseCL's banks hold 5-8 % of ImageNet's or CIFAR's images: a key in the bank is almost never an older
    view of the query's own image, which a bank of as many keys as images would make every image's negative)."""
    return queue_size if queue_size is not None else min(QUEUE_MAX, images // QUEUE_SHARE)


def build(layers: list[dict], overrides: list[str] = (), where: str = "config") -> DictConfig:
    """Merge dict layers and ``key=value`` overrides onto the schema, then validate."""
    from .base import SSL_METHODS

    cfg = OmegaConf.structured(PretrainRun)
    for source, layer in [(where, x) for x in layers] + [(f"override {o!r}", o) for o in overrides]:
        if isinstance(layer, str):
            if "=" not in layer:
                raise ConfigError(f"override {layer!r} must look like key=value")
            layer = OmegaConf.from_dotlist([layer])
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise config._explain(e, source) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise config._explain(e, where) from None
    errors = config.range_errors(PretrainRun, cfg)
    p = cfg.pretrain
    if p.iters <= 0 and p.epochs <= 0:
        errors.append("set pretrain.iters or pretrain.epochs to a positive number")
    if p.method not in SSL_METHODS:
        errors.append(f"pretrain.method must be one of {', '.join(SSL_METHODS.names())}, not {p.method!r}")
    if p.optimizer not in OPTIMIZERS:
        errors.append(f"pretrain.optimizer must be one of {', '.join(OPTIMIZERS)}, not {p.optimizer!r}")
    if p.stream is not None and p.stream not in cfg.data.streams:
        errors.append(f"pretrain.stream {p.stream!r} is not in data.streams ({', '.join(cfg.data.streams)})")
    if cfg.train.amp not in ("auto", "none", "bf16", "fp16"):
        errors.append(f"train.amp must be auto, none, bf16 or fp16, not {cfg.train.amp!r}")
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """A YAML config (with its optional ``base:``; packaged ones by name, ``shapes/pretrain_ssl.yaml``) and
    overrides; ``out`` defaults to ``runs/pretrain_<config name>``."""
    path = config.resolve_path(path)
    cfg = build(config._raw_layers(path), list(overrides), where=str(path))
    if cfg.out is None:
        OmegaConf.set_readonly(cfg, False)
        cfg.out = str(Path("runs") / f"pretrain_{path.stem}")
        OmegaConf.set_readonly(cfg, True)
    return cfg


def from_dict(data: dict, overrides: list[str] = ()) -> DictConfig:
    """A config from a plain dict (the Python API and tests)."""
    return build([data], list(overrides))
