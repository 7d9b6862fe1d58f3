"""Pipelines of stages (the engine issue): every stage of every multi-stage method runs on tiny data, a rerun
skips finished stages, an interrupted stage resumes to the same result, per-stage overrides are validated
config keys, and single-stage methods keep their run folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lesseg import config
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import MARKER, PIPELINE, STAGE_TB, STATUS, PipelineRun
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
    # a stage declared unnecessary by its method (AE's steps after the erasing stopped) is skipped
    skipped = {s["stage"] for s in status if s["state"] == "skipped"}
    assert [s["state"] for s in status] == ["skipped" if s.name in skipped else "done" for s in stages]
    for s in status:
        assert Path(s["product"]).exists(), s
    for s in stages[:-1]:
        assert (out / s.name / MARKER).is_file() or Path(status[stages.index(s)]["product"]).is_symlink()
    trained = len(fits)
    assert trained == sum(s.trains for s in stages if s.name not in skipped)
    products = {s["product"]: Path(s["product"]).stat().st_mtime_ns for s in status[:-1]}

    measured = [x.get("metrics") for x in status[:-1]]
    PipelineRun(cfg).run(until=stages[-2].name)  # everything before the last stage: all done, all skipped
    assert len(fits) == trained
    assert {p: Path(p).stat().st_mtime_ns for p in products} == products
    again = json.loads((out / STATUS).read_text())  # a skipped stage keeps what it measured when it ran
    assert [x.get("metrics") for x in again[:-1]] == measured and any(measured)


def test_a_finished_stage_trains_again_when_its_schedule_changes_not_its_logging(tiny_cfg, fits):
    # self_training: stage1 (a supervised teacher) then the student; stage 1's length makes its product
    base = ["train.iters=2", "stages.stage1.train.iters=2"]
    cfg = tiny_cfg(base, method={"name": "self_training"}, data=TWO_STREAMS)
    first = METHODS.get("self_training").pipeline(cfg)[0].name
    assert first == "stage1"
    PipelineRun(cfg).run(until=first)
    PipelineRun(tiny_cfg([*base, "stages.stage1.train.log_every=1", "stages.stage1.train.progress=false"],
                         method={"name": "self_training"}, data=TWO_STREAMS)).run(until=first)
    assert fits == [("stage1", None)]  # run-time settings: done before
    longer = tiny_cfg([*base, "stages.stage1.train.iters=3"], method={"name": "self_training"}, data=TWO_STREAMS)
    PipelineRun(longer).run(until=first)
    assert fits == [("stage1", None), ("stage1", None)]  # trained again, from the start
    assert ckpt.load(Path(longer.out) / first / "last.pt")["step"] == 3
    # a marker written before the schedule counted (no train.iters in it) still stands for its stage
    marker = Path(longer.out) / first / MARKER
    done = json.loads(marker.read_text())
    done["inputs"] = {k: v for k, v in done["inputs"].items() if k not in ("train.iters", "train.epochs")}
    marker.write_text(json.dumps(done))
    PipelineRun(longer).run(until=first)
    assert len(fits) == 2


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


# -- the stages' events in metrics.jsonl and TensorBoard ------------------------------------------------------


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stage_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of ``<out>/tb/stages`` as TensorBoard shows them (purged points left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / STAGE_TB))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_stage_events_are_logged_and_survive_the_fresh_start_of_the_last_stage(tiny_cfg):
    cfg = tiny_cfg(["train.iters=2", "data.streams.unlabeled.true_masks=true"], method={"name": "self_training"},
                   data=TWO_STREAMS)
    out = Path(cfg.out)
    result = train(cfg)
    status = json.loads((out / STATUS).read_text())
    for rerun in (False, True):  # a rerun skips stage1 and pseudo and trains the last stage afresh
        recs = records(out)
        events = [r for r in recs if r["event"] == "stage"]
        assert [(e["stage"], e["step"]) for e in events] == [("stage1", 0), ("pseudo", 1), ("train", 2)]
        for e, s in zip(events, status):
            assert {k: v for k, v in e.items() if k not in ("event", "stage", "step")} == s["metrics"]
        assert events[2]["miou"] == result["miou"]
        # the earlier stages' events were written before the last stage's first record, and its fresh start
        # (which deletes an old metrics.jsonl) did not take them
        first_train = next(i for i, r in enumerate(recs) if r["event"] == "train")
        assert recs.index(events[0]) < first_train and recs.index(events[1]) < first_train
        assert recs.index(events[2]) == len(recs) - 1
        scalars = stage_scalars(out)
        assert scalars["stage/stage1/miou"] == [(0, pytest.approx(status[0]["metrics"]["miou"]))]
        assert scalars["stage/pseudo/pseudo_miou"] == [(1, pytest.approx(status[1]["metrics"]["pseudo_miou"]))]
        assert scalars["stage/train/miou"] == [(2, pytest.approx(result["miou"]))]  # one point: reruns purge
        assert set(scalars) == {"stage/stage1/miou", "stage/pseudo/pseudo_miou", "stage/pseudo/pseudo_acc",
                                "stage/train/miou"}
        if not rerun:
            result = train(cfg)
            status = json.loads((out / STATUS).read_text())
    assert config.load(out / PIPELINE) == cfg  # the run's config, as it ran


def test_a_resumed_last_stage_writes_the_stage_events_again(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(["train.iters=3", "train.ckpt_every=1"], method={"name": "self_training"}, data=TWO_STREAMS)
    out = Path(cfg.out)
    original = trainer_mod.Trainer.train_step

    def crash(self, batch):
        if Path(self.out) == out and self.step == 1:  # the last stage dies in its 2nd step
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [r["stage"] for r in records(out) if r["event"] == "stage"] == ["stage1", "pseudo"]
    seen = []  # the stage events in the log while the resumed last stage trains

    def look(self, batch):
        seen.append([r["stage"] for r in records(out) if r["event"] == "stage"])
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", look)
    monkeypatch.setattr(trainer_mod, "truncate_metrics", lambda path, step: path.write_text(""))  # drops all
    train(cfg, resume=True)
    assert seen == [["stage1", "pseudo"]] * 2  # steps 2 and 3
    assert [r["stage"] for r in records(out) if r["event"] == "stage"] == ["stage1", "pseudo", "train"]


# -- skipped stages ---------------------------------------------------------------------------------------------


@pytest.fixture
def skippable(monkeypatch):
    """self_training with a second stage 1 and a second pseudo stage that a switch skips; the last stage
    trains on the second pseudo stage's product. Records the products each skip rule saw."""
    from lesseg.methods.base import Stage
    from lesseg.methods.self_training import (
        SelfTraining,
        pseudo_inputs,
        stage1_config,
        stage3_config,
        write_pseudo_dataset,
    )

    switch = {"skip": True, "seen": []}

    def rule(products):
        switch["seen"].append(sorted(products))
        return "not needed here" if switch["skip"] else None

    def pipeline(cls, cfg):
        return [Stage("stage1", config=stage1_config),
                Stage("pseudo", run=write_pseudo_dataset, inputs=pseudo_inputs),
                Stage("again", config=stage1_config, skip=rule),
                Stage("pseudo2", run=write_pseudo_dataset, inputs=pseudo_inputs, skip=rule),
                Stage("train", config=lambda c, p: stage3_config(c, {**p, "pseudo": p["pseudo2"]}))]

    monkeypatch.setattr(SelfTraining, "pipeline", classmethod(pipeline))
    return switch


