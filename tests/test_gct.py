"""GCT (methods-wave2.md section 10): the flaw detector, its target, the flaw-map post-processing, the
dynamic-consistency targets and the loss terms on hand-computed values; the method's gradient routing."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from test_mean_teacher import TINY, make_batch, reaches

from lesseg.errors import ConfigError
from lesseg.methods.base import RunInfo
from lesseg.methods.gct import (
    GCT,
    GCTConfig,
    dc_loss,
    dc_targets,
    dilate,
    fc_loss,
    fd_loss,
    flaw_target,
    gaussian_blur,
    handle_flawmap,
    odd_kernel,
)
from lesseg.methods.mean_teacher import sigmoid_rampup
from lesseg.models.flaw_detector import FlawDetector, IBNorm

SMALL = {"fd_channels": 8, "fd_min_side": 128}  # a small detector that still gives a 3x3 map


def _method(**overrides) -> GCT:
    torch.manual_seed(0)
    m = GCT(
        GCTConfig(**{**SMALL, **overrides}), TINY, RunInfo(num_classes=3, max_iters=20, iters_per_epoch=2)
    )
    return m.train()


def _row(values) -> torch.Tensor:
    """A 1x1xHxW map from nested lists."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


# ----------------------------------------------------------------------------------------- blur pieces
def test_odd_kernel_sizes_follow_the_crop():
    assert [odd_kernel(321, d) for d in (16, 8, 4)] == [21, 41, 81]  # the authors' VOC crop
    assert [odd_kernel(32, d) for d in (16, 8, 4)] == [3, 5, 9]
    assert odd_kernel(7, 8) == 1 and odd_kernel(30, 8) == 3


@pytest.mark.parametrize("k", [3, 5, 9])
def test_gaussian_blur_is_opencvs_gaussian_with_reflection(k):
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = torch.rand(1, 1, 12, 15, generator=torch.Generator().manual_seed(k))
    g = cv2.getGaussianKernel(k, sigma)
    want = cv2.sepFilter2D(x[0, 0].numpy(), -1, g, g, borderType=cv2.BORDER_REFLECT_101)
    assert np.allclose(gaussian_blur(x, k)[0, 0].numpy(), want, atol=1e-6)


def test_gaussian_blur_hand_values():
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    g1 = math.exp(-1 / (2 * 0.8**2))  # k = 3: sigma 0.8
    c, e = 1 / (1 + 2 * g1), g1 / (1 + 2 * g1)
    out = gaussian_blur(delta, 3)[0, 0]
    assert out[2, 2].item() == pytest.approx(c * c) and out[1, 2].item() == pytest.approx(c * e)
    assert out[1, 1].item() == pytest.approx(e * e) and out.sum().item() == pytest.approx(1.0)
    assert torch.equal(gaussian_blur(delta, 1), delta)


def test_dilate_is_a_reflected_3x3_max():
    x = _row([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert dilate(x)[0, 0].tolist() == [[0.0, 0.0, 0.5, 0.5]] * 3


# -------------------------------------------------------------------------------- the detector's target
def test_flaw_target_hand_values_without_blur():
    # 4 pixels (side 7: every kernel is 1): exact, half wrong, ignored, wrong; mu = 0.5
    prob = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.3, 0.7], [0.75, 0.25]]).t().reshape(1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 255, 1]]])
    # mu * sum_c |onehot - p| = [0, 0.5, 0.5 (all-zero one-hot: mu * sum p), 0.75] -> min-max
    got = flaw_target(prob, labels, mu=0.5, nu=0, side=7)
    assert got.shape == (1, 1, 1, 4)
    assert torch.allclose(got.flatten(), torch.tensor([0.0, 2 / 3, 2 / 3, 1.0]))


def test_flaw_target_is_zero_for_a_perfect_prediction_and_in_unit_range():
    labels = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert flaw_target(perfect, labels, 0.5, 1, 32).abs().max() == 0
    prob = torch.rand(2, 3, 32, 32).softmax(1)
    prob.requires_grad_()
    target = flaw_target(prob, labels, 0.5, 1, 32)
    assert not target.requires_grad
    assert target.shape == (2, 1, 32, 32) and target.min() >= 0 and target.max() <= 1
    for img in target:  # normalised per image
        assert img.min() == 0 and img.max().item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------- post-processing
def test_handle_flawmap_zeroes_negatives_low_maps_and_normalises():
    flaw = torch.cat([_row([[-1.0, 0.2, 0.4]]), _row([[-1.0, 0.05, 0.08]])])  # side 3: no blur
    out = handle_flawmap(flaw, side=3)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.0, 0.5, 1.0]))
    assert out[1].abs().max() == 0  # max 0.08 <= 0.1: no flaw at all
    assert handle_flawmap(flaw, side=3, clip=0.05)[1].flatten().tolist() == pytest.approx([0.0, 0.625, 1.0])


