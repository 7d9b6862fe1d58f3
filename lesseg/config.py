"""Typed configuration: YAML (+ one ``base:`` level) + ``key=value`` overrides, validated by OmegaConf.

Every default lives in the dataclasses below (never in ``cfg.get(k, default)`` calls). An unknown key, a
wrongly typed value or a number outside its field's range (declared with :func:`ranged`) is one
:class:`ConfigError` naming it. The ``method`` section is validated against the
config dataclass of the method it names (each method file declares its own, see ``lesseg.methods``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def ranged(default: Any, interval: str) -> Any:
    """A dataclass field whose number (or each number of its list) must lie in ``interval``, written as in
    mathematics: ``"[1, inf)"``, ``"(0, 1]"``. ``None`` is not checked (it means "derived" or "unset")."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    bounds = (lo, interval[0] == "[", hi, interval[-1] == "]", interval)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": bounds})
    return field(default=default, metadata={"range": bounds})


def _in_range(x: float, bounds: tuple) -> bool:
    lo, lo_closed, hi, hi_closed, _ = bounds
    if isinstance(x, float) and math.isnan(x):
        return False
    return (x >= lo if lo_closed else x > lo) and (x <= hi if hi_closed else x < hi)


def range_errors(schema: type, node: Any, prefix: str = "") -> list[str]:
    """Every ``key: value not in interval`` of ``node`` (a config section) against the ranges declared in
    ``schema`` (its dataclass), nested sections and dicts of sections (``data.streams.*``) included."""
    errors = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value, key = node[f.name], f"{prefix}{f.name}"
        bounds = f.metadata.get("range")
        if bounds is not None and value is not None:
            values = list(value) if not isinstance(value, (int, float)) else [value]
            bad = [v for v in values if not _in_range(v, bounds)]
            if bad:
                errors.append(f"{key} must be in {bounds[4]}, got {value if len(values) == 1 else bad[0]}")
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            errors += range_errors(hint, value, f"{key}.")
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            for k, sub in value.items():
                errors += range_errors(typing.get_args(hint)[1], sub, f"{key}.{k}.")
    return errors


@dataclass
class StreamConfig:
    """One named stream of training batches ("labeled", "unlabeled", "source", "target", ...)."""

    split: str = "train"  # a split name, a split file, or a difference "train - labeled" (train minus labeled)
    batch_size: int = ranged(8, "[1, inf)")  # per process
    labeled: bool = True  # read masks; False gives only a `valid` map (padding excluded)
    strong: bool = False  # also return a strongly augmented copy sharing the weak view's geometry
    # unlabeled streams of benchmark data whose masks exist: also read them as `true_mask`, only to log the
    # pseudo-labels' quality during training (pl_acc, pl_miou, ...); no method trains on them
    true_masks: bool = False
    dataset: str | None = None  # None: data.dataset (a stream may come from another dataset, e.g. DA)
    root: str | None = None  # None: data.root
    options: dict[str, Any] | None = None  # over data.options (a stream of another dataset: its own only)
    # this stream's own geometry (e.g. RIPU: source crops 1280x720, target 1280x640): None: data.crop_size
    crop_size: list[int] | None = ranged(None, "[1, inf)")
    aug: dict[str, Any] = field(default_factory=dict)  # overrides of data.aug for this stream (same keys)


@dataclass
class AugConfig:
    scale: list[float] = ranged([0.5, 2.0], "(0, inf)")  # random rescale range
    base_size: int | None = ranged(None, "[1, inf)")  # resize so the long side is this before random scaling; None: native
    hflip: bool = True
    vflip: bool = False  # for data without an up/down (aerial, microscopy, shapes)
    rotate: float = ranged(0.0, "[0, 180]")  # random rotation in [-rotate, rotate] degrees (corners: image 0, mask ignore)
    color_jitter: float = ranged(0.5, "[0, inf)")  # strong view: brightness/contrast/saturation strength (hue = strength/2)
    color_jitter_p: float = ranged(0.8, "[0, 1]")
    grayscale_p: float = ranged(0.2, "[0, 1]")
    blur_p: float = ranged(0.5, "[0, 1]")
    # labeled streams: chance that an image gets the pixels of one class of another image of its stream pasted
    # on, both through the stream's geometry (Simple Copy-Paste, Ghiasi et al. 2021; AEL's copy-paste without
    # its class weighting). Unlabeled streams have no masks to cut from and ignore it.
    copy_paste: float = ranged(0.0, "[0, 1]")
    paste_exclude: list[int] = field(default_factory=lambda: [0])  # never pasted (0: VOC-style background)


