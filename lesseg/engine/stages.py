"""Pipelines: a method as a list of named stages, run by one ``lesseg train`` and resumable stage by stage.

Stage ``k`` works in ``<out>/<name>`` (the last one in ``<out>`` itself: its checkpoint is the run's) and
leaves a product found by name: a training stage's ``last.pt``, a task stage's folder (a dataset in the
folder format). A done marker (``done.json``) is written last, with the settings the product depends on and
the identities of the products it used; ``<out>/stages.json`` shows every stage's state. A rerun skips a
finished stage, resumes an interrupted training stage from its ``last.pt``, and runs again a stage whose
settings changed (its schedule, ``train.iters``/``epochs``, included; only run-time settings such as the device
or the logging are not compared) or whose upstream products were remade (its folder is cleared first).

A stage whose ``skip`` says it is unnecessary given the earlier products (AE after its erasing stopped) is
not run: ``stages.json`` marks it ``skipped`` (with the reason and ``same_as``, the stage whose product stands
in), and its product is a symbolic link to that stage's product. A later rerun that runs it removes the link
first (nothing is ever written through it).

What each stage measured is logged as it finishes: an event ``{"event": "stage", "stage": name, "step": k,
...metrics}`` in the run's ``metrics.jsonl`` (one per stage: a rerun's replaces the earlier one; the last
stage's trainer, which starts the file afresh on a fresh run, writes the earlier stages' events again as it
begins) and TensorBoard scalars ``stage/<name>/<metric>`` at step k in ``<out>/tb/stages`` (a run of its own,
so the trainer's purge of ``<out>/tb`` never hides them; each ``lesseg train`` shows its stages anew).
``<out>/pipeline.yaml`` keeps the run's config (``lesseg viz --weak`` reads it; ``lesseg train`` loads it).

Per-stage overrides live in the config under ``stages.<name>`` (e.g. ``stages.stage1.train.iters=300``),
validated with the rest of the config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import config as config_mod
from .. import dist
from ..errors import ConfigError
from ..methods import METHODS
from ..methods.base import Stage, stage_config, stage_folder, stage_product
from .context import EngineContext
from .trainer import RESUMABLE_PREFIXES, Trainer, amp_dtype, flatten

log = logging.getLogger(__name__)
MARKER = "done.json"
STATUS = "stages.json"
PIPELINE = "pipeline.yaml"  # the run's config, as the pipeline ran it
STAGE_TB = Path("tb") / "stages"


# the schedule makes a training stage's product: a resume may change it (an interrupted stage goes on to the
# new length), but a finished stage with another length trains again rather than passing for one
SCHEDULE = ("train.iters", "train.epochs")


def _inputs(stage: Stage, scfg: DictConfig) -> dict:
    """What a finished product depends on (JSON-normalised); run-time settings are left out."""
    if stage.inputs is not None:
        raw = stage.inputs(scfg)
    else:
        raw = {k: v for k, v in flatten(OmegaConf.to_container(scfg)).items()
               if k in SCHEDULE or not k.startswith(RESUMABLE_PREFIXES)}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def _comparable(inputs: dict, done: dict) -> dict:
    """``inputs`` as a finished stage's marker can be compared with: without the schedule where the marker has
    none (written before the schedule counted), so such a stage is not trained again for that alone."""
    stored = done.get("inputs")
    if isinstance(stored, dict) and not any(k in stored for k in SCHEDULE):
        return {k: v for k, v in inputs.items() if k not in SCHEDULE}
    return inputs


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _given_id(path: Path) -> str:
    st = path.stat()
    return f"given:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _clear(folder: Path) -> None:
    """Remove a stage's folder, or the link that stood in for it (never what the link points to)."""
    if folder.is_symlink():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _link(product: Path, target: Path, folder: Path) -> None:
    """Make ``product`` (a skipped stage's, in ``folder``) a relative symbolic link to ``target``, clearing
    what the folder held (a product made while the stage was not skipped); a right link already stays."""
    want = os.path.relpath(os.path.realpath(target), os.path.realpath(product.parent))
    if product.is_symlink() and os.readlink(product) == want:
        return
    _clear(folder)
    product.parent.mkdir(parents=True, exist_ok=True)
    product.symlink_to(want, target_is_directory=target.is_dir())


