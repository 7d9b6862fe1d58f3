"""Mean Teacher and CutMix-Seg (methods.md sections 2, 3): ramp-up, consistency terms, EMA teacher, one step."""

from __future__ import annotations

import math

import pytest
import torch

from lesseg.config import ModelConfig
from lesseg.methods.base import Method, RunInfo
from lesseg.methods.cutmix_seg import CutMixSeg, CutMixSegConfig
from lesseg.methods.mean_teacher import (
    MeanTeacher,
    confident_ce,
    confident_share,
    consistency_mse,
    sigmoid_rampup,
)

C = 3
TINY = ModelConfig(encoder="test_resnet", decoder_channels=16)


def make_batch(b: int = 2, size: int = 32, strong: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Labeled and unlabeled batches with ignore pixels (top rows) and padding (right columns)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, C, (b, size, size), generator=g)
    mask[:, :4] = 255
    valid = torch.ones(b, size, size, dtype=torch.bool)
    valid[:, :, -6:] = False
    unl = {"image": torch.randn(b, 3, size, size, generator=g), "valid": valid}
    if strong:
        unl["image_strong"] = unl["image"] + 0.1 * torch.randn(b, 3, size, size, generator=g)
    return {"labeled": {"image": torch.randn(b, 3, size, size, generator=g), "mask": mask}, "unlabeled": unl}


def reaches(method: Method, term: torch.Tensor) -> dict[str, bool]:
    """Trainable net name -> whether ``term`` gives it a non-zero gradient (one backward for all nets)."""
    params = {
        name: [p for p in net.parameters() if p.requires_grad]
        for name, net in method.trainable_nets().items()
    }
    flat = [p for ps in params.values() for p in ps]
    grads = dict(zip(map(id, flat), torch.autograd.grad(term, flat, retain_graph=True, allow_unused=True)))
    nonzero = {k: g is not None and bool(g.abs().sum() > 0) for k, g in grads.items()}
    return {name: any(nonzero[id(p)] for p in ps) for name, ps in params.items()}


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up


def test_consistency_mse_hand_values():
    logits = torch.zeros(1, 2, 1, 3)  # softmax (0.5, 0.5) everywhere
    target = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]).reshape(2, 1, 3).unsqueeze(0)  # 1,2,1,3
    all_valid = torch.ones(1, 1, 3, dtype=torch.bool)
    # pixel distances: 0.25 + 0.25 = 0.5, 0, 0.5
    assert consistency_mse(logits, target, all_valid).item() == pytest.approx(1.0 / 3)
    assert consistency_mse(logits, target, torch.tensor([[[False, True, True]]])).item() == pytest.approx(
        0.25
    )
    assert consistency_mse(logits, target, torch.zeros_like(all_valid)).item() == 0.0  # no NaN


