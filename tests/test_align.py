"""Distribution alignment of a teacher's unlabeled predictions (methods/common.PriorAlignment), by hand."""

from __future__ import annotations

import pytest
import torch

from lesseg.methods.common import PriorAlignment, class_counts


def test_alignment_moves_the_teacher_to_the_labeled_class_frequencies():
    a = PriorAlignment(2, "mean")
    masks = torch.tensor([[[0, 1, 1, 255]]])  # labeled pixels: 1/3 class 0, 2/3 class 1 (255 ignored)
    probs = torch.tensor([[0.9, 0.9], [0.1, 0.1]]).view(1, 2, 1, 2)  # the teacher says 0.9 class 0 everywhere
    a.update(masks, probs, torch.ones(1, 1, 2, dtype=torch.bool))  # first update: the means are the batch's
    assert a.labeled.tolist() == pytest.approx([1 / 3, 2 / 3]) and a.predicted.tolist() == pytest.approx([0.9, 0.1])
    aligned = a(probs.log()).softmax(1)[0, :, 0, 0]
    # p * pi_lab / pi_pred, renormalised: (0.9 * (1/3) / 0.9, 0.1 * (2/3) / 0.1) = (1/3, 2/3)
    assert aligned.tolist() == pytest.approx([1 / 3, 2 / 3])


def test_running_means_use_the_ema_warm_up_and_skip_invalid_pixels():
    a = PriorAlignment(2, "mean", momentum=0.5)
    valid = torch.tensor([[[True, False]]])
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # the invalid pixel says class 1: not counted
    a.update(torch.tensor([[[0, 0]]]), p1, valid)
    assert a.predicted.tolist() == pytest.approx([1.0, 0.0])
    p2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    a.update(torch.tensor([[[1, 1]]]), p2, valid)  # second update: m = min(1 - 1/2, 0.5) = 0.5
    assert a.predicted.tolist() == pytest.approx([0.5, 0.5]) and a.labeled.tolist() == pytest.approx([0.5, 0.5])
    assert int(a.updates) == 2 and "predicted" in a.state_dict()  # checkpointed: a resume continues the means


@pytest.mark.parametrize("name", ["u2pl", "mean_teacher", "fixmatch", "unimatch"])
def test_methods_with_alignment_train_and_checkpoint_its_running_means(name, tiny_cfg):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": True}}
    method = {"name": name, "align": "mean"} | ({"sup_only_epochs": 0} if name == "u2pl" else {})
    trainer = Trainer(tiny_cfg(["train.iters=3"], method=method, data={"streams": streams}))
    trainer.fit()
    a = trainer.method.align
    assert int(a.updates) == 3 and a.labeled.sum().item() == pytest.approx(1.0)
    assert a.predicted.sum().item() == pytest.approx(1.0) and not torch.equal(a.predicted, torch.full_like(a.predicted, 1 / 7))
    assert "align.predicted" in trainer.state()["method"]


@pytest.mark.parametrize("name", ["fixmatch", "unimatch"])
def test_fixmatch_takes_its_pseudo_labels_from_the_aligned_probabilities(name, tiny_cfg):
    # priors that call every labeled pixel class 3 and a prediction mean that is uniform: the aligned
    # weak-view probabilities put (almost) all mass on class 3, so every pseudo-label is 3 (none background);
    # without alignment the same network's pseudo-labels are not
    from lesseg.bench.measure import steady_trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": True, "true_masks": True}}
    shares = {}
    for align in ("none", "mean"):
        trainer, (batch,) = steady_trainer(tiny_cfg(method={"name": name, "align": align}, data={"streams": streams}))
        if align == "mean":
            a = trainer.method.align
            a.updates.fill_(10**6)  # running means at their momentum: one batch moves them by 1 %
            a.labeled.copy_(torch.full((7,), 1e-9).index_fill_(0, torch.tensor([3]), 1.0))
        shares[align] = float(trainer.method.training_step(batch, trainer.step)["pl_c0"])
    assert shares["mean"] == 0.0 and shares["none"] > 0.0


