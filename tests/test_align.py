"""Distribution alignment of a teacher's unlabeled predictions (methods/common.PriorAlignment), by hand."""

from __future__ import annotations

import pytest
import torch

from lesseg.methods.common import PriorAlignment


def test_alignment_moves_the_teacher_to_the_labeled_class_frequencies():
    a = PriorAlignment(2)
    masks = torch.tensor([[[0, 1, 1, 255]]])  # labeled pixels: 1/3 class 0, 2/3 class 1 (255 ignored)
    probs = torch.tensor([[0.9, 0.9], [0.1, 0.1]]).view(1, 2, 1, 2)  # the teacher says 0.9 class 0 everywhere
    a.update(masks, probs, torch.ones(1, 1, 2, dtype=torch.bool))  # first update: the means are the batch's
    assert a.labeled.tolist() == pytest.approx([1 / 3, 2 / 3]) and a.predicted.tolist() == pytest.approx([0.9, 0.1])
    aligned = a(probs.log()).softmax(1)[0, :, 0, 0]
    # p * pi_lab / pi_pred, renormalised: (0.9 * (1/3) / 0.9, 0.1 * (2/3) / 0.1) = (1/3, 2/3)
    assert aligned.tolist() == pytest.approx([1 / 3, 2 / 3])


def test_running_means_use_the_ema_warm_up_and_skip_invalid_pixels():
    a = PriorAlignment(2, momentum=0.5)
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
    method = {"name": name, "align": True} | ({"sup_only_epochs": 0} if name == "u2pl" else {})
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
    for align in (False, True):
        trainer, (batch,) = steady_trainer(tiny_cfg(method={"name": name, "align": align}, data={"streams": streams}))
        if align:
            a = trainer.method.align
            a.updates.fill_(10**6)  # running means at their momentum: one batch moves them by 1 %
            a.labeled.copy_(torch.full((7,), 1e-9).index_fill_(0, torch.tensor([3]), 1.0))
        shares[align] = float(trainer.method.training_step(batch, trainer.step)["pl_c0"])
    assert shares[True] == 0.0 and shares[False] > 0.0
