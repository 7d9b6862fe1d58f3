"""Rounds inside one training and the label store (the engine issue): rounds happen at their steps, nothing
is selected twice, the store round-trips through a checkpoint, datasets see the new labels, a kill and
resume in the middle of the rounds gives the same result, and two processes run them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_active  # noqa: F401  (registers the toy method)

from lesseg.data.label_store import LabelStore
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.trainer import Trainer
from lesseg.errors import LessegError

STREAMS = {"streams": {"labeled": {"split": "train", "batch_size": 4},
                       "target": {"split": "val", "batch_size": 4, "labeled": False}}}
TOY = {"name": "toy_active", "per_image": 5}


# -- the label store ----------------------------------------------------------------------------------
def test_label_store_rasterises_refuses_twice_and_round_trips():
    store = LabelStore(3)
    assert store.add(1, torch.tensor([5, 0, 7]), torch.tensor([2, 1, 0]), 0, (2, 4)) == 3
    store.add(1, np.array([3]), np.array([4]), 1, (2, 4))
    assert store.rasterize(1, (2, 4)).tolist() == [[1, 255, 255, 4], [255, 2, 255, 0]]
    assert store.rasterize(0, (2, 2)).tolist() == [[255, 255], [255, 255]]
    assert store.labeled(1, (2, 4)).flatten().nonzero().flatten().tolist() == [0, 3, 5, 7]
    assert store.count() == 4 and store.count(0) == 3 and store.count(1) == 1
    with pytest.raises(LessegError, match="twice"):
        store.add(1, [5], [1], 2, (2, 4))
    with pytest.raises(LessegError, match="twice"):
        store.add(2, [1, 1], [1, 1], 2, (2, 4))
    with pytest.raises(LessegError, match="outside"):
        store.add(2, [8], [1], 2, (2, 4))
    with pytest.raises(LessegError, match="image 1 was"):
        store.add(1, [1], [1], 2, (4, 2))

    holder = torch.nn.Module()
    holder.label_store = store
    again = torch.nn.Module()
    again.label_store = LabelStore()  # sized by what it loads (evaluating a checkpoint)
    buf = __import__("io").BytesIO()
    torch.save(holder.state_dict(), buf)
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.label_store.rasterize(1, (2, 4)).tolist() == store.rasterize(1, (2, 4)).tolist()
    assert again.label_store.count(1) == 1 and again.label_store.num_images == 3
    reader = pickle.loads(pickle.dumps(store.reader()))  # what loader workers receive
    assert reader(1, (2, 4)).tolist() == store.rasterize(1, (2, 4)).tolist()


def test_label_store_checkpoint_is_sparse():
    """Labels of 1 % of 100 images of 512x1024: a few bytes per labeled pixel, not a dense mask."""
    store = LabelStore(100)
    rng = np.random.default_rng(0)
    for i in range(100):
        pixels = rng.choice(512 * 1024, 5243, replace=False)
        store.add(i, pixels, rng.integers(0, 19, pixels.size), 0, (512, 1024))
    size = sum(t.numel() * t.element_size() for t in store.get_extra_state().values())
    assert size < 7 * store.count() < 0.1 * 100 * 512 * 1024


# -- rounds in a training -------------------------------------------------------------------------------
def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_rounds_happen_at_their_steps_and_label_new_pixels_each_time(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg(["train.iters=8"], method=TOY, data=STREAMS))
    assert trainer.rounds == [2, 4]
    seen = []
    original = trainer.method.training_step

    def record(batch, step):
        seen.append(int((batch["target"]["mask"] != 255).sum()))
        return original(batch, step)

    monkeypatch.setattr(trainer.method, "training_step", record)
    trainer.fit()
    rounds = [r for r in _records(trainer.out) if r["event"] == "round"]
    n = len(trainer.streams["target"].dataset)
    assert [(r["step"], r["round"], r["pixels"]) for r in rounds] == [(2, 0, 5 * n), (4, 1, 5 * n)]
    store = trainer.method.label_store
    assert store.count(0) == store.count(1) == 5 * n and store.count() == 10 * n  # add() refuses repeats
    # the target batches read the label store afresh after each round (crops may cut labeled pixels off)
    assert seen[:2] == [0, 0] and max(seen[2:4]) > 0 and max(seen[4:]) > max(seen[2:4])
    state = ckpt.load(trainer.out / "last.pt")  # the store is in the checkpoint, sparse
    again = LabelStore()
    again.set_extra_state(state["method"]["label_store._extra_state"])
    for i in range(n):
        assert np.array_equal(again.rasterize(i, (32, 32)), store.rasterize(i, (32, 32)))


def test_rounds_outside_the_run_are_refused(tiny_cfg):
    with pytest.raises(LessegError, match="rounds at steps"):
        Trainer(tiny_cfg(["train.iters=8"], method={**TOY, "rounds": [0.5, 1.0]}, data=STREAMS))


def test_kill_and_resume_between_rounds_gives_the_same_picks_and_weights(tiny_cfg, tmp_path, monkeypatch):
    common = ["train.iters=8", "train.ckpt_every=3", "train.deterministic=true"]
    full = Trainer(tiny_cfg(common + [f"out={tmp_path / 'full'}"], method=TOY, data=STREAMS))
    full.fit()
    killed = Trainer(tiny_cfg(common + [f"out={tmp_path / 'killed'}"], method=TOY, data=STREAMS))
    original = killed.method.after_step

    def crash(step):
        if step == 3:  # the 4th step: after round 0 (step 2) and the checkpoint of step 3, before round 1 (4)
            raise KeyboardInterrupt
        original(step)

    monkeypatch.setattr(killed.method, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert ckpt.load(tmp_path / "killed" / "last.pt")["step"] == 3
    resumed = Trainer(tiny_cfg(common + [f"out={tmp_path / 'killed'}"], method=TOY, data=STREAMS), resume=True)
    assert resumed.method.label_store.count() == full.method.label_store.count(0)  # round 0 came back
    resumed.fit()
    a, b = ckpt.load(tmp_path / "full" / "last.pt")["method"], ckpt.load(tmp_path / "killed" / "last.pt")["method"]
    for k in a:
        if k.endswith("_extra_state"):
            assert all(torch.equal(a[k][f], b[k][f]) for f in a[k]), k
        else:
            assert torch.equal(a[k], b[k]), k
    torch.use_deterministic_algorithms(False)


def test_two_processes_run_the_rounds_with_one_store(tiny_cfg, tmp_path):
    from lesseg import config

    cfg = tiny_cfg(["train.iters=4", f"out={tmp_path / 'ddp'}"], method={**TOY, "rounds": [0.5]}, data=STREAMS)
    cfg_path = tmp_path / "cfg.yaml"
    config.save(cfg, cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(Path(__file__).parent / "toy_active.py"), "train", str(cfg_path)],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]
    rounds = [x for x in _records(tmp_path / "ddp") if x["event"] == "round"]
    assert [(x["step"], x["pixels"]) for x in rounds] == [(2, 5 * 15)]  # every image of both shards, once
    state = ckpt.load(tmp_path / "ddp" / "last.pt")
    store = LabelStore()
    store.set_extra_state(state["method"]["label_store._extra_state"])
    assert store.count() == 75 and all(len(np.unique(p)) == len(p) for p in store._pixels)
