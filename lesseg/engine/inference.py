"""Using a trained checkpoint: rebuild its network, evaluate it, predict files, export to ONNX."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from .. import config as config_mod
from .. import dist
from ..data import build_eval_dataset, eval_loader, stream_source
from ..data.base import read_rgb
from ..data.transforms import normalize
from ..errors import ConfigError, LessegError
from ..methods import Method, RunInfo, build_method
from ..models import Classifier, Segmentor, class_map
from ..viz import colorize, overlay
from . import checkpoint as ckpt
from .evaluate import EVALUATORS, predict_probs, windows

log = logging.getLogger(__name__)


def load_checkpoint_net(path: str | Path, device: torch.device | str = "cpu",
                        overrides: list[str] = ()) -> tuple[torch.nn.Module, DictConfig, RunInfo, dict]:
    """The evaluation network of a checkpoint, its (overridden) config, run info and the raw state."""
    method, cfg, info, state = load_checkpoint_method(path, overrides)
    return method.eval_net().to(device).eval(), cfg, info, state


def load_checkpoint_method(path: str | Path, overrides: list[str] = ()) -> tuple[Method, DictConfig, RunInfo, dict]:
    """The whole method of a checkpoint (every network, on the CPU), its (overridden) config, run info and
    the raw state."""
    state = ckpt.load(path, "cpu")
    if not all(k in state for k in ("method", "config", "info")):
        raise LessegError(f"{path} is not a lesseg checkpoint (no method state, config or run info)")
    try:
        cfg = config_mod.from_dict(state["config"], list(overrides))
    except ConfigError as e:
        raise ConfigError(f"the config stored in checkpoint {path}: {e}") from None
    info = RunInfo(**state["info"])
    method = build_method(for_loading(cfg), info)
    load_method_state(method, state, path)
    return method, cfg, info, state


def for_loading(cfg: DictConfig) -> DictConfig:
    """``cfg`` without ``model.pretrained``: a checkpoint's weights replace the encoder's anyway, and the
    pretrained file need not exist where the checkpoint is used."""
    return OmegaConf.merge(cfg, {"model": {"pretrained": None}})


def load_method_state(method: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load a checkpoint's method weights; a method or model that does not fit them is one clear error."""
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise LessegError(
            f"checkpoint {path} does not fit method {type(method).__name__} with this config's model settings "
            f"(use the method and model.* values it was trained with): {detail[:300]}"
        ) from None


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str | Path, net_name: str | None = None,
                        split: str | None = None) -> dict:
    """Evaluate a checkpoint's network on ``split`` (default ``data.val_split``) of ``cfg``'s dataset, as
    ``lesseg eval`` does; joins the process group under torchrun (each process evaluates its shard) and leaves
    it before returning.

    The method of ``cfg`` is rebuilt and loaded with the checkpoint's weights; a checkpoint with another class
    count than the dataset is a LessegError. ``net_name`` picks one of the method's networks (its named
    :class:`Segmentor` children; an unknown one is a LessegError listing them), by default the one the method
    evaluates. Returns the method's evaluation (segmentation mIoU, or a classifier's tag mAP) with ``metric``,
    its main number's name, and ``net``, the name of the evaluated network.
    """
    device = dist.init(cfg.train.device)
    src = stream_source(cfg.data)
    info = RunInfo(num_classes=src.num_classes, class_names=list(src.classes))
    method = build_method(for_loading(cfg), info)
    state = ckpt.load(checkpoint)
    if state.get("info", {}).get("num_classes", info.num_classes) != info.num_classes:
        raise LessegError(f"{checkpoint} has {state['info']['num_classes']} classes, the dataset "
                          f"{info.num_classes}")
    load_method_state(method, state, checkpoint)
    nets = {name: m for name, m in method.named_children() if isinstance(m, (Segmentor, Classifier))}
    if net_name is not None and net_name not in nets:
        raise LessegError(f"--net {net_name!r}: {cfg.method.name} has the networks {', '.join(nets)}")
    net = (nets[net_name] if net_name else method.eval_net()).to(device)
    ds = build_eval_dataset(cfg.data, split=split, check=cfg.data.check)
    loader = eval_loader(ds, cfg.eval.batch_size, dist.rank(), dist.world(), cfg.data.workers)
    evaluator, _, main_metric = EVALUATORS.get(type(method).evaluation)
    result = evaluator(net, loader, info.num_classes, cfg.eval, list(cfg.data.crop_size), device,
                       info.class_names)
    dist.cleanup(finished=True)
    return {**result, "metric": main_metric, "net": next(name for name, m in nets.items() if m is net)}


