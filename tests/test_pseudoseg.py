"""PseudoSeg (methods-wave2.md section 11, the authors' code): sharpening and the calibrated fusion on
hand-computed values, soft CE, image tags, the cutout square, the SGC refiner's attention and background
score, Grad-CAM = max-normalised CAM for a GAP-linear head, the branch's tags, and a tiny training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lesseg import config
from lesseg.errors import ConfigError, LessegError
from lesseg.methods import RunInfo, build_method
from lesseg.methods import pseudoseg as ps
from lesseg.methods.pseudoseg import (
    PseudoSegConfig,
    SGCBranch,
    calibrated_fusion,
    cutout_square,
    drop_background,
    image_tags,
    sharpen,
    soft_ce,
)
from lesseg.methods.weak.cam import class_activation_maps
from lesseg.models.heads import ClassificationHead
from lesseg.models.sgc import SelfAttentionRefiner, with_background

C, H, W = 3, 32, 32


def _method(**over):
    cfg = config.from_dict({"method": {"name": "pseudoseg", **over}, "train": {"iters": 10},
                            "model": {"encoder": "test_resnet", "decoder_channels": 16}})
    torch.manual_seed(0)
    return build_method(cfg, RunInfo(num_classes=C, class_names=list("abc"), max_iters=10))


def _batch(seed=0, b=2, tags=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, C, (b, H, W), generator=g)
    mask[:, :2] = 255
    valid = torch.ones(b, H, W, dtype=torch.bool)
    valid[:, -3:] = False
    unl = {"image": torch.randn(b, 3, H, W, generator=g), "valid": valid,
           "image_strong": torch.randn(b, 3, H, W, generator=g)}
    if tags:
        unl["tags"] = torch.tensor([[1.0, 0.0, 1.0]] * b)
    return {"labeled": {"image": torch.randn(b, 3, H, W, generator=g), "mask": mask}, "unlabeled": unl}


# ------------------------------------------------------------------------------------------ pure pieces
def test_sharpen_by_hand_and_temperature_one_is_identity():
    p = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    assert sharpen(p, 0.5).flatten().tolist() == pytest.approx([0.9, 0.1])  # 0.75^2 / (0.75^2 + 0.25^2)
    q = torch.rand(2, 4, 3, 3).softmax(1)
    assert torch.allclose(sharpen(q, 1.0), q, atol=1e-6)


def test_calibrated_fusion_by_hand():
    """One pixel, two classes: decoder logits (3, 0), SGC logits (1, 0); rms over all four = sqrt(10/4)."""
    dec = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    sgc = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    r = math.sqrt(2.5)
    p0 = (1 / (1 + math.exp(-3 / r)) + 1 / (1 + math.exp(-1 / r))) / 2  # averaged softmaxes, class 0
    want = p0**2 / (p0**2 + (1 - p0) ** 2)  # sharpened with T = 0.5
    got = calibrated_fusion(dec, sgc, 0.5)
    assert got.flatten().tolist() == pytest.approx([want, 1 - want], rel=1e-5)


def test_calibrated_fusion_sums_to_one_is_scale_free_and_per_image():
    torch.manual_seed(0)
    dec, sgc = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    fused = calibrated_fusion(dec, sgc, 0.5)
    assert torch.allclose(fused.sum(1), torch.ones(2, 5, 5))
    # the calibration: both sources rescaled together give the same label (overconfident logits are tamed)
    assert torch.allclose(calibrated_fusion(7 * dec, 7 * sgc, 0.5), fused, atol=1e-5)
    # one image's label does not depend on its batch mates (the authors' rms spans the per-GPU batch)
    alone = calibrated_fusion(dec[:1], sgc[:1], 0.5)
    other = calibrated_fusion(torch.cat([dec[:1], 10 * dec[1:]]), torch.cat([sgc[:1], sgc[1:]]), 0.5)
    assert torch.allclose(alone, other[:1], atol=1e-6)


def test_soft_ce_by_hand_equals_ce_for_one_hot_targets_and_skips_invalid():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1,2,1,2
    target = torch.tensor([[[[0.5, 0.0]], [[0.5, 1.0]]]])
    ce0 = -(0.5 * math.log(1 / (1 + math.exp(-2))) + 0.5 * math.log(1 / (1 + math.exp(2))))
    ce1 = math.log(1 + math.exp(-1))
    both = torch.ones(1, 1, 2, dtype=torch.bool)
    assert soft_ce(logits, target, both).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert soft_ce(logits, target, torch.tensor([[[False, True]]])).item() == pytest.approx(ce1, rel=1e-6)
    assert soft_ce(logits, target, torch.zeros_like(both)).item() == 0.0
    hard = torch.randint(0, 2, (1, 1, 2))
    one_hot = torch.nn.functional.one_hot(hard, 2).permute(0, 3, 1, 2).float()
    assert soft_ce(logits, one_hot, both).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, hard).item(), rel=1e-6)


def test_image_tags_are_the_present_classes_without_background():
    mask = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [1, 1]]])
    assert image_tags(mask, 3, 0).tolist() == [[0, 1], [1, 0]]
    assert image_tags(mask, 3, None).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert drop_background(torch.tensor([[1.0, 2.0, 3.0]]), 1).tolist() == [[1.0, 3.0]]


def test_cutout_square_is_one_clipped_square_of_the_given_side():
    torch.manual_seed(0)
    m = cutout_square(64, 32, 40, 0.25, "cpu")[:, 0]  # half-sides 4 and 5
    rows, cols = m.amax(2), m.amax(1)  # B,H ; B,W
    assert torch.equal(m, rows[:, :, None] * cols[:, None, :])  # a rectangle
    assert (rows.sum(1) <= 8).all() and (cols.sum(1) <= 10).all() and (rows.sum(1) >= 4).all()
    assert ((rows.sum(1) == 8) & (cols.sum(1) == 10)).any()  # whole where the centre is not near a border
    for r in (rows, cols):  # contiguous
        assert ((r[:, 1:] - r[:, :-1]).abs().sum(1) <= 2).all()


def test_with_background_inserts_top_minus_max_at_the_background_index():
    s = torch.tensor([0.5, 1.5]).view(1, 2, 1, 1)
    assert with_background(s, 0, 2.0).flatten().tolist() == [0.5, 0.5, 1.5]
    assert with_background(s, 2, 2.0).flatten().tolist() == [0.5, 1.5, 0.5]
    assert with_background(s, None, 2.0) is s


def _identity_refiner(k_in, num_classes, bg_class):
    r = SelfAttentionRefiner(k_in, num_classes, bg_class, dim=4).eval()
    with torch.no_grad():
        r.classifier[0].weight.copy_(torch.eye(num_classes).view(num_classes, num_classes, 1, 1))
    return r


def test_refiner_with_equal_features_attends_uniformly_to_the_valid_pixels_only():
    r = _identity_refiner(3, 3, 0)
    feat = torch.ones(1, 3, 1, 3)  # every query-key product is equal: uniform attention
    scores = torch.tensor([[[[1.0, 0.0, 0.5]], [[0.0, 1.0, 0.2]]]])  # 1,2,1,3 (two foreground classes)
    valid = torch.tensor([[[True, True, False]]])
    bn = math.sqrt(1 + 1e-5)  # eval BatchNorm with fresh statistics divides by sqrt(1 + eps)
    out = r(feat, scores, valid) * bn
    fg = scores + scores[..., :2].mean(-1, keepdim=True)  # A s + s, the mean over the two valid pixels
    want = torch.cat([2 - fg.amax(1, keepdim=True), fg], 1)
    assert torch.allclose(out, want, atol=1e-5)
    changed = scores.clone()
    changed[..., 2] = 9.0  # the padding pixel's own scores change only its own output
    assert torch.allclose(r(feat, changed, valid)[..., :2], out[..., :2] / bn, atol=1e-5)


def test_grad_cam_of_a_gap_linear_head_is_the_max_normalised_cam():
    torch.manual_seed(0)
    head = ClassificationHead(6, 3)
    feat = torch.randn(2, 6, 4, 5, requires_grad=True)
    tags = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    logits = head(feat)
    grad_cam = []
    for c in range(3):  # Selvaraju et al.: weights = spatial mean of d y_c / d f, ReLU of the weighted sum
        (g,) = torch.autograd.grad(logits[:, c].sum(), feat, retain_graph=True)
        cam = torch.relu((g.mean((2, 3), keepdim=True) * feat).sum(1))
        grad_cam.append(cam / cam.amax((1, 2), keepdim=True))
    want = torch.stack(grad_cam, 1) * tags[:, :, None, None]
    got = class_activation_maps(feat.detach(), head.classifier.weight, tags, (4, 5))
    assert torch.allclose(got, want, atol=1e-5)


def test_branch_uses_given_tags_where_known_and_its_own_prediction_elsewhere():
    features = [torch.randn(4, 5, 4, 4), torch.randn(4, 6, 2, 2)]
    valid = torch.ones(4, 8, 8, dtype=torch.bool)
    given = torch.tensor([[1.0, 0.0]] * 4)
    known = torch.tensor([True, True, False, False])
    for thresh, predicted in ((0.0, 1.0), (1.0, 0.0)):
        branch = SGCBranch([5, 6], 3, PseudoSegConfig(tag_thresh=thresh))
        out = branch(features, valid, given, known)
        assert out["cls"].shape == (4, 2) and out["sgc"].shape == (4, 3, 2, 2)
        assert out["tags"][:2].tolist() == given[:2].tolist() and (out["tags"][2:] == predicted).all()


# ------------------------------------------------------------------------------------------ the method
def test_cutout_region_is_mean_filled_in_the_strong_view_and_left_out_of_the_loss(monkeypatch):
    m = _method()
    m.train()
    seen = {}
    original = m.net.forward

    def spy(x, perturb=None):
        seen["x"] = x
        return original(x, perturb=perturb)

    monkeypatch.setattr(m.net, "forward", spy)
    full = torch.ones(2, 1, H, W)
    monkeypatch.setattr(ps, "cutout_square", lambda b, h, w, size, device: full[:b])
    out = m.training_step(_batch(), 0)
    assert (seen["x"][4:] == 0).all()  # [x_l, u_weak, u_strong]: the strong images wholly cut out
    assert out["loss_unsup"].item() == 0.0
    nothing = torch.zeros(2, 1, H, W)
    monkeypatch.setattr(ps, "cutout_square", lambda b, h, w, size, device: nothing[:b])
    batch = _batch()
    m.training_step(batch, 0)
    assert torch.equal(seen["x"][4:], batch["unlabeled"]["image_strong"])


def test_a_background_class_outside_the_data_is_refused():
    with pytest.raises(ConfigError, match="bg_class"):
        _method(bg_class=3)
    assert _method(bg_class=None).sgc.cls_head.classifier.out_channels == C  # every class has a CAM


def test_weakly_needs_tags_and_uses_them_for_the_cams_and_the_classifier():
    weak = _method(weakly=True, tag_thresh=1.0).train()  # tag_thresh 1: every predicted tag would be 0
    with pytest.raises(LessegError, match="tags"):
        weak.training_step(_batch(), 0)
    batch = _batch(tags=True)
    torch.manual_seed(1)  # the same cutout squares in both steps
    out = weak.training_step(batch, 0)
    assert out["tag_frac"].item() == pytest.approx(0.5)  # the given tags, background dropped: [0, 1]
    semi = _method(tag_thresh=1.0).train()  # the same weights, tags predicted
    torch.manual_seed(1)
    semi = semi.training_step(batch, 0)
    assert semi["tag_frac"].item() == 0.0
    assert torch.allclose(out["loss_sup"], semi["loss_sup"])  # the same forward ...
    assert not torch.allclose(out["loss_cls"], semi["loss_cls"])  # ... the classifier also learns the tags


def test_tiny_training_logs_the_quality_of_the_fused_label_and_of_each_source(tiny_cfg):
    from lesseg.engine.trainer import Trainer

    streams = {"labeled": {"split": "train", "batch_size": 4},
               "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": True,
                             "true_masks": True}}
    cfg = tiny_cfg(["train.iters=2", "train.log_every=1"], method={"name": "pseudoseg"},
                   data={"streams": streams})
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert 0.0 <= result["miou"] <= 1.0
    events = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 2
    for e in train:
        assert all(0.0 <= e[k] <= 1.0 for k in ("pl_acc", "dec_acc", "sgc_acc", "tag_frac", "pl_conf"))
        assert all(math.isfinite(e[k]) for k in ("loss", "loss_sup", "loss_cls", "loss_sgc", "loss_unsup"))


@pytest.mark.parametrize("step, factor", [(0, math.exp(-5.0)), (3, math.exp(-5.0 * 0.4**2)), (5, 1.0), (9, 1.0)])
def test_unlabeled_term_ramps_up_over_a_share_of_the_run(step, factor):
    # rampup 0.5 of a 10-step run: loss_unsup weighs unsup_weight x exp(-5 (1 - step/5)^2), fully from step 5
    m = _method(rampup=0.5, unsup_weight=2.0).train()
    assert m.phases() == [("unsupervised weight ramp-up (sigmoid, to 2)", 0, 5)]
    out = m.training_step(_batch(), step)
    rest = out["loss_sup"] + out["loss_sgc"] + out["loss_cls"]
    assert out["loss"].item() == pytest.approx((rest + 2.0 * factor * out["loss_unsup"]).item(), rel=1e-6)
    assert _method().phases() == [("unsupervised weight ramp-up (sigmoid, to 1)", 0, 1)]  # 10 % of the run
    assert _method(rampup=0.0).phases() == []  # the authors': full weight from the first step


def test_aligned_soft_targets_take_the_labeled_class_shares(monkeypatch):
    """method.align=hard (the default): the fused soft pseudo-labels are shifted so that their argmax has the
    labeled masks' class shares (here every labeled pixel is class 2) before the soft CE; none leaves them as fused."""
    targets = {}

    def capture(logits, target, valid):
        targets["t"] = target
        return (logits * 0).sum()

    monkeypatch.setattr(ps, "soft_ce", capture)
    batch = _batch()
    batch["labeled"]["mask"][:, 2:] = 2
    shares = {}
    for align in ("none", "hard", "default"):
        m = _method(**({} if align == "default" else {"align": align})).train()
        out = m.training_step(batch, 5)
        assert torch.isfinite(out["loss"])
        t, v = targets["t"], batch["unlabeled"]["valid"]
        shares[align] = float((t.argmax(1) == 2)[v].float().mean())
        assert torch.allclose(t.sum(1), torch.ones_like(t[:, 0]), atol=1e-5)  # still distributions
    assert shares["hard"] > 0.95 and shares["hard"] > shares["none"] + 0.2
    assert shares["default"] == shares["hard"]  # hard is the default (the VOC / Cityscapes configs set none)
