"""Pipelines of stages (the engine issue): every stage of every multi-stage method runs on tiny data, a rerun
skips finished stages, an interrupted stage resumes to the same result, per-stage overrides are validated
config keys, and single-stage methods keep their run folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import MARKER, STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.errors import ConfigError
from lesseg.methods import METHODS

TWO_STREAMS = {"streams": {"labeled": {"split": "train", "batch_size": 4},
                           "unlabeled": {"split": "val", "batch_size": 4, "labeled": False}}}
MULTI_STAGE = [n for n in METHODS.names() if len(METHODS.get(n).stage_names) > 1]


def test_there_are_multi_stage_methods_to_check():
    assert "self_training" in MULTI_STAGE


@pytest.fixture
def fits(monkeypatch):
    """The (out folder, resumed step) of every Trainer.fit call."""
    calls = []
    original = trainer_mod.Trainer.fit

    def fit(self):
        calls.append((Path(self.out).name, self.resumed_from))
        return original(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    return calls


@pytest.mark.parametrize("name", MULTI_STAGE)
def test_pipeline_contract_every_stage_runs_and_a_rerun_skips_finished_stages(name, tiny_cfg, fits):
    cfg = tiny_cfg(["train.iters=2"], method={"name": name}, data=TWO_STREAMS)
    stages = METHODS.get(name).pipeline(cfg)
    assert [s.name for s in stages] == list(METHODS.get(name).stage_names)
    result = train(cfg)
    assert 0.0 <= result["miou"] <= 1.0
    out = Path(cfg.out)
    status = json.loads((out / STATUS).read_text())
    assert [s["state"] for s in status] == ["done"] * len(stages)
    for s in status:
        assert Path(s["product"]).exists(), s
    for s in stages[:-1]:
        assert (out / s.name / MARKER).is_file()
    trained = len(fits)
    assert trained == sum(s.trains for s in stages)
    products = {s["product"]: Path(s["product"]).stat().st_mtime_ns for s in status[:-1]}

    measured = [x.get("metrics") for x in status[:-1]]
    PipelineRun(cfg).run(until=stages[-2].name)  # everything before the last stage: all done, all skipped
    assert len(fits) == trained
    assert {p: Path(p).stat().st_mtime_ns for p in products} == products
    again = json.loads((out / STATUS).read_text())  # a skipped stage keeps what it measured when it ran
    assert [x.get("metrics") for x in again[:-1]] == measured and any(measured)


def test_an_interrupted_stage_resumes_to_the_same_result(tiny_cfg, tmp_path, monkeypatch):
    common = ["train.iters=4", "train.ckpt_every=1", "train.deterministic=true"]
    method = {"name": "self_training"}
    train(tiny_cfg(common + [f"out={tmp_path / 'full'}"], method=method, data=TWO_STREAMS))

    original = trainer_mod.Trainer.train_step

    def crash(self, batch):
        if Path(self.out).name == "stage1" and self.step == 2:  # stage 1 dies in its 3rd step
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash)
    cfg = tiny_cfg(common + [f"out={tmp_path / 'killed'}"], method=method, data=TWO_STREAMS)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    status = json.loads((tmp_path / "killed" / STATUS).read_text())
    assert [s["state"] for s in status] == ["running", "pending", "pending"]
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    resumed = []
    fit = trainer_mod.Trainer.fit
    monkeypatch.setattr(trainer_mod.Trainer, "fit", lambda self: resumed.append(self.resumed_from) or fit(self))
    train(cfg)
    assert resumed == [2, None]  # stage 1 from its step-2 checkpoint, the last stage from scratch
    for stage in ("stage1/last.pt", "last.pt"):
        a, b = ckpt.load(tmp_path / "full" / stage)["method"], ckpt.load(tmp_path / "killed" / stage)["method"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    masks = sorted((tmp_path / "full" / "pseudo" / "masks").iterdir())
    assert [p.read_bytes() for p in masks] == [
        (tmp_path / "killed" / "pseudo" / "masks" / p.name).read_bytes() for p in masks]
    torch.use_deterministic_algorithms(False)


def test_per_stage_overrides_apply_to_their_stage_only(tiny_cfg):
    cfg = tiny_cfg(["train.iters=2", "stages.stage1.train.iters=3", "stages.pseudo.eval.flip=true"],
                   method={"name": "self_training"}, data=TWO_STREAMS)
    train(cfg)
    out = Path(cfg.out)
    stage1 = ckpt.load(out / "stage1" / "last.pt")
    assert stage1["step"] == 3 and stage1["config"]["method"]["name"] == "supervised"
    assert stage1["config"]["stages"] == {}
    assert json.loads((out / "pseudo" / MARKER).read_text())["inputs"]["eval"]["flip"] is True
    assert ckpt.load(out / "last.pt")["step"] == 2


@pytest.mark.parametrize("override, message", [
    ("stages.stage9.train.iters=3", r"`stages\.stage9`: method self_training has the stages stage1, pseudo, train"),
    ("stages.stage1.train.iterz=3", r"stages\.stage1\.train\.iterz"),
    ("stages.stage1.train.iters=-3", r"stages\.stage1`: train\.iters must be in \[0, inf\)"),
    ("stages.stage1.method.threshold=0.5", "not method or stages"),
])  # fmt: skip
def test_bad_stage_overrides_are_config_errors(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg([override], method={"name": "self_training"}, data=TWO_STREAMS)


def test_single_stage_methods_keep_their_run_folder(tiny_cfg):
    cfg = tiny_cfg(["train.iters=1"])
    train(cfg)
    out = Path(cfg.out)
    assert (out / "last.pt").is_file() and not (out / STATUS).exists() and not (out / "train").exists()