def test_skipped_stages_stand_in_for_an_earlier_product_and_come_back_cleanly(tiny_cfg, fits, skippable):
    cfg = tiny_cfg(["train.iters=2"], method={"name": "self_training"}, data=TWO_STREAMS)
    out = Path(cfg.out)
    train(cfg)
    assert skippable["seen"] == [["pseudo", "stage1"], ["again", "pseudo", "stage1"]]  # earlier products
    status = json.loads((out / STATUS).read_text())
    assert [s["state"] for s in status] == ["done", "done", "skipped", "skipped", "done"]
    assert (status[2]["same_as"], status[3]["same_as"]) == ("stage1", "pseudo")
    assert status[2]["reason"] == "not needed here" and "metrics" not in status[2]
    assert [f[0] for f in fits] == ["stage1", "run"]  # the skipped training stage did not train
    # the products are links to the stand-ins, under the stages' own names
    assert (out / "again" / "last.pt").is_symlink() and (out / "pseudo2").is_symlink()
    assert (out / "again" / "last.pt").resolve() == (out / "stage1" / "last.pt").resolve()
    assert (out / "pseudo2").resolve() == (out / "pseudo").resolve()
    assert ckpt.load(out / "last.pt")["config"]["data"]["streams"]["pseudo"]["root"] == str(out / "pseudo2")
    events = {r["stage"]: r for r in records(out) if r["event"] == "stage"}
    assert events["pseudo2"]["skipped"] == "not needed here" and events["pseudo2"]["same_as"] == "pseudo"

    # no longer skipped: the links go, the stages run for real, and nothing was written through the links
    kept = {p: p.stat().st_mtime_ns for p in [out / "stage1" / "last.pt", *(out / "pseudo" / "masks").iterdir()]}
    skippable["skip"] = False
    PipelineRun(cfg).run(until="pseudo2")
    assert [f[0] for f in fits] == ["stage1", "run", "again"]
    assert not (out / "pseudo2").is_symlink() and (out / "pseudo2" / MARKER).is_file()
    assert not (out / "again" / "last.pt").is_symlink() and (out / "again" / MARKER).is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    status = json.loads((out / STATUS).read_text())
    assert [s["state"] for s in status[:4]] == ["done"] * 4 and "same_as" not in status[2]

    # skipped again: the real products go (a link stands in), nothing trains, the stand-ins stay untouched
    skippable["skip"] = True
    PipelineRun(cfg).run(until="pseudo2")
    assert [f[0] for f in fits] == ["stage1", "run", "again"]
    assert (out / "pseudo2").is_symlink() and (out / "again" / "last.pt").is_symlink()
    assert not (out / "again" / MARKER).exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_the_last_stage_cannot_be_skipped(tiny_cfg, monkeypatch):
    from lesseg.methods.base import Stage
    from lesseg.methods.self_training import SelfTraining

    monkeypatch.setattr(SelfTraining, "pipeline", classmethod(
        lambda cls, cfg: [Stage("stage1", config=lambda c, p: c), Stage("train", config=lambda c, p: c,
                                                                        skip=lambda p: "never")]))
    with pytest.raises(ValueError, match=r"the last stage \(train\) cannot be skipped"):
        PipelineRun(tiny_cfg(method={"name": "self_training"}, data=TWO_STREAMS))