# ------------------------------------------------------------------------------- dynamic consistency
def _probs(*pixels) -> torch.Tensor:
    return torch.tensor(pixels).t().reshape(1, len(pixels[0]), 1, len(pixels))


def test_dc_targets_follow_the_lower_flaw_map():
    p_l = _probs([0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4])
    p_r = _probs([0.2, 0.8], [0.1, 0.9], [0.5, 0.5], [0.4, 0.6])
    # pixel 0: both below xi, l lower -> l keeps itself, r learns l; pixel 1: l higher -> l learns r;
    # pixel 2: both above xi (saturate to 1, a tie) -> each keeps its own, both flawed; pixel 3: equal maps
    map_l = _row([[0.1, 0.5, 0.7, 0.3]])
    map_r = _row([[0.4, 0.2, 0.9, 0.3]])
    t_l, t_r, both = dc_targets(p_l, p_r, map_l, map_r, 0.6)
    pix = lambda t, i: t[0, :, 0, i].tolist()
    assert pix(t_l, 0) == pix(p_l, 0) and pix(t_r, 0) == pix(p_l, 0)
    assert pix(t_l, 1) == pix(p_r, 1) and pix(t_r, 1) == pix(p_r, 1)
    assert pix(t_l, 2) == pix(p_l, 2) and pix(t_r, 2) == pix(p_r, 2)
    assert pix(t_l, 3) == pix(p_l, 3) and pix(t_r, 3) == pix(p_r, 3)
    assert both.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


def test_dc_loss_hand_value_and_identical_models():
    p_l = _probs([0.9, 0.1], [0.8, 0.2])
    p_r = _probs([0.2, 0.8], [0.1, 0.9])
    t_l, _, _ = dc_targets(p_l, p_r, _row([[0.5, 0.1]]), _row([[0.1, 0.5]]), 0.6)  # l learns r at pixel 0
    assert dc_loss(p_l, t_l).item() == pytest.approx((0.7**2 + 0.7**2) / 4)
    t_l, t_r, _ = dc_targets(p_l, p_l.clone(), _row([[0.5, 0.1]]), _row([[0.1, 0.5]]), 0.6)
    assert dc_loss(p_l, t_l) == 0 and dc_loss(p_l, t_r) == 0


def test_fc_and_fd_loss_hand_values():
    flaw = _row([[1.0, 2.0, 3.0, 4.0]])
    assert fc_loss(flaw, _row([[1.0, 0.0, 1.0, 0.0]])).item() == pytest.approx((1 + 9) / 4)
    assert fd_loss(flaw, _row([[1.0, 1.0, 1.0, 1.0]])).item() == pytest.approx((0 + 1 + 4 + 9) / 4)


# -------------------------------------------------------------------------------------- the detector
def test_flaw_detector_shapes_and_parameters():
    ib = IBNorm(5)
    assert ib.bn.num_features == 3 and ib.inorm.num_features == 2
    fd = FlawDetector(3 + 4, width=4, min_side=128)
    image, prob = torch.randn(2, 3, 32, 48), torch.rand(2, 4, 32, 48).softmax(1)
    flaw = fd(image, prob)
    assert flaw.shape == (2, 1, 32, 48)
    assert flaw[0].std() > 0  # upsampled for the detector: a map, not one value per image
    assert fd.encoder_parameters() == [] and len(fd.head_parameters()) == len(list(fd.parameters()))
    with pytest.raises(ValueError, match="64 pixels or more"):
        FlawDetector(7, min_side=32)


# ------------------------------------------------------------------------------------------- method
def test_terms_reach_exactly_their_networks():
    m = _method()
    out = m.training_step(make_batch(), 0)
    assert reaches(m, out["loss_sup"]) == {"net_l": True, "net_r": True, "fd": False}
    assert reaches(m, out["loss_dc"]) == {"net_l": True, "net_r": True, "fd": False}
    assert reaches(m, out["loss_fc"]) == {"net_l": True, "net_r": True, "fd": False}  # the frozen detector
    assert reaches(m, out["loss_fd"]) == {"net_l": False, "net_r": False, "fd": True}
    assert out["loss_fc"] > 0 and out["loss_dc"] > 0 and 0 < out["both_flawed"] < 1


def test_total_loss_weights_and_ramp():
    m = _method(dc_rampup_epochs=2.5)  # 5 steps
    assert m.rampup_steps == 5 and m.phases()[0][1:] == (0, 5)
    out = m.training_step(make_batch(), 3)
    ramp = sigmoid_rampup(3, 5)
    want = out["loss_sup"] + 100 * ramp * out["loss_dc"] + out["loss_fc"] + 10 * out["loss_fd"]
    assert torch.allclose(out["loss"], want) and out["dc_ramp"].item() == pytest.approx(ramp)


