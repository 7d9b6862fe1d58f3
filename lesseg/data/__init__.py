"""Data layer: dataset sources (on-disk formats), augmentation, named training streams, evaluation sets."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, DataError
from . import fashion, shapes  # noqa: F401  (fashion registers the `fashion` source)
from . import sources as _sources  # noqa: F401  (register the sources; build_streams has a local `sources`)
from .base import IGNORE, SOURCES, Sample, SegSource
from .check import batch_problem, require_clean, scan

if TYPE_CHECKING:
    from .loader import SegDataset, Stream

# the loaders (torch, torchvision) are imported on first use, so that `lesseg data stats|check` and config
# loading start without them
_LOADER_NAMES = ("SegDataset", "Stream", "eval_loader")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "IGNORE",
    "SOURCES",
    "Sample",
    "SegDataset",
    "SegSource",
    "Stream",
    "batch_problem",
    "build_eval_dataset",
    "build_source",
    "build_streams",
    "eval_loader",
    "scan",
    "stream_source",
]


@lru_cache(maxsize=16)
def _source(dataset: str, root: str, options: tuple) -> SegSource:
    try:
        cls = SOURCES.get(dataset)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    return cls(root, **dict(options))


def build_source(dataset: str, root: str, options: dict | None = None) -> SegSource:
    """The (cached) source of a dataset; options are the dataset's own (e.g. ``binary_mask``)."""
    return _source(dataset, str(root), tuple(sorted((options or {}).items())))


def stream_source(data: DictConfig, stream: DictConfig | None = None) -> SegSource:
    """The source of a stream: its own dataset/root/options where set, otherwise ``data``'s."""
    own = stream is not None and stream.dataset and stream.dataset != data.dataset  # another dataset
    dataset = stream.dataset if own else data.dataset
    root = (stream.root if stream is not None and stream.root else None) or data.root
    # options are the dataset's own: a stream of another dataset does not inherit data.options; a stream of
    # the same dataset sets its options over them (e.g. RIPU's target: masks_dir=masks_full)
    def plain(opts) -> dict:
        return dict(OmegaConf.to_container(opts) if isinstance(opts, DictConfig) else opts or {})
    opts = {} if own else plain(data.options)
    if stream is not None and stream.options is not None:
        opts.update(plain(stream.options))
    return build_source(dataset, root, opts)


def build_streams(data: DictConfig, names: tuple[str, ...], strong: tuple[str, ...] = (),
                  check: bool = True, progress: bool = True, world: int = 1,
                  strong_views: int = 1) -> dict[str, Stream]:
    """The training streams a method reads. Missing streams, a stream whose class list is not the run's
    (``data.dataset``'s, which evaluation uses) and bad files are reported before training."""
    missing = [n for n in names if n not in data.streams]
    if missing:
        raise ConfigError(
            f"this method reads data stream(s) {missing}, but data.streams defines {list(data.streams)}"
        )
    run = stream_source(data)
    sources = {name: stream_source(data, data.streams[name]) for name in names}
    for name, src in sources.items():
        if src.classes == run.classes:
            continue
        sc = data.streams[name]
        opts = sc.options if sc.options is not None else data.options
        pairs = enumerate(zip(src.classes, run.classes))
        k = next((i for i, (a, b) in pairs if a != b), min(src.num_classes, run.num_classes))
        ours = repr(src.classes[k]) if k < src.num_classes else "nothing (its list ends)"
        theirs = repr(run.classes[k]) if k < run.num_classes else "nothing (its list ends)"
        raise ConfigError(
            f"stream {name!r} reads dataset {sc.dataset or data.dataset} at {src.root} (options "
            f"{dict(opts or {})}) with {src.num_classes} classes {src.classes}, but the run's dataset "
            f"(data.dataset {data.dataset} at {run.root}, options {dict(data.options or {})}, also used for "
            f"evaluation) has {run.num_classes} classes {run.classes}; they first differ at class {k}: {ours} "
            f"in the stream, {theirs} in the run. Every stream must have the run's classes (SYNTHIA -> "
            "Cityscapes: give both datasets the same options.classes, 16 or 13)"
        )
    from .loader import SegDataset, Stream

    streams = {}
    for name in names:
        sc = data.streams[name]
        src = sources[name]
        samples = src.samples(sc.split)
        if not samples:
            raise DataError(f"stream {name!r}: split {sc.split!r} of {src.root} is empty")
        problem = batch_problem(name, len(samples), sc.batch_size, world)
        if problem:
            raise ConfigError(problem)
        if check:
            require_clean(src, samples, sc.labeled or sc.true_masks, f"stream {name!r} ({sc.split})", progress)
        aug = stream_aug(data, sc)
        ds = SegDataset(src, samples, train=True, labeled=sc.labeled, strong=sc.strong or name in strong,
                        strong_views=strong_views if name in strong else 1,
                        true_masks=sc.true_masks and not sc.labeled,
                        crop_size=list(sc.crop_size or data.crop_size), aug=aug,
                        mean=list(data.mean), std=list(data.std),
                        copy_paste=aug.copy_paste if sc.labeled else 0.0, paste_exclude=tuple(aug.paste_exclude))
        streams[name] = Stream(name, ds, sc.batch_size)
    return streams


def stream_aug(data: DictConfig, stream: DictConfig) -> DictConfig:
    """The augmentation of a stream: ``data.aug`` with the stream's own ``aug`` overrides."""
    return OmegaConf.merge(data.aug, stream.aug) if stream.aug else data.aug


def build_eval_dataset(data: DictConfig, split: str | None = None, check: bool = False,
                       progress: bool = True) -> SegDataset:
    """The labeled evaluation set (``data.val_split`` of the main dataset unless ``split`` is given)."""
    from .loader import SegDataset

    src = stream_source(data)
    split = split or data.val_split
    samples = src.samples(split)
    if check:
        require_clean(src, samples, True, f"evaluation split {split!r}", progress)
    return SegDataset(src, samples, train=False, labeled=True, mean=list(data.mean), std=list(data.std))
