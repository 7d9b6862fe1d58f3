"""Using a trained checkpoint: rebuild its network, predict files, export to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from .. import config as config_mod
from ..data.base import read_rgb
from ..data.transforms import normalize
from ..errors import ConfigError, LessegError
from ..methods import Method, RunInfo, build_method
from ..models import class_map
from ..viz import colorize, overlay
from . import checkpoint as ckpt
from .evaluate import predict_probs


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


def image_tensor(image: np.ndarray, cfg: DictConfig) -> torch.Tensor:
    """HxWx3 uint8 -> 1,3,H,W normalized."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return normalize(list(cfg.data.mean), list(cfg.data.std))(t).unsqueeze(0)


def predict_files(net, cfg: DictConfig, info: RunInfo, inputs: list[Path], out: Path,
                  with_overlay: bool = False, device: torch.device | str = "cpu", progress: bool = True) -> list[Path]:
    """Write a palette PNG mask (and optionally an overlay) per input image into ``out``."""
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
        probs = predict_probs(net, image_tensor(image, cfg).to(device), cfg.eval, list(cfg.data.crop_size),
                              info.num_classes)
        pred = class_map(probs)[0].to(torch.uint8).cpu().numpy()
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
