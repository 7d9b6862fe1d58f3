"""RIPU (methods.md section 8): its loss terms by hand, and a tiny domain-adaptation run whose rounds label
target regions from the ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg.engine.trainer import Trainer
from lesseg.errors import ConfigError
from lesseg.methods.active.losses import boundary_pixels, local_consistency, negative_learning


def test_boundary_pixels_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 1, 1]]])
    edge = boundary_pixels(labels)[0]
    # (2, 2) touches the valid 0 at (1, 1) diagonally; the 255 pixels are never boundary pixels
    assert edge.tolist() == [[False, True, True, False], [False, True, True, False], [False, False, True, False]]
    assert not boundary_pixels(torch.zeros(1, 4, 4, dtype=torch.long)).any()


def test_local_consistency_by_hand():
    """Two classes on a 1x3 strip, labels [0, 0, 1]: boundary pixels 1 and 2. With replicate padding the 3x3
    mean of column j averages columns j-1, j, j+1 (edges repeated)."""
    p = torch.tensor([[[[1.0, 0.5, 0.0]], [[0.0, 0.5, 1.0]]]])  # B=1,C=2,H=1,W=3
    labels = torch.tensor([[[0, 0, 1]]])
    mean = [(1.0 + 1.0 + 0.5) / 3, (1.0 + 0.5 + 0.0) / 3, (0.5 + 0.0 + 0.0) / 3]  # class 0, columns 0..2
    d1 = 2 * abs(0.5 - mean[1])  # both classes move by the same amount
    d2 = 2 * abs(0.0 - mean[2])
    assert local_consistency(p, labels).item() == pytest.approx((d1 + d2) / 2)
    assert local_consistency(p, torch.zeros(1, 1, 3, dtype=torch.long)).item() == 0.0  # no boundary


def test_negative_learning_by_hand_and_never_nan():
    p = torch.tensor([0.01, 0.5, 0.49]).view(1, 3, 1, 1)
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    assert negative_learning(p, valid, 0.05).item() == pytest.approx(-math.log(0.99))
    q = torch.tensor([0.01, 0.02, 0.97]).view(1, 3, 1, 1)
    both = torch.cat([p, q], 3)
    expected = -(math.log(0.99) * 2 + math.log(0.98)) / 3
    assert negative_learning(both, torch.ones(1, 1, 2, dtype=torch.bool), 0.05).item() == pytest.approx(expected)
    none = negative_learning(torch.full((1, 3, 2, 2), 1 / 3), torch.ones(1, 2, 2, dtype=torch.bool), 0.05)
    assert none.item() == 0.0 and not torch.isnan(none)
    assert negative_learning(p, torch.zeros(1, 1, 1, dtype=torch.bool), 0.05).item() == 0.0  # padding only


STREAMS = {"streams": {"source": {"split": "train", "batch_size": 4},
                       "target": {"split": "val", "batch_size": 4, "labeled": False}}}


@pytest.mark.parametrize("mode, regions", [("region", "square"), ("pixel", "square"), ("region", "superpixel")])
def test_a_tiny_adaptation_run_labels_the_budget_from_the_ground_truth(tiny_cfg, mode, regions):
    cfg = tiny_cfg(["train.iters=6"], method={"name": "ripu", "mode": mode, "rounds": [0.34, 0.67], "ratio": 0.05,
                                              "pixels": 4000.0, "regions": regions}, data=STREAMS)
    trainer = Trainer(cfg)
    assert trainer.rounds == [2, 4]
    trainer.fit()
    rounds = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "round"]
    store, data = trainer.method.label_store, trainer.streams["target"].dataset
    n = len(data)
    assert [r["images"] for r in rounds] == [n, n]
    assert all(0 <= r["flat_score_images"] <= n for r in rounds)  # counted every round
    if regions == "superpixel":  # whole superpixels until the round's pixels reach the budget
        budget = math.ceil(32 * 32 * 0.05 / 2)
        for r in rounds:
            assert budget * n <= r["pixels"] < 3 * budget * n
    else:
        per_round = (math.ceil(32 * 32 * 0.05 / 2 / 9) if mode == "region" else
                     math.ceil(4000 * 32 * 32 / (640 * 1280) / 2))
        for r in rounds:
            assert r["pixels"] <= per_round * (9 if mode == "region" else 1) * n and r["pixels"] > 0
    for k in (0, 1):  # each round's picture: images, score maps, the selected regions
        assert Image.open(Path(cfg.out) / "rounds" / f"round{k}.png").size[1] > 100
    for i in range(n):  # the stored labels are the ground truth's
        truth = torch.from_numpy(data.source.read_mask(data.samples[i].mask)).long()
        got = torch.from_numpy(store.rasterize(i, (32, 32))).long()
        known = got != 255
        assert known.any() and torch.equal(got[known], truth[known])
    assert rounds[-1]["labeled_pixels"] == store.count()
    assert rounds[-1]["labeled_share"] == pytest.approx(store.count() / (n * 32 * 32))


def test_paper_configs_set_the_authors_geometry_and_schedule():
    from lesseg import config

    gtav = config.load("cityscapes/ripu_gtav.yaml")
    assert gtav.data.streams.source.dataset == "gtav" and list(gtav.data.streams.source.crop_size) == [720, 1280]
    assert list(gtav.data.crop_size) == [640, 1280] and gtav.model.head == "deeplabv2" and gtav.model.freeze_bn
    assert list(gtav.method.rounds) == [0.25, 0.30, 0.35, 0.40, 0.45] and gtav.train.iters == 40000
    synthia = config.load("cityscapes/ripu_synthia.yaml")
    assert synthia.data.options.classes == synthia.data.streams.source.options.classes == 16


@pytest.mark.parametrize("annotator", ["gt", "human"])
def test_two_processes_select_every_target_image_once_per_round(tiny_cfg, tmp_path, annotator):
    """Under torchrun each process scores its shard; the gathered picks reach one identical store. With a
    person as the annotator both processes pause at the first round, and the message is printed once (exit 0:
    torchrun turns a worker's exit 3 into a failure report; the JSON line tells)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from lesseg import config
    from lesseg.data.label_store import LabelStore
    from lesseg.engine import checkpoint as ckpt

    out = tmp_path / "ddp"
    cfg = tiny_cfg(["train.iters=6", f"out={out}"], method={"name": "ripu", "rounds": [0.34, 0.67], "ratio": 0.05,
                                                            "annotator": annotator}, data=STREAMS)
    path = tmp_path / "cfg.yaml"
    config.save(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(Path(__file__).parent / "toy_active.py"), "train", str(path)],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in records if x["event"] == "round"]
    store = LabelStore()
    store.set_extra_state(ckpt.load(out / "last.pt")["method"]["label_store._extra_state"])
    if annotator == "human":
        assert r.returncode == 0, r.stderr[-3000:]  # torchrun would report exit 3 as a failed worker
        assert r.stderr.count("lesseg: paused:") == 1 and r.stdout.count('{"paused":') == 1
        assert [x["images"] for x in rounds] == [15] and store.pending()["images"] == 15
        return
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]
    assert [x["images"] for x in rounds] == [15, 15]  # both shards, every image once
    assert store.count() == sum(x["pixels"] for x in rounds) > 0
    per_image = math.ceil(32 * 32 * 0.05 / 2 / 9) * 9 * 2
    assert all(0 < len(p) <= per_image and len(np.unique(p)) == len(p) for p in store._pixels)