def test_confident_ce_hand_values():
    logits = torch.zeros(1, 2, 1, 3)  # CE to any class is ln 2
    target = torch.tensor([[0.99, 0.6, 0.02], [0.01, 0.4, 0.98]]).reshape(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    # pixel 0 confident (0.99), pixel 1 not (0.6), pixel 2 invalid: ln2 / 2 valid pixels
    assert confident_ce(logits, target, valid, 0.97).item() == pytest.approx(math.log(2) / 2)
    assert confident_ce(logits, target, valid, 0.0).item() == pytest.approx(math.log(2))


def test_cutmix_seg_defaults_are_the_authors_weighting():
    """French et al.'s code: squared error scaled by the share of confident pixels (0.97), no ramp-up."""
    m = build(CutMixSeg)
    assert (m.cfg.consistency, m.cfg.conf_thresh, m.rampup_steps) == ("mse_conf", 0.97, 0)
    assert not any("ramp-up" in p[0] for p in m.phases())
    out = m.train().training_step(make_batch(), step=0)
    assert 0.0 <= out["conf_rate"].item() <= 1.0 and torch.isfinite(out["loss_cons"])


def test_mse_conf_scales_the_mse_by_the_share_of_confident_valid_pixels():
    """French et al.'s default weighting (conf_thresh 0.97 without conf_per_pixel): every valid pixel keeps its
    squared distance, the whole term is multiplied by the batch's share of confident valid pixels."""
    target = torch.tensor([[0.99, 0.6, 0.02, 0.99], [0.01, 0.4, 0.98, 0.01]]).reshape(1, 2, 1, 4)
    valid = torch.tensor([[[True, True, True, False]]])  # the invalid pixel is confident: it must not count
    assert confident_share(target, valid, 0.97).item() == pytest.approx(2 / 3)
    assert confident_share(target, torch.zeros_like(valid), 0.97).item() == 0.0
    logits = torch.zeros(1, 2, 1, 4, requires_grad=True)
    m = build(MeanTeacher, consistency="mse_conf", conf_thresh=0.97)
    got = m.consistency_loss(logits, target, valid)
    assert got.item() == pytest.approx(consistency_mse(logits, target, valid).item() * 2 / 3)
    got.backward()  # the share is a constant: the gradient is the mse's, scaled
    (ref,) = torch.autograd.grad(consistency_mse(logits, target, valid), logits)
    assert torch.allclose(logits.grad, ref * 2 / 3)


@pytest.mark.parametrize("loss_fn", [consistency_mse, lambda lg, t, v: confident_ce(lg, t, v, 0.5)])
def test_consistency_ignores_invalid_pixels(loss_fn):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, C, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(2, C, 4, 4, generator=g).softmax(1)
    valid = torch.rand(2, 4, 4, generator=g) > 0.4
    loss = loss_fn(logits, target, valid)
    changed_logits = torch.where(valid.unsqueeze(1), logits, 100 * torch.randn(2, C, 4, 4, generator=g))
    changed_target = torch.where(valid.unsqueeze(1), target, torch.rand(2, C, 4, 4, generator=g))
    assert torch.allclose(loss_fn(changed_logits, changed_target, valid), loss)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().sum() > 0 and bool((grad[(~valid).unsqueeze(1).expand_as(grad)] == 0).all())


def build(cls: type[Method], **cfg) -> Method:
    torch.manual_seed(0)
    return cls(cls.Config(**cfg), TINY, RunInfo(num_classes=C, max_iters=20))


@pytest.mark.parametrize(
    "cls, cfg",
    [
        (MeanTeacher, {}),
        (MeanTeacher, {"consistency": "ce", "conf_thresh": 0.0}),
        (CutMixSeg, {"consistency": "mse"}),
        (CutMixSeg, {"consistency": "ce", "conf_thresh": 0.0}),
        (CutMixSeg, {"consistency": "mse_conf", "conf_thresh": 0.0}),  # every pixel confident: a weight of 1
    ],
)
def test_step_grads_and_teacher(cls, cfg):
    method = build(cls, **cfg).train()
    assert not method.teacher.training and method.net.training  # teacher predicts in eval mode
    out = method.training_step(make_batch(strong=cls.strong_streams != ()), step=0)
    thresholded = method.cfg.consistency != "mse"  # these log the share of confident pixels they count
    assert set(out) == {"loss", "loss_sup", "loss_cons"} | ({"conf_rate"} if thresholded else set())
    assert not thresholded or out["conf_rate"].item() == 1.0
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert list(method.trainable_nets()) == ["net"]
    assert reaches(method, out["loss_sup"]) == {"net": True}
    assert reaches(method, out["loss_cons"]) == {"net": True}
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_ema_decay_without_a_setting_is_relative_to_the_run_and_announced():
    """No ema_decay: the teacher averages over 1/15 of the run (0.95 at 300 steps, 0.99 at 1,500), capped at
    methods.md's 0.999 for paper-length runs; a configured decay is kept; the phases say which."""
    from lesseg.methods.common import run_relative_decay

    assert run_relative_decay(None, 300) == pytest.approx(0.95)
    assert run_relative_decay(None, 1500) == pytest.approx(0.99)
    assert run_relative_decay(None, 40000) == 0.999 and run_relative_decay(None, 10) == 0.0
    assert run_relative_decay(0.9, 300) == 0.9
    torch.manual_seed(0)
    method = MeanTeacher(MeanTeacher.Config(), TINY, RunInfo(num_classes=C, max_iters=300))
    assert method.ema_decay == pytest.approx(0.95)
    assert any("decay 0.95 (averaging over ~20 steps)" in p[0] for p in method.phases())
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in method.teacher.parameters()]
    method.after_step(100)  # d = min(1 - 1/101, 0.95) = 0.95
    t, t_before, s = next(method.teacher.parameters()), t0[0], next(method.net.parameters())
    assert torch.allclose(t, 0.95 * t_before + 0.05 * s)
    assert build(MeanTeacher, ema_decay=0.5).ema_decay == 0.5


