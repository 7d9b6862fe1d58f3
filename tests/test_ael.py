"""U2PL + AEL (methods-wave2.md section 14): the confidence bank, class draws, sampling rates, the re-weighted
CE, copy-paste and ACM boxes on hand-computed values; the method's bank, terms, phases and checkpoint."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lesseg.config import ModelConfig
from lesseg.errors import ConfigError
from lesseg.methods.ael import (
    U2PLAEL,
    U2PLAELConfig,
    acm_boxes,
    class_confidence,
    copy_paste,
    difficulty_probs,
    equalized_ce,
    sampling_rates,
    update_confidence,
)
from lesseg.methods.base import RunInfo
from lesseg.methods.common import ce_loss

C = 3


def _pixels(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).t().reshape(1, len(probs[0]), 1, len(probs))  # 1,C,1,P


# --------------------------------------------------------------------------------------- confidence bank
def test_class_confidence_hand_values():
    probs = _pixels([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    labels = torch.tensor([[[0, 0, 1, 255]]])
    sums, counts = class_confidence(probs, labels)
    assert sums.tolist() == pytest.approx([1.2, 0.8, 0.0]) and counts.tolist() == [2, 1, 0]


def test_update_confidence_moves_absent_classes_towards_zero():
    conf = torch.tensor([0.5, 0.5, 0.5])
    new = update_confidence(conf, torch.tensor([1.2, 0.8, 0.0]), torch.tensor([2.0, 1.0, 0.0]), 0.9)
    assert new.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 0.6, 0.9 * 0.5 + 0.1 * 0.8, 0.45])


def test_class_draws_and_sampling_rates():
    uniform = torch.full((4,), 0.3)
    assert torch.allclose(difficulty_probs(uniform), torch.full((4,), 0.25))
    allowed = torch.tensor([True, False, True, True])
    assert torch.allclose(difficulty_probs(uniform, allowed), torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]))
    e = math.exp(0.5)  # ACP: softmax(sqrt(1 - Conf)) of Conf (0.75, 0): scores 0.5, 1
    assert torch.allclose(
        difficulty_probs(torch.tensor([0.75, 0.0]), power=0.5), torch.tensor([1, e]) / (1 + e)
    )
    assert torch.equal(sampling_rates(uniform, 1.0), torch.ones(4))  # uniform Conf: every pixel kept
    rates = sampling_rates(torch.tensor([0.2, 0.6, 0.9]), 2.0)  # ((1 - Conf) / 0.8)^2
    assert rates.tolist() == pytest.approx([1.0, 0.25, 0.125**2])


# ------------------------------------------------------------------------------------- re-weighted CE
def test_equalized_ce_without_weights_is_the_plain_mean_over_labeled_pixels():
    logits = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))
    pseudo = torch.randint(0, C, (2, 4, 4))
    pseudo[0, 0] = 255
    assert torch.allclose(equalized_ce(logits, pseudo, torch.ones(2, 4, 4)), ce_loss(logits, pseudo))


def test_equalized_ce_hand_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).t().reshape(1, 2, 1, 3)
    pseudo = torch.tensor([[[0, 0, 255]]])  # the ignored pixel's weight must not count
    ce = F.cross_entropy(logits, pseudo, ignore_index=255, reduction="none")[0, 0]
    got = equalized_ce(logits, pseudo, torch.tensor([[[0.25, 0.75, 5.0]]]))
    assert got.item() == pytest.approx(0.25 * ce[0].item() + 0.75 * ce[1].item())
    assert equalized_ce(logits, pseudo, torch.zeros(1, 1, 3)) == 0


# --------------------------------------------------------------------------------------------- ACP, ACM
def test_copy_paste_pastes_the_drawn_classes_of_the_next_image():
    image = torch.stack([torch.zeros(3, 2, 3), torch.ones(3, 2, 3)])
    labels = torch.tensor([[[0, 0, 0], [0, 0, 0]], [[1, 2, 255], [1, 0, 2]]])
    classes = torch.tensor([False, True, True])
    img, lab = copy_paste(image, labels, classes, torch.tensor([True, True]))
    assert lab[0].tolist() == [[1, 2, 0], [1, 0, 2]]  # the partner's 255 and class 0 are not pasted
    assert img[0, 0].tolist() == [[1, 1, 0], [1, 0, 1]]
    assert lab[1].tolist() == labels[1].tolist()  # its partner (image 0) has none of the classes
    img, lab = copy_paste(image, labels, classes, torch.tensor([False, True]))
    assert torch.equal(img, image) and torch.equal(lab, labels)
    img, lab = copy_paste(image, labels, torch.zeros(3, dtype=torch.bool), torch.tensor([True, True]))
    assert torch.equal(img, image) and torch.equal(lab, labels)  # an empty class set changes nothing


def test_acm_box_is_the_bounding_box_of_a_component_of_the_drawn_class():
    pred = torch.zeros(3, 16, 16, dtype=torch.long)
    pred[1, 2:5, 6:10] = 2  # a 3x4 component of class 2 (area 12 > 0.03 * 256)
    pred[1, 12, 12] = 2  # a 1-pixel component, too small to be picked
    pred[2, 0, 0] = 2  # image 2 holds too little of class 2 to be a source
    torch.manual_seed(0)
    for _ in range(5):
        mask, src = acm_boxes(pred, torch.tensor([2, 0, 2]), min_area=0.03, presence_area=0.01)
        assert src[0] == 1 and src[2] == 1
        want = torch.zeros(16, 16)
        want[2:5, 6:10] = 1
        assert torch.equal(mask[0, 0], want) and torch.equal(mask[2, 0], want)
        assert src[1] in (0, 2) and mask[1].sum() > 0  # class 0 fills images 0 and 2 entirely


def test_acm_falls_back_to_a_random_half_box():
    pred = torch.ones(2, 16, 16, dtype=torch.long)
    torch.manual_seed(0)
    mask, src = acm_boxes(pred, torch.tensor([0, 0]), min_area=0.03, presence_area=0.01)  # class 0 nowhere
    assert src.tolist() == [1, 0]
    assert all(abs(m.sum().item() - 128) <= 16 for m in mask)  # about half the image, one rectangle
    mask, src = acm_boxes(pred[:1], torch.tensor([1]), 0.03, 0.01)  # a batch of one mixes with itself
    assert src.tolist() == [0] and mask.sum() == 256


# ------------------------------------------------------------------------------------------- method
def _method(**overrides) -> U2PLAEL:
    torch.manual_seed(0)
    mc = OmegaConf.structured(ModelConfig(encoder="test_resnet", decoder_channels=16, rep_dim=16))
    small = {
        "num_queries": 4,
        "num_negatives": 4,
        "bank_size": 32,
        "bank_size_bg": 32,
        "sup_only_epochs": 0,
        "contra_start_epochs": 0,
    }
    cfg = U2PLAELConfig(**{**small, **overrides})
    return U2PLAEL(cfg, mc, RunInfo(num_classes=C, max_iters=20, iters_per_epoch=2)).train()


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, -4:] = False
    image = lambda: torch.randn(2, 3, 32, 32, generator=g)
    return {
        "labeled": {"image": image(), "mask": torch.randint(0, C, (2, 32, 32), generator=g)},
        "unlabeled": {"image": image(), "image_strong": image(), "valid": valid},
    }


def test_step_terms_bank_and_total():
    m = _method()
    assert torch.allclose(m.class_conf, torch.full((C,), 1 / C))
    out = m.training_step(_batch(), 0)
    for k in ("loss_sup", "loss_unsup", "loss_unsup_lab", "loss_contra"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    want = out["loss_sup"] + out["loss_unsup"] + out["loss_unsup_lab"] + 0.1 * out["loss_contra"]
    assert torch.allclose(out["loss"], want)
    assert not torch.allclose(m.class_conf, torch.full((C,), 1 / C))  # the bank learned from the step
    assert out["conf_min"] == m.class_conf.min()


def test_acm_mixes_inputs_and_teacher_outputs_alike():
    m = _method()
    x = torch.randn(2, 3, 16, 16)
    logits = torch.randn(2, C, 16, 16)
    rep = torch.randn(2, 16, 4, 4)
    pseudo = torch.zeros(2, 16, 16, dtype=torch.long)
    pseudo[1, :8, :8] = 1
    torch.manual_seed(0)
    x_m, logits_m, rep_m, pseudo_m, _ = m._mix(x, logits, rep, pseudo, None)
    pasted = (x_m != x).any(1)  # B,H,W
    assert pasted.any()
    assert torch.equal(pasted, (logits_m != logits).any(1)) and not ((pseudo_m != pseudo) & ~pasted).any()
    assert torch.equal(x_m[0][:, pasted[0]], x[1][:, pasted[0]])  # image 0 takes from image 1
    assert not torch.equal(rep_m, rep)


def test_confidence_threshold_and_sampling_by_the_students_class():
    m = _method(conf_thresh=0.7, gamma=0.0)
    logits_s = _pixels([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]).log_softmax(1)  # student: 0, 1, 2
    logits_t = _pixels([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.4, 0.3, 0.3]]).log()  # pixel 2: q = 0.4
    pseudo = torch.tensor([[[0, 1, 0]]])
    ce = F.cross_entropy(logits_s, pseudo, reduction="none").flatten()
    rates = torch.tensor([1.0, 1.0, 1.0])
    assert m._equalized(logits_s, logits_t, pseudo, rates).item() == pytest.approx(ce[:2].mean().item())
    rates = torch.tensor([0.0, 1.0, 1.0])  # class 0 never sampled: pixel 0 (student class 0) goes
    assert m._equalized(logits_s, logits_t, pseudo, rates).item() == pytest.approx(ce[1].item())


def test_unsupervised_ce_drops_the_unreliable_pixels(monkeypatch):
    from lesseg.methods import ael, u2pl

    splits, targets = [], []
    real_split, real_ce = u2pl.entropy_split, ael.equalized_ce
    monkeypatch.setattr(u2pl, "entropy_split", lambda *a: splits.append(real_split(*a)) or splits[-1])
    monkeypatch.setattr(
        ael, "equalized_ce", lambda lg, pseudo, w: targets.append(pseudo) or real_ce(lg, pseudo, w)
    )
    m = _method(sample=False)
    m.training_step(_batch(), 0)
    (reliable, unreliable), unlabeled = splits[0], targets[0]
    assert unreliable.any() and (unlabeled[unreliable] == 255).all() and (unlabeled[reliable] != 255).all()


def test_warm_up_and_late_contrastive_start():
    m = _method(sup_only_epochs=1, contra_start_epochs=2)  # 2 supervised steps, contrastive from step 4
    assert [p[1:] for p in m.phases()] == [(0, 2), (2, 20), (2, 4)]  # warm-up, EMA teacher, no contrastive
    out = m.training_step(_batch(), 0)
    assert torch.allclose(out["loss"], out["loss_sup"]) and out["loss_unsup_lab"] == 0
    assert not torch.allclose(m.class_conf, torch.full((C,), 1 / C))  # the bank learns during the warm-up
    out = m.training_step(_batch(), 2)
    assert out["loss_contra"] == 0 and (m.bank.count == 0).all() and out["loss_unsup"] > 0
    out = m.training_step(_batch(), 4)
    assert out["loss_contra"] > 0 and (m.bank.count > 0).any()


def test_checkpoint_round_trip_keeps_the_confidence_bank():
    m = _method()
    for step in range(2):
        m.training_step(_batch(step), step)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    clone = _method()
    assert not torch.equal(clone.class_conf, m.class_conf)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(clone.class_conf, m.class_conf) and "class_conf" in m.state_dict()
    torch.manual_seed(3)
    a = m.training_step(_batch(5), 2)
    torch.manual_seed(3)
    b = clone.training_step(_batch(5), 2)
    assert all(torch.allclose(a[k], b[k]) for k in a) and torch.equal(clone.class_conf, m.class_conf)


def test_config_errors_and_u2pl_mixing():
    with pytest.raises(ConfigError, match="acp_exclude"):
        _method(acp_exclude=[0, 3])
    with pytest.raises(ConfigError, match="acp_exclude"):
        _method(acp_exclude=[0, 1, 2])
    with pytest.raises(ConfigError, match="method.mixing"):
        _method(mixing="mosaic")
    m = _method(mixing="cutmix", acp_exclude=[0])
    assert m.cfg.mixing == "cutmix" and m.acp_allowed.tolist() == [False, True, True]
    assert torch.isfinite(m.training_step(_batch(), 0)["loss"])
