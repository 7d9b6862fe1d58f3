"""CPS (methods.md section 5): the cross term on hand-computed values, padding, overlap, two networks."""

from __future__ import annotations

import math

import pytest
import torch
from test_mean_teacher import TINY, C, make_batch, reaches

from lesseg.methods.base import METHODS, RunInfo
from lesseg.methods.common import ce_loss
from lesseg.methods.cps import CPS, CPSConfig, confident, cps_loss, hard_labels, prediction_overlap
from lesseg.methods.supervised import Supervised, SupervisedConfig


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


# 2 classes, 2x2 pixels; (class 0, class 1) logits per pixel
LOGITS1 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 1.0]]]).permute(2, 0, 1).unsqueeze(0)
LOGITS2 = torch.tensor([[[0.0, 1.0], [0.0, 2.0]], [[1.0, 0.0], [2.0, 0.0]]]).permute(2, 0, 1).unsqueeze(0)
# argmax P1 = [[0, 1], [0, 1]], argmax P2 = [[1, 1], [0, 0]]
# CE of logits (a, b) to class 1 is softplus(a - b), to class 0 softplus(b - a)
CE1_TO_2 = [softplus(1.0), softplus(-2.0), softplus(-3.0), softplus(1.0)]  # P1 vs argmax P2
CE2_TO_1 = [softplus(1.0), softplus(-2.0), softplus(-1.0), softplus(2.0)]  # P2 vs argmax P1


def test_hard_labels_and_overlap_hand_values():
    valid = torch.tensor([[[True, True], [True, False]]])
    y1, y2 = hard_labels(LOGITS1, valid), hard_labels(LOGITS2, valid)
    assert y1.tolist() == [[[0, 1], [0, 255]]] and y2.tolist() == [[[1, 1], [0, 255]]]
    assert prediction_overlap(y1, y2, valid).item() == pytest.approx(2 / 3)
    all_valid = torch.ones_like(valid)
    full = prediction_overlap(hard_labels(LOGITS1, all_valid), hard_labels(LOGITS2, all_valid), all_valid)
    assert full.item() == pytest.approx(0.5)


def test_cps_loss_hand_values():
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    loss = cps_loss(LOGITS1, LOGITS2, hard_labels(LOGITS1, valid), hard_labels(LOGITS2, valid))
    assert loss.item() == pytest.approx(sum(CE1_TO_2) / 4 + sum(CE2_TO_1) / 4, rel=1e-6)
    valid[0, 1, 1] = False  # a padding pixel: out of both directions
    loss = cps_loss(LOGITS1, LOGITS2, hard_labels(LOGITS1, valid), hard_labels(LOGITS2, valid))
    assert loss.item() == pytest.approx(sum(CE1_TO_2[:3]) / 3 + sum(CE2_TO_1[:3]) / 3, rel=1e-6)


def test_cps_loss_weights_each_directions_pixels_by_their_teachers_confidence():
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    y1, y2 = hard_labels(LOGITS1, valid), hard_labels(LOGITS2, valid)
    # top probabilities, pixel by pixel: P1 sigmoid(1), sigmoid(2), sigmoid(3), sigmoid(1); P2 sigmoid(1),
    # sigmoid(2), sigmoid(1), sigmoid(2); at 0.8 (between sigmoid(1) = 0.73 and sigmoid(2) = 0.88):
    w1 = confident(LOGITS1.softmax(1), 0.8)  # net1's labels kept at pixels 1 and 2
    w2 = confident(LOGITS2.softmax(1), 0.8)  # net2's at pixels 1 and 3
    assert w1.tolist() == [[[0.0, 1.0], [1.0, 0.0]]] and w2.tolist() == [[[0.0, 1.0], [0.0, 1.0]]]
    loss = cps_loss(LOGITS1, LOGITS2, y1, y2, w1, w2)
    # the mean stays over the 4 valid pixels: a partner sure of little teaches little
    assert loss.item() == pytest.approx((CE1_TO_2[1] + CE1_TO_2[3]) / 4 + (CE2_TO_1[1] + CE2_TO_1[2]) / 4, rel=1e-6)
    assert confident(LOGITS1.softmax(1), 0.0) is None


def test_no_gradient_through_the_pseudo_labels():
    """Each network's gradient comes from its own CE towards the other's labels only."""
    l1, l2 = LOGITS1.clone().requires_grad_(), LOGITS2.clone().requires_grad_()
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    y1, y2 = hard_labels(l1, valid), hard_labels(l2, valid)
    cps_loss(l1, l2, y1, y2).backward()
    own1, own2 = LOGITS1.clone().requires_grad_(), LOGITS2.clone().requires_grad_()
    ce_loss(own1, y2).backward()
    ce_loss(own2, y1).backward()
    assert torch.allclose(l1.grad, own1.grad) and torch.allclose(l2.grad, own2.grad)


def test_padding_pixels_do_not_change_the_cross_term():
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, C, 6, 6, generator=g), torch.randn(2, C, 6, 6, generator=g)
    valid = torch.rand(2, 6, 6, generator=g) > 0.3
    loss = cps_loss(l1, l2, hard_labels(l1, valid), hard_labels(l2, valid))
    pad = (~valid).unsqueeze(1)
    m1 = torch.where(pad, 50 * torch.randn(2, C, 6, 6, generator=g), l1)
    m2 = torch.where(pad, 50 * torch.randn(2, C, 6, 6, generator=g), l2)
    assert torch.allclose(cps_loss(m1, m2, hard_labels(m1, valid), hard_labels(m2, valid)), loss)


def build(**cfg) -> CPS:
    torch.manual_seed(0)
    return CPS(CPSConfig(**cfg), TINY, RunInfo(num_classes=C, max_iters=10))


