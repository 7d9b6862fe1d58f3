"""Atomic checkpoints. Loading never executes code from the file (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..safe_load import file_digest, torch_load  # noqa: F401  (file_digest: what callers of ckpt use)


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


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that a kill during :func:`save_atomic` left in ``folder``."""
    stale = sorted(Path(folder).glob(".*.pt.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _tensors(obj, prefix: str = ""):
    """(name, tensor) of every tensor in nested dicts and lists."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def nonfinite_keys(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` (nested dicts/lists) holding a NaN or an inf.

    One device-side reduction and a single host sync when everything is finite, the common case."""
    floats = [(k, t) for k, t in _tensors(state) if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all().to(floats[0][1].device) for _, t in floats])
    if bool(flags.all()):
        return []
    return [k for (k, _), ok in zip(floats, flags.tolist()) if not ok]


def state_differences(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's method state differs from the one a config builds: missing and extra keys, and
    keys whose shapes differ (each with both shapes)."""
    out = [f"{k} is not in the checkpoint" for k in expected if k not in stored]
    out += [f"{k} is only in the checkpoint" for k in stored if k not in expected]
    out += [f"{k} has shape {tuple(stored[k].shape)} in the checkpoint, {tuple(v.shape)} in this config"
            for k, v in expected.items() if k in stored and torch.is_tensor(v) and torch.is_tensor(stored[k])
            and tuple(stored[k].shape) != tuple(v.shape)]
    return out


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return torch_load(path, map_location, "checkpoint")


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
