"""PSL and PSL+ (methods.md section 7): the suppression rule of the online masks and the tag filter by hand, the
training step's terms, the dense CRF on a tiny image, and the whole AE-PSL+ pipeline on tiny data, killed in
a training stage and in a task stage and resumed to the same result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lesseg.config import ModelConfig
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.methods import RunInfo
from lesseg.methods import psl as psl_mod
from lesseg.methods.psl import PSL, PslConfig, online_masks, psl_weights, tag_filter
from lesseg.methods.weak.crf import CrfParams, crf_missing, dense_crf

# -- the online masks ----------------------------------------------------------------------------------------


def test_weights_are_the_branch_confidence_of_tagged_classes_zero_for_absent_ones_one_for_background():
    cls = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), 5.0]])  # sigmoid: 0.5, 0.75, 0.25, 0.9933
    tags = torch.tensor([[0.0, 1.0, 1.0, 0.0]])  # class 3 absent (however sure the branch is)
    assert psl_weights(cls, tags)[0].tolist() == pytest.approx([1.0, 0.75, 0.25, 0.0])
    assert psl_weights(cls, tags, bg_class=3)[0].tolist() == pytest.approx([0.0, 0.75, 0.25, 1.0])
    cls.requires_grad_(True)
    assert not psl_weights(cls, tags).requires_grad


def test_online_masks_suppress_absent_classes_and_scale_by_the_confidence():
    # four pixels with softmax probabilities (background, 1, 2); weights (1, 0.75, 0): class 2 absent
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.2, 0.1, 0.7], [0.35, 0.45, 0.2]])
    logits = probs.log().T.reshape(1, 3, 1, 4)  # softmax(log p) = p
    weights = torch.tensor([[1.0, 0.75, 0.0]])
    # weighted: [.5 .3 0] -> 0; [.3 .45 0] -> 1; [.2 .075 0] -> 0 (class 2 prohibited, though it is the
    # argmax); [.35 .3375 0] -> 0 (the argmax 1 loses to background once scaled by 0.75)
    assert online_masks(logits, weights).tolist() == [[[0, 1, 0, 0]]]
    assert online_masks(logits, torch.ones(1, 3)).tolist() == [[[0, 1, 2, 1]]]  # no suppression: the argmax
    # with a threshold: the winner's share of the weighted sum; [.5 .3 0] -> .625, [.3 .45 0] -> .6,
    # [.2 .075 0] -> .727, [.35 .3375 0] -> .509: at 0.62 the second and fourth pixels are ignored
    assert online_masks(logits, weights, 0.62).tolist() == [[[0, 255, 0, 255]]]
    assert online_masks(logits, weights, 0.5).tolist() == [[[0, 1, 0, 0]]]


def test_tag_filter_keeps_background_and_the_tags_and_renormalises():
    probs = torch.tensor([0.2, 0.5, 0.3]).reshape(1, 3, 1, 1)
    out = tag_filter(probs, torch.tensor([[0.0, 0.0, 1.0]]))
    assert out.flatten().tolist() == pytest.approx([0.4, 0.0, 0.6])
    assert tag_filter(probs, torch.tensor([[0.0, 0.0, 1.0]]), bg_class=1).flatten().tolist() == pytest.approx(
        [0.0, 0.625, 0.375])


def test_training_step_is_ce_on_the_ae_masks_plus_ce_on_the_online_masks_plus_bce():
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"encoder": "test_resnet", "decoder_channels": 16})
    torch.manual_seed(0)
    method = PSL(PslConfig(psl_weight=0.5, cls_weight=2.0), model, RunInfo(num_classes=3)).eval()
    assert method.net.cls_head is not None  # the branch, whatever model.cls_head says
    image = torch.randn(2, 3, 32, 32)
    mask = torch.full((2, 32, 32), 255)
    mask[:, :4] = 1
    mask[1, 10:] = 0
    tags = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    losses = method.training_step({"pseudo": {"image": image, "mask": mask, "tags": tags}}, 0)
    out = method.net(image)
    p = F.softmax(out["logits"], 1)
    w = torch.sigmoid(out["cls"]) * tags
    w[:, 0] = 1.0
    online = (p * w[:, :, None, None]).argmax(1)
    assert not (online[0] == 2).any()  # class 2 is not in image 0
    ce_ae = F.cross_entropy(out["logits"], mask, ignore_index=255)
    ce_online = F.cross_entropy(out["logits"], online)
    bce = F.binary_cross_entropy_with_logits(out["cls"], tags)
    assert losses["loss_ae"].item() == pytest.approx(ce_ae.item(), rel=1e-5)
    assert losses["loss_psl"].item() == pytest.approx(ce_online.item(), rel=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((ce_ae + 0.5 * ce_online + 2.0 * bce).item(), rel=1e-5)
    known = mask != 255
    assert losses["online_agree"].item() == pytest.approx(((online == mask) & known).sum().item() / known.sum().item())



def test_online_masks_weight_ramps_up_over_the_configured_share_of_the_run():
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"encoder": "test_resnet", "decoder_channels": 16})
    torch.manual_seed(0)
    method = PSL(PslConfig(psl_weight=0.5, psl_rampup=0.5), model, RunInfo(num_classes=3, max_iters=100)).eval()
    assert method.phases() == [("online masks' weight ramp-up (sigmoid, to 0.5)", 0, 50)]
    batch = {"pseudo": {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32)),
                        "tags": torch.ones(2, 3)}}
    for step, ramp in ((0, math.exp(-5)), (25, math.exp(-1.25)), (50, 1.0), (90, 1.0)):
        losses = method.training_step(batch, step)
        want = losses["loss_ae"] + 0.5 * ramp * losses["loss_psl"] + losses["loss_cls"]
        assert losses["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert PSL(PslConfig(), model, RunInfo(num_classes=3, max_iters=100)).phases() == []  # the paper: no ramp


# -- the dense CRF -------------------------------------------------------------------------------------------

needs_crf = pytest.mark.skipif(crf_missing() is not None, reason=str(crf_missing()))


@needs_crf
def test_crf_moves_a_wrong_boundary_to_the_colour_edge():
    # a 4x8 image, red left of column 4, blue from it; the network's boundary is one column late (class 0 up
    # to column 4, at 0.6 against 0.4)
    image = np.zeros((4, 8, 3), np.uint8)
    image[:, :4] = (255, 0, 0)
    image[:, 4:] = (0, 0, 255)
    probs = np.zeros((2, 4, 8), np.float32)
    probs[0, :, :5], probs[1, :, :5] = 0.6, 0.4
    probs[0, :, 5:], probs[1, :, 5:] = 0.4, 0.6
    q = dense_crf(image, probs)
    assert q.shape == (2, 4, 8) and np.allclose(q.sum(0), 1.0, atol=1e-5)
    assert (q.argmax(0) == np.array([0, 0, 0, 0, 1, 1, 1, 1])).all()
    assert q[0, :, :4].min() > 0.9  # and it is sure of it
    assert np.allclose(dense_crf(image, probs, CrfParams(iters=0)), probs, atol=1e-5)  # no step: the input
    with pytest.raises(ValueError, match="uint8 image"):
        dense_crf(image[:, :6], probs)


# -- the pipeline --------------------------------------------------------------------------------------------


def psl_cfg(tiny_cfg, out: Path, **method):
    """AE (2 steps) + PSL + PSL+ with the CRF, deterministic, a checkpoint every step."""
    return tiny_cfg(["train.iters=3", "train.ckpt_every=1", "train.deterministic=true",
                     "stages.classifier.train.iters=3", f"out={out}"],
                    method={"name": "psl", "steps": 2, "stop_loss": None, "cam_batch": 5,
                            "crf": crf_missing() is None, **method},
                    data={"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False,
                                                  "true_masks": True}}})


def products(out: Path) -> dict[str, bytes]:
    """Every mask, region and erased image the task stages wrote, by path."""
    files = [p for folder in ("erase1", "erase2", "refine") for p in sorted((out / folder).rglob("*"))
             if p.suffix in (".png", ".npz") and p.parent.name in ("masks", "regions", "images")
             and not p.is_symlink()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_pipeline_killed_in_a_training_and_a_task_stage_resumes_to_the_same_result(tiny_cfg, tmp_path,
                                                                                    monkeypatch):
    full = tmp_path / "full"
    result = train(psl_cfg(tiny_cfg, full))
    assert 0.0 <= result["miou"] <= 1.0
    status = json.loads((full / STATUS).read_text())
    assert [s["stage"] for s in status] == ["classifier", "erase1", "classifier2", "erase2", "psl", "refine",
                                            "train"]
    assert all(s["state"] == "done" for s in status)
    refine = status[5]["metrics"]
    quality = json.loads((full / "refine" / "quality.json").read_text())
    assert refine["raw_miou"] == quality["raw"]["miou"] and refine["pseudo_miou"] == quality["miou"]
    if crf_missing() is None:
        assert refine["crf_miou"] == quality["miou"]
    psl = ckpt.load(full / "psl" / "last.pt")
    assert psl["config"]["model"]["cls_head"] and psl["config"]["data"]["streams"]["pseudo"]["root"] == str(
        full / "erase2")
    assert any(k.startswith("net.cls_head.") for k in psl["method"])
    last = ckpt.load(full / "last.pt")["config"]
    assert last["method"]["name"] == "psl" and last["data"]["streams"]["pseudo"]["root"] == str(full / "refine")
    labels = (full / "refine" / "image_labels.csv").read_text()
    assert labels == (full / "erase2" / "image_labels.csv").read_text()

    # the same run, killed in classifier2's 2nd step, then in the middle of the refine stage
    killed = tmp_path / "killed"
    cfg = psl_cfg(tiny_cfg, killed)
    original_step = trainer_mod.Trainer.train_step

    def crash_training(self, batch):
        if Path(self.out).name == "classifier2" and self.step == 1:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash_training)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [s["state"] for s in json.loads((killed / STATUS).read_text())][:4] == ["done", "done", "running",
                                                                                  "pending"]
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original_step)
    original_filter, calls = psl_mod.tag_filter, []

    def crash_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the 5th image of refine
            raise KeyboardInterrupt
        return original_filter(*args, **kwargs)

    monkeypatch.setattr(psl_mod, "tag_filter", crash_task)
    resumed = []
    fit = trainer_mod.Trainer.fit
    monkeypatch.setattr(trainer_mod.Trainer, "fit",
                        lambda self: resumed.append((Path(self.out).name, self.resumed_from)) or fit(self))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert resumed == [("classifier2", 1), ("psl", None)]  # classifier2 goes on from its step-1 checkpoint
    assert json.loads((killed / STATUS).read_text())[5]["state"] == "running"
    assert len(list((killed / "refine" / "masks").iterdir())) == 4
    monkeypatch.setattr(psl_mod, "tag_filter", original_filter)
    train(cfg)
    assert resumed[2:] == [("killed", None)]  # refine redone, then the last stage (in the run folder) only
    assert json.loads((killed / STATUS).read_text())[5]["state"] == "done"

    a, b = products(full), products(killed)
    assert a.keys() == b.keys() and len(a) > 3 * 32
    assert all(a[k] == b[k] for k in a)
    for stage in ("classifier", "classifier2", "psl", ""):
        wa = ckpt.load(full / stage / "last.pt")["method"]
        wb = ckpt.load(killed / stage / "last.pt")["method"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
    q = [json.loads((d / "refine" / "quality.json").read_text()) for d in (full, killed)]
    assert q[0] == q[1]
    torch.use_deterministic_algorithms(False)


def test_psl_without_plus_trains_once_on_the_ae_masks(tiny_cfg, tmp_path):
    cfg = psl_cfg(tiny_cfg, tmp_path / "run", plus=False, steps=1)
    PipelineRun(cfg).run()
    status = json.loads((tmp_path / "run" / STATUS).read_text())
    assert [s["stage"] for s in status] == ["classifier", "erase1", "train"]
    final = ckpt.load(tmp_path / "run" / "last.pt")
    assert final["config"]["data"]["streams"]["pseudo"]["root"] == str(tmp_path / "run" / "erase1")
    assert any(k.startswith("net.cls_head.") for k in final["method"])
    torch.use_deterministic_algorithms(False)


def test_refine_is_redone_when_its_prediction_window_changes(tiny_cfg, tmp_path):
    # with eval.crop_size unset, the refine stage predicts (slide mode) with windows of data.crop_size; a
    # stages.refine override of it changes the masks and no upstream product, so the done marker must hold it
    from lesseg.engine.stages import _inputs
    from lesseg.methods.base import stage_config, stage_product

    def refine_marker(*overrides):
        cfg = tiny_cfg(["eval.mode=slide", *overrides], method={"name": "psl", "steps": 1, "crf": False})
        stages = PSL.pipeline(cfg)
        k = [s.name for s in stages].index("refine")
        products = {s.name: stage_product(cfg.out, stages, j) for j, s in enumerate(stages)}
        return _inputs(stages[k], stage_config(cfg, stages, k, products))

    assert refine_marker() == refine_marker()
    assert refine_marker() != refine_marker("stages.refine.data.crop_size=[16,16]")
    assert refine_marker() != refine_marker("stages.refine.eval.flip=true")


def test_init_from_classifier_starts_the_psl_networks_encoder_from_the_classifier(tiny_cfg, tmp_path, monkeypatch):
    # the shapes configs start PSL's segmentation networks (psl and, with PSL+, train) from the classifier the
    # pipeline trained on the tags: their encoder, not the classification head (the branch starts fresh)
    from lesseg.methods.base import stage_config, stage_product

    cfg = psl_cfg(tiny_cfg, tmp_path / "plan", init_from_classifier=True, crf=False)
    stages = PSL.pipeline(cfg)
    products = {s.name: stage_product(cfg.out, stages, j) for j, s in enumerate(stages)}
    classifier = str(products["classifier"])
    for name in ("psl", "train"):
        k = [s.name for s in stages].index(name)
        scfg = stage_config(cfg, stages, k, products)
        assert scfg.model.pretrained == classifier and scfg.model.cls_head, name
    plain = psl_cfg(tiny_cfg, tmp_path / "plan2", crf=False)
    k = [s.name for s in PSL.pipeline(plain)].index("psl")
    assert stage_config(plain, PSL.pipeline(plain), k, products).model.pretrained is None

    # a real run: the psl network's encoder before its first step is the classifier's
    cfg = psl_cfg(tiny_cfg, tmp_path / "run", plus=False, steps=1, init_from_classifier=True)
    seen = {}
    original_step = trainer_mod.Trainer.train_step

    def first_step(self, batch):
        if self.step == 0 and Path(self.out) == tmp_path / "run":
            seen.update({k: v.detach().clone() for k, v in self.method.net.state_dict().items()})
        return original_step(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", first_step)
    PipelineRun(cfg).run()
    trained = ckpt.load(tmp_path / "run" / "classifier" / "last.pt")["method"]
    encoder = {k[len("net."):]: v for k, v in trained.items() if k.startswith("net.encoder.")}
    assert encoder and all(torch.equal(seen[k], v) for k, v in encoder.items())
    head = [k for k in seen if k.startswith("cls_head.") and f"net.{k}" in trained]  # the classifier's has these too
    assert head and not any(torch.equal(seen[k], trained[f"net.{k}"]) for k in head)
    torch.use_deterministic_algorithms(False)