def write_stage_events(path: Path, events: list[dict], drop: set[str] = frozenset()) -> None:
    """Put ``events`` (stage events) into the metrics log ``path``: each in the place of the event the log
    holds for its stage, or at the end; the events of the stages ``drop`` (being made again) go. Other
    records stay as they are."""
    pending = {e["stage"]: e for e in events}
    lines = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("event") == "stage" and (r.get("stage") in pending or r.get("stage") in drop):
            if r["stage"] in pending:
                lines.append(json.dumps(pending.pop(r["stage"])))
            continue
        lines.append(line)
    lines += [json.dumps(e) for e in sorted(pending.values(), key=lambda e: e["step"])]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def _number(name: str, v: float) -> str:
    """A stage metric as the progress line says it: rates as they are, fractions as percentages."""
    return f"{name} {v:.1f}" if name.endswith("_per_s") else f"{name} {100 * v:.2f}"


class PipelineRun:
    """Runs the stages of ``cfg``'s method; ``resume`` applies to the last stage (earlier ones always
    continue what they finished or began)."""

    def __init__(self, cfg: DictConfig, resume: bool = False) -> None:
        if cfg.out is None:
            raise ConfigError("a run needs a run folder: set `out`")
        self.cfg, self.resume = cfg, resume
        self.stages = METHODS.get(cfg.method.name).pipeline(cfg)
        self.out = Path(cfg.out)
        if self.stages[-1].skip is not None:
            raise ValueError(f"{cfg.method.name}: the last stage ({self.stages[-1].name}) cannot be skipped")
        self.products: dict[str, Path] = {}
        self.status = [{"stage": s.name, "kind": "train" if s.trains else "task", "state": "pending",
                        "product": str(stage_product(self.out, self.stages, k))} for k, s in enumerate(self.stages)]
        self.events: dict[str, dict] = {}  # stage -> its event, for metrics.jsonl and TensorBoard
        self.dropped: set[str] = set()  # stages made again: their old events go
        self.tb_logged: set[str] = set()
        self.tb = None

    def _set(self, k: int, state: str) -> None:
        self.status[k]["state"] = state
        if dist.is_main() and len(self.stages) > 1:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / STATUS).write_text(json.dumps(self.status, indent=1) + "\n")

    def _say(self, k: int, text: str) -> None:
        if dist.is_main() and self.cfg.train.progress and len(self.stages) > 1:
            print(f"stage {k + 1}/{len(self.stages)} {self.stages[k].name}: {text}", file=sys.stderr, flush=True)

    # -- the stages' events -----------------------------------------------------------------------------
    def _record(self, k: int, metrics: dict | None, **extra) -> None:
        name = self.stages[k].name
        self.events[name] = {"event": "stage", "stage": name, "step": k, **extra, **(metrics or {})}
        self.dropped.discard(name)

    def _forget(self, k: int) -> None:
        self.events.pop(self.stages[k].name, None)
        self.dropped.add(self.stages[k].name)

    def _write_events(self) -> None:
        """The events recorded so far into the run's metrics.jsonl and TensorBoard (main process)."""
        if not dist.is_main() or len(self.stages) == 1 or not (self.events or self.dropped):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_stage_events(self.out / "metrics.jsonl", list(self.events.values()), self.dropped)
        new = [e for name, e in self.events.items() if name not in self.tb_logged]
        if not new:
            return
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step 0 hides the stage points of earlier `lesseg train`s of this folder
            self.tb = SummaryWriter(str(self.out / STAGE_TB), purge_step=0)
        for e in new:
            for key, v in e.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
                    self.tb.add_scalar(f"stage/{e['stage']}/{key}", v, e["step"])
            self.tb_logged.add(e["stage"])
        self.tb.flush()

    def _skip(self, k: int, reason: str, ids: dict[str, str], real: dict[str, str]) -> None:
        """Stage ``k`` is unnecessary: its product becomes a link to the last real product of its kind."""
        stage = self.stages[k]
        same = next((s.name for s in reversed(self.stages[:k])
                     if s.trains == stage.trains and real.get(s.name) == s.name), None)
        if same is None:
            kind = "training" if stage.trains else "task"
            raise ValueError(f"stage {stage.name!r} is skipped, but no earlier {kind} stage made a product "
                             "to stand in for it")
        product = stage_product(self.out, self.stages, k)
        dist.barrier()
        if dist.is_main():
            _link(product, self.products[same], stage_folder(self.out, self.stages, k))
        dist.barrier()
        self.products[stage.name], ids[stage.name], real[stage.name] = product, ids[same], same
        self.status[k].pop("metrics", None)
        self.status[k].update(reason=reason, same_as=same)
        self._set(k, "skipped")
        self._say(k, f"skipped: {reason}; its product is {same}'s")
        self._record(k, None, skipped=reason, same_as=same)
        self._write_events()

    def run(self, until: str | None = None) -> dict:
        """Run the stages (up to and including ``until``); the last stage's final evaluation ({} when it
        did not run). ``self.products`` then maps each stage run or skipped to its product."""
        names = [s.name for s in self.stages]
        if until is not None and until not in names:
            raise ConfigError(f"no stage {until!r}; {self.cfg.method.name} has the stages {', '.join(names)}")
        if dist.is_main() and len(self.stages) > 1:
            self.out.mkdir(parents=True, exist_ok=True)
            config_mod.save(self.cfg, self.out / PIPELINE)
        try:
            return self._run(names.index(until) if until is not None else len(self.stages) - 1)
        finally:
            self._write_events()
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _run(self, until: int) -> dict:
        products = self.products = {}
        ids: dict[str, str] = {}
        real: dict[str, str] = {}  # stage -> the stage whose product it has (itself unless skipped)
        result: dict = {}
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages[: until + 1]):
            product = stage_product(self.out, self.stages, k)
            if stage.given is not None:
                if not product.is_file():
                    raise ConfigError(f"stage {stage.name!r}: no checkpoint {product}")
                products[stage.name], ids[stage.name] = product, _given_id(product)
                real[stage.name] = stage.name
                self._set(k, "given")
                self._say(k, f"given ({product})")
                continue
            folder = stage_folder(self.out, self.stages, k)
            reason = stage.skip(dict(products)) if stage.skip is not None else None
            if reason is not None:
                self._skip(k, reason, ids, real)
                continue
            real[stage.name] = stage.name
            if product.is_symlink():  # it was skipped before: the link goes, the product it shows stays
                dist.barrier()
                if dist.is_main():
                    _clear(folder)
                dist.barrier()
            self.status[k].pop("reason", None)
            self.status[k].pop("same_as", None)
            scfg = stage_config(self.cfg, self.stages, k, products)
            marker = {"stage": stage.name, "inputs": _inputs(stage, scfg), "upstream": dict(ids)}
            done = _read_marker(folder)
            if done is not None and k < last:
                if {kk: done.get(kk) for kk in ("inputs", "upstream")} == {"inputs": _comparable(marker["inputs"], done),
                                                                           "upstream": marker["upstream"]}:
                    products[stage.name], ids[stage.name] = product, done["id"]
                    self.status[k]["metrics"] = done.get("metrics")  # what it measured when it ran
                    self._set(k, "done")
                    self._say(k, f"done before ({product})")
                    self._record(k, done.get("metrics"))
                    continue
                self._say(k, "its settings or inputs changed since it finished: running it again")
                dist.barrier()
                if dist.is_main():
                    shutil.rmtree(folder, ignore_errors=True)
                dist.barrier()
            self._set(k, "running")
            self._say(k, "training" if stage.trains else "running")
            self._forget(k)
            if stage.trains:
                resume = self.resume if k == last else (folder / "last.pt").is_file()
                if k == last and len(self.stages) > 1:
                    trainer = Trainer(scfg, resume=resume, log_started=self._write_events)
                else:
                    trainer = Trainer(scfg, resume=resume)
                result = trainer.fit()
                metrics = {trainer.metric: result.get("score")}
            else:
                metrics = self._run_task(stage, scfg, folder, products)
            marker["id"] = uuid.uuid4().hex
            marker["metrics"] = self.status[k]["metrics"] = metrics
            if metrics:
                self._say(k, "done, " + ", ".join(_number(n, v) for n, v in metrics.items() if v is not None))
            if dist.is_main():
                folder.mkdir(parents=True, exist_ok=True)
                (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            dist.barrier()
            products[stage.name], ids[stage.name] = product, marker["id"]
            self._set(k, "done")
            self._record(k, metrics)
            self._write_events()
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


__all__ = ["MARKER", "PIPELINE", "STAGE_TB", "STATUS", "PipelineRun", "run_pipeline", "stage_config",
           "write_stage_events"]
