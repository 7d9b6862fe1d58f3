"""AdvSemSeg (methods-wave2.md section 12): the discriminator's shape, the BCE pieces on hand-computed values,
the D-trusted pseudo-labels, the semi start, the gradient separation of the one-backward design, and a tiny
training through the trainer's optimizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lesseg import config
from lesseg.methods import RunInfo, build_method
from lesseg.methods.advsemseg import (
    bce_map,
    discriminator_loss,
    one_hot_labels,
    trusted_pseudo_labels,
    valid_mean,
)
from lesseg.models.discriminator import FCDiscriminator

C, H, W = 3, 32, 32


def _method(iters=10, **over):
    cfg = config.from_dict({"method": {"name": "advsemseg", **over}, "train": {"iters": iters},
                            "model": {"encoder": "test_resnet", "decoder_channels": 16}})
    torch.manual_seed(0)
    return build_method(cfg, RunInfo(num_classes=C, class_names=list("abc"), max_iters=iters))


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, C, (b, H, W), generator=g)
    mask[:, :2] = 255
    valid = torch.ones(b, H, W, dtype=torch.bool)
    valid[:, -3:] = False
    return {"labeled": {"image": torch.randn(b, 3, H, W, generator=g), "mask": mask},
            "unlabeled": {"image": torch.randn(b, 3, H, W, generator=g), "valid": valid}}


# ------------------------------------------------------------------------------------------ pure pieces
def test_discriminator_maps_probabilities_to_an_input_sized_logit_map_without_normalization():
    d = FCDiscriminator(C, channels=8)
    out = d(torch.rand(2, C, 40, 72))
    assert out.shape == (2, 1, 40, 72)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (C, 8, (4, 4), (2, 2)), (8, 16, (4, 4), (2, 2)), (16, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2)),
        (64, 1, (4, 4), (2, 2))]  # fmt: skip
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in d.modules())
    assert sum(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.modules()) == 4


def test_one_hot_labels_leave_ignored_pixels_all_zero():
    mask = torch.tensor([[[0, 2, 255]]])
    got = one_hot_labels(mask, 3)
    assert got.shape == (1, 3, 1, 3)
    assert got[0, :, 0].T.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_bce_map_by_hand_averages_over_valid_pixels_only():
    logits = torch.tensor([0.0, 2.0, -1.0]).view(1, 1, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    want_real = (math.log(2) + math.log(1 + math.exp(-2))) / 2  # -log sigmoid(x)
    want_fake = (math.log(2) + math.log(1 + math.exp(2))) / 2  # -log(1 - sigmoid(x))
    assert bce_map(logits, 1.0, valid).item() == pytest.approx(want_real, rel=1e-6)
    assert bce_map(logits, 0.0, valid).item() == pytest.approx(want_fake, rel=1e-6)
    none = bce_map(logits, 1.0, torch.zeros_like(valid))
    assert none.item() == 0.0


def test_discriminator_loss_is_half_fake_plus_half_real():
    fake = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)  # BCE towards 0: ln 2, ln(1 + e)
    real = torch.tensor([3.0]).view(1, 1, 1, 1)  # BCE towards 1: ln(1 + e^-3)
    ones = torch.ones(1, 1, 2, dtype=torch.bool)
    got = discriminator_loss(fake, ones, real, torch.ones(1, 1, 1, dtype=torch.bool))
    want = 0.5 * (math.log(2) + math.log(1 + math.e)) / 2 + 0.5 * math.log(1 + math.exp(-3))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_trusted_pseudo_labels_threshold_at_equality_and_padding():
    logits = torch.tensor([[[[2.0, 0.0, 0.0, 1.0]], [[0.0, 1.0, 3.0, 0.0]]]])  # 1,2,1,4: argmax 0,1,1,0
    d = torch.tensor([0.0, -1.0, 5.0, 5.0]).view(1, 1, 1, 4)  # sigmoid 0.5, 0.27, 0.99, 0.99
    valid = torch.tensor([[[True, True, True, False]]])
    assert trusted_pseudo_labels(logits, d, valid, 0.5).tolist() == [[[0, 255, 1, 255]]]  # 0.5 >= 0.5 counts
    assert trusted_pseudo_labels(logits, d, valid, 0.0).tolist() == [[[0, 1, 1, 255]]]  # T = 0: all valid
    assert (trusted_pseudo_labels(logits, d, valid, 1.0) == 255).all()


def test_valid_mean_by_hand_and_without_valid_pixels():
    values = torch.tensor([[[0.2, 0.4, 0.9]]])
    assert valid_mean(values, torch.tensor([[[True, True, False]]])).item() == pytest.approx(0.3)
    assert valid_mean(values, torch.zeros(1, 1, 3, dtype=torch.bool)).item() == 0.0


# ------------------------------------------------------------------------------------------ the method
def test_semi_term_is_exactly_zero_before_the_start_share_of_the_run_and_counts_after():
    m = _method(iters=10, semi_start=0.5, semi_thresh=0.0)
    assert m.phases() == [(m.phases()[0][0], 0, 5)]
    m.train()
    for step, on in ((4, False), (5, True)):
        torch.manual_seed(1)
        out = m.training_step(_batch(), step)
        assert (out["loss_semi"].item() > 0) == on and out["semi_frac"].item() == 1.0
        c = m.cfg
        total = (out["loss_sup"] + c.adv_weight * out["loss_adv"] + c.semi_adv_weight * out["loss_semi_adv"]
                 + c.semi_weight * out["loss_semi"] + c.d_weight * out["loss_d"])  # fmt: skip
        assert torch.allclose(out["loss"], total)
    assert _method(iters=20000).phases()[0][1:] == (0, 5000)  # the paper's 5000 of 20 000


def test_each_network_gets_exactly_the_gradient_of_its_own_objective():
    """The summed loss gives D the gradient of d_weight L_D and the segmenter that of its terms; the
    segmenter's adversarial terms see D's current weights (functional_call equals the module)."""
    m = _method(d_weight=2.0, semi_start=0.0, semi_thresh=0.0)
    m.train()
    out = m.training_step(_batch(), 0)
    disc = list(m.disc.parameters())
    net = [p for p in m.net.parameters() if p.requires_grad]
    g_total = torch.autograd.grad(out["loss"], disc, retain_graph=True)
    g_d = torch.autograd.grad(out["loss_d"], disc, retain_graph=True)
    assert all(torch.allclose(a, 2.0 * b) for a, b in zip(g_total, g_d))
    for term in ("loss_sup", "loss_adv", "loss_semi_adv", "loss_semi"):
        grads = torch.autograd.grad(out[term], disc, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), term
    grads = torch.autograd.grad(out["loss_d"], net, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    x = torch.rand(2, C, H, W)
    assert torch.equal(m.frozen_disc(x), m.disc(x))


def test_semi_adv_term_is_back_propagated_when_no_pixel_is_trusted():
    """The authors' code skips it on such steps after the start; here it always counts."""
    m = _method(semi_start=0.0, semi_thresh=1.0)
    m.train()
    out = m.training_step(_batch(), 3)
    assert out["semi_frac"].item() == 0.0 and out["loss_semi"].item() == 0.0
    grads = torch.autograd.grad(out["loss"] - out["loss_sup"] - m.cfg.adv_weight * out["loss_adv"]
                                - m.cfg.d_weight * out["loss_d"], list(m.net.head.parameters()),
                                allow_unused=True)  # fmt: skip
    assert any(g is not None and g.any() for g in grads)


