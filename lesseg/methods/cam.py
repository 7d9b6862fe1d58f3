"""Classifier + CAM (methods.md section 7, Zhou et al. 2016): image tags in, a trained segmentation network
out, as a pipeline of three stages run by one ``lesseg train``.

``classifier`` trains the ``classifier`` method (encoder + GAP + bias-free 1x1, BCE on the tags) on the
tagged images of the stream ``labeled`` (in ``<out>/classifier``; its masks, if any, are not read; scored by
tag mAP on the val split). ``cams`` computes, for every image of that stream, the CAMs of its tags with the
classifier (``scales`` and ``flip`` averaged, max-normalised per class) and writes pseudo-masks as a dataset
in the folder format to ``<out>/cams``: the best tagged class where its CAM is >= ``fg_threshold``, background
below ``bg_threshold``, 255 between; with ``saliency`` set, also background where the image's saliency map
(an OpenCV contrib detector or a folder of the user's maps, :mod:`lesseg.data.saliency`) is below
``saliency_threshold``, and 255 where that contradicts a foreground CAM. Where the images have masks
(``labeled: true`` or ``true_masks: true`` on the stream) the pseudo-masks are scored against them
(``quality.json``: mIoU, accuracy, foreground precision and recall, the labelled fraction); the stage's
metrics also give the CAM extraction speed (``images_per_s``: the images over the wall seconds of moving
them to the device, the multi-scale CAMs and the thresholding, saliency and writing left out). The last stage
trains a segmentation network with CE on that dataset (the stream ``pseudo``) in ``<out>``, evaluated on the
real val split.

The engine skips finished stages and resumes an interrupted one; ``method.classifier_checkpoint`` replaces
the first stage by a classifier trained before; ``stages.classifier.*`` overrides its settings (its model
included: the CAM stage rebuilds the classifier from the model settings stored in its checkpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import config as config_mod
from ..config import ModelConfig, ranged
from ..data.saliency import SOURCES as SALIENCY_SOURCES
from ..data.saliency import SaliencyMaps
from ..data.writer import FolderWriter
from ..errors import ConfigError
from ..metrics import iou_from_confusion
from ..models import Classifier, build_classifier, build_model
from ..models.pretrained import eval_net_weights
from ..safe_load import torch_load
from .base import METHODS, Method, RunInfo, Stage
from .supervised import SupervisedConfig, sup_loss
from .weak.cam import foreground_counts, foreground_quality, multiscale_cams, pseudo_masks

if TYPE_CHECKING:
    from ..data.loader import SegDataset


@dataclass
class CamSettings(SupervisedConfig):
    """What the CAM-based pipelines share (``cam``, ``ae``, ``psl``): the classifier stage, the CAMs, the
    background cue and the start of the segmentation network."""

    # CAMs averaged over these image scales (and the mirrored image with flip); IRN/PSA settings
    scales: list[float] = ranged([1.0, 0.5, 1.5, 2.0], "(0, inf)")
    flip: bool = True
    bg_class: int = ranged(0, "[0, inf)")  # the class id pseudo-masks give to background (no CAM of its own)
    cam_batch: int = ranged(16, "[1, inf)")  # images of one size whose CAMs are computed together
    # the segmentation network's encoder starts from the classifier's (model.pretrained is then the
    # classifier stage's checkpoint); false: from model.pretrained as configured
    init_from_classifier: bool = False
    # stage classifier done elsewhere: a lesseg checkpoint of the classifier method on these classes, whose
    # CAMs make the pseudo-masks; the classifier stage is then not trained
    classifier_checkpoint: str | None = None
    # a background cue besides low CAMs. None: none; spectral_residual / fine_grained: OpenCV contrib's
    # detector on each image; folder: the user's maps, <saliency_dir>/<image name>.png (8-bit grey)
    saliency: str | None = None
    saliency_dir: str | None = None
    saliency_threshold: float = ranged(0.2, "[0, 1]")  # background where saliency / 255 < this


@dataclass
class CamConfig(CamSettings):
    name: str = "cam"
    fg_threshold: float = ranged(0.3, "[0, 1]")  # best tagged CAM >= this: that class
    # best tagged CAM < this: background; in between: 255 (uncertain). None: fg_threshold (no band)
    bg_threshold: float | None = ranged(0.05, "[0, 1]")


# what the pseudo-masks depend on (the contents of a saliency_dir are not tracked: a new folder, a new run)
CAM_KEYS = ("scales", "flip", "fg_threshold", "bg_threshold", "bg_class", "saliency", "saliency_dir",
            "saliency_threshold")


def load_classifier(path: str | Path, class_names: list[str],
                    device: torch.device | str = "cpu") -> Classifier:
    """The classifier of a ``classifier`` training checkpoint, on ``device``, in eval mode.

    It is built from the model settings stored in the checkpoint (a classifier stage may have its own, e.g.
    another encoder or output stride), not from the caller's config, which is why this is not
    ``EngineContext.network`` (that one builds segmentation networks). A checkpoint of other classes or of
    another network is one ConfigError naming the file."""
    state = torch_load(path, "cpu", "checkpoint", ConfigError)
    if not isinstance(state, dict) or not all(k in state for k in ("method", "info", "eval_net", "config")):
        raise ConfigError(f"{path} is not a lesseg training checkpoint")
    names = state["info"].get("class_names")
    if names != list(class_names):
        raise ConfigError(f"{path} was trained on classes {names}, this run's data has {list(class_names)}")
    weights = eval_net_weights(state)
    if not any(k.startswith("cls_head.") for k in weights):
        method = state["config"].get("method", {}).get("name")
        raise ConfigError(f"{path} is a checkpoint of method {method!r}, not of a classifier (method "
                          "classifier): it has no classification head to make CAMs with")
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"].get("model", {}),
                                {"pretrained": None})  # the checkpoint's weights replace any starting weights
    net = build_classifier(model_cfg, len(class_names))
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not fit the classifier of its own model settings: "
                          f"{str(e).splitlines()[-1].strip()[:300]}") from None
    return net.to(device).eval()


def same_size_batches(items: Iterable[dict], size: int) -> Iterator[dict]:
    """Items of a batch-1 loader regrouped into batches of up to ``size`` consecutive images of one size
    (images of different sizes cannot be stacked), keys ``index``, ``image``, ``tags`` and ``mask`` if any."""
    group: list[dict] = []

    def batch() -> dict:
        keys = [k for k in ("index", "image", "tags", "mask") if k in group[0]]
        return {k: torch.cat([it[k] for it in group]) for k in keys}

    for item in items:
        if group and (len(group) == size or item["image"].shape[-2:] != group[0]["image"].shape[-2:]):
            yield batch()
            group = []
        group.append(item)
    if group:
        yield batch()


class Throughput:
    """Images a second of a timed computation (``timing``: wall clock, a CUDA device synchronised at both ends
    so that its queued work counts), for a stage's ``images_per_s``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.images, self.seconds = device, 0, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def timing(self, images: int) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds += time.perf_counter() - start
        self.images += images

    def images_per_s(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """This process's rate, summed over the processes by ``reduce`` (call it on every process): they
        work at the same time on their shares."""
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return float(reduce(torch.tensor([rate], dtype=torch.float64, device=self.device))[0])


def low_saliency(saliency: SaliencyMaps | None, batch: dict, threshold: float) -> torch.Tensor | None:
    """Where the saliency of each image of ``batch`` (read at its native size, like the CAMs) is below
    ``threshold`` (as a fraction of 255): the background cue, B,H,W bool; None without saliency."""
    if saliency is None:
        return None
    size = tuple(batch["image"].shape[-2:])
    low = [saliency(i, size).astype(np.float32) / 255.0 < threshold for i in batch["index"].tolist()]
    return torch.from_numpy(np.stack(low))


def tagged_images(ctx: Any) -> tuple[SegDataset, bool]:
    """The images of the stream ``labeled`` for a stage that makes pseudo-masks from their tags, and whether
    they are scored (their true masks read: ``labeled`` or ``true_masks`` on the stream). An image without
    tags, or a ``method.bg_class`` that is no class of the data, is a ConfigError."""
    sc = ctx.cfg.data.streams.labeled
    scored = bool(sc.labeled or sc.true_masks)
    data = ctx.dataset("labeled", masks=scored)
    if not data.with_tags:
        raise ConfigError(f"the {ctx.cfg.method.name} method makes pseudo-masks from image tags: every image "
                          "of the stream 'labeled' needs them (image_labels.csv, or data.options.tags for VOC)")
    if ctx.cfg.method.bg_class >= ctx.num_classes:
        raise ConfigError(f"method.bg_class {ctx.cfg.method.bg_class} is not a class of the data "
                          f"({ctx.num_classes} classes)")
    return data, scored


def write_cam_dataset(ctx: Any) -> dict:
    """Stage ``cams``: CAM pseudo-masks of every image of the stream ``labeled`` from the ``classifier``
    stage's network, written to ``ctx.folder/{images,masks,classes.txt,splits/train.txt}`` (processes share
    the images). Where the images have masks, also ``quality.json`` (the pseudo-masks against them: mIoU,
    accuracy, per-class IoU, foreground precision/recall, labelled fraction), whose numbers it returns, with
    the CAM extraction speed ``images_per_s`` (:class:`Throughput`)."""
    m = ctx.cfg.method
    data, scored = tagged_images(ctx)
    writer = FolderWriter(ctx.folder, [s.name for s in data.samples], ctx.class_names)
    if ctx.main:
        writer.clear()  # leftovers of an interrupted stage
    ctx.barrier()
    saliency = (SaliencyMaps(data.source, data.samples, m.saliency, m.saliency_dir)
                if m.saliency is not None else None)
    net = load_classifier(ctx.products["classifier"], ctx.class_names, ctx.device)
    autocast = torch.autocast(ctx.device.type, dtype=ctx.amp) if ctx.amp else nullcontext()
    counts = torch.zeros(5, dtype=torch.long, device=ctx.device)
    speed = Throughput(ctx.device)
    loader = tqdm(ctx.loader("labeled", masks=scored), desc="CAM pseudo-masks", disable=not ctx.progress,
                  leave=False)
    for batch in same_size_batches(loader, m.cam_batch):
        background = low_saliency(saliency, batch, m.saliency_threshold)
        with speed.timing(len(batch["index"])):
            tags = batch["tags"].to(ctx.device)
            tags[:, m.bg_class] = 0  # background has no CAM of its own: low object CAMs make it
            with torch.no_grad(), autocast:
                cams = multiscale_cams(net.cam, batch["image"].to(ctx.device), tags, list(m.scales), m.flip)
            masks = pseudo_masks(cams, tags, m.fg_threshold, m.bg_threshold, background, bg_class=m.bg_class)
        true = batch["mask"].to(ctx.device) if scored else None
        counts += foreground_counts(masks, true, m.bg_class)
        masks = masks.cpu().numpy()
        for k, i in enumerate(batch["index"].tolist()):
            writer.write(i, data.samples[i].image, masks[k], data.source.read_image,
                         true=batch["mask"][k] if scored else None)
    return {**finish_masks(ctx, writer, counts), "images_per_s": speed.images_per_s(ctx.all_reduce_sum)}


def finish_masks(ctx: Any, writer: FolderWriter, counts: torch.Tensor) -> dict:
    """After a pseudo-mask stage wrote its masks on every process: the main process writes the dataset's
    class list, split and ``quality.json`` (the writer's scores and :func:`foreground_quality` of the summed
    ``counts``); returns the numbers for ``stages.json`` (only the labelled fraction without true masks)."""
    quality = writer.quality(ctx.all_reduce_sum)  # also the processes' meeting point before files are listed
    fg = foreground_quality(ctx.all_reduce_sum(counts).cpu())
    if quality is not None:
        quality = {**quality, **fg}
    if ctx.main:
        writer.finish(quality)
    if quality is None:
        return {"pseudo_labelled": fg["labelled"]}
    return {"pseudo_miou": quality["miou"], "pseudo_acc": quality["acc"],
            "pseudo_fg_precision": fg["fg_precision"], "pseudo_fg_recall": fg["fg_recall"],
            "pseudo_labelled": fg["labelled"]}


def add_raw_quality(ctx: Any, metrics: dict, raw_conf: torch.Tensor, crf: bool) -> dict:
    """After :func:`finish_masks` of masks that a dense CRF refined: the masks before it, scored from
    ``raw_conf`` (summed over the processes) as ``raw_miou``/``raw_acc`` and as ``raw`` in ``quality.json``;
    with ``crf`` the written masks' numbers again as ``crf_miou``/``crf_acc``. Returns ``metrics``."""
    raw = iou_from_confusion(ctx.all_reduce_sum(raw_conf.to(ctx.device)).cpu(), ctx.class_names)
    metrics.update(raw_miou=raw["miou"], raw_acc=raw["acc"])
    if crf:
        metrics.update(crf_miou=metrics["pseudo_miou"], crf_acc=metrics["pseudo_acc"])
    if ctx.main:
        quality = json.loads((ctx.folder / "quality.json").read_text())
        (ctx.folder / "quality.json").write_text(json.dumps({**quality, "raw": raw}, indent=1) + "\n")
    return metrics


def check_saliency(m: CamSettings | DictConfig) -> None:
    """The saliency settings of a CAM-based method: a known source, a folder only with ``folder``."""
    if m.saliency is not None and m.saliency not in SALIENCY_SOURCES:
        raise ConfigError(f"method.saliency {m.saliency!r} is not one of {', '.join(SALIENCY_SOURCES)} "
                          "(or null: no saliency)")
    if m.saliency == "folder" and not m.saliency_dir:
        raise ConfigError("method.saliency: folder reads the maps from method.saliency_dir, which is not set")
    if m.saliency_dir is not None and m.saliency != "folder":
        raise ConfigError(f"method.saliency_dir is only read with method.saliency: folder (it is "
                          f"{m.saliency!r})")


def classifier_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The classifier of stage 1: the tagged stream ``labeled`` (its masks not read), same model, schedule
    and val split; scored by its own metric (tag mAP), whatever ``eval.metric`` the last stage uses."""
    d = OmegaConf.to_container(cfg)
    d["method"] = {"name": "classifier"}
    labeled = d["data"]["streams"]["labeled"]
    d["data"]["streams"] = {"labeled": {**labeled, "labeled": False, "strong": False, "true_masks": False}}
    d["eval"]["metric"] = None
    return config_mod.from_dict(d)


def pseudo_train_config(cfg: DictConfig, root: Path, init_from: Path | None = None,
                        model: dict | None = None) -> DictConfig:
    """CE-style training on the stream ``pseudo``: the folder dataset at ``root`` (a pseudo-mask stage's
    product) with the tagged stream's batch, crop and augmentation; the encoder from the checkpoint
    ``init_from`` if given; ``model`` settings merged over the run's."""
    d = OmegaConf.to_container(cfg)
    pseudo = {
        **d["data"]["streams"]["labeled"],
        "dataset": "folder",
        "root": str(root),
        "split": "train",
        "labeled": True,
        "strong": False,
        "true_masks": False,
        "options": {},
    }
    d["data"]["streams"] = {"pseudo": pseudo}
    d["model"].update(model or {})
    if init_from is not None:
        d["model"]["pretrained"] = str(init_from)
        d["model"]["pretrained_partial"] = False
    return config_mod.from_dict(d)


def train_config(cfg: DictConfig, products: dict[str, Path]) -> DictConfig:
    """The last stage: CE on the stream ``pseudo`` (the ``cams`` stage's dataset, with the tagged stream's
    batch, crop and augmentation), the encoder from the classifier with ``init_from_classifier``."""
    start = products["classifier"] if cfg.method.init_from_classifier else None
    return pseudo_train_config(cfg, products["cams"], start)


def cam_inputs(cfg: DictConfig, keys: Sequence[str] = CAM_KEYS) -> dict:
    """What the pseudo-masks depend on (besides the classifier): the images, their tags, the method's
    settings ``keys``."""
    data = OmegaConf.to_container(cfg.data)
    method = OmegaConf.to_container(cfg.method)
    return {"labeled": data["streams"]["labeled"], "method": {k: method[k] for k in keys},
            "data": {k: data[k] for k in ("dataset", "root", "options", "mean", "std")}}


def check_tagged_run(cfg: DictConfig) -> None:
    """What a pipeline that makes pseudo-masks from the stream ``labeled`` checks before any stage runs: the
    stream exists and ``method.bg_threshold`` (if set) does not exceed ``method.fg_threshold``."""
    if "labeled" not in cfg.data.streams:
        raise ConfigError(f"{cfg.method.name} needs the data stream 'labeled' (the tagged images); data.streams "
                          f"defines {list(cfg.data.streams)}")
    m = cfg.method
    if m.bg_threshold is not None and m.bg_threshold > m.fg_threshold:
        raise ConfigError(f"method.bg_threshold {m.bg_threshold} must not exceed method.fg_threshold "
                          f"{m.fg_threshold} (between them lies the uncertain band)")


@METHODS.register("cam")
class CAM(Method):
    """The last stage's training: a segmentation network, CE (or OHEM, aux head) on the CAM pseudo-masks."""

    Config = CamConfig
    streams = ("pseudo",)
    config_streams = ("labeled",)
    stage_names = ("classifier", "cams", "train")

    def __init__(self, cfg: CamConfig, model_cfg, info: RunInfo) -> None:
        super().__init__(cfg, model_cfg, info)
        self.net = build_model(model_cfg, info.num_classes)

    @classmethod
    def pipeline(cls, cfg: DictConfig) -> list[Stage]:
        check_tagged_run(cfg)
        m = cfg.method
        check_saliency(m)
        return [Stage("classifier", config=classifier_config, given=m.classifier_checkpoint),
                Stage("cams", run=write_cam_dataset, inputs=cam_inputs),
                Stage("train", config=train_config)]

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        pse = batch["pseudo"]
        loss = sup_loss(self.net(pse["image"]), pse["mask"], self.cfg)
        return {"loss": loss}


__all__ = ["CAM", "CamConfig", "CamSettings", "Throughput", "check_saliency", "classifier_config",
           "finish_masks",
           "load_classifier", "low_saliency", "pseudo_train_config", "same_size_batches", "tagged_images",
           "train_config", "write_cam_dataset"]
