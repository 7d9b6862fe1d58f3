"""`lesseg pretrain`: self-supervised encoder pretraining (lightly's heads, losses and augmentations).

Tiny and on CPU: timm's test encoder on the 32x32 shapes dataset of conftest."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightly")

from conftest import TINY, tiny_dict
from lightly.utils.scheduler import cosine_warmup_schedule

from lesseg import config, dist
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.trainer import NonFiniteLoss
from lesseg.errors import ConfigError, LessegError
from lesseg.models import build_model, create_encoder
from lesseg.pretrain import SSL_METHODS, Pretrainer, from_dict, pretrain
from lesseg.pretrain.data import ViewPairs, image_split, view_transform

METHODS = ("simclr", "densecl")


def pre_dict(root, out, **pretrain_opts) -> dict:
    opts = {
        "iters": 4,
        "batch_size": 8,
        "image_size": 32,
        "log_every": 2,
        "queue_size": 64,
        "proj_dim": 16,
        **pretrain_opts,
    }
    return tiny_dict(root, out, pretrain=opts)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_encoder_loads_through_model_pretrained(shapes_root, tmp_path, method):
    out = tmp_path / "run"
    summary = pretrain(from_dict(pre_dict(shapes_root, out, method=method)))
    assert summary["steps"] == 4 and summary["images"] == 32 and np.isfinite(summary["loss"])
    stored = weights(summary["encoder"])
    for product in ("encoder.pt", "last.pt"):  # the product, and the resumable checkpoint itself
        cfg = config.from_dict(
            tiny_dict(shapes_root, tmp_path / "sup"), [f"model.pretrained={out / product}"]
        )
        encoder = build_model(cfg.model, 7).encoder.state_dict()
        assert set(encoder) == set(stored)
        assert all(torch.equal(encoder[k], v) for k, v in stored.items())
    initial = create_encoder(TINY, 16).state_dict()
    assert not all(torch.equal(initial[k], v) for k, v in stored.items())  # the steps changed the encoder


@pytest.mark.parametrize("method", METHODS)
def test_steps_lower_the_loss_on_a_fixed_batch(shapes_root, tmp_path, method):
    cfg = from_dict(pre_dict(shapes_root, tmp_path, method=method, queue_size=0))  # in-batch negatives
    torch.manual_seed(0)
    model = SSL_METHODS.get(method)(create_encoder(TINY, 16), cfg.pretrain)
    source, split = image_split(cfg)
    views = ViewPairs(source, source.samples(split)[:8], view_transform(cfg))
    batch = torch.utils.data.default_collate([views[(i, i)] for i in range(8)])
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.training_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(shapes_root, tmp_path, monkeypatch, method):
    opts = {"method": method, "iters": 6, "ckpt_every": 3}
    pretrain(from_dict(pre_dict(shapes_root, tmp_path / "whole", **opts)))

    step = Pretrainer.train_step

    def dies_at_step_4(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self, batch)

    cut = from_dict(pre_dict(shapes_root, tmp_path / "cut", **opts))
    monkeypatch.setattr(Pretrainer, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cut)
    assert (
        weights(tmp_path / "cut" / "last.pt")["step"] == 3 and not (tmp_path / "cut" / "encoder.pt").exists()
    )
    monkeypatch.setattr(Pretrainer, "train_step", step)
    pretrain(cut, resume=True)

    a, b = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "cut" / "last.pt")
    assert b["step"] == 6
    assert a["method"].keys() == b["method"].keys()
    for k, v in a["method"].items():  # student, heads, momentum encoder, memory banks
        assert torch.equal(v, b["method"][k]) if torch.is_tensor(v) else v.keys() == b["method"][k].keys(), k
    if method == "densecl":
        banks = a["method"]["_extra_state"]
        assert all(torch.equal(v, b["method"]["_extra_state"][k]) for k, v in banks.items())
    enc_a, enc_b = weights(tmp_path / "whole" / "encoder.pt"), weights(tmp_path / "cut" / "encoder.pt")
    assert all(torch.equal(v, enc_b[k]) for k, v in enc_a.items())
    steps = [
        [json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "cut")
    ]
    assert steps[0] == steps[1] == [2, 3, 4, 6]  # what the killed run logged after step 3 is not repeated


def test_resume_refuses_a_changed_setting_and_takes_more_steps(shapes_root, tmp_path):
    d = pre_dict(shapes_root, tmp_path / "run", method="densecl")
    pretrain(from_dict(d))
    with pytest.raises(LessegError, match=r"pretrain\.lr"):
        Pretrainer(from_dict(d, ["pretrain.lr=0.5"]), resume=True)
    longer = Pretrainer(from_dict(d, ["pretrain.iters=6"]), resume=True)
    cosine = cosine_warmup_schedule(
        4, 6, start_value=1.0, end_value=0.001, warmup_steps=0, warmup_start_value=0.0
    )
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * cosine)  # the schedule stretched
    assert longer.fit()["steps"] == 6
    with pytest.raises(LessegError, match="no checkpoint"):
        Pretrainer(from_dict(pre_dict(shapes_root, tmp_path / "none")), resume=True)


def test_config_errors_name_the_key(shapes_root, tmp_path):
    d = pre_dict(shapes_root, tmp_path)
    with pytest.raises(ConfigError, match="pretrain.bogus"):
        from_dict(d, ["pretrain.bogus=1"])
    with pytest.raises(ConfigError, match=r"pretrain\.method must be one of densecl, simclr"):
        from_dict(d, ["pretrain.method=byol"])
    with pytest.raises(ConfigError, match=r"pretrain\.temperature must be in \(0, inf\)"):
        from_dict(d, ["pretrain.temperature=0"])
    with pytest.raises(ConfigError, match="pretrain.stream 'target' is not in data.streams"):
        from_dict(d, ["pretrain.stream=target"])
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        Pretrainer(from_dict(d, ["pretrain.batch_size=64"]))
    with pytest.raises(ConfigError, match="pretrain.iters or pretrain.epochs"):
        from_dict(d, ["pretrain.iters=0"])


def test_any_split_or_stream_gives_the_images(shapes_root, tmp_path):
    d = pre_dict(shapes_root, tmp_path)
    assert len(Pretrainer(from_dict(d, ["pretrain.split=unlabeled_1-16"])).stream.dataset) == 30
    listing = tmp_path / "some.txt"
    listing.write_text("\n".join(s.name for s in image_split(from_dict(d))[0].samples("val")[:9]))
    assert len(Pretrainer(from_dict(d, [f"pretrain.split={listing}"])).stream.dataset) == 9
    cfg = from_dict(
        d,
        [
            "pretrain.stream=labeled",
            "data.streams.labeled.split=val",
            "pretrain.epochs=1",
            "pretrain.iters=0",
        ],
    )
    trainer = Pretrainer(cfg)
    assert len(trainer.stream.dataset) == 15 and trainer.max_iters == 1  # 15 // 8


def test_views_are_a_function_of_index_and_seed(shapes_root, tmp_path):
    cfg = from_dict(pre_dict(shapes_root, tmp_path, image_size=24))
    source, split = image_split(cfg)
    views = ViewPairs(source, source.samples(split), view_transform(cfg))
    np.random.seed(1)
    torch.manual_seed(1)
    state = np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b, c = views[(3, 7)], views[(3, 7)], views[(3, 8)]
    assert a["view0"].shape == (3, 24, 24)
    assert torch.equal(a["view0"], b["view0"]) and torch.equal(a["view1"], b["view1"])
    assert not torch.equal(a["view0"], c["view0"]) and not torch.equal(a["view0"], a["view1"])
    assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.get_rng_state(), state[1])


def test_a_non_finite_loss_stops_without_a_checkpoint(shapes_root, tmp_path, monkeypatch):
    from lesseg.pretrain.simclr import SimCLR

    step = SimCLR.training_step
    monkeypatch.setattr(
        SimCLR, "training_step", lambda self, batch: {"loss": step(self, batch)["loss"] * np.nan}
    )
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        pretrain(from_dict(pre_dict(shapes_root, tmp_path / "run", method="simclr")))
    assert not (tmp_path / "run" / "last.pt").exists()


def _ddp_worker(rank: int, port: int, d: dict, folder: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    trainer = Pretrainer(from_dict(d))
    try:
        trainer.fit()
        torch.save(ckpt.unwrap_state(trainer.method.state_dict(), ["student"]), f"{folder}/rank{rank}.pt")
    finally:
        dist.cleanup()


@pytest.mark.parametrize("method", [pytest.param("simclr", marks=pytest.mark.slow), "densecl"])
def test_two_processes_ddp_keep_one_state(shapes_root, tmp_path, method):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = pre_dict(shapes_root, tmp_path / "run", method=method, batch_size=4)
    torch.multiprocessing.spawn(_ddp_worker, args=(port, d, str(tmp_path)), nprocs=2)
    assert weights(tmp_path / "run" / "last.pt")["step"] == 4
    ranks = [weights(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for k, v in ranks[0].items():  # DDP's weights; the momentum encoder and the memory banks gathered alike
        if torch.is_tensor(v):
            assert torch.equal(v, ranks[1][k]), k
        else:
            assert all(torch.equal(t, ranks[1][k][name]) for name, t in v.items()), k
    encoder = weights(tmp_path / "run" / "encoder.pt")
    assert all(torch.equal(v, ranks[0][f"student.encoder.{k}"]) for k, v in encoder.items())


def test_bench_pretrain_runs_each_method_from_each_start(tmp_path, monkeypatch, capsys):
    """Every method at 1/16 from random init, from lesseg pretrain's encoder (made first, once, then reused)
    and from the synthetic encoder; the table has one row per start."""
    from lesseg.bench import pretrain as bp
    from lesseg.engine import trainer

    seen = []

    def fake_train(cfg, resume=False):
        seen.append((cfg.method.name, cfg.model.pretrained))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return {"miou": 0.5}

    pretrained = []

    def fake_ssl(out, iters, extra, device, train_missing, family):
        pretrained.append(iters)
        return out / "ssl" / "encoder.pt", 12.0

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(bp, "ssl_encoder", fake_ssl)
    rows = bp.bench_pretrain(tmp_path, methods=("supervised", "u2pl"), seeds=(0,), ssl_iters=7)
    assert pretrained == [7]
    starts = {(r["start_kind"], r["method"]) for r in rows}
    assert starts == {(s, m) for s in bp.STARTS for m in ("supervised", "u2pl")}
    ssl_runs = [p for m, p in seen if p and p.endswith("encoder.pt")]
    assert len(ssl_runs) == 2 and all(p == str(tmp_path / "ssl" / "encoder.pt") for p in ssl_runs)
    assert ("supervised", None) in seen  # scratch: random init
    assert all(r["budget"] == "1-16" for r in rows)  # no all-labels reference runs
    assert next(r for r in rows if r["start_kind"] == "ssl")["start_cost_s"] == 12.0
    bp.print_pretrain_table(rows)
    out = capsys.readouterr().out
    assert "scratch" in out and "ssl" in out and "12s" in out


def test_bench_pretrain_gives_pretrain_overrides_to_the_pretraining_only(tmp_path, monkeypatch):
    """`lesseg bench pretrain pretrain.queue_size=...` configures lesseg pretrain; the training runs, which have
    no `pretrain` section, get the other overrides (a pretrain.* key there would be an unknown-key error)."""
    from lesseg.bench import pretrain as bp
    from lesseg.engine import trainer

    seen, given = [], []

    def fake_train(cfg, resume=False):
        seen.append(cfg.train.iters)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return {"miou": 0.5}

    def fake_ssl(out, iters, extra, device, train_missing, family):
        given.append(list(extra))
        return out / "ssl" / "encoder.pt", None

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(bp, "ssl_encoder", fake_ssl)
    extra = ["pretrain.queue_size=16", "train.iters=5"]
    rows = bp.bench_pretrain(tmp_path, ("ssl",), ("supervised",), (0,), extra, ssl_iters=7)
    assert given == [extra] and seen == [5] and [r["start_kind"] for r in rows] == ["ssl"]


def test_bench_pretrain_refuses_an_unknown_start(capsys):
    from lesseg.cli import main

    assert main(["bench", "pretrain", "--starts", "ssl,imagenet", "--out", "unused"]) != 0
    assert "imagenet" in capsys.readouterr().err


def test_memory_bank_defaults_to_an_eighth_of_the_images_and_an_oversize_one_is_named(shapes_root, tmp_path,
                                                                                        capsys):
    from lesseg.pretrain.config import queue_for

    assert (queue_for(None, 1024), queue_for(None, 10_582), queue_for(None, 100_000)) == (128, 1322, 4096)
    assert queue_for(0, 1024) == 0 and queue_for(512, 1024) == 512  # a set size is kept
    summary = pretrain(from_dict(pre_dict(shapes_root, tmp_path / "a", method="densecl", queue_size=None)))
    assert summary["queue_size"] == 4  # 32 images
    bank = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["method"]["_extra_state"]
    assert bank["global.bank"].shape[0] == 4 and bank["dense.bank"].shape[0] == 4
    assert "warning" not in capsys.readouterr().out
    pretrain(from_dict(pre_dict(shapes_root, tmp_path / "b", method="densecl", queue_size=64)))
    assert "queue_size=64 is not smaller than the 32 images" in capsys.readouterr().out


def test_bench_refuses_to_reuse_a_pretraining_made_with_other_settings(shapes_root, tmp_path):
    from lesseg.bench.pretrain import _same_pretraining

    cfg = from_dict(pre_dict(shapes_root, tmp_path, queue_size=None))
    config.save(cfg, tmp_path / "config.yaml")
    _same_pretraining(cfg, tmp_path)  # the same: reused
    _same_pretraining(from_dict(pre_dict(shapes_root, tmp_path, queue_size=None, log_every=3)), tmp_path)
    with pytest.raises(LessegError, match=r"pretrain.queue_size: None -> 4096"):
        _same_pretraining(from_dict(pre_dict(shapes_root, tmp_path, queue_size=4096)), tmp_path)
    with pytest.raises(LessegError, match="model.pretrained"):
        _same_pretraining(from_dict(pre_dict(shapes_root, tmp_path, queue_size=None), ["model.pretrained=x.pt"]),
                          tmp_path)
