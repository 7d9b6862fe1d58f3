"""Pipelines: a method as a list of named stages, run by one ``lesseg train`` and resumable stage by stage.

Stage ``k`` works in ``<out>/<name>`` (the last one in ``<out>`` itself: its checkpoint is the run's) and
leaves a product found by name: a training stage's ``last.pt``, a task stage's folder (a dataset in the
folder format). A done marker (``done.json``) is written last, with the settings the product depends on and
the identities of the products it used; ``<out>/stages.json`` shows every stage's state. A rerun skips a
finished stage, resumes an interrupted training stage from its ``last.pt``, and runs again a stage whose
settings changed or whose upstream products were remade (its folder is cleared first).

Per-stage overrides live in the config under ``stages.<name>`` (e.g. ``stages.stage1.train.iters=300``),
validated with the rest of the config.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import dist
from ..errors import ConfigError
from ..methods import METHODS
from ..methods.base import Stage, stage_config, stage_folder, stage_product
from .context import EngineContext
from .trainer import RESUMABLE_PREFIXES, Trainer, amp_dtype, flatten

log = logging.getLogger(__name__)
MARKER = "done.json"
STATUS = "stages.json"


def _inputs(stage: Stage, scfg: DictConfig) -> dict:
    """What a finished product depends on (JSON-normalised); run-time settings are left out."""
    if stage.inputs is not None:
        raw = stage.inputs(scfg)
    else:
        raw = {k: v for k, v in flatten(OmegaConf.to_container(scfg)).items() if not k.startswith(RESUMABLE_PREFIXES)}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _given_id(path: Path) -> str:
    st = path.stat()
    return f"given:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class PipelineRun:
    """Runs the stages of ``cfg``'s method; ``resume`` applies to the last stage (earlier ones always
    continue what they finished or began)."""

    def __init__(self, cfg: DictConfig, resume: bool = False) -> None:
        if cfg.out is None:
            raise ConfigError("a run needs a run folder: set `out`")
        self.cfg, self.resume = cfg, resume
        self.stages = METHODS.get(cfg.method.name).pipeline(cfg)
        self.out = Path(cfg.out)
        self.products: dict[str, Path] = {}
        self.status = [{"stage": s.name, "kind": "train" if s.trains else "task", "state": "pending",
                        "product": str(stage_product(self.out, self.stages, k))} for k, s in enumerate(self.stages)]

    def _set(self, k: int, state: str) -> None:
        self.status[k]["state"] = state
        if dist.is_main() and len(self.stages) > 1:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / STATUS).write_text(json.dumps(self.status, indent=1) + "\n")

    def _say(self, k: int, text: str) -> None:
        if dist.is_main() and self.cfg.train.progress and len(self.stages) > 1:
            print(f"stage {k + 1}/{len(self.stages)} {self.stages[k].name}: {text}", file=sys.stderr, flush=True)

    def run(self, until: str | None = None) -> dict:
        """Run the stages (up to and including ``until``); the last stage's final evaluation ({} when it
        did not run). ``self.products`` then maps each stage run or skipped to its product."""
        names = [s.name for s in self.stages]
        if until is not None and until not in names:
            raise ConfigError(f"no stage {until!r}; {self.cfg.method.name} has the stages {', '.join(names)}")
        products = self.products = {}
        ids: dict[str, str] = {}
        result: dict = {}
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            if until is not None and k > names.index(until):
                break
            product = stage_product(self.out, self.stages, k)
            if stage.given is not None:
                if not product.is_file():
                    raise ConfigError(f"stage {stage.name!r}: no checkpoint {product}")
                products[stage.name], ids[stage.name] = product, _given_id(product)
                self._set(k, "given")
                self._say(k, f"given ({product})")
                continue
            folder = stage_folder(self.out, self.stages, k)
            scfg = stage_config(self.cfg, self.stages, k, products)
            marker = {"stage": stage.name, "inputs": _inputs(stage, scfg), "upstream": dict(ids)}
            done = _read_marker(folder)
            if done is not None and k < last:
                if {kk: done.get(kk) for kk in ("inputs", "upstream")} == {kk: marker[kk] for kk in ("inputs", "upstream")}:
                    products[stage.name], ids[stage.name] = product, done["id"]
                    self.status[k]["metrics"] = done.get("metrics")  # what it measured when it ran
                    self._set(k, "done")
                    self._say(k, f"done before ({product})")
                    continue
                self._say(k, "its settings or inputs changed since it finished: running it again")
                dist.barrier()
                if dist.is_main():
                    shutil.rmtree(folder, ignore_errors=True)
                dist.barrier()
            self._set(k, "running")
            self._say(k, "training" if stage.trains else "running")
            if stage.trains:
                resume = self.resume if k == last else (folder / "last.pt").is_file()
                trainer = Trainer(scfg, resume=resume)
                result = trainer.fit()
                metrics = {trainer.metric: result.get("score")}
            else:
                metrics = self._run_task(stage, scfg, folder, products)
            marker["id"] = uuid.uuid4().hex
            marker["metrics"] = self.status[k]["metrics"] = metrics
            if metrics:
                self._say(k, "done, " + ", ".join(f"{n} {100 * v:.2f}" for n, v in metrics.items() if v is not None))
            if dist.is_main():
                folder.mkdir(parents=True, exist_ok=True)
                (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            dist.barrier()
            products[stage.name], ids[stage.name] = product, marker["id"]
            self._set(k, "done")
        return result

    def _run_task(self, stage: Stage, scfg: DictConfig, folder: Path, products: dict[str, Path]) -> dict:
        """The task's product quality (e.g. ``pseudo_miou`` against the true masks where they exist)."""
        from ..data import stream_source

        device = dist.init(scfg.train.device)
        ctx = EngineContext(cfg=scfg, device=device, class_names=list(stream_source(scfg.data).classes),
                            amp=amp_dtype(scfg.train.amp, device), progress=scfg.train.progress and dist.is_main(),
                            folder=folder, products=dict(products))
        metrics = stage.run(ctx) or {}
        dist.barrier()
        return metrics


def run_pipeline(cfg: DictConfig, resume: bool = False) -> dict:
    """Run every stage of ``cfg``'s method (skipping finished ones); the last stage's final evaluation."""
    return PipelineRun(cfg, resume).run()


__all__ = ["MARKER", "STATUS", "PipelineRun", "run_pipeline", "stage_config"]