def test_networks_are_initialised_differently_and_net1_as_a_single_network_run():
    method = build()
    diffs = [not torch.equal(a, b) for a, b in zip(method.net1.parameters(), method.net2.parameters())]
    assert any(diffs)
    torch.manual_seed(0)
    single = Supervised(SupervisedConfig(), TINY, RunInfo(num_classes=C))
    assert all(torch.equal(a, b) for a, b in zip(single.net.parameters(), method.net1.parameters()))
    assert list(method.trainable_nets()) == ["net1", "net2"] and method.eval_net() is method.net1
    assert METHODS.get("cps") is CPS


@pytest.mark.parametrize("cutmix", [False, True])
def test_step_terms_and_gradients(cutmix):
    method = build(cutmix=cutmix).train()
    out = method.training_step(make_batch(strong=False), step=0)
    assert set(out) == {"loss", "loss_sup", "loss_cps", "overlap"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert 0.0 <= out["overlap"].item() <= 1.0 and not out["overlap"].requires_grad
    assert reaches(method, out["loss_sup"]) == {"net1": True, "net2": True}
    assert reaches(method, out["loss_cps"]) == {"net1": True, "net2": True}


@pytest.mark.parametrize("step, factor", [(0, math.exp(-5.0)), (3, math.exp(-5.0 * 0.4**2)), (5, 1.0), (9, 1.0)])
def test_cross_term_ramp_up_over_a_share_of_the_run(step, factor):
    # rampup 0.5 of a 10-step run: the cross term's weight is cps_weight x exp(-5 (1 - step/5)^2), full from step 5
    method = build(rampup=0.5, cps_weight=1.5).train()
    assert method.phases() == [("cross term's weight ramp-up (sigmoid, to 1.5)", 0, 5)]
    out = method.training_step(make_batch(strong=False), step=step)
    expected = out["loss_sup"] + 1.5 * factor * out["loss_cps"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert build().phases() == []  # the paper's: no ramp-up


@pytest.mark.parametrize("cutmix", [False, True])
def test_threshold_keeps_the_confident_pseudo_labels_only(cutmix):
    batch = make_batch(strong=False)
    every = build(cutmix=cutmix).train().training_step(batch, step=0)
    low = build(cutmix=cutmix, threshold=1e-6).train().training_step(batch, step=0)
    assert low["loss_cps"].item() == pytest.approx(every["loss_cps"].item(), rel=1e-5)
    assert low["confident"].item() == pytest.approx(1.0) and "confident" not in every
    method = build(cutmix=cutmix, threshold=1.0).train()  # no softmax reaches 1 here: nothing taught
    out = method.training_step(batch, step=0)
    assert out["loss_cps"].item() == 0.0 and out["confident"].item() == 0.0
    assert out["loss_sup"].item() == pytest.approx(every["loss_sup"].item(), rel=1e-5)
    # a higher threshold keeps a subset of the pixels: the share and the term never grow (CE >= 0)
    shares, losses = [], []
    for threshold in (0.36, 0.42, 0.5):  # 3 classes: every top probability is >= 1/3
        method = build(cutmix=cutmix, threshold=threshold).train()
        out = method.training_step(batch, step=0)
        shares.append(out["confident"].item())
        losses.append(out["loss_cps"].item())
        assert 0.0 < shares[-1] < 1.0, shares  # the tiny networks' probabilities lie on both sides of these
        assert reaches(method, out["loss_cps"]) == {"net1": True, "net2": True}
    assert shares == sorted(shares, reverse=True) and losses == sorted(losses, reverse=True)


@pytest.mark.parametrize("mixing", ["cutmix", "classmix"])
def test_mixed_step_with_either_mask(mixing):
    method = build(cutmix=True, mixing=mixing).train()
    out = method.training_step(make_batch(strong=False), step=0)
    assert all(torch.isfinite(v) for v in out.values())
    assert reaches(method, out["loss_cps"]) == {"net1": True, "net2": True}


def test_classmix_pastes_whole_classes_of_the_two_networks_mean_prediction():
    method = build(cutmix=True, mixing="classmix", align="none").eval()  # eval: no dropout, fixed statistics
    batch = make_batch(b=4, strong=False)
    unl = batch["unlabeled"]
    x_mix, y1, y2, valid, _, w1, w2 = method.mixed_pseudo_labels(unl, batch["labeled"])
    assert w1 is None and w2 is None  # no threshold: every pixel at weight 1
    with torch.no_grad():
        p1, p2 = (net(unl["image"])["logits"].softmax(1) for net in (method.net1, method.net2))
    classes = (p1 + p2).argmax(1).roll(-1, 0)  # the partner's
    taken = (x_mix == unl["image"].roll(-1, 0)).all(1) & (x_mix != unl["image"]).any(1)
    for i in range(4):
        whole = torch.isin(classes[i], classes[i][taken[i]].unique()) & unl["valid"].roll(-1, 0)[i]
        assert taken[i].any() and torch.equal(taken[i], whole)
    # each network's pseudo-labels of the pasted pixels are its own prediction on the partner
    assert torch.equal(y1[taken], p1.argmax(1).roll(-1, 0)[taken])
    assert torch.equal(y2[taken], p2.argmax(1).roll(-1, 0)[taken]) and valid[taken].all()


def test_unknown_mixing_is_a_config_error():
    from lesseg.errors import ConfigError

    with pytest.raises(ConfigError, match="mixing"):
        build(cutmix=True, mixing="box")
    with pytest.raises(ConfigError, match="cutmix=true"):  # a mask without CutMix would be silently unused
        build(mixing="classmix")