def test_tiny_training_steps_d_in_the_one_optimizer_without_weight_decay(tiny_cfg):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "true_masks": True}}
    cfg = tiny_cfg(["train.iters=4", "train.log_every=1", "optim.weight_decay=0.01", "optim.head_lr_mult=10"],
                   method={"name": "advsemseg", "semi_start": 0.5, "semi_thresh": 0.0},
                   data={"streams": streams})
    trainer = Trainer(cfg)
    disc = {id(p) for p in trainer.method.disc.parameters()}
    groups = [g for g in trainer.optimizer.param_groups if id(g["params"][0]) in disc]
    assert len(groups) == 1 and len(groups[0]["params"]) == len(disc)
    # D at d_lr_mult (0.4) x the base LR 0.01, whatever head_lr_mult (10) does to the segmenter's head
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["initial_lr"] == pytest.approx(0.004)
    head = [g for g in trainer.optimizer.param_groups if g is not groups[0] and g["lr_mult"] == 10]
    assert head and all(g["initial_lr"] == pytest.approx(0.1) for g in head)
    assert all(g["weight_decay"] == 0.01 for g in trainer.optimizer.param_groups if g is not groups[0])
    before = [p.detach().clone() for p in trainer.method.disc.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.method.disc.parameters()))
    events = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert [e["loss_semi"] > 0 for e in train] == [False, False, True, True]  # from step 0.5 x 4 = 2
    for e in train:
        assert 0 <= e["d_real"] <= 1 and 0 <= e["d_fake"] <= 1 and 0 <= e["pl_acc"] <= 1 and "semi_acc" in e
    phases = next(e for e in events if e["event"] == "phases")["phases"]
    assert (phases[0]["start"], phases[0]["end"]) == (0, 2)
