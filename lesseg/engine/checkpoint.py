"""Atomic checkpoints. Loading never executes code from the file (``weights_only=True``)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import LessegError


def save_atomic(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file: which version of a weights file a run started from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise LessegError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter about foreign files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        if refused:  # the file holds objects other than tensors: possibly code
            raise LessegError(f"refused to load checkpoint {path}: it holds Python objects other than tensors "
                              f"({refused.group(1)}), and loading them could run code") from None
        raise LessegError(f"cannot load checkpoint {path}: not a checkpoint, or a corrupt one") from None
    # torch.load reports a truncated or foreign file as RuntimeError, EOFError, KeyError, ValueError, ... by format
    except Exception as e:  # noqa: BLE001
        raise LessegError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


def unwrap_state(state: dict[str, torch.Tensor], wrapped: list[str]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` level that DDP adds under each wrapped attribute."""
    out = {}
    for k, v in state.items():
        for name in wrapped:
            if k.startswith(f"{name}.module."):
                k = name + k[len(name) + len(".module") :]
                break
        out[k] = v
    return out


def finished_eval(run_dir: str | Path) -> dict | None:
    """The final evaluation of a run whose ``last.pt`` reached the last step, else None (run or resume it)."""
    path = Path(run_dir) / "last.pt"
    return final_eval(load(path)) if path.is_file() else None


def final_eval(state: dict) -> dict | None:
    """The evaluation stored in a checkpoint saved at its run's last step, else None."""
    done = state["step"] >= state["info"].get("max_iters", float("inf"))
    return state.get("eval") if done else None
