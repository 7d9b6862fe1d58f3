"""U2PL (methods.md section 6): pure loss pieces on hand-computed values, the memory bank, and the method."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lesseg.config import ModelConfig
from lesseg.errors import ConfigError
from lesseg.methods.base import RunInfo
from lesseg.methods.contrastive import (
    MemoryBank,
    class_ranks,
    contrast_sets,
    contrastive_loss,
    info_nce,
    one_hot,
    sample_masked,
)
from lesseg.methods.u2pl import U2PL, U2PLConfig, clamp_ranks, entropy_split, masked_percentile, unsup_loss

KW = {"num_queries": 8, "num_negatives": 4, "temperature": 0.5, "delta_p": 0.3}


# ------------------------------------------------------------------------------------- percentiles, L_u
def test_masked_percentile_matches_torch_quantile_on_valid_pixels():
    torch.manual_seed(0)
    for n in (1, 2, 7, 100):
        x = torch.rand(n * 3)
        valid = torch.zeros(n * 3, dtype=torch.bool)
        valid[torch.randperm(n * 3)[:n]] = True
        x_noisy = torch.where(valid, x, torch.full_like(x, 1e6))  # invalid values must not matter
        q = (0.0, 12.5, 20.0, 50.0, 80.0, 100.0)
        got = masked_percentile(x_noisy, valid, q)
        want = torch.quantile(x[valid], torch.tensor(q) / 100)  # linear interpolation
        assert torch.allclose(got, want, atol=1e-6), (n, got, want)
    assert torch.isinf(masked_percentile(torch.rand(5), torch.zeros(5, dtype=torch.bool), (50.0,))).all()


def test_masked_percentile_beyond_torch_quantile_size_limit():
    torch.manual_seed(0)
    x = torch.rand(2**24 + 10)  # torch.quantile refuses inputs above 2**24 elements
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:5] = False
    got = masked_percentile(x, valid, (80.0,))[0]
    v = x[5:]
    pos = 0.8 * (v.numel() - 1)
    lo = math.floor(pos)
    a, b = v.kthvalue(lo + 1).values, v.kthvalue(lo + 2).values
    assert torch.allclose(got, a + (pos - lo) * (b - a))


def test_entropy_split_drop_rule_is_greater_or_equal():
    ent = torch.arange(11, dtype=torch.float64).float().div(10).view(1, 1, 11)  # 0.0 .. 1.0
    ent = torch.cat([ent, torch.full((1, 1, 1), 5.0)], dim=2)  # an invalid pixel with a huge entropy
    valid = torch.ones_like(ent, dtype=torch.bool)
    valid[..., -1] = False
    reliable, unreliable = entropy_split(ent, valid, 20.0)
    # pct(80) of 11 values: position 0.8 * 10 = 8 -> exactly 0.8, which is dropped (>=)
    assert unreliable[0, 0].nonzero().flatten().tolist() == [8, 9, 10]
    assert reliable[0, 0].nonzero().flatten().tolist() == [0, 1, 2]  # <= pct(20) = 0.2
    assert not unreliable[..., -1] and not reliable[..., -1]


def test_unsup_loss_reweighting_is_exact():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]).t().reshape(1, 2, 2, 2)
    pseudo = torch.tensor([[[0, 1], [1, 0]]])
    unreliable = torch.tensor([[[False, False], [True, False]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    ce = F.cross_entropy(logits, pseudo, reduction="none")[0]  # 2,2
    kept = [ce[0, 0], ce[0, 1]]  # pixel (1,0) unreliable, (1,1) invalid
    want = (4 / 2) * (kept[0] + kept[1]) / 2  # w = #pixels / #kept times the mean CE over kept pixels
    assert torch.allclose(unsup_loss(logits, pseudo, unreliable, valid), want)
    none = unsup_loss(logits, pseudo, torch.ones_like(unreliable), valid)
    assert torch.isfinite(none) and none == 0


# ------------------------------------------------------------------------------------- contrastive sets
def test_one_hot_is_per_image():
    labels = torch.tensor([[[0, 255]], [[2, 1]]])  # B=2, 1x2
    oh = one_hot(labels, 3)
    assert oh.shape == (2, 3, 1, 2)
    assert oh[1, :, 0, 0].tolist() == [False, False, True]  # the 2nd image's labels are there
    assert oh[1, :, 0, 1].tolist() == [False, True, False]
    assert oh[0, :, 0, 1].tolist() == [False, False, False]  # ignore


def test_class_ranks():
    prob = torch.tensor([0.2, 0.5, 0.05, 0.25]).view(1, 4, 1, 1)
    assert class_ranks(prob).flatten().tolist() == [2, 0, 3, 1]


def _pixels(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).t().reshape(1, len(probs[0]), 1, len(probs))  # 1,C,1,P


def test_contrast_sets_follow_the_paper():
    # image 0 labeled (GT 0, GT 1), image 1 unlabeled (unreliable, reliable with pseudo-label 3); C=4, ranks [1,3)
    prob = torch.cat(
        [
            _pixels([[0.15, 0.6, 0.2, 0.05], [0.05, 0.7, 0.2, 0.05]]),
            _pixels([[0.4, 0.3, 0.2, 0.1], [0.05, 0.1, 0.15, 0.7]]),
        ]
    )
    labels = torch.tensor([[[0, 1]], [[255, 3]]])
    unreliable = torch.tensor([[[False, False]], [[True, False]]])
    members, anchors, negatives = contrast_sets(prob, labels, unreliable, 1, 0.3, 1, 3)
    cls = lambda m, b, p: torch.nonzero(m[b, :, 0, p]).flatten().tolist()
    assert cls(members, 0, 0) == [0] and cls(anchors, 0, 0) == []  # p(0) = 0.15 <= delta_p
    assert cls(members, 0, 1) == [1] and cls(anchors, 0, 1) == [1]
    assert cls(members, 1, 1) == [3] and cls(anchors, 1, 1) == [3]
    assert cls(members, 1, 0) == []
    assert cls(negatives, 0, 0) == [1]  # labeled hard negative: GT 0 but class 1 is its top-1
    assert cls(negatives, 0, 1) == []  # top-1 is its own GT
    assert cls(negatives, 1, 0) == [1, 2]  # unreliable: classes ranked 1 and 2, whatever its argmax
    assert cls(negatives, 1, 1) == []  # reliable pixels are no negatives


def test_sample_masked_draws_only_candidates():
    torch.manual_seed(0)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, [3, 17, 49]] = True
    mask[2, 0] = True
    idx, count = sample_masked(mask, 300)
    assert idx.shape == (3, 300) and count.tolist() == [3, 0, 1]
    assert set(idx[0].tolist()) == {3, 17, 49}
    assert set(idx[2].tolist()) == {0}
    assert ((idx >= 0) & (idx < 50)).all()


# ------------------------------------------------------------------------------------------ InfoNCE
def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_info_nce_sanity_values_and_bounds():
    c, q, n, d, tau = 3, 5, 50, 8, 0.5
    every = torch.ones(c, dtype=torch.bool)
    same, neg_same = torch.ones(c, q, d), F.normalize(torch.ones(c, q, n, d), dim=-1)
    loss, used = info_nce(same, torch.ones(c, d), neg_same, every, tau)  # all features identical
    assert torch.allclose(loss, torch.tensor(math.log(1 + n))) and used == 3
    lowest, _ = info_nce(same, torch.ones(c, d), -neg_same, every, tau)  # negatives opposite
    assert torch.allclose(lowest, torch.tensor(math.log(1 + n * math.exp(-2 / tau))))
    torch.manual_seed(0)
    for _ in range(5):
        loss, _ = info_nce(torch.randn(c, q, d), torch.randn(c, d), _unit(c, q, n, d), every, tau)
        assert math.log(1 + n * math.exp(-2 / tau)) <= loss <= math.log(1 + n * math.exp(2 / tau))


def test_info_nce_skipped_classes_do_not_count():
    torch.manual_seed(0)
    a, p, neg = torch.randn(4, 6, 8), torch.randn(4, 8), _unit(4, 6, 5, 8)
    one = torch.ones(1, dtype=torch.bool)
    per_class = [info_nce(a[i : i + 1], p[i : i + 1], neg[i : i + 1], one, 0.5)[0] for i in range(4)]
    loss, used = info_nce(a, p, neg, torch.tensor([True, False, True, False]), 0.5)
    assert used == 2 and torch.allclose(loss, (per_class[0] + per_class[2]) / 2)
    zero, none = info_nce(a, p, neg, torch.zeros(4, dtype=torch.bool), 0.5)
    assert zero == 0 and none == 0


# -------------------------------------------------------------------------------------- memory bank
def test_memory_bank_ring_buffer():
    bank = MemoryBank([4, 3], dim=2, dtype=torch.float32)
    f = torch.arange(1, 7, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # rows 1..6
    only0 = torch.tensor([[True, False]] * 6)
    bank.push(f[:3], only0[:3])  # 1,2,3
    assert bank.count.tolist() == [3, 0] and bank.ptr.tolist() == [3, 0]
    bank.push(f[3:5], only0[3:5])  # 4,5: wraps, overwrites the oldest (1)
    assert bank.count.tolist() == [4, 0] and bank.ptr.tolist() == [1, 0]
    assert bank.feats[:4, 0].tolist() == [5, 2, 3, 4]
    mask = torch.tensor(
        [[False, True], [True, True], [False, True], [True, True], [False, True], [True, False]]
    )
    bank.push(f, mask)  # class 0 gets 2,4,6 ; class 1 gets 1..5 but keeps only the newest 3
    assert bank.count.tolist() == [4, 3] and bank.ptr.tolist() == [0, 0]
    assert bank.feats[:4, 0].tolist() == [5, 2, 4, 6]
    assert bank.feats[4:7, 0].tolist() == [3, 4, 5]  # sizes differ per class (background queue)


def test_memory_bank_samples_only_filled_part_and_round_trips():
    torch.manual_seed(0)
    bank = MemoryBank([5, 5, 5], dim=3)
    assert bank.feats.dtype == torch.bfloat16
    feats = F.normalize(torch.randn(2, 3), dim=1)
    bank.push(feats, torch.tensor([[True, False, False], [True, True, False]]))
    out, filled = bank.sample(200)
    assert out.shape == (3, 200, 3) and out.dtype == torch.bfloat16 and filled.tolist() == [True, True, False]
    got0 = {tuple(r) for r in out[0].float().tolist()}
    assert got0 == {tuple(r) for r in feats.bfloat16().float().tolist()}  # both entries, never an empty slot
    assert {tuple(r) for r in out[1].float().tolist()} == {tuple(feats[1].bfloat16().float().tolist())}
    other = MemoryBank([5, 5, 5], dim=3)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.feats, bank.feats) and torch.equal(other.count, bank.count)
    assert torch.equal(other.ptr, bank.ptr)


def test_memory_bank_sample_reuses_its_block_and_a_stale_one_cannot_backpropagate():
    """sample() writes into one tensor kept between calls (a fresh 46 MB block each step was most of the
    gather's time on the CPU): the second call overwrites the first's result, and a backward through a
    result overwritten before it errors instead of using the new negatives."""
    torch.manual_seed(0)
    bank = MemoryBank([8, 8], dim=4, dtype=torch.float32)
    bank.push(F.normalize(torch.randn(6, 4), dim=1), torch.ones(6, 2, dtype=torch.bool))
    first, _ = bank.sample(5)
    kept = first.clone()
    anchor = torch.randn(2, 4, requires_grad=True)
    sim = torch.einsum("cd,cnd->cn", anchor, first)
    second, _ = bank.sample(5)
    assert second.data_ptr() == first.data_ptr() and not torch.equal(second, kept)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sim.sum().backward()
    assert bank.sample(7)[0].shape == (2, 7, 4)  # another size gets a block of its own


def test_memory_bank_per_row_bound_writes_the_same_bank():
    # the bounded write (per_row x P rows) must leave exactly the bank of the full C x P write, through
    # overflow (more candidates than a queue holds) and wrap-around
    torch.manual_seed(0)
    c, p, k = 6, 40, 2
    full, bounded = MemoryBank([7, 5, 9, 5, 5, 30], dim=3), MemoryBank([7, 5, 9, 5, 5, 30], dim=3)
    for _ in range(4):
        feats = F.normalize(torch.randn(p, 3), dim=1)
        picks = torch.rand(p, c).argsort(1)[:, :k]  # k distinct classes per row ...
        mask = torch.zeros(p, c, dtype=torch.bool).scatter_(1, picks, True) & (torch.rand(p, k) < 0.7).any(1, True)
        mask[::5] = False  # ... or none
        full.push(feats, mask)
        bounded.push(feats, mask, per_row=k)
        assert torch.equal(full.ptr, bounded.ptr) and torch.equal(full.count, bounded.count)
        assert torch.equal(full.feats[:-1], bounded.feats[:-1])  # the sink row is scratch
    assert (full.count == full.capacity).any()  # overflow happened


def test_contrastive_loss_enqueues_every_negative():
    # the loss bounds the write by its rank windows; the bank must still get every negative of the step
    torch.manual_seed(0)
    c, low, high = 7, 3, 7
    labels = torch.randint(0, c, (4, 4, 4))
    labels[2:] = 255
    labels[2:, :2] = 1  # some reliable pseudo-labels
    unreliable = torch.zeros(4, 4, 4, dtype=torch.bool)
    unreliable[2:, 2:] = True
    prob = torch.randn(4, c, 4, 4).softmax(1)
    rep_t = torch.randn(4, 8, 4, 4)
    bank, ref = MemoryBank([64] * c, dim=8), MemoryBank([64] * c, dim=8)
    contrastive_loss(rep_t.clone(), rep_t, prob, labels, unreliable, 2, bank, low_rank=low, high_rank=high, **KW)
    negatives = contrast_sets(prob, labels, unreliable, 2, KW["delta_p"], low, high)[2]
    assert negatives[2:].sum((1, 2, 3)).gt(0).all()  # unlabeled negatives exist (up to high - low per pixel)
    ref.push(F.normalize(rep_t.permute(0, 2, 3, 1).reshape(-1, 8), dim=1), negatives.permute(0, 2, 3, 1).reshape(-1, c))
    assert torch.equal(bank.count, ref.count) and torch.equal(bank.feats[:-1], ref.feats[:-1])


# -------------------------------------------------------------------------------- contrastive loss
def _confident(c: int, labels: torch.Tensor) -> torch.Tensor:
    """Teacher probabilities B,C,h,w with 0.9 on each pixel's label."""
    b, h, w = labels.shape
    prob = torch.full((b, c, h, w), 0.1 / (c - 1))
    return prob.scatter_(1, labels.unsqueeze(1), 0.9)


def test_contrastive_pairs_each_class_with_its_own_bank():
    # only class 1 is present; its anchors/prototype are e1. Bank 0 holds -e1 (would give the minimum loss),
    # bank 1 holds e2 (orthogonal). The authors' code pairs the first valid class with bank 0.
    torch.manual_seed(0)
    c, d = 2, 2
    labels = torch.ones(1, 2, 2, dtype=torch.long)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    rep = e1.view(1, 2, 1, 1).expand(1, d, 2, 2)
    bank = MemoryBank([4, 4], dim=d, dtype=torch.float32)
    bank.push(torch.stack([-e1, e2]), torch.tensor([[True, False], [False, True]]))
    no_negatives = {"low_rank": 0, "high_rank": 0}  # this step pushes nothing: the banks stay as built
    unreliable = torch.zeros(1, 2, 2, dtype=torch.bool)
    loss, used = contrastive_loss(
        rep.clone(), rep, _confident(c, labels), labels, unreliable, 1, bank, **no_negatives, **KW
    )
    n = KW["num_negatives"]
    assert used == 1
    assert torch.allclose(loss, torch.tensor(math.log(math.exp(2) + n) - 2))  # cos 1 / 0.5 vs cos 0


def test_contrastive_binary_task_uses_negatives(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        low, high = clamp_ranks(3, 20, 2)
    assert (low, high) == (1, 2) and "clamped" in caplog.text
    labels = torch.randint(0, 2, (4, 4, 4))
    labels[2:] = 255  # unlabeled images: nothing reliable
    unreliable = torch.zeros(4, 4, 4, dtype=torch.bool)
    unreliable[2:] = True
    prob = torch.rand(4, 2, 4, 4).softmax(1)
    rep_s, rep_t = torch.randn(4, 8, 4, 4, requires_grad=True), torch.randn(4, 8, 4, 4)
    bank = MemoryBank([64, 64], dim=8)  # empty: the negatives pushed by this step are sampled
    loss, used = contrastive_loss(
        rep_s, rep_t, prob, labels, unreliable, 2, bank, low_rank=low, high_rank=high, **KW
    )
    assert torch.isfinite(loss) and loss > 0 and used >= 1
    assert (bank.count > 0).all()  # both classes got negatives (labeled hard ones and unreliable ones)
    loss.backward()
    assert rep_s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- method
def _method(**overrides) -> U2PL:
    torch.manual_seed(0)
    mc = OmegaConf.structured(ModelConfig(encoder="test_resnet", decoder_channels=32, rep_dim=16))
    small = {"num_queries": 8, "num_negatives": 4, "bank_size": 64, "bank_size_bg": 64}
    cfg = U2PLConfig(**{**small, "sup_only_epochs": 0, "mix_prob": 1.0, **overrides})
    m = U2PL(cfg, mc, RunInfo(num_classes=3, max_iters=10, iters_per_epoch=2))
    return m.train()


def _batch(b: int = 2, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(b, size, size, dtype=torch.bool)
    valid[:, -4:] = False  # crop padding
    image = lambda: torch.randn(b, 3, size, size, generator=g)
    mask = torch.randint(0, 3, (b, size, size), generator=g)
    return {
        "labeled": {"image": image(), "mask": mask},
        "unlabeled": {"image": image(), "image_strong": image(), "valid": valid},
    }


def _grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixing", ["cutmix", "classmix", "cutout", "none"])
def test_training_step_terms_and_gradients(mixing):
    m = _method(mixing=mixing)
    out = m.training_step(_batch(), 0)
    terms = (
        "loss",
        "loss_sup",
        "loss_unsup",
        "loss_contra",
        "drop_percent",
        "reliable_frac",
        "contra_classes",
    )
    for k in terms:
        assert out[k].dim() == 0 and torch.isfinite(out[k]), k
    assert out["loss_unsup"] > 0 and out["loss_contra"] > 0 and out["contra_classes"] >= 1
    assert 0.6 < out["reliable_frac"] < 0.9  # about 1 - alpha_0 of the valid pixels are kept
    assert m.teacher.training is False
    out["loss_unsup"].backward(retain_graph=True)
    g_unsup = _grads(m.student)
    assert sum(g.abs().sum() for g in g_unsup.values()) > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    m.student.zero_grad(set_to_none=True)
    out["loss_contra"].backward()
    g_contra = _grads(m.student)
    assert any(k.startswith("rep_head") and g.abs().sum() > 0 for k, g in g_contra.items())
    assert any(k.startswith("encoder") and g.abs().sum() > 0 for k, g in g_contra.items())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_warm_up_teacher_start_ema_and_eval_net():
    m = _method(sup_only_epochs=1, ema_decay=0.99)  # 2 supervised steps
    batch = _batch()
    opt = torch.optim.SGD(m.student.parameters(), lr=0.1)
    for step in range(2):
        out = m.training_step(batch, step)
        assert out["loss_unsup"] == 0 and out["loss_contra"] == 0 and out["contra_classes"] == 0
        assert torch.allclose(out["loss"], out["loss_sup"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.after_step(step)
        assert m.eval_net() is m.student
    assert (m.bank.count == 0).all()
    out = m.training_step(batch, 2)  # semi-supervised phase: the teacher starts as a copy of the student
    assert m.eval_net() is m.teacher
    for t, s in zip(m.teacher.parameters(), m.student.parameters()):
        assert torch.equal(t, s)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    m.after_step(2)  # i = 0: d = 0, the teacher becomes the student
    for t, s in zip(m.teacher.state_dict().values(), m.student.state_dict().values()):
        assert torch.equal(t, s)
    before = [t.clone() for t in m.teacher.parameters()]
    out = m.training_step(batch, 3)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    m.after_step(3)  # i = 1: d = 0.5
    moved = False
    for b, t, s in zip(before, m.teacher.parameters(), m.student.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)
        moved |= not torch.equal(t, b)
    assert moved
    for (name, t), s in zip(m.teacher.named_buffers(), m.student.buffers()):
        assert torch.equal(t, s), name  # BatchNorm statistics copied from the student


def test_teacher_bn_weak_labels_with_batch_statistics_and_is_evaluated_with_the_students():
    """teacher_bn="weak": the teacher's BatchNorm normalises its weak batch with that batch's statistics;
    its running statistics (used when it is evaluated) are copied from the student by EMA, as with
    "student"; dropout stays off."""
    m = _method(teacher_bn="weak")
    batch = _batch()
    bn = [x for x in m.teacher.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    drop = [x for x in m.teacher.modules() if isinstance(x, torch.nn.Dropout2d | torch.nn.Dropout)]
    assert bn and drop and all(x.training for x in bn) and not any(x.training for x in drop)
    with torch.no_grad():
        eval_mode = m.teacher.eval()(batch["unlabeled"]["image"])["logits"]
    m.train()
    with torch.no_grad():
        batch_mode = m.teacher(batch["unlabeled"]["image"])["logits"]
    assert not torch.allclose(eval_mode, batch_mode)  # labeling does not use the running statistics
    out = m.training_step(batch, 0)
    out["loss"].backward()
    m.after_step(0)  # d = 0: parameters become the student's, and so do the running statistics
    for t, s in zip(m.teacher.parameters(), m.student.parameters()):
        assert torch.equal(t, s)
    assert torch.equal(bn[0].running_mean, dict(m.student.named_buffers())[_bn0_name(m)])
    m.eval()
    assert not any(x.training for x in bn)  # evaluation: running statistics
    with pytest.raises(ConfigError, match="teacher_bn"):
        _method(teacher_bn="ema")


def _bn0_name(m: U2PL) -> str:
    name = next(n for n, x in m.teacher.named_modules() if isinstance(x, torch.nn.BatchNorm2d))
    return f"{name}.running_mean"


def test_state_dict_round_trip_restores_bank_and_phase():
    m = _method()
    m.training_step(_batch(), 0)
    assert (m.bank.count > 0).any()
    fresh = _method(sup_only_epochs=1)
    assert fresh.eval_net() is fresh.student
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.bank.feats, m.bank.feats) and torch.equal(fresh.bank.count, m.bank.count)
    assert torch.equal(fresh.bank.ptr, m.bank.ptr)
    assert fresh.eval_net() is fresh.teacher


def test_teacher_decay_is_relative_to_the_steps_after_the_warm_up_unless_set():
    """No ema_decay: 1/15 of the semi-supervised steps (8 of 10 here: 1 - 15/8 < 0, so 0: the teacher follows
    the student), announced with the phases; 240 steps of 300 give 0.9375; a configured decay is kept."""
    m = _method(sup_only_epochs=1)  # 2 supervised steps of 10
    assert m.ema_decay == 0.0
    assert m.phases()[-1][1:] == (2, 10) and "decay 0 (averaging over ~1 steps)" in m.phases()[-1][0]
    long = U2PL(m.cfg, m.model_cfg, RunInfo(num_classes=3, max_iters=300, iters_per_epoch=60))
    assert long.ema_decay == pytest.approx(1 - 15 / 240)
    assert _method(sup_only_epochs=1, ema_decay=0.99).ema_decay == 0.99
