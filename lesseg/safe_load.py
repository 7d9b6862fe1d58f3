"""Reading ``.pt``/``.pth`` files without executing code from them (``weights_only=True``), with one message
per failure that names the file: used for checkpoints, pretrained weights and stage products alike; and the
file digest that records which version of a weights file a run started from."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import LessegError


def torch_load(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint",
               error: type[LessegError] = LessegError) -> Any:
    """``torch.load(path, weights_only=True)``; a missing, corrupt or code-carrying file is one ``error``
    naming ``what`` and the path (never PyTorch's advice to load it unsafely)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter about foreign files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        if refused:  # the file holds objects other than tensors: possibly code
            raise error(f"refused to load {what} {path}: it holds Python objects other than tensors "
                        f"({refused.group(1)}), and loading them could run code") from None
        raise error(f"cannot load {what} {path}: not a {what}, or a corrupt one") from None
    # torch.load reports a truncated or foreign file as RuntimeError, EOFError, KeyError, ValueError, ... by format
    except Exception as e:  # noqa: BLE001
        raise error(f"cannot load {what} {path}: {str(e).splitlines()[0]}") from None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, in hex: which version of a weights file a run started from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
