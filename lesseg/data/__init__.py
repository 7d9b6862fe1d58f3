"""Data layer: dataset sources (on-disk formats), augmentation, named training streams, evaluation sets."""

from __future__ import annotations

from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, DataError
from . import formats, shapes  # noqa: F401  (register the sources)
from .base import IGNORE, SOURCES, Sample, SegSource
from .check import require_clean, scan
from .loader import SegDataset, Stream, batch_problem, eval_loader

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
    dataset = (stream.dataset if stream is not None and stream.dataset else None) or data.dataset
    root = (stream.root if stream is not None and stream.root else None) or data.root
    opts = stream.options if stream is not None and stream.options is not None else data.options
    return build_source(dataset, root, OmegaConf.to_container(opts) if isinstance(opts, DictConfig) else opts)


def build_streams(data: DictConfig, names: tuple[str, ...], strong: tuple[str, ...] = (),
                  check: bool = True, progress: bool = True, world: int = 1) -> dict[str, Stream]:
    """The training streams a method reads. Missing streams and bad files are reported before training."""
    missing = [n for n in names if n not in data.streams]
    if missing:
        raise ConfigError(
            f"this method reads data stream(s) {missing}, but data.streams defines {list(data.streams)}"
        )
    streams = {}
    for name in names:
        sc = data.streams[name]
        src = stream_source(data, sc)
        samples = src.samples(sc.split)
        if not samples:
            raise DataError(f"stream {name!r}: split {sc.split!r} of {src.root} is empty")
        problem = batch_problem(name, len(samples), sc.batch_size, world)
        if problem:
            raise ConfigError(problem)
        if check:
            require_clean(src, samples, sc.labeled or sc.true_masks, f"stream {name!r} ({sc.split})", progress)
        ds = SegDataset(src, samples, train=True, labeled=sc.labeled, strong=sc.strong or name in strong,
                        true_masks=sc.true_masks and not sc.labeled,
                        crop_size=list(data.crop_size), aug=data.aug, mean=list(data.mean), std=list(data.std))
        streams[name] = Stream(name, ds, sc.batch_size)
    return streams


def build_eval_dataset(data: DictConfig, split: str | None = None, check: bool = False,
                       progress: bool = True) -> SegDataset:
    """The labeled evaluation set (``data.val_split`` of the main dataset unless ``split`` is given)."""
    src = stream_source(data)
    split = split or data.val_split
    samples = src.samples(split)
    if check:
        require_clean(src, samples, True, f"evaluation split {split!r}", progress)
    return SegDataset(src, samples, train=False, labeled=True, mean=list(data.mean), std=list(data.std))
