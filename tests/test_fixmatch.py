"""FixMatch and UniMatch (methods-wave2.md section 15): the loss pieces on hand-computed values, the CutMix box,
the feature-perturbation stream, the mixed targets of one step, and a tiny training that logs its diagnostics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from lesseg.config import ModelConfig
from lesseg.methods import fixmatch as fm
from lesseg.methods.base import RunInfo
from lesseg.methods.fixmatch import (
    FixMatch,
    FixMatchConfig,
    UniMatch,
    UniMatchConfig,
    confident_ce,
    confident_share,
    cutmix_box,
    feature_dropout,
    total_loss,
)
from lesseg.methods.mixing import mix, partner
from lesseg.models import build_model

C = 3
TINY = OmegaConf.structured(ModelConfig(encoder="test_resnet", decoder_channels=16))


# ------------------------------------------------------------------------------------------ loss pieces
def _three_pixels():
    """One image of 1x3 pixels with 2 classes: logits, pseudo-labels and their CE values by hand."""
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 0.0, 3.0]]]])  # 1,2,1,3
    pseudo = torch.tensor([[[0, 1, 0]]])
    # CE_i = logsumexp - logit of the target class
    ce = [math.log(math.exp(2) + 1) - 2, math.log(2), math.log(math.e + math.exp(3)) - 1]
    return logits, pseudo, ce


def test_confident_ce_keeps_pixels_at_or_above_tau_and_divides_by_the_valid_count():
    logits, pseudo, ce = _three_pixels()
    conf = torch.tensor([[[0.95, 0.94, 0.99]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    got = confident_ce(logits, pseudo, conf, valid, 0.95)
    # pixel 0 has q = tau exactly: kept (>=); pixel 1 is below; the denominator is 3 valid pixels, not 2
    assert got.item() == pytest.approx((ce[0] + ce[2]) / 3, rel=1e-6)
    assert got.dtype == torch.float32


def test_confident_ce_padding_never_contributes():
    logits, pseudo, ce = _three_pixels()
    conf = torch.ones(1, 1, 3)
    valid = torch.tensor([[[True, True, False]]])  # the pixel with the largest CE is padding
    got = confident_ce(logits, pseudo, conf, valid, 0.5)
    assert got.item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-6)
    nothing = confident_ce(logits, pseudo, conf, torch.zeros_like(valid), 0.5)
    assert nothing.item() == 0.0 and torch.isfinite(nothing)


def test_tau_above_one_zeroes_the_term_and_tau_zero_is_plain_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, C, 4, 4, requires_grad=True)
    conf, pseudo = torch.rand(2, C, 4, 4).softmax(1).max(1)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    assert confident_ce(logits, pseudo, conf, valid, 1.01).item() == 0.0
    plain = torch.nn.functional.cross_entropy(logits, pseudo)
    assert torch.allclose(confident_ce(logits, pseudo, conf, valid, 0.0), plain)


def test_total_loss_weights():
    one = torch.tensor(1.0)
    # UniMatch's weights sum to (1 + 0.25 + 0.25 + 0.5) / 2 = 1
    assert total_loss(one, [one, one], 0.25, one, 0.5).item() == pytest.approx(1.0)
    # each term at its own weight: (1 + 0.25*2 + 0.25*3 + 0.5*4) / 2
    got = total_loss(one, [torch.tensor(2.0), torch.tensor(3.0)], 0.25, torch.tensor(4.0), 0.5)
    assert got.item() == pytest.approx((1 + 0.5 + 0.75 + 2.0) / 2)
    assert total_loss(torch.tensor(1.0), [torch.tensor(3.0)], 1.0).item() == pytest.approx(2.0)  # FixMatch
    assert (FixMatchConfig().strong_weight, FixMatchConfig().conf_thresh) == (1.0, 0.95)
    u = UniMatchConfig()
    assert (u.strong_weight, u.fp_weight, u.fp_dropout, u.conf_thresh) == (0.25, 0.5, 0.5, 0.95)


def test_confident_share():
    conf = torch.tensor([[[0.95, 0.5, 0.99, 0.99]]])
    valid = torch.tensor([[[True, True, True, False]]])
    assert confident_share(conf, valid, 0.95).item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------- boxes
def test_cutmix_box_is_one_rectangle_of_the_drawn_area_inside_the_image():
    g = torch.Generator().manual_seed(0)
    h = w = 40
    m = cutmix_box(256, h, w, "cpu", p=1.0, generator=g)
    assert m.shape == (256, 1, h, w)
    area = m.sum((1, 2, 3))
    assert (area >= 1).all()
    assert (area <= 0.4 * h * w).all() and (area >= math.floor(math.sqrt(0.02 * h * w / 3.34)) ** 2).all()
    rows, cols = m[:, 0].amax(2), m[:, 0].amax(1)  # B,H ; B,W projections
    assert torch.equal(m[:, 0], rows[:, :, None] * cols[:, None, :])  # a single axis-aligned rectangle
    ratio = rows.sum(1) / cols.sum(1)
    assert (ratio > 0.2).all() and (ratio < 5).all()
    assert cutmix_box(8, h, w, "cpu", p=0.0).sum() == 0


def test_cutmix_box_probability_is_per_image():
    g = torch.Generator().manual_seed(1)
    m = cutmix_box(2000, 16, 16, "cpu", p=0.5, generator=g)
    share = (m.sum((1, 2, 3)) > 0).float().mean().item()
    assert 0.45 < share < 0.55


# --------------------------------------------------------------------------------------- feature dropout
def test_feature_dropout_appends_dropped_copies_of_the_chosen_samples():
    torch.manual_seed(0)
    feats = [torch.rand(5, 8, 4, 4) + 0.1, torch.rand(5, 16, 2, 2) + 0.1]
    out = feature_dropout(1, 3, 0.5)(feats)
    for f, o in zip(feats, out):
        assert o.shape[0] == 7 and torch.equal(o[:5], f)
        copy, src = o[5:], f[1:3]
        zero = (copy == 0).all(-1).all(-1)  # whole channels dropped (Dropout2d)
        assert zero.any() and (~zero).any()
        assert torch.allclose(copy[~zero], 2 * src[~zero])  # survivors scaled by 1 / (1 - p)


def test_segmentor_perturb_hook():
    torch.manual_seed(0)
    net = build_model(TINY, C).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = net(x)
    same = net(x, perturb=lambda fs: fs)
    assert torch.equal(plain["logits"], same["logits"])
    doubled = net(x, perturb=lambda fs: [torch.cat([f, f]) for f in fs])
    assert doubled["logits"].shape == (4, C, 32, 32)
    assert torch.allclose(doubled["logits"][2:], plain["logits"], atol=1e-6)


# --------------------------------------------------------------------------------------------- one step
def _method(cls, model=TINY, **over):
    torch.manual_seed(0)
    cfg = (UniMatchConfig if cls is UniMatch else FixMatchConfig)(**over)
    return cls(cfg, model, RunInfo(num_classes=C, max_iters=10, iters_per_epoch=2)).train()


def _batch(b: int = 3, size: int = 32, second: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(b, size, size, dtype=torch.bool)
    valid[:, -4:] = False  # crop padding
    image = lambda: torch.randn(b, 3, size, size, generator=g)
    unl = {"image": image(), "image_strong": image(), "valid": valid,
           "true_mask": torch.randint(0, C, (b, size, size), generator=g)}
    if second:
        unl["image_strong2"] = image()
    return {"labeled": {"image": image(), "mask": torch.randint(0, C, (b, size, size), generator=g)},
            "unlabeled": unl}


class Spy:
    """Records the boxes drawn, the network's input and outputs, and the arguments of every confident_ce."""

    def __init__(self, method, monkeypatch):
        self.boxes, self.ce, self.io = [], [], []
        box, ce = fm.cutmix_box, fm.confident_ce

        def spy_box(*a, **k):
            self.boxes.append(box(*a, **k))
            return self.boxes[-1]

        def spy_ce(*a):
            self.ce.append(a)
            return ce(*a)

        monkeypatch.setattr(fm, "cutmix_box", spy_box)
        monkeypatch.setattr(fm, "confident_ce", spy_ce)
        method.net.register_forward_hook(lambda mod, args, out: self.io.append((args[0], out)))


