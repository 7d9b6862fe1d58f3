"""Pluggable evaluation (the engine issue): multi-label mAP against hand-computed values, the tags evaluation
of a classifier, and ``eval.metric`` choosing what picks best.pt."""

from __future__ import annotations

import json

import pytest
import torch

from lesseg.engine.trainer import Trainer
from lesseg.errors import ConfigError
from lesseg.metrics import average_precision, mean_average_precision


def test_average_precision_by_hand():
    # class 0: ranks of positives 1 and 3 -> (1/1 + 2/3) / 2; class 1: one positive at rank 2 -> 1/2
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.9], [0.2, 0.05]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # ranks for class 0 by score: img0 (pos), img1, img2 (pos), img3 -> precision at positives 1, 2/3
    ap = average_precision(scores, targets)
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1].item() == pytest.approx(1 / 2)  # class 1 by score: img2, img1 (pos)
    result = mean_average_precision(scores, targets, ["a", "b"])
    assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    nobody = mean_average_precision(scores, torch.tensor([[1, 0]] * 4), ["a", "b"])
    assert nobody["ap"]["b"] is None and nobody["map"] == pytest.approx(1.0)


def test_eval_metric_picks_best_checkpoint(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg(["train.iters=4", "train.eval_every=1", "eval.metric=acc"]))
    scores = iter([0.2, 0.9, 0.1, 0.5])  # acc at steps 1..4; mIoU moves the other way
    real = trainer.evaluator

    def fake(*args, **kwargs):
        out = real(*args, **kwargs)
        acc = next(scores)
        return {**out, "acc": acc, "miou": 1 - acc}

    trainer.evaluator = fake
    trainer.fit()
    from lesseg.engine import checkpoint as ckpt

    best = ckpt.load(trainer.out / "best.pt")
    assert best["step"] == 2 and best["eval"]["metric"] == "acc" and best["best"] == 0.9
    records = [json.loads(x) for x in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["acc"] for r in records if r["event"] == "eval"] == [0.2, 0.9, 0.1, 0.5]


def test_an_unknown_metric_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match="eval.metric 'map': the segmentation evaluation of supervised gives miou, acc"):
        Trainer(tiny_cfg(["eval.metric=map"]))


def test_tags_evaluation_of_a_classifier(tiny_cfg):
    """The tags evaluation scores the sigmoid of ``cls``: a network whose cls output copies the tags gets
    mAP 1, one that reverses them less."""
    from lesseg.data import build_eval_dataset, eval_loader
    from lesseg.engine.evaluate import evaluate_tags

    cfg = tiny_cfg()
    data = build_eval_dataset(cfg.data)
    assert data.with_tags  # shapes writes image_labels.csv

    class Oracle(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign = sign
            self.tags = {i: data[i]["tags"] for i in range(len(data))}
            self.calls = 0

        def forward(self, x):
            t = torch.stack([self.tags[self.calls + k] for k in range(x.shape[0])])
            self.calls += x.shape[0]
            return {"cls": self.sign * (2 * t - 1)}

    loader = eval_loader(data, 1, 0, 1, 0)
    perfect = evaluate_tags(Oracle(1.0), loader, 7, cfg.eval, [32, 32], torch.device("cpu"), progress=False)
    worst = evaluate_tags(Oracle(-1.0), loader, 7, cfg.eval, [32, 32], torch.device("cpu"), progress=False)
    assert perfect["map"] == pytest.approx(1.0) and worst["map"] < 0.9


def test_lesseg_eval_of_a_classifier_reports_its_tag_map(tiny_cfg, capsys):
    from lesseg import config
    from lesseg.cli import main
    from lesseg.engine.trainer import train

    cfg = tiny_cfg(["train.iters=2"], method={"name": "classifier"})
    result = train(cfg)
    path = f"{cfg.out}/config.yaml"
    capsys.readouterr()
    assert main(["eval", path, "--checkpoint", f"{cfg.out}/last.pt"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["map"] == pytest.approx(result["map"]) and out["net"] == "net" and "miou" not in out
    assert config.load(path).method.name == "classifier"
