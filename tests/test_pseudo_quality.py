"""Pseudo-label diagnostics: the unlabeled stream's hidden masks (``true_masks``) and the scores each
pseudo-labelling method logs against them (pl_acc, pl_miou, pl_c0/true_c0; U2PL's rel_acc/unrel_acc)."""

import json
from pathlib import Path

import pytest
import torch
from test_contract import C, build, make_batch, method_defaults

from lesseg.data import build_streams
from lesseg.data.base import Sample
from lesseg.data.loader import SegDataset
from lesseg.engine.trainer import train
from lesseg.errors import ConfigError
from lesseg.methods.common import pseudo_label_quality


def test_quality_scores_by_hand():
    true = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 0]]])  # 1,2,4
    pseudo = torch.tensor([[[0, 1, 1, 1], [0, 2, 2, 255]]])
    q = pseudo_label_quality(pseudo, {"true_mask": true}, num_classes=3)
    # scored: 6 pixels (one true 255, one pseudo 255); right: (0,0) (1,1) (1,1) (2,2) -> 4/6
    assert q["pl_acc"].item() == pytest.approx(4 / 6)
    # IoU: class 0: hits 1, true 3 - 1 unscored = 2, pseudo 2 -> 1/3; class 1: 2/(2+3-2)=2/3; class 2: 1/(2+1-1)=1/2
    assert q["pl_miou"].item() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert q["pl_c0"].item() == pytest.approx(2 / 6)
    assert q["true_c0"].item() == pytest.approx(2 / 6)
    assert pseudo_label_quality(pseudo, {}, num_classes=3) == {}


def test_quality_of_an_empty_batch_is_zero_not_nan():
    q = pseudo_label_quality(torch.full((1, 2, 2), 255), {"true_mask": torch.zeros(1, 2, 2, dtype=torch.long)}, 3)
    assert all(v.item() == 0 for v in q.values())


def _teacher_labels(method, batch):
    unl = batch["unlabeled"]
    with torch.no_grad():
        if hasattr(method, "net1"):  # CPS scores net1, the evaluated network
            if method.cfg.cutmix:
                logits = method.net1(unl["image"])["logits"]
            else:
                n = batch["labeled"]["image"].shape[0]
                logits = method.net1(torch.cat([batch["labeled"]["image"], unl["image"]]))["logits"][n:]
        elif hasattr(method, "teacher_probs"):  # Mean Teacher, CutMix-Seg
            logits = method.teacher_probs(unl["image"])
        else:
            logits = method.teacher(unl["image"])["logits"]
        align = getattr(method, "align1", getattr(method, "align", None))  # CPS: net1's own alignment
        if align is not None:  # U2PL's and CPS's default: their pseudo-labels are the aligned ones
            logits = align(logits)
    return logits.max(1).indices.masked_fill(~unl["valid"], 255)


@pytest.mark.parametrize(
    "name,over",
    [("mean_teacher", {}), ("cutmix_seg", {}), ("cps", {"cutmix": True}), ("cps", {"cutmix": False}),
     ("u2pl", {"mix_prob": 1.0}), ("u2pl", {"mixing": "classmix", "mix_prob": 1.0})],
)
def test_methods_score_their_own_pseudo_labels(name, over):
    """True masks equal to the method's own pseudo-labels score 1, shifted ones 0: the scores use the
    pseudo-labels of the unlabeled images in the stream's order (and U2PL mixes the masks as the labels)."""
    method = build(name, **{**method_defaults(name), **over})
    method.eval()  # deterministic networks (dropout off, BatchNorm statistics fixed): CPS labels with them
    with torch.no_grad():  # strong random classifiers: pseudo-labels vary over pixels, so mixing shows
        for module_name, module in method.named_modules():
            if module_name.endswith("classifier"):
                module.weight.normal_(0, 10.0)
    batch = make_batch(type(method))
    for a in (getattr(method, k, None) for k in ("align", "align1", "align2")):
        if a is not None:  # a fixed, non-zero class offset (the running one frozen)
            a.shift_momentum = 1.0
            a.updates.fill_(10**9)
            a.shift.copy_(torch.linspace(-0.05, 0.05, C))  # small: the labels still vary over pixels
    if hasattr(method, "teacher_probs"):  # its small teacher labels noise images with one class
        probs = torch.randn(batch["unlabeled"]["image"].shape[0], C, 32, 32).softmax(1)
        method.teacher_probs = lambda image: probs
    assert not any(k.startswith(("pl_", "rel_")) for k in method.training_step(batch, step=0))
    own = _teacher_labels(method, batch)
    both = (own[0] != 255) & (own[1] != 255)
    assert (own[0] != own[1])[both].float().mean() > 0.2  # mixing the two images changes their labels
    for shift, expected in ((0, 1.0), (1, 0.0)):
        batch["unlabeled"]["true_mask"] = torch.where(own == 255, 255, (own + shift) % C)
        out = method.training_step(batch, step=0)
        assert out["pl_acc"].item() == expected
        if shift == 0:
            assert out["pl_miou"].item() == 1.0 and out["pl_c0"].item() == out["true_c0"].item()
        if name == "u2pl":
            assert out["rel_acc"].item() == expected and out["unrel_acc"].item() == expected


def test_true_masks_stream_gives_the_mask_a_labeled_stream_would(tiny_cfg):
    cfg = tiny_cfg(data={"streams": {"labeled": {"split": "train", "batch_size": 4},
                                     "plain": {"split": "train", "batch_size": 4, "labeled": False},
                                     "hidden": {"split": "train", "batch_size": 4, "labeled": False,
                                                "true_masks": True}}})  # fmt: skip
    streams = build_streams(cfg.data, ("labeled", "plain", "hidden"), progress=False)
    for key in [(0, 11), (5, 12345), (17, 99)]:
        lab, plain, hidden = (streams[n].dataset[key] for n in ("labeled", "plain", "hidden"))
        assert torch.equal(hidden["true_mask"], lab["mask"])
        assert torch.equal(hidden["valid"], plain["valid"]) and torch.equal(hidden["image"], plain["image"])
        assert "mask" not in hidden and "true_mask" not in plain


def test_true_masks_on_images_without_masks_is_a_clear_error(tmp_path):
    from lesseg.data import build_source

    src = build_source("shapes", str(tmp_path / "s"), {"n_train": 4, "n_val": 1, "size": 16})
    samples = [Sample(name="x", image=src.samples("train")[0].image)]
    with pytest.raises(ConfigError, match="true_masks.*no mask"):
        SegDataset(src, samples, train=True, labeled=False, true_masks=True, crop_size=[16, 16],
                   aug=None, mean=[0, 0, 0], std=[1, 1, 1])  # fmt: skip


def test_training_logs_pseudo_label_quality_after_the_warm_up(tiny_cfg):
    """U2PL's terms change when its semi-supervised phase begins; the trainer logs both phases."""
    cfg = tiny_cfg(
        method={"name": "u2pl", "sup_only_epochs": 1, "num_queries": 4, "num_negatives": 4, "bank_size": 32},
        data={"streams": {"labeled": {"split": "train", "batch_size": 4},
                          "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "true_masks": True}}},
        train={"iters": 12, "log_every": 4, "eval_every": 0},
    )  # fmt: skip
    train(cfg)
    records = [json.loads(line) for line in Path(cfg.out, "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["event"] == "train"]
    assert "pl_acc" not in logged[0] and "loss_sup" in logged[0]  # steps 1-4: warm-up (8 batches/epoch)
    assert all(0 <= r["pl_acc"] <= 1 and 0 <= r["rel_acc"] <= 1 for r in logged[2:])
