"""VAT for segmentation (methods-wave2.md section 13): the KL terms on hand-computed values, the power
iteration against the eigenvector of a hand-built curvature, the radius, padding, precision, modes, a step's
passes and a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_mean_teacher import TINY, C, make_batch, reaches

from lesseg.methods.base import RunInfo
from lesseg.methods.vat import (
    VAT,
    VATConfig,
    adversarial_direction,
    confidence_weight,
    consistency_kl,
    image_gradient_norm,
    kl_pixels,
    l2_normalize,
)


def build(max_iters: int = 10, **over) -> VAT:
    torch.manual_seed(0)
    return VAT(VATConfig(conf_thresh=0.0, **over), TINY, RunInfo(num_classes=C, max_iters=max_iters))


def pixel_map(values: list[list[float]]) -> torch.Tensor:
    """Per-pixel class vectors -> 1,C,1,N."""
    return torch.tensor(values, dtype=torch.float64).T.reshape(1, len(values[0]), 1, len(values))


# ------------------------------------------------------------------------------------------ loss pieces
def test_l2_normalize_per_sample_keeps_zero():
    d = torch.stack([torch.full((2, 3, 3), 2.0), torch.zeros(2, 3, 3)])
    n = l2_normalize(d)
    assert n[0].norm().item() == pytest.approx(1.0) and torch.equal(n[1], torch.zeros(2, 3, 3))


def test_kl_pixels_hand_values():
    target = pixel_map([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25], [0.5, 0.5]])
    logits = pixel_map([[0.0, 0.0], [0.0, 0.0], [math.log(3), 0.0], [math.log(3), 0.0]])
    got = kl_pixels(target, logits)[0, 0]
    # KL((1,0)||(.5,.5)) = ln 2 (0 ln 0 = 0); equal distributions: 0; KL((.5,.5)||(.75,.25)) = .5 ln(4/3)
    assert got.tolist() == pytest.approx([math.log(2), 0.0, 0.0, 0.5 * math.log(4 / 3)], abs=1e-12)


def test_consistency_kl_averages_over_valid_pixels_with_weights():
    target = pixel_map([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    logits = pixel_map([[0.0, 0.0], [math.log(3), 0.0], [-9.0, 9.0]])  # the last pixel is padding
    valid = torch.tensor([[[True, True, False]]])
    kl = [math.log(2), 0.5 * math.log(4 / 3)]
    assert consistency_kl(logits, target, valid).item() == pytest.approx(sum(kl) / 2)
    weight = torch.tensor([[[0.0, 1.0, 1.0]]])
    assert consistency_kl(logits, target, valid, weight).item() == pytest.approx(kl[1] / 2)
    assert consistency_kl(logits, target, valid, 0.5).item() == pytest.approx(sum(kl) / 4)
    assert consistency_kl(logits, target, torch.zeros_like(valid)).item() == 0.0


def test_confidence_weight_per_pixel_or_shared_share_of_valid_pixels():
    probs = pixel_map([[0.98, 0.02], [0.6, 0.4], [0.99, 0.01], [0.5, 0.5]]).float()
    valid = torch.tensor([[[True, True, True, False]]])  # a confident pixel among the valid ones: 2 of 3
    weight, share = confidence_weight(probs, valid, 0.97, per_pixel=True)
    assert weight.tolist() == [[[1.0, 0.0, 1.0, 0.0]]] and share.item() == pytest.approx(2 / 3)
    weight, share = confidence_weight(probs, valid, 0.97, per_pixel=False)
    assert weight.item() == pytest.approx(2 / 3) and share.item() == pytest.approx(2 / 3)
    weight, _ = confidence_weight(probs, valid, 0.0, per_pixel=False)
    assert weight.item() == 1.0  # threshold 0: no masking


# ------------------------------------------------------------------------------------- power iteration
def _linear_pixel_net(weight: torch.Tensor):
    """f(x) = W x per pixel (a 1x1 conv), so the KL curvature at pixel i is W^T (diag p_i - p_i p_i^T) W."""
    return lambda x: torch.einsum("ck,bkhw->bchw", weight, x)


def test_one_iteration_is_the_normalized_curvature_times_d0_and_many_give_its_top_eigenvector():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)  # 3 classes, 4 input channels, one pixel
    f = _linear_pixel_net(w)
    x = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)
    d0 = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)
    p = f(x).softmax(1)
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    pv = p.flatten()
    hess = w.T @ (torch.diag(pv) - torch.outer(pv, pv)) @ w  # 4x4, by hand
    one = adversarial_direction(f, x, p, valid, d0, 1e-6, 1).flatten()
    expected = hess @ d0.flatten()
    assert torch.allclose(one, expected / expected.norm(), atol=1e-5)
    many = adversarial_direction(f, x, p, valid, d0, 1e-6, 40).flatten()
    top = torch.linalg.eigh(hess).eigenvectors[:, -1]
    assert abs(float(many @ top)) == pytest.approx(1.0, abs=1e-6)


def test_zero_iterations_is_normalized_noise_and_a_constant_network_gives_no_direction():
    x, d0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    target = torch.full((2, C, 4, 4), 1.0 / C)
    assert torch.allclose(adversarial_direction(lambda t: t, x, target, valid, d0, 1e-6, 0), l2_normalize(d0))
    const = torch.randn(2, C, 4, 4)
    for f in (lambda t: const, lambda t: const + 0.0 * t):  # unused input, or used with zero gradient
        d = adversarial_direction(f, x, const.softmax(1), valid, d0, 1e-6, 1)
        assert torch.equal(d, torch.zeros_like(d))
    assert consistency_kl(const, const.softmax(1), valid).item() == pytest.approx(0.0, abs=1e-6)


def test_direction_ignores_padding_pixels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(C, 3, generator=g, dtype=torch.float64)
    f = _linear_pixel_net(w)
    x = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64)
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    valid[:, :, -1] = False  # a pixel-wise network: padding pixels' inputs get no direction
    d = adversarial_direction(f, x, f(x).softmax(1), valid, torch.randn(x.shape, generator=g, dtype=x.dtype),
                              1e-6, 1)  # fmt: skip
    assert d[..., -1].abs().max().item() == 0.0 and d[..., :-1].abs().max().item() > 0


def test_image_gradient_norm_hand_values_and_padding():
    x = torch.tensor([[0.0, 1.0, 4.0], [0.0, 2.0, 2.0], [1.0, 1.0, 1.0]]).view(1, 1, 3, 3)
    # step-2 differences: vertical x[2] - x[0] = (1, 0, -3), horizontal x[:, 2] - x[:, 0] = (4, 2, 0)
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    assert image_gradient_norm(x, valid).item() == pytest.approx(0.5 * math.sqrt(1 + 9 + 16 + 4))
    valid[:, :, 2] = False  # the last column is padding: only the vertical differences of columns 0, 1 count
    assert image_gradient_norm(x, valid).item() == pytest.approx(0.5 * math.sqrt(1 + 0))


# ------------------------------------------------------------------------------------------------ method
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_norm_is_the_radius_per_image(adaptive):
    m = build(eps=0.5, adaptive_radius=adaptive)
    m.train()
    x, valid = torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.bool)
    valid[1, :, -5:] = False
    r = m.perturbation(x, valid)
    radius = image_gradient_norm(x, valid) if adaptive else torch.full((2,), math.sqrt(3 * 32 * 32))
    assert torch.allclose(r.flatten(1).norm(dim=1), 0.5 * radius, rtol=1e-4)


@pytest.mark.parametrize("from_student", [False, True])
def test_direction_pass_changes_no_state_mode_or_gradient(from_student):
    m = build(dir_from_student=from_student, teacher_bn="weak")
    m.train()
    modes = [mod.training for mod in m.modules()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = m.perturbation(torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.bool))
    assert r.abs().sum() > 0 and not r.requires_grad
    assert [mod.training for mod in m.modules()] == modes  # eval mode for the direction only
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # no BatchNorm statistics moved
    assert all(p.grad is None for p in m.parameters())


def test_direction_is_computed_in_full_precision_under_autocast():
    m = build()
    m.train()
    x, valid = torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.bool)
    torch.manual_seed(3)
    plain = m.perturbation(x, valid)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.perturbation(x, valid)
    assert mixed.dtype == torch.float32 and torch.allclose(plain, mixed)
    assert torch.backends.cudnn.allow_tf32 == tf32  # restored


def test_ema_decay_zero_makes_the_teacher_the_student_so_both_directions_agree():
    m = build(ema_decay=0.0)
    m.train()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.01)
    m.after_step(5)
    pairs = zip(m.teacher.state_dict().values(), m.net.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    x, valid = torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.bool)
    torch.manual_seed(1)
    from_teacher = m.perturbation(x, valid)
    m.cfg.dir_from_student = True
    torch.manual_seed(1)
    assert torch.allclose(m.perturbation(x, valid), from_teacher, atol=1e-6)


@pytest.mark.parametrize("strong", [True, False])
def test_one_step_trains_the_student_on_its_perturbed_view(monkeypatch, strong):
    m = build(strong_view=strong)
    m.train()
    batch = make_batch()
    seen = []
    forward = m.net.forward
    monkeypatch.setattr(m.net, "forward", lambda x, **k: seen.append(x.detach().clone()) or forward(x, **k))
    out = m.training_step(batch, step=0)
    assert reaches(m, out["loss_cons"]) == {"net": True} and reaches(m, out["loss_sup"]) == {"net": True}
    n = batch["labeled"]["image"].shape[0]
    assert len(seen) == 1  # the student's one forward: [x_l, x_s + r_adv] (the direction used the teacher)
    view = batch["unlabeled"]["image_strong" if strong else "image"]
    r = seen[0][n:] - view
    assert torch.equal(seen[0][:n], batch["labeled"]["image"]) and r.abs().sum() > 0
    assert out["adv_norm"].item() == pytest.approx(r.flatten(1).norm(dim=1).mean().item(), rel=1e-4)


def test_rampup_and_teacher_decay_are_relative_to_the_run_and_announced():
    ema = ("EMA teacher, decay 0.985 (averaging over ~67 steps)", 0, 1000)  # 1 - 15/1000
    assert build(max_iters=1000).phases() == [ema]  # French et al.'s VOC run: no ramp-up
    m = build(max_iters=1000, rampup_steps=None)
    assert m.rampup_steps == 100 and m.phases() == [("consistency weight ramp-up (sigmoid)", 0, 100), ema]
    assert build(max_iters=1000, ema_decay=0.99).ema_decay == 0.99


# ------------------------------------------------------------------------------------- cost, training
def test_the_passes_of_a_step_and_a_tiny_training(shapes_root, tmp_path):
    from conftest import tiny_dict

    from lesseg import bench, config
    from lesseg.bench.measure import steady_trainer
    from lesseg.engine.trainer import Trainer

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": "vat", "conf_thresh": 0.0})
    unlabeled = {"split": "train", "batch_size": 3, "labeled": False, "true_masks": True}
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2}, "unlabeled": unlabeled}
    trainer, (batch,) = steady_trainer(config.from_dict(d))
    # the teacher labels the weak view; the direction: a clean pass, one power iteration; the student's pass
    assert [(c.name, c.images, c.grad) for c in bench.record_passes(trainer, batch)] == [
        ("teacher", 3, False), ("teacher", 3, False), ("teacher", 3, True), ("net", 5, True)]
    d["train"].update(iters=3, log_every=1)
    trainer = Trainer(config.from_dict(d))
    trainer.fit()
    train = [json.loads(s) for s in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in train if e["event"] == "train"]
    assert len(train) == 3 and all(e["adv_norm"] > 0 and 0 <= e["pl_acc"] <= 1 for e in train)


def test_one_step_of_cost(shapes_root, tmp_path):
    from conftest import tiny_dict

    from lesseg import config
    from lesseg.bench.cost import bench_overhead

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": "vat"})
    unlabeled = {"split": "train", "batch_size": 3, "labeled": False}
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2}, "unlabeled": unlabeled}
    assert bench_overhead(config.from_dict(d), iters=1, warmup=0)["step_s"] > 0