@pytest.mark.parametrize("second", [False, True])
def test_unimatch_strong_views_boxes_and_mixed_targets(monkeypatch, second):
    m = _method(UniMatch, mix_prob=1.0, conf_thresh=0.0)
    spy = Spy(m, monkeypatch)
    batch = _batch(second=second)
    out = m.training_step(batch, 0)
    unl, n = batch["unlabeled"], 3
    box1, box2 = spy.boxes
    assert not torch.equal(box1, box2)  # independent boxes for the two strong views
    (x, net_out), = spy.io
    strong2 = unl["image_strong2"] if second else unl["image_strong"]
    assert torch.equal(x[n:2 * n], unl["image"])
    assert torch.equal(x[2 * n:3 * n], mix(unl["image_strong"], partner(unl["image_strong"]), box1))
    assert torch.equal(x[3 * n:4 * n], mix(strong2, partner(strong2), box2))
    logits = net_out["logits"]
    assert logits.shape[0] == 5 * n  # labeled, weak, s1, s2, fp of the weak images
    conf, pseudo = logits[n:2 * n].detach().softmax(1).max(1)
    (l1, t1, c1, v1, _), (l2, t2, c2, v2, _), (lfp, tfp, cfp, vfp, _) = spy.ce
    for lk, tk, ck, vk, box, k in ((l1, t1, c1, v1, box1, 2), (l2, t2, c2, v2, box2, 3)):
        assert torch.equal(lk, logits[k * n:(k + 1) * n])
        inside = box[:, 0].bool()
        assert torch.equal(tk[~inside], pseudo[~inside]) and torch.equal(tk[inside], partner(pseudo)[inside])
        assert torch.equal(ck[inside], partner(conf)[inside]) and torch.equal(ck[~inside], conf[~inside])
        assert torch.equal(vk, mix(unl["valid"], partner(unl["valid"]), box))
    assert torch.equal(lfp, logits[4 * n:]) and torch.equal(tfp, pseudo) and torch.equal(vfp, unl["valid"])
    assert torch.equal(cfp, conf)
    assert not torch.allclose(lfp, logits[n:2 * n])  # the dropped features change the prediction
    want = (out["loss_sup"] + 0.25 * out["loss_s1"] + 0.25 * out["loss_s2"] + 0.5 * out["loss_fp"]) / 2
    assert torch.allclose(out["loss"], want)
    assert out["conf_frac"].item() == 1.0 and out["mix_frac"].item() == 1.0
    assert {"pl_acc", "pl_miou", "conf_acc"} <= set(out)


