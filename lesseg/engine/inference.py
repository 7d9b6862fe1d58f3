"""Using a trained checkpoint: rebuild its network, predict files, export to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from .. import config as config_mod
from ..data.base import read_rgb
from ..data.transforms import normalize
from ..errors import LessegError
from ..methods import RunInfo, build_method
from ..viz import colorize, overlay
from . import checkpoint as ckpt
from .evaluate import predict_probs


def load_checkpoint_net(path: str | Path, device: torch.device | str = "cpu",
                        overrides: list[str] = ()) -> tuple[torch.nn.Module, DictConfig, RunInfo, dict]:
    """The evaluation network of a checkpoint, its (overridden) config, run info and the raw state."""
    state = ckpt.load(path, "cpu")
    if "method" not in state or "config" not in state:
        raise LessegError(f"{path} is not a lesseg checkpoint (no method state or config)")
    cfg = config_mod.from_dict(state["config"], list(overrides))
    info = RunInfo(num_classes=state["info"]["num_classes"], class_names=state["info"]["class_names"])
    method = build_method(cfg, info)
    method.load_state_dict(state["method"])
    net = method.eval_net().to(device).eval()
    return net, cfg, info, state


def image_tensor(image: np.ndarray, cfg: DictConfig) -> torch.Tensor:
    """HxWx3 uint8 -> 1,3,H,W normalized."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return normalize(list(cfg.data.mean), list(cfg.data.std))(t).unsqueeze(0)


def predict_files(net, cfg: DictConfig, info: RunInfo, inputs: list[Path], out: Path,
                  with_overlay: bool = False, device: torch.device | str = "cpu", progress: bool = True) -> list[Path]:
    """Write a palette PNG mask (and optionally an overlay) per input image into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(inputs, desc="predict", disable=not progress):
        image = read_rgb(path)
        probs = predict_probs(net, image_tensor(image, cfg).to(device), cfg.eval, list(cfg.data.crop_size),
                              info.num_classes)
        pred = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
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

    Returns the largest absolute difference of the logits on a random input.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise LessegError("ONNX export needs the export extra: pip install 'lesseg[export]'") from None
    model = _LogitsOnly(net).eval()
    h, w = cfg.data.crop_size
    x = torch.randn(1, 3, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(out), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if diff > atol:
        raise LessegError(f"ONNX output differs from PyTorch by {diff:.2e} (> {atol}); the export is not faithful")
    return diff