@dataclass
class DataConfig:
    dataset: str = "shapes"  # registry name: shapes, folder, voc, cityscapes, gtav, synthia
    root: str = "data/shapes"
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific options (e.g. binary_mask)
    crop_size: list[int] = ranged([64, 64], "[1, inf)")  # H, W of training crops
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = ranged(IMAGENET_STD, "(0, inf)")
    workers: int = ranged(2, "[0, inf)")
    check: bool = True  # open every file of the splits before training (bad files are reported at once)
    streams: dict[str, StreamConfig] = field(default_factory=dict)  # name -> stream; the method says which it reads
    val_split: str = "val"
    aug: AugConfig = field(default_factory=AugConfig)
    # label budget (1-8, 92, ...) that split paths name as ${data.budget} (paper configs); None: not used
    budget: str | None = None


@dataclass
class ModelConfig:
    encoder: str = "resnet18"  # any timm model with features_only
    head: str = "deeplabv3plus"  # deeplabv3plus | deeplabv2
    output_stride: int = 16
    pretrained: str | None = None  # imagenet | timm:[ARCH.]TAG | a local checkpoint (models/pretrained.py)
    # load a checkpoint of another encoder for what matches (otherwise refused, naming what differs)
    pretrained_partial: bool = False
    decoder_channels: int = ranged(256, "[1, inf)")
    dropout: float = ranged(0.1, "[0, 1)")
    rep_head: bool = False
    rep_dim: int = ranged(256, "[1, inf)")
    cls_head: bool = False
    aux_head: bool = False
    freeze_bn: bool = False


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the papers' choice) | adamw (momentum and nesterov then unused)
    lr: float = ranged(0.01, "(0, inf)")
    momentum: float = ranged(0.9, "[0, 1)")
    weight_decay: float = ranged(1e-4, "[0, inf)")
    nesterov: bool = False
    head_lr_mult: float = ranged(10.0, "[0, inf)")
    poly_power: float = ranged(0.9, "[0, inf)")
    warmup_iters: int = ranged(0, "[0, inf)")
    reference_batch: int = ranged(0, "[0, inf)")  # >0: scale lr linearly by (global labeled batch / reference_batch)


@dataclass
class TrainConfig:
    iters: int = ranged(0, "[0, inf)")  # total optimizer steps; 0: use epochs
    epochs: int = ranged(0, "[0, inf)")  # passes over the longest stream (used when iters == 0)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | none | bf16 | fp16
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under multi-GPU DDP
    log_every: int = ranged(10, "[1, inf)")
    eval_every: int = ranged(0, "[0, inf)")  # 0: evaluate at the end only
    ckpt_every: int = ranged(0, "[0, inf)")  # 0: checkpoint with each evaluation and at the end
    progress: bool = True


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide | center
    crop_size: list[int] | None = ranged(None, "[1, inf)")  # slide window / center crop; None: data.crop_size
    stride: list[int] | None = ranged(None, "[1, inf)")  # slide stride; None: 2/3 of the window
    resize: list[int] | None = ranged(None, "[1, inf)")  # whole mode: resize the input to H, W and the logits back
    scales: list[float] = ranged([1.0], "(0, inf)")
    flip: bool = False
    # the score that picks best.pt: one the method's evaluation returns (segmentation: miou, acc; tags: map);
    # None: its main one
    metric: str | None = None
    batch_size: int = ranged(1, "[1, inf)")  # images of different sizes need 1