def test_empty_boxes_give_the_weak_pseudo_labels_and_unmixed_strong_images(monkeypatch):
    m = _method(FixMatch, mix_prob=0.0, conf_thresh=0.0)
    spy = Spy(m, monkeypatch)
    batch = _batch()
    out = m.training_step(batch, 0)
    (x, net_out), = spy.io
    n = 3
    assert net_out["logits"].shape[0] == 3 * n  # labeled, weak, one strong view; no fp stream
    assert torch.equal(x[2 * n:], batch["unlabeled"]["image_strong"])
    _, target, _, valid, _ = spy.ce[0]
    pseudo = net_out["logits"][n:2 * n].detach().softmax(1).max(1).indices
    assert torch.equal(target, pseudo) and torch.equal(valid, batch["unlabeled"]["valid"])
    assert set(FixMatch.loss_terms) == {"loss_sup", "loss_unsup"}
    assert torch.allclose(out["loss"], (out["loss_sup"] + out["loss_unsup"]) / 2)
    assert out["mix_frac"].item() == 0.0


def test_fp_dropout_zero_reproduces_the_weak_prediction(monkeypatch):
    """With p = 0 the fp copies decode to exactly the weak logits: the fp slice is the weak images'
    (the decoder's own dropout off, so the only randomness left would be the fp stream's)."""
    m = _method(UniMatch, OmegaConf.merge(TINY, {"dropout": 0.0}), fp_dropout=0.0, conf_thresh=0.0)
    spy = Spy(m, monkeypatch)
    m.training_step(_batch(), 0)
    logits = spy.io[0][1]["logits"]
    assert torch.allclose(logits[12:], logits[3:6], atol=1e-5)


def test_tau_above_one_zeroes_every_unsupervised_term_but_keeps_the_graph():
    m = _method(UniMatch, conf_thresh=1.01)
    out = m.training_step(_batch(), 0)
    for k in ("loss_s1", "loss_s2", "loss_fp", "conf_frac"):
        assert out[k].item() == 0.0, k
    assert torch.allclose(out["loss"], out["loss_sup"] / 2)


def test_feature_dropout_is_active_whatever_the_mode(monkeypatch):
    """The authors' module-in-forward dropout is active in any mode; lesseg's functional one is explicit."""
    m = _method(UniMatch, conf_thresh=0.0)
    m.eval()
    spy = Spy(m, monkeypatch)
    with torch.no_grad():
        m.training_step(_batch(), 0)
    logits = spy.io[0][1]["logits"]
    assert not torch.allclose(logits[12:], logits[3:6])


# ------------------------------------------------------------------------------------------ tiny training
@pytest.mark.parametrize("name", ["fixmatch", "unimatch"])
def test_tiny_training_logs_the_confident_share_and_pseudo_label_quality(tiny_cfg, name):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": True,
                             "true_masks": True}}
    cfg = tiny_cfg(["train.iters=4", "train.log_every=1"], method={"name": name, "conf_thresh": 0.5},
                   data={"streams": streams})
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert 0.0 <= result["miou"] <= 1.0
    events = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 4
    for e in train:
        assert 0.0 <= e["conf_frac"] <= 1.0 and 0.0 <= e["pl_acc"] <= 1.0 and "conf_acc" in e
        assert math.isfinite(e["loss"])
    terms = ("loss_unsup",) if name == "fixmatch" else ("loss_s1", "loss_s2", "loss_fp")
    assert all(t in train[-1] for t in terms)


def test_unimatch_gets_two_independent_photometric_strong_views(tiny_cfg):
    """The loader draws image_strong and image_strong2 separately (same geometry, other colour jitter), so
    UniMatch's two strong views differ even where neither gets a CutMix box."""
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False}}
    trainer = Trainer(tiny_cfg(["train.iters=1"], method={"name": "unimatch"}, data={"streams": streams}))
    item = trainer.streams["unlabeled"].dataset[(0, 123)]
    again = trainer.streams["unlabeled"].dataset[(0, 123)]
    assert torch.equal(item["image_strong2"], again["image_strong2"])  # deterministic for a seed
    assert not torch.equal(item["image_strong"], item["image_strong2"])
    fix = Trainer(tiny_cfg(["train.iters=1"], method={"name": "fixmatch"}, data={"streams": streams}))
    assert "image_strong2" not in fix.streams["unlabeled"].dataset[(0, 123)]