def test_ema_teacher_moves_after_step():
    method = build(MeanTeacher, ema_decay=0.5)
    teacher, student = method.teacher, method.net
    first = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.after_step(0)  # d = 0: the teacher becomes a copy of the student
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert not any(torch.equal(t, f) for t, f in zip(teacher.parameters(), first))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0)
    method.after_step(10)  # d = min(1 - 1/11, 0.5) = 0.5: halfway towards the student
    t, s = next(teacher.parameters()), next(student.parameters())
    assert torch.allclose(t, s - 1.0)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_eval_net_and_rampup_default():
    method = build(MeanTeacher)
    assert method.eval_net() is method.teacher and method.rampup_steps == 2  # 10% of max_iters
    method = build(CutMixSeg, eval_teacher=False, rampup_steps=0)
    assert method.eval_net() is method.net and method.rampup_steps == 0
    assert isinstance(method.cfg, CutMixSegConfig)


@pytest.mark.parametrize("cls", [MeanTeacher, CutMixSeg])
@pytest.mark.parametrize("policy", ["student", "weak"])
def test_teacher_batchnorm_policy(cls, policy):
    """student: the teacher labels with its running BatchNorm statistics; weak: with each weak batch's own.
    Either way the running statistics (what the evaluated teacher uses) are the student's after EMA, and the
    teacher's dropout stays off."""
    method = build(cls, teacher_bn=policy).train()
    bn = [m for m in method.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    drop = [m for m in method.teacher.modules() if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d)]
    assert drop and not any(m.training for m in drop)
    assert all(m.training == (policy == "weak") for m in bn)
    before = bn[0].running_mean.clone()
    method.training_step(make_batch(strong=cls.strong_streams != ()), step=0)
    assert torch.equal(bn[0].running_mean, before) == (policy == "student")  # weak: batch statistics were used
    with torch.no_grad():
        for m in method.net.modules():  # a student whose statistics differ from anything the teacher saw
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.5)
    method.after_step(0)
    assert all(torch.equal(t, s) for t, s in zip(method.teacher.buffers(), method.net.buffers()))
    method.eval()
    assert not any(m.training for m in bn)


def test_bad_consistency_is_a_config_error():
    from lesseg.errors import ConfigError

    with pytest.raises(ConfigError, match="consistency"):
        build(MeanTeacher, consistency="kl")
    with pytest.raises(ConfigError, match="teacher_bn"):
        build(MeanTeacher, teacher_bn="ema")


def test_methods_are_registered():
    from lesseg.methods.base import METHODS

    assert METHODS.get("mean_teacher") is MeanTeacher and METHODS.get("cutmix_seg") is CutMixSeg