def image_tensor(image: np.ndarray, cfg: DictConfig) -> torch.Tensor:
    """HxWx3 uint8 -> 1,3,H,W normalized."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return normalize(list(cfg.data.mean), list(cfg.data.std))(t).unsqueeze(0)


MAX_WHOLE_PIXELS = 2048 * 2048  # larger images are predicted in tiles (whole-image passes grow without bound)
TILE = 1024


@torch.no_grad()
def predict_tiled(net, image: np.ndarray, cfg: DictConfig, window: list[int], stride: list[int], num_classes: int,
                  device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """Class map (H,W uint8) of an image of any size, in bounded memory: overlapping windows (the last one of
    each row and column aligned to the border), each predicted with the evaluation's scales and flips, whose
    class probabilities are summed per pixel; rows are finished band by band.

    Memory beyond the network's pass on one window: the uint8 image and class map, and a float32 band of
    ``num_classes x window_h x W`` (plus one window's normalised input): a 6000x6000 image with 7 classes and
    1024 windows holds 172 MB of band, not the 1 GB of a whole-image probability map.
    """
    h, w = image.shape[:2]
    ch, cw = min(window[0], h), min(window[1], w)
    ys, xs = windows(h, ch, stride[0]), windows(w, cw, stride[1])
    per_window = SimpleNamespace(mode="whole", resize=None, stride=None, scales=list(cfg.eval.scales),
                                 flip=bool(cfg.eval.flip))
    out = np.empty((h, w), np.uint8)
    band = torch.zeros(num_classes, ch, w, device=device)  # summed probabilities of rows top .. top + ch
    top = 0
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", disable=not progress, leave=False)
    for y in ys:
        if y > top:  # rows above y get no more windows: finish them, slide the band down
            shift = y - top
            out[top:y] = class_map(band[:, :shift].unsqueeze(0))[0].to(torch.uint8).cpu().numpy()
            band[:, : ch - shift] = band[:, shift:].clone()
            band[:, ch - shift :] = 0
            top = y
        for x in xs:
            tile = image_tensor(image[y : y + ch, x : x + cw], cfg).to(device)
            band[:, :, x : x + cw] += predict_probs(net, tile, per_window, [ch, cw], num_classes)[0].float()
            bar.update(1)
    out[top:] = class_map(band[:, : h - top].unsqueeze(0))[0].to(torch.uint8).cpu().numpy()
    bar.close()
    return out


def tiling(cfg: DictConfig, shape: tuple[int, int], max_pixels: int = MAX_WHOLE_PIXELS,
           tile: int = TILE) -> tuple[list[int], list[int]] | None:
    """(window, stride) when an image of ``shape`` is predicted in tiles, else None (one whole pass): always
    with ``eval.mode=slide`` (its window and stride), and for images of more than ``max_pixels`` pixels."""
    if cfg.eval.mode == "slide":
        window = list(cfg.eval.crop_size or cfg.data.crop_size)
    elif shape[0] * shape[1] > max_pixels:
        window = [tile, tile]
    else:
        return None
    stride = list(cfg.eval.stride) if cfg.eval.mode == "slide" and cfg.eval.stride else [max(1, c * 2 // 3)
                                                                                         for c in window]
    if any(s > c for s, c in zip(stride, window)):
        raise ConfigError(f"eval.stride {stride} is larger than the window {window}: pixels between windows "
                          "would get no prediction")
    return window, stride


def predict_files(net, cfg: DictConfig, info: RunInfo, inputs: list[Path], out: Path,
                  with_overlay: bool = False, device: torch.device | str = "cpu", progress: bool = True,
                  max_pixels: int = MAX_WHOLE_PIXELS, tile: int = TILE) -> list[Path]:
    """Write a palette PNG mask (and optionally an overlay) per input image into ``out``. Images of more
    than ``max_pixels`` pixels (and every image with ``eval.mode=slide``) are predicted in tiles."""
    by_stem: dict[str, Path] = {}
    for path in inputs:  # masks are named by stem: two inputs must not write the same file
        if path.stem in by_stem:
            raise LessegError(f"inputs {by_stem[path.stem]} and {path} would both write "
                              f"{out / (path.stem + '.png')}; predict them into different --out folders")
        by_stem[path.stem] = path
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(inputs, desc="predict", disable=not progress):
        image = read_rgb(path)
        tiles = tiling(cfg, image.shape[:2], max_pixels, tile)
        if tiles is None:
            probs = predict_probs(net, image_tensor(image, cfg).to(device), cfg.eval, list(cfg.data.crop_size),
                                  info.num_classes)
            pred = class_map(probs)[0].to(torch.uint8).cpu().numpy()
        else:
            if cfg.eval.mode != "slide":
                log.warning("%s is %dx%d: predicted in %dx%d tiles (more than %d pixels)", path, image.shape[1],
                            image.shape[0], tiles[0][1], tiles[0][0], max_pixels)
            pred = predict_tiled(net, image, cfg, *tiles, info.num_classes, device, progress)
        target = out / f"{path.stem}.png"
        colorize(pred, info.num_classes).save(target)
        if with_overlay:
            Image.fromarray(overlay(image, pred, info.num_classes)).save(out / f"{path.stem}_overlay.jpg")
        written.append(target)
    return written


class _LogitsOnly(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["logits"]


def export_onnx(net, cfg: DictConfig, out: Path, atol: float = 1e-3) -> float:
    """Export logits(image) to ONNX with dynamic batch/size and check it against PyTorch with onnxruntime.

    Returns the largest absolute difference of the logits on random inputs other than the traced one: a new
    batch of 2 at the crop size and one at 1.5 times the crop size (the dynamic axes must really be dynamic).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise LessegError("ONNX export needs the export extra: pip install 'lesseg[export]'") from None
    model = _LogitsOnly(net).eval()
    h, w = cfg.data.crop_size
    x = torch.randn(1, 3, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(model, (x,), str(out), input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"x": dims}, dynamo=True, external_data=False, verbose=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    diff = 0.0
    for check in (torch.randn(2, 3, h, w), torch.randn(1, 3, h * 3 // 2, w * 3 // 2)):
        with torch.no_grad():
            ref = model(check).numpy()
        try:
            got = sess.run(None, {"image": check.numpy()})[0]
        except Exception as e:  # noqa: BLE001  (onnxruntime errors share no base class but Exception)
            raise LessegError(f"the exported {out} fails on an input of shape {list(check.shape)}: "
                              f"{str(e).splitlines()[0]}") from None
        if got.shape != ref.shape:
            raise LessegError(f"ONNX output has shape {got.shape}, PyTorch {ref.shape}; the export is not faithful")
        diff = max(diff, float(np.abs(ref - got).max()))
    if diff > atol:
        raise LessegError(f"ONNX output differs from PyTorch by {diff:.2e} (> {atol}); the export is not faithful")
    return diff