def test_aligned_predictions_of_the_unlabeled_images_take_the_labeled_class_shares(monkeypatch):
    """method.align=hard: each network's unlabeled probabilities are shifted so that their argmax has the labeled
    masks' class shares (here every labeled pixel is of the class both networks predict least) before the
    dynamic-consistency targets are built; the labeled images' part is left as predicted; none (the paper's)
    leaves everything as predicted; hard is the default."""
    from lesseg.methods import gct

    seen = {}
    real = gct.dc_targets

    def capture(p_l, p_r, *rest):
        seen["p"] = (p_l, p_r)
        return real(p_l, p_r, *rest)

    monkeypatch.setattr(gct, "dc_targets", capture)

    def run(**over):
        m = _method(**over)
        m.net_l.eval()  # no dropout: the live probabilities below are the ones the step saw
        m.net_r.eval()
        return m, m.training_step(batch, 0)

    batch = make_batch()
    valid = batch["unlabeled"]["valid"]
    run(align="none")  # the class both networks predict least, as they predict it
    rare = int(torch.stack([q[2:].argmax(1)[valid].bincount(minlength=3) for q in seen["p"]]).sum(0).argmin())
    batch["labeled"]["mask"][:, 4:] = rare
    shares = {}
    for align in ("none", "hard", "default"):
        m, out = run(**({} if align == "default" else {"align": align}))
        assert torch.isfinite(out["loss"])
        x = torch.cat([batch["labeled"]["image"], batch["unlabeled"]["image"]])
        for q, net in zip(seen["p"], (m.net_l, m.net_r)):
            with torch.no_grad():
                live = net(x)["logits"].softmax(1)
            assert torch.allclose(q[:2], live[:2], atol=1e-5)  # the labeled images: as predicted
            assert torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=1e-5)  # still distributions
        shares[align] = [float((q[2:].argmax(1) == rare)[valid].float().mean()) for q in seen["p"]]
    assert min(shares["hard"]) > 0.95 and min(shares["hard"]) > max(shares["none"]) + 0.2
    assert shares["default"] == shares["hard"]  # aligned by default (the paper's: method.align=none)


def test_identical_networks_have_no_dynamic_consistency():
    """The paper's GCT (align none): two identical networks have nothing to teach each other. Aligned (the
    default), they take no target from each other either, but each learns its own aligned prediction."""
    batch = make_batch()
    for align in ("none", "hard"):
        m = _method(align=align)
        m.net_r.load_state_dict(m.net_l.state_dict())
        m.net_l.eval()  # no dropout: both networks predict alike
        m.net_r.eval()
        out = m.training_step(batch, 0)
        assert out["dc_switch"] == 0
        assert (out["loss_dc"] == 0) == (align == "none")


def test_detector_learns_at_its_own_rate_without_weight_decay(tiny_cfg):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 2},
               "unlabeled": {"split": "train", "batch_size": 2, "labeled": False}}  # fmt: skip
    cfg = tiny_cfg(["optim.weight_decay=0.01", "optim.head_lr_mult=10"],
                   method={"name": "gct", **SMALL}, data={"streams": streams})  # fmt: skip
    trainer = Trainer(cfg)
    fd = {id(p) for p in trainer.method.fd.parameters()}
    groups = trainer.optimizer.param_groups
    mine = [g for g in groups if id(g["params"][0]) in fd]
    assert len(mine) == 1 and len(mine[0]["params"]) == len(fd)
    # the detector at fd_lr_mult (0.4) x the base LR 0.01, not at the networks' head LR (x10)
    assert mine[0]["weight_decay"] == 0.0 and mine[0]["initial_lr"] == pytest.approx(0.004)
    nets = [g for g in groups if g is not mine[0]]
    assert sorted(g["initial_lr"] for g in nets) == pytest.approx([0.01, 0.01, 0.1, 0.1])  # l, r: enc, head
    assert all(g["weight_decay"] == 0.01 for g in nets)


def test_networks_start_different_and_l_is_evaluated():
    m = _method()
    assert any(not torch.equal(a, b) for a, b in zip(m.net_l.parameters(), m.net_r.parameters()))
    assert m.eval_net() is m.net_l


def test_modes():
    fc_only = _method(mode="fc").training_step(make_batch(), 0)
    assert fc_only["loss_dc"] == 0 and fc_only["loss_fc"] > 0
    dc_only = _method(mode="dc").training_step(make_batch(), 0)
    assert dc_only["loss_fc"] == 0 and dc_only["loss_dc"] > 0
    with pytest.raises(ConfigError, match="method.mode"):
        _method(mode="both")