def test_cutmix_seg_classmix_pastes_whole_classes_of_the_teacher_prediction():
    """mixing=classmix: image i takes from its partner exactly the pixels of some of the classes the teacher
    predicts there (whole classes, never a box through an object); images, probabilities and valid maps are
    mixed with that one mask."""
    method = build(CutMixSeg, mixing="classmix", student_view="weak")
    g = torch.Generator().manual_seed(3)
    b, size = 4, 12
    probs = torch.rand(b, C, size, size, generator=g).softmax(1)
    valid = torch.ones(b, size, size, dtype=torch.bool)
    valid[:, :, -2:] = False
    unl = {"image": torch.randn(b, 3, size, size, generator=g), "valid": valid}
    x, p, v = method.unlabeled_views(unl, probs)
    taken = (x == unl["image"].roll(-1, 0)).all(1) & (x != unl["image"]).any(1)  # B,H,W: from the partner
    classes = probs.argmax(1).roll(-1, 0)
    for i in range(b):
        picked = classes[i][taken[i]].unique()
        assert 1 <= len(picked) < len(classes[i][valid.roll(-1, 0)[i]].unique())  # some, not all classes
        whole = torch.isin(classes[i], picked) & valid.roll(-1, 0)[i]
        assert torch.equal(taken[i], whole)  # every pixel of a picked class, and only those
        assert torch.equal(p[i][:, whole], probs.roll(-1, 0)[i][:, whole])
        assert torch.equal(p[i][:, ~whole], probs[i][:, ~whole]) and torch.equal(v[i][~whole], valid[i][~whole])


def test_cutmix_seg_box_is_the_authors_one_box_of_half_the_image():
    """mixing=cutmix (the default): image i takes from its partner one rectangle covering half of the image
    (the authors' --mask_prop_range=0.5, one box; not CPS's three XOR'ed boxes), with random aspect ratios,
    and its probabilities and valid map with the same pixels. The mixed images are the strong views (the
    default student_view, the authors' --aug_strong_colour), the probabilities the teacher's on the weak ones."""
    method = build(CutMixSeg)
    torch.manual_seed(0)
    b, size = 64, 40
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(b, C, size, size, generator=g).softmax(1)
    unl = {"image": torch.randn(b, 3, size, size, generator=g), "valid": torch.ones(b, size, size, dtype=torch.bool)}
    unl["image_strong"] = torch.randn(b, 3, size, size, generator=g)
    x, p, _ = method.unlabeled_views(unl, probs)
    strong = unl["image_strong"]
    taken = (x == strong.roll(-1, 0)).all(1)  # B,H,W
    assert torch.equal(x, torch.where(taken[:, None], strong.roll(-1, 0), strong))  # no weak pixel in it
    assert torch.equal(p, torch.where(taken[:, None], probs.roll(-1, 0), probs))
    heights = []
    for t in taken:
        rows, cols = t.any(1).nonzero().flatten(), t.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # contiguous
        assert int(t.sum()) == h * w  # a filled rectangle: one box, nothing XOR'ed away
        assert abs(h * w / size**2 - 0.5) < 0.05  # half the image
        heights.append(h)
    assert torch.tensor(heights).float().std() > 2  # random aspect ratios


def test_unknown_mixing_is_a_config_error():
    from lesseg.errors import ConfigError

    with pytest.raises(ConfigError, match="mixing"):
        build(CutMixSeg, mixing="box")
    with pytest.raises(ConfigError, match="student_view"):
        build(CutMixSeg, student_view="colour")


@pytest.mark.parametrize("view", ["strong", "weak"])
def test_cutmix_seg_student_view_decides_the_stream_and_the_mixed_images(view, tiny_cfg):
    """student_view=strong: the trainer gives the unlabeled stream a strong view and the student's mixed images
    are made of it; weak: no strong view is computed (none is asked for) and the weak images are mixed. The
    teacher labels the weak views either way."""
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False}}
    cfg = tiny_cfg(["train.iters=1"], method={"name": "cutmix_seg", "student_view": view}, data={"streams": streams})
    assert CutMixSeg.strong_streams_for(cfg.method) == (("unlabeled",) if view == "strong" else ())
    trainer = Trainer(cfg)
    assert trainer.streams["unlabeled"].dataset.strong == (view == "strong")
    method = build(CutMixSeg, student_view=view).train()
    batch = make_batch()
    unl = batch["unlabeled"]
    seen = []
    method.teacher.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    method.training_step(batch, step=0)
    assert len(seen) == 1 and torch.equal(seen[0], unl["image"])  # the step's teacher labels the weak views
    x, _, _ = method.unlabeled_views(unl, method.teacher_probs(unl["image"]))
    src = unl["image_strong" if view == "strong" else "image"]
    assert ((x == src) | (x == src.roll(-1, 0))).all()  # every pixel from the chosen view of some image