@pytest.mark.parametrize("max_pixels", [65536, 25])
def test_hard_alignment_gives_the_argmax_the_labeled_class_shares(max_pixels):
    # 100 unlabeled pixels all argmax class 0, with a class-1 probability that ranks them; the labeled masks
    # are 70 % class 0 and 30 % class 1: the solved shift turns the 30 pixels with the most class-1 mass
    # into class 1 (mean alignment would not: the mean probability of class 1 is not where the argmax is).
    # max_pixels 25: solved on every 4th pixel, the same shares up to the stride
    a = PriorAlignment(2, "hard", max_pixels=max_pixels)
    p1 = torch.linspace(0.05, 0.45, 100)
    probs = torch.stack([1 - p1, p1]).view(1, 2, 10, 10)
    masks = torch.tensor([0] * 70 + [1] * 30).view(1, 10, 10)
    valid = torch.ones(1, 10, 10, dtype=torch.bool)
    a.update(masks, probs, valid)  # first update: the running shift is the solved one
    pseudo = a(probs.log()).argmax(1).flatten()
    assert abs(int(pseudo.sum()) - 30) <= 4 and bool((pseudo[74:] == 1).all()) and bool((pseudo[:66] == 0).all())
    assert a.shift.sum().item() == pytest.approx(0.0, abs=1e-5)  # mean 0: only differences matter
    m = a.shift.clone()
    a.update(masks, probs, valid)  # second: m = min(1 - 1/2, 0.9) = 0.5 of the old shift, 0.5 of a new solve
    assert a.shift.tolist() == pytest.approx(m.tolist(), abs=0.05)  # the same batch solves to the same shift


def test_invalid_pixels_and_pasted_labeled_pixels_are_not_counted():
    a = PriorAlignment(2, "hard")
    masks = torch.tensor([[[0, 0, 1, 1]]])
    pasted = torch.tensor([[[False, False, True, True]]])  # the two class-1 pixels came from copy-paste
    probs = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9, 0.9]]).view(1, 2, 1, 4)
    valid = torch.tensor([[[True, True, False, False]]])  # only the two class-0 pixels are valid
    a.update(masks, probs, valid, pasted)
    assert a.labeled.tolist() == pytest.approx([1.0, 0.0])
    assert a(probs.log()).argmax(1)[valid].tolist() == [0, 0]


def test_align_names_its_modes(tiny_cfg):
    from lesseg.engine.trainer import Trainer
    from lesseg.errors import ConfigError

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False}}
    with pytest.raises(ConfigError, match="method.align must be one of none, mean, hard, got 'True'.*mean"):
        Trainer(tiny_cfg(method={"name": "mean_teacher", "align": True}, data={"streams": streams}))


@pytest.mark.parametrize("name", ["cps", "u2pl"])
def test_hard_alignment_trains_and_checkpoints_its_shift(name, tiny_cfg):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": name == "u2pl"}}
    method = {"name": name, "align": "hard"} | ({"sup_only_epochs": 0} if name == "u2pl" else {"cutmix": True})
    trainer = Trainer(tiny_cfg(["train.iters=3"], method=method, data={"streams": streams}))
    trainer.fit()
    aligns = [trainer.method.align1, trainer.method.align2] if name == "cps" else [trainer.method.align]
    for a in aligns:
        assert int(a.updates) == 3 and a.shift.abs().sum() > 0
    assert ("align1.shift" if name == "cps" else "align.shift") in trainer.state()["method"]


def test_class_counts_by_comparison_and_by_bincount_agree():
    label = torch.tensor([0, 2, 2, 1, 2, 0])
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.5])  # the third pixel invalid
    classes = torch.arange(4)
    for by_comparison in (True, False):
        assert class_counts(label, weight, classes, by_comparison).tolist() == [1.5, 1.0, 2.0, 0.0]


@pytest.mark.parametrize("mode", ["mean", "hard"])
def test_a_state_saved_before_the_shift_was_a_buffer_loads(mode):
    """Checkpoints of `align: true` runs (the mean mode) hold the running frequencies but no shift: loading one
    derives the mean mode's shift from them (the hard mode starts from 0), inside a strict load of a method."""
    torch.manual_seed(0)
    a = PriorAlignment(3, mode)
    probs = torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    a.update(torch.randint(0, 3, (2, 4, 4)), probs, torch.ones(2, 4, 4, dtype=torch.bool))
    old = {k: v for k, v in torch.nn.Sequential(a).state_dict().items() if not k.endswith("shift")}
    b = torch.nn.Sequential(PriorAlignment(3, mode))
    b.load_state_dict(old)  # strict
    want = a.labeled.log() - a.predicted.log() if mode == "mean" else torch.zeros(3)
    assert torch.allclose(b[0].shift, want) and torch.equal(b[0].labeled, a.labeled)
    assert mode == "hard" or not torch.allclose(want, torch.zeros(3))
