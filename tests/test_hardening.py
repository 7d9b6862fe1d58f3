"""Defects found by trying lesseg as a new user and a QA engineer would (issue 15): each test failed before
its fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# one_thread: the autouse one-intra-op-thread fixture, imported to apply here too
from test_cli import folder_config, folder_tree, one_thread, run_cli  # noqa: F401

from lesseg import config
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.trainer import NonFiniteLoss, Trainer
from lesseg.errors import ConfigError, LessegError


# -- 1, 2: non-finite training state and what is said to be kept ----------------------------------------
def test_a_non_finite_buffer_is_never_checkpointed_over_the_last_good_one(tiny_cfg, monkeypatch):
    """The loss stays finite while a BatchNorm running_var becomes inf (what lr=1e3 does): the checkpoint of
    step 4 must not be written, the one of step 2 stays and the message says so."""
    trainer = Trainer(tiny_cfg(["train.iters=8", "train.ckpt_every=2", "train.log_every=1"]))
    original = trainer.method.after_step

    def poison(step):
        original(step)
        if step == 2:  # the 3rd step: after the checkpoint of step 2
            trainer.method.net.encoder.bn1.running_var[0] = float("inf")

    monkeypatch.setattr(trainer.method, "after_step", poison)
    with pytest.raises(NonFiniteLoss, match=r"step 4 .*bn1\.running_var.*last\.pt, step 2\) is kept"):
        trainer.fit()
    state = ckpt.load(trainer.out / "last.pt")
    assert state["step"] == 2
    assert ckpt.nonfinite_keys({"method": state["method"], "optimizer": state["optimizer"]}) == []


def test_non_finite_optimizer_state_is_refused_too():
    state = {"method": {"w": torch.ones(3)},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}, "param_groups": []}}
    assert ckpt.nonfinite_keys(state) == ["optimizer.state.0.exp_avg"]
    assert ckpt.nonfinite_keys({"method": {"w": torch.ones(3), "n": torch.tensor(3)}}) == []


def test_a_run_that_fails_before_any_checkpoint_does_not_claim_one_is_kept(tiny_cfg):
    trainer = Trainer(tiny_cfg(["optim.lr=1e30", "train.iters=4", "train.log_every=1"]))
    with pytest.raises(NonFiniteLoss, match="no checkpoint was written yet") as info:
        trainer.fit()
    assert "is kept" not in str(info.value)
    assert not (trainer.out / "last.pt").exists()


# -- 3: ranges of numeric config values ------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("data.streams.labeled.batch_size=0", "data.streams.labeled.batch_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("train.log_every=0", "train.log_every"),
    ("train.iters=-5", "train.iters"),
    ("data.aug.blur_p=1.5", "data.aug.blur_p"),
    ("data.crop_size=[0,32]", "data.crop_size"),
    ("eval.scales=[0.5,0.0]", "eval.scales"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("model.dropout=1.0", "model.dropout"),
    ("data.workers=-1", "data.workers"),
    ("method.aux_weight=-1", "method.aux_weight"),
])  # fmt: skip
def test_a_numeric_value_out_of_its_range_is_a_config_error_naming_the_key(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r" must be in [\[(]"):
        tiny_cfg([override])


def test_method_ranges_are_checked_for_each_methods_own_fields(tiny_cfg):
    with pytest.raises(ConfigError, match=r"method\.ema_decay must be in \[0, 1\], got 1\.5"):
        tiny_cfg(["method.ema_decay=1.5"], method={"name": "mean_teacher"})
    with pytest.raises(ConfigError, match=r"method\.drop_percent must be in \[0, 100\]"):
        tiny_cfg(["method.drop_percent=120"], method={"name": "u2pl"})
    assert tiny_cfg(["method.rampup_steps=0"], method={"name": "mean_teacher"}).method.rampup_steps == 0


def test_batch_size_zero_on_the_command_line_is_one_clear_error(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    rc, _, err = run_cli(capsys, "train", folder_config(tmp_path, tree.root), "data.streams.labeled.batch_size=0")
    assert rc == 2 and "data.streams.labeled.batch_size must be in [1, inf), got 0" in err, err
    assert "Traceback" not in err and "ZeroDivision" not in err


# -- 4, 5: what a resume may change ----------------------------------------------------------------------
@pytest.fixture
def finished(tiny_cfg):
    """A 2-step run with a checkpoint at each step; returns the config factory of its folder."""
    Trainer(tiny_cfg(["train.iters=2", "train.ckpt_every=1", "train.log_every=1"])).fit()
    return lambda overrides=(): tiny_cfg(["train.iters=2", "train.ckpt_every=1", "train.log_every=1", *overrides])


def test_resume_with_another_model_shape_names_the_key(finished):
    with pytest.raises(LessegError, match=r"model\.decoder_channels: 16 -> 32"):
        Trainer(finished(["model.decoder_channels=32"]), resume=True)


def test_resume_compares_tensor_shapes_and_names_the_differing_keys(finished):
    """When the config agrees but the state does not (here a crafted one), the keys and shapes are named."""
    cfg = finished()
    path = f"{cfg.out}/last.pt"
    state = ckpt.load(path)
    key = next(k for k in state["method"] if k.endswith("classifier.weight"))
    state["method"][key] = torch.zeros(3, *state["method"][key].shape[1:])
    ckpt.save_atomic(state, path)
    with pytest.raises(LessegError, match=re.escape(key) + r" has shape \(3, .*in the checkpoint, \(7,"):
        Trainer(cfg, resume=True)


def test_resume_refuses_a_changed_learning_rate_instead_of_silently_keeping_the_old_one(finished):
    with pytest.raises(LessegError, match=r"optim\.lr: 0\.01 -> 5\.0"):
        Trainer(finished(["optim.lr=5"]), resume=True)


def test_resume_applies_and_logs_the_keys_it_may_change(finished, caplog):
    cfg = finished(["train.iters=4", "train.eval_every=1"])
    trainer = Trainer(cfg, resume=True)
    assert trainer.resumed_changes == {"train.eval_every": (0, 1), "train.iters": (2, 4)}
    trainer.fit()
    assert yaml.safe_load((trainer.out / "config.yaml").read_text())["train"]["eval_every"] == 1
    records = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["event"] == "resume"]
    assert resume == [{"event": "resume", "step": 2, "changed": {"train.eval_every": {"was": 0, "now": 1},
                                                                  "train.iters": {"was": 2, "now": 4}}}]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2, 3, 4]  # the new eval_every took effect
    assert "train.eval_every" in caplog.text


# -- 6: data check finds what train refuses ---------------------------------------------------------------
def test_data_check_finds_a_labeled_image_without_mask_that_train_refuses(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root)
    (tree.root / "masks" / "img_001.png").unlink()
    rc, out, err = run_cli(capsys, "data", "check", cfg_path)
    assert rc == 1 and "img_001.jpg has no mask" in out, out + err
    rc, _, err = run_cli(capsys, "train", cfg_path)
    assert rc == 2 and "img_001.jpg has no mask" in err, err


def test_data_check_finds_streams_smaller_than_a_batch_and_streams_the_method_lacks(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root)
    rc, out, err = run_cli(capsys, "data", "check", cfg_path, "data.streams.labeled.batch_size=9")
    assert rc == 1 and "stream 'labeled' has 5 images, fewer than one global batch (9" in out, out + err
    rc, _, err = run_cli(capsys, "train", cfg_path, "data.streams.labeled.batch_size=9")
    assert rc == 2 and "fewer than one global batch" in err, err
    rc, out, _ = run_cli(capsys, "data", "check", cfg_path, "method.name=mean_teacher")
    assert rc == 1 and "reads data stream 'unlabeled'" in out, out


# -- 7, 8: what an interrupted run leaves behind ----------------------------------------------------------
def test_stale_checkpoint_temporaries_are_removed_when_a_run_starts(finished):
    out = Path(finished().out)
    stale = [out / name for name in (".last.pt.k1x2.tmp", ".best.pt.z9.tmp")]  # save_atomic's names
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    keep = out / "notes.tmp"
    keep.write_text("mine")
    Trainer(finished(["train.iters=3"]), resume=True).fit()
    assert not any(p.exists() for p in stale) and keep.exists()


def test_resume_truncates_the_metrics_logged_after_the_checkpoint(tiny_cfg, monkeypatch):
    common = ["train.iters=6", "train.ckpt_every=3", "train.log_every=1"]
    killed = Trainer(tiny_cfg(common))
    original = killed.method.after_step

    def crash(step):
        if step == 4:  # dies in the 5th step: steps 4 was logged after the checkpoint of step 3
            raise KeyboardInterrupt
        original(step)

    monkeypatch.setattr(killed.method, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    metrics = killed.out / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    Trainer(tiny_cfg(common), resume=True).fit()
    train_steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]


# -- 10: large images are predicted in tiles -------------------------------------------------------------
def _reference_tiles(net, image, cfg, window, stride, num_classes):
    """Naive reference: a full-size probability sum over the same windows."""
    from lesseg.engine.evaluate import windows
    from lesseg.engine.inference import image_tensor

    h, w = image.shape[:2]
    total = torch.zeros(num_classes, h, w)
    for y in windows(h, window[0], stride[0]):
        for x in windows(w, window[1], stride[1]):
            tile = image_tensor(image[y : y + window[0], x : x + window[1]], cfg)
            with torch.no_grad():
                total[:, y : y + window[0], x : x + window[1]] += net(tile)["logits"].softmax(1)[0]
    return total.argmax(0).numpy()


def test_tiled_prediction_equals_a_full_size_probability_sum_and_whole_when_one_tile_covers(tiny_cfg):
    from lesseg.engine.inference import image_tensor, predict_tiled
    from lesseg.models import build_model

    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = build_model(cfg.model, 7).eval()
    for m in net.modules():  # a network whose classes differ across the image (random init favours one)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(0.01)
    image = np.random.default_rng(0).integers(0, 255, (50, 71, 3), dtype=np.uint8)
    got = predict_tiled(net, image, cfg, [24, 32], [16, 20], 7)
    ref = _reference_tiles(net, image, cfg, [24, 32], [16, 20], 7)
    assert got.shape == (50, 71) and len(np.unique(ref)) > 1
    assert (got == ref).mean() > 0.999  # float summation order may flip exact ties
    with torch.no_grad():
        whole = net(image_tensor(image, cfg))["logits"].argmax(1)[0].numpy()
    assert np.array_equal(predict_tiled(net, image, cfg, [64, 96], [40, 60], 7), whole)


def test_predict_tiles_images_above_max_pixels(tmp_path, capsys, caplog):
    tree = folder_tree(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root)
    assert run_cli(capsys, "train", cfg_path)[0] == 0
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(big)
    rc, _, err = run_cli(capsys, "predict", big, "--checkpoint", tmp_path / "run" / "last.pt",
                           "--out", tmp_path / "pred", "--max-pixels", "1000", "--tile", "40")
    assert rc == 0, err
    assert np.array(Image.open(tmp_path / "pred" / "big.png")).shape == (90, 130)
    assert "predicted in 40x40 tiles" in caplog.text


# -- 11: messages ----------------------------------------------------------------------------------------
def test_a_missing_split_of_shapes_lists_its_splits(tiny_cfg):
    from lesseg.data import stream_source
    from lesseg.errors import DataError

    src = stream_source(tiny_cfg().data)
    with pytest.raises(DataError, match=r"not one of its splits \(labeled_1-16, labeled_1-2.*train.*val\)"):
        src.samples("labeled_1-3")


def test_a_crafted_pretrained_checkpoint_gets_lesseg_s_refusal(tiny_cfg, tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return os.getcwd, ()

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCode()}, path)
    with pytest.raises(ConfigError, match="refused to load pretrained checkpoint") as info:
        Trainer(tiny_cfg([f"model.pretrained={path}"]))
    assert "weights_only" not in str(info.value)


# -- 12 ----------------------------------------------------------------------------------------------------
def test_memory_bank_push_of_no_rows_changes_nothing():
    from lesseg.methods.contrastive import MemoryBank

    bank = MemoryBank([4, 3], dim=2, dtype=torch.float32)
    bank.push(torch.ones(2, 2), torch.tensor([[True, False], [True, True]]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.push(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool))
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())


def test_config_ranges_round_trip_through_a_saved_config(tiny_cfg, tmp_path):
    """Declaring ranges does not change defaults or the saved config."""
    cfg = tiny_cfg()
    config.save(cfg, tmp_path / "c.yaml")
    again = config.load(tmp_path / "c.yaml")
    assert again.data.aug.scale == [0.75, 1.25] and again.optim.momentum == 0.9