def test_margin_keeps_region_centres_away_from_the_border(tiny_cfg):
    from lesseg.engine.trainer import Trainer as T

    cfg = tiny_cfg(["train.iters=3"], method={"name": "ripu", "rounds": [0.5], "ratio": 0.2, "margin": 5},
                   data=STREAMS)
    method = T(cfg).method
    score = torch.zeros(32, 32)
    score[0, :] = 1.0  # the border scores highest: without a margin every pick would lie there
    regions = method.select(score, torch.zeros(32, 32, dtype=torch.bool))
    ys, xs = (regions >= 0).nonzero(as_tuple=True)
    assert ys.numel() > 0 and ys.min() >= 4 and xs.min() >= 4 and ys.max() <= 27 and xs.max() <= 27  # k = 1
    paper = T(tiny_cfg(["train.iters=3"], method={"name": "ripu", "rounds": [0.5], "ratio": 0.2},
                       data=STREAMS)).method.select(score, torch.zeros(32, 32, dtype=torch.bool))
    assert (paper[0] >= 0).any()  # the paper's selection takes the border first


def test_equal_scores_are_broken_at_random_unless_configured_by_index(tiny_cfg):
    """An image whose prediction is one class scores 0 everywhere: the round's squares spread over it (seeded
    ranks, the default), or fill its top rows with ``method.ties=index`` (the authors' argmax)."""
    def picks(seed, **extra):
        method = Trainer(tiny_cfg(["train.iters=3"], method={"name": "ripu", "rounds": [0.5], "ratio": 0.2, **extra},
                            data=STREAMS)).method
        logits = torch.zeros(3, 32, 32)
        logits[0] = 9.0  # one class, confidently, everywhere: score 0 at every pixel
        return method.pick(logits, torch.zeros(32, 32, dtype=torch.bool), torch.Generator().manual_seed(seed),
                           np.zeros((32, 32, 3), np.uint8))
    regions, score = picks(0)
    assert not score.any()
    rows = (regions >= 0).nonzero()[:, 0]
    assert rows.min() < 10 and rows.max() > 21
    assert torch.equal(regions, picks(0)[0]) and not torch.equal(regions, picks(1)[0])
    assert (picks(0, ties="index")[0] >= 0).nonzero()[:, 0].max() <= 7  # rows 0-7: the top of the image
    with pytest.raises(ConfigError, match="method.ties"):
        picks(0, ties="upper-left")


def test_the_random_regions_and_tie_ranks_are_drawn_with_the_run_seed(tiny_cfg, tmp_path):
    """Seeds of a random-baseline run differ in their picks too, not only in the training (before, every seed
    drew the same regions); one seed draws the same ones again."""
    def labels(seed, tag):
        cfg = tiny_cfg([f"train.seed={seed}", "train.iters=2", f"out={tmp_path / tag}"],
                       method={"name": "ripu", "score": "random", "rounds": [0.5], "ratio": 0.05}, data=STREAMS)
        trainer = Trainer(cfg)
        trainer.fit()
        state = trainer.method.label_store.get_extra_state()
        assert state["pixels"].numel() > 0
        return state["pixels"]

    first = labels(0, "a")
    assert torch.equal(first, labels(0, "b")) and not torch.equal(first, labels(1, "c"))
