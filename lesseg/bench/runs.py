"""Run folders as the harnesses use them: train a config into its folder or reuse the run finished there
(refusing one made with another config or from another pretrained file), and read back what it logged.

A bench's plan is a list of run folders; finished runs are reused and interrupted ones resumed, so a plan can
be split over processes and summarised afterwards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import config
from ..engine import checkpoint as ckpt
from ..engine import trainer
from ..errors import LessegError
from ..methods import METHODS
from .measure import peak_rss_mib, reset_peak_rss


def finished_or_train(cfg: DictConfig, run_dir: Path, title: str, train_missing: bool = True) -> dict | None:
    """The final evaluation of a finished run in ``run_dir``, else train it (recording wall time and peak RSS);
    without ``train_missing``, None for a run that is not finished."""
    state = _same_run(cfg, run_dir)
    result = ckpt.final_eval(state) if state is not None else None
    if result is None and not train_missing:
        print(f"-- not finished, left out: {title}", flush=True)
        return None
    if result is None:
        resume = state is not None  # interrupted (a killed bench, a session's end): go on from its last.pt
        print(f"== {title}" + (f" (resuming at step {state['step']})" if resume else ""), flush=True)
        reset_peak_rss()
        t0 = time.perf_counter()
        result = trainer.train(cfg, resume=resume)  # looked up per call: tests replace it
        if not resume:  # a resumed run's time and peak would be those of its last part only: not recorded
            (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n{peak_rss_mib()}\n")
    return result


def _same_run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Refuse to reuse or resume a run folder whose run had another config (say, before a config changed).
    Returns the folder's ``last.pt`` state, None when it has none."""
    path = run_dir / "last.pt"
    if not path.is_file():
        return None
    cfg = METHODS.get(cfg.method.name).final_config(cfg)  # what the run's checkpoints store (self-training: stage 3)
    # through today's schema: keys added since the run was made read as their defaults
    try:
        state = ckpt.load(path)
        stored = OmegaConf.to_container(config.from_dict(state["config"]))
    except LessegError as e:
        raise LessegError(f"{run_dir} holds a run this version cannot compare ({e}); delete it to rerun") from None

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    ignored = {"out", "train.progress", "train.device"}  # and true_masks: diagnostics, training is the same
    old, new = flat(stored), flat(OmegaConf.to_container(cfg))
    differ = sorted(k for k in old.keys() | new.keys()
                    if k not in ignored and not k.endswith(".true_masks") and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise LessegError(
            f"{run_dir} holds a run with another config ({shown}{', ...' if len(differ) > 4 else ''}); "
            "delete it to rerun, or pass --out for a new bench folder"
        )
    _same_start(cfg.model.pretrained, state.get("pretrained_sha256"), run_dir)
    return state


def _same_start(pretrained: str | None, digest: str | None, run_dir: Path) -> None:
    """Refuse a run that started from another version of its ``model.pretrained`` file (same path, say a
    retrained bench encoder). Runs from before checkpoints kept the digest: the file must predate the run."""
    if not pretrained or not Path(pretrained).is_file():
        return  # training it (resuming) reports the missing file
    if digest is not None:
        changed = digest != ckpt.file_digest(pretrained)
    else:
        started = run_dir / "config.yaml"  # written when the run starts
        started = started if started.is_file() else run_dir / "last.pt"
        changed = Path(pretrained).stat().st_mtime > started.stat().st_mtime
    if changed:
        raise LessegError(f"{run_dir} holds a run that started from another version of {pretrained} (the file "
                          "changed since); delete it to rerun, or pass --out for a new bench folder")


def train_records(metrics: Path) -> list[dict]:
    """The ``train`` records of a run's ``metrics.jsonl`` (none when the file is missing)."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [r for r in map(json.loads, lines) if r.get("event") == "train"]


def mean_rate(records: list[dict]) -> float | None:
    """Mean logged iterations per second, None when no record has one."""
    rates = [r["it_per_s"] for r in records if r.get("it_per_s")]
    return sum(rates) / len(rates) if rates else None


def last_logged(records: list[dict], key: str) -> float | None:
    """The last logged value of ``key`` (e.g. pl_miou: the pseudo-labels' quality at the end), or None."""
    return next((r[key] for r in reversed(records) if key in r), None)


def read_numbers(path: Path) -> list[float | None]:
    """The whitespace-separated numbers of a small file, None for each that is not a finite number."""
    values = []
    for tok in path.read_text().split() if path.is_file() else []:
        try:
            v = float(tok)
        except ValueError:
            v = math.nan
        values.append(v if math.isfinite(v) else None)
    return values