@dataclass
class Config:
    method: Any = field(default_factory=lambda: {"name": "supervised"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None  # run folder; None: runs/<config name> (packaged: runs/<family>/<config name>)
    # per-stage overrides of a multi-stage method: stages.<stage name>.<section>.<key> (e.g. the first stage's
    # stages.stage1.train.iters); the stage names are the method's (lesseg.methods.base.Method.stage_names)
    stages: dict[str, Any] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def _raw_layers(path: Path) -> list[dict]:
    """The YAML file and, when it names one, its ``base:`` file (one level; relative to the file)."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [data]
    base_path = (path.parent / base).resolve()
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise ConfigError(f"{base_path}: only one level of `base:` is supported")
    return [base_data, data]


def _explain(e: OmegaConfBaseException, where: str, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if key:
        return ConfigError(f"{where}: bad config key `{prefix}{key}`: {msg}")
    return ConfigError(f"{where}: {msg}")


def build(layers: list[dict], overrides: list[str] = (), where: str = "config", methods: bool = True) -> DictConfig:
    """Merge dict layers and ``key=value`` overrides onto the schema and validate the method section.
    ``methods=False`` leaves the method section and ``stages`` unchecked (as written, a mapping with a
    ``name``), so that commands that only read data (``lesseg data stats|check``) start without importing the
    methods (and torch); every other section is checked as usual."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, where) from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {ov!r}") from None
    try:  # interpolations (split paths naming ${data.budget}) -> their values, the ones a run uses and saves
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    method = OmegaConf.to_container(cfg.method) if isinstance(cfg.method, DictConfig) else cfg.method
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(f"{where}: `method` must be a mapping with a `name`")
    if not methods:
        errors = range_errors(Config, cfg)
        if errors:
            raise ConfigError(f"{where}: " + "; ".join(errors))
        _check(cfg, where)
        OmegaConf.set_readonly(cfg, True)
        return cfg
    from .methods import method_schema

    try:
        schema = method_schema(method["name"])
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    try:
        typed = OmegaConf.merge(schema, method)
    except OmegaConfBaseException as e:
        raise _explain(e, where, prefix="method.") from None
    cfg.method = typed
    errors = range_errors(Config, cfg) + range_errors(OmegaConf.get_type(typed), typed, "method.")
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))
    _check(cfg, where)
    _check_stages(cfg, method["name"], where)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check(cfg: DictConfig, where: str) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.train.iters <= 0 and cfg.train.epochs <= 0:
        raise ConfigError(f"{where}: set train.iters or train.epochs to a positive number")
    if cfg.optim.name not in ("sgd", "adamw"):
        raise ConfigError(f"{where}: optim.name must be sgd or adamw, not {cfg.optim.name!r}")
    if cfg.eval.mode not in ("whole", "slide", "center"):
        raise ConfigError(f"{where}: eval.mode must be whole, slide or center, not {cfg.eval.mode!r}")
    if cfg.train.amp not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"{where}: train.amp must be auto, none, bf16 or fp16, not {cfg.train.amp!r}")
    if len(cfg.data.crop_size) != 2:
        raise ConfigError(f"{where}: data.crop_size must be [H, W]")
    for name, sc in cfg.data.streams.items():
        if sc.crop_size is not None and len(sc.crop_size) != 2:
            raise ConfigError(f"{where}: data.streams.{name}.crop_size must be [H, W]")
        if sc.aug:
            try:
                merged = OmegaConf.merge(OmegaConf.structured(AugConfig), cfg.data.aug, sc.aug)
            except OmegaConfBaseException as e:
                raise _explain(e, where, prefix=f"data.streams.{name}.aug.") from None
            errors = range_errors(AugConfig, merged, f"data.streams.{name}.aug.")
            if errors:
                raise ConfigError(f"{where}: " + "; ".join(errors))
            if sc.aug.get("copy_paste") and not sc.labeled:
                raise ConfigError(f"{where}: data.streams.{name}.aug.copy_paste: stream {name!r} is unlabeled (no "
                                  "masks to cut objects from); copy-paste applies to labeled streams")


def _check_stages(cfg: DictConfig, method: str, where: str) -> None:
    """``stages.<name>.*``: a stage the method has, and keys and values the config schema accepts."""
    from .methods import METHODS

    names = METHODS.get(method).stage_names
    for name, delta in (cfg.stages or {}).items():
        if name not in names:
            raise ConfigError(f"{where}: `stages.{name}`: method {method} has the stages {', '.join(names)}")
        if not isinstance(delta, DictConfig):
            raise ConfigError(f"{where}: `stages.{name}` must be a mapping of config sections")
        if "method" in delta or "stages" in delta:
            raise ConfigError(f"{where}: `stages.{name}` may override data, model, optim, train and eval, "
                              "not method or stages")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(Config), delta)
        except OmegaConfBaseException as e:
            raise _explain(e, where, prefix=f"stages.{name}.") from None
        errors = range_errors(Config, merged)
        if errors:
            raise ConfigError(f"{where}: `stages.{name}`: " + "; ".join(errors))


PACKAGED = Path(__file__).parent / "configs"


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or else relative to the packaged configs (``shapes/u2pl.yaml``)."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    for candidate in (PACKAGED / path, PACKAGED / Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return path


def load(path: str | Path, overrides: list[str] = (), methods: bool = True) -> DictConfig:
    """Load a YAML config (with its optional ``base:``) and apply overrides (``methods``: see :func:`build`)."""
    path = resolve_path(path)
    cfg = build(_raw_layers(path), list(overrides), where=str(path), methods=methods)
    if cfg.out is None:  # a packaged config's family keeps shapes/u2pl.yaml and fashion/u2pl.yaml apart
        OmegaConf.set_readonly(cfg, False)
        packaged = path.resolve().is_relative_to(PACKAGED.resolve())
        cfg.out = str(Path("runs") / (path.parent.name if packaged else "") / path.stem)
        OmegaConf.set_readonly(cfg, True)
    return cfg


def from_dict(data: dict, overrides: list[str] = ()) -> DictConfig:
    """Build a config from a plain dict (the Python API and tests)."""
    return build([data], list(overrides), where="config")


def save(cfg: DictConfig, path: str | Path, started_from: dict | None = None) -> None:
    """Write ``cfg`` as YAML. ``started_from`` (``models.pretrained.resolve_pretrained``'s record) is written as
    a comment at the top: what ``model.pretrained`` resolved to and its sha256, while the file stays a config
    that ``lesseg train|eval`` load as it is."""
    head = ""
    if started_from:
        what = " ".join(str(started_from[k]) for k in ("source", "tag", "file") if started_from.get(k))
        head = f"# started from: {started_from['spec']} -> {what} (sha256 {started_from['sha256']})\n"
    Path(path).write_text(head + OmegaConf.to_yaml(cfg))
