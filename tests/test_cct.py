"""CCT (methods-wave2.md section 9): the consistency and ABCE losses on hand-computed values, each
perturbation, the auxiliary decoders (ICNR, stride, counts), the ramp-up, gradient routing, a checkpoint round
trip, a step's cost and a tiny run."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_mean_teacher import TINY, C, make_batch, reaches

from lesseg.errors import ConfigError
from lesseg.methods.base import RunInfo
from lesseg.methods.cct import (
    CCT,
    KINDS,
    CCTConfig,
    PerturbedDecoders,
    abce_loss,
    abce_threshold,
    aux_consistency,
    cutout_mask,
    feature_drop,
    feature_noise,
    feature_stride,
    foreground,
    object_boxes,
)
from lesseg.methods.common import ce_loss
from lesseg.methods.vat import adversarial_direction
from lesseg.models import build_model
from lesseg.models.aux_decoders import ShuffleDecoder

SMALL = {f"aux_{k}": 1 for k in KINDS}  # one decoder per perturbation


def build(max_iters: int = 10, **over) -> CCT:
    torch.manual_seed(0)
    return CCT(CCTConfig(**{**SMALL, **over}), TINY, RunInfo(num_classes=C, max_iters=max_iters))


def pixel_map(values: list[list[float]]) -> torch.Tensor:
    """Per-pixel class vectors -> 1,C,1,N."""
    return torch.tensor(values).T.reshape(1, len(values[0]), 1, len(values))


# ------------------------------------------------------------------------------------------ loss pieces
def test_aux_consistency_hand_values_padding_and_identity():
    target = pixel_map([[1.0, 0.0], [0.5, 0.5]])  # the second pixel is padding
    keep = torch.tensor([[[True, False]]])
    a1 = pixel_map([[0.0, 0.0], [9.0, -9.0]])  # softmax (.5, .5): squared distance .25 + .25
    a2 = pixel_map([[math.log(3), 0.0], [9.0, -9.0]])  # (.75, .25): .0625 + .0625
    # per decoder: sum over classes / (C x kept pixels); then the mean over the K decoders
    assert aux_consistency([a1, a2], target, keep).item() == pytest.approx((0.5 / 2 + 0.125 / 2) / 2)
    # an identity perturbation (the main logits themselves) gives 0
    main = torch.randn(2, C, 4, 4)
    assert aux_consistency([main, main], main.softmax(1), torch.ones(2, 4, 4, dtype=torch.bool)).item() == 0.0
    assert aux_consistency([a1], target, torch.zeros_like(keep)).item() == 0.0


def test_abce_threshold_anneals_from_one_over_c_towards_0_9():
    assert abce_threshold(0, 21, 400.0) == pytest.approx(1 / 21)
    end = 1 / 21 + (0.9 - 1 / 21) * (1 - math.exp(-5))
    assert abce_threshold(400, 21, 400.0) == pytest.approx(end)
    assert abce_threshold(10**6, 21, 400.0) == pytest.approx(end)  # clipped
    assert abce_threshold(200, 21, 400.0) == pytest.approx(1 / 21 + (0.9 - 1 / 21) * (1 - math.exp(-2.5)))


def test_abce_keeps_pixels_below_eta_but_at_least_min_kept_per_image():
    # ground truth class 0 everywhere; p_gt = sigmoid(l0 - l1) = .2, .5, .8, .95; the last pixel is ignored
    p = torch.tensor([0.2, 0.5, 0.8, 0.95, 0.1])
    logits = pixel_map([[math.log(q / (1 - q)), 0.0] for q in p.tolist()])
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    ce = (-p.log()).tolist()
    assert abce_loss(logits, target, 0.6, 1).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)
    # eta below every p_gt: still the min_kept * B = 1 hardest pixel (threshold = 2nd smallest p_gt)
    assert abce_loss(logits, target, 0.0, 1).item() == pytest.approx(ce[0], rel=1e-5)
    assert abce_loss(logits, target, 0.0, 2).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)
    assert abce_loss(logits, target, 1.0, 1).item() == pytest.approx(sum(ce[:4]) / 4, rel=1e-5)
    assert abce_loss(logits, torch.full_like(target, 255), 0.5, 1).item() == 0.0


# -------------------------------------------------------------------------------------------- perturbations
def test_feature_noise_is_one_draw_for_the_batch_with_mean_z():
    z = torch.rand(2, 4, 3, 3) + 0.5
    out = feature_noise(z, 0.3)
    n = (out - z) / z  # the relative noise: the same for both images, within +-0.3
    assert torch.allclose(n[0], n[1], atol=1e-6) and n.abs().max() <= 0.3 + 1e-6 and n.abs().max() > 0
    torch.manual_seed(0)
    mean = torch.stack([feature_noise(z, 0.3) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, z, atol=0.02 * z.max().item())


def test_feature_drop_zeroes_locations_at_or_above_gamma_times_the_max_channel_mean():
    z = torch.zeros(1, 2, 1, 4)
    z[0, :, 0] = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 5.0, 4.0]])  # channel means 1, 2, 4, 4
    out = feature_drop(z, 0.75)  # threshold 3: locations with mean >= 3 go
    assert torch.equal(out[0, :, 0, :2], z[0, :, 0, :2]) and out[0, :, 0, 2:].abs().sum() == 0


def test_foreground_excludes_background_classes_and_padding():
    pseudo = torch.tensor([[[0, 1, 2, 3]]])
    valid = torch.tensor([[[True, True, True, False]]])
    assert foreground(pseudo, valid, [0]).tolist() == [[[False, True, True, False]]]
    assert foreground(pseudo, valid, [0, 2]).tolist() == [[[False, True, False, False]]]


def test_context_and_object_masked_features_sum_to_z_and_dropout_is_always_on():
    m = build()
    m.eval()  # Dropout2d of the dropout decoders is part of the loss: on in any mode
    z = torch.rand(2, 16, 8, 8) + 0.1
    fg = (torch.rand(2, 1, 8, 8) > 0.5).float()
    ctx = m.aux.perturb("context_masking", z, fg, [], (32, 32))
    obj = m.aux.perturb("object_masking", z, fg, [], (32, 32))
    assert torch.equal(ctx + obj, z) and torch.equal(ctx, z * fg)
    dropped = m.aux.perturb("dropout", z, fg, [], (32, 32))
    zeroed = dropped.flatten(2).abs().sum(2) == 0  # B,D: whole channels
    assert 0 < zeroed.float().mean() < 1
    assert torch.allclose(dropped[~zeroed], 2 * z[~zeroed])  # the kept channels: z / (1 - p)


def test_guided_cutout_boxes_follow_the_authors_contour_rule():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disk = ((yy - 32) ** 2 + (xx - 30) ** 2) <= 20**2  # a round object: 68 contour points
    square = torch.zeros(64, 64, dtype=torch.bool)
    square[5:60, 5:60] = True  # 4 points in CHAIN_APPROX_SIMPLE: never cut, as in the authors' code
    boxes = object_boxes(torch.stack([disk, square]), 50)
    assert boxes[1] == [] and len(boxes[0]) == 1
    x0, y0, w, h = boxes[0][0]
    assert (x0, y0, w, h) == (10, 12, 40, 40)
    torch.manual_seed(0)
    mask = cutout_mask(boxes, (64, 64), 0.4)
    assert torch.equal(mask[1], torch.ones(1, 64, 64))
    holes = (mask[0, 0] == 0).nonzero()
    assert len(holes) == int(0.4 * w) * int(0.4 * h)
    assert holes[:, 1].min() >= x0 and holes[:, 1].max() <= x0 + w  # inside the object's box
    assert holes[:, 0].min() >= y0 and holes[:, 0].max() <= y0 + h


def test_vat_decoder_perturbation_has_norm_eps_per_image_and_no_gradient():
    m = build(vat_eps=2.0)
    z = torch.rand(2, 16, 8, 8)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    r = m.aux.vat_perturbation(m.aux.decoders[0], z.requires_grad_(), valid)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((2,), 2.0)) and not r.requires_grad
    assert all(p.grad is None for p in m.aux.parameters())


def test_vat_decoder_direction_at_the_default_xi_is_the_float64_one_at_the_authors_feature_size():
    """xi is the norm of the whole perturbation: on CCT's 512 x 40 x 40 features (VOC crop 320, stride 8) each
    feature moves by xi / 905, and at 1e-4 (a former default) the float32 direction was mostly noise."""
    torch.manual_seed(0)
    aux = PerturbedDecoders(["vat"], 512, 21, 8, CCTConfig())
    dec = aux.decoders[0]
    z = torch.relu(torch.randn(1, 512, 40, 40))
    valid = torch.ones(1, 320, 320, dtype=torch.bool)
    torch.manual_seed(1)
    d = aux.vat_perturbation(dec, z, valid) / CCTConfig().vat_eps
    torch.manual_seed(1)
    d0 = torch.rand_like(z) - 0.5  # the draw vat_perturbation made
    dec64 = copy.deepcopy(dec).double()
    target = dec64(z.double(), (320, 320)).softmax(1).detach()
    ref = adversarial_direction(lambda t: dec64(t, (320, 320)), z.double(), target, valid, d0.double(), 1e-6, 1)
    assert float((d.double() * ref).sum()) > 0.99


# --------------------------------------------------------------------------------------------- decoders
def test_shuffle_decoder_starts_as_nearest_upsampling_and_reaches_the_input_size():
    dec = ShuffleDecoder(8, C, upscale=4)
    assert len(dec.stages) == 2
    out = dec(torch.randn(1, 8, 5, 5), (20, 20))  # 5 x 4 = 20: no resize, only the stages
    blocks = out.unfold(2, 4, 4).unfold(3, 4, 4)  # 1,C,5,5,4,4: each 4x4 block one value at init (ICNR)
    assert torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks))
    assert dec(torch.randn(1, 8, 5, 5), (19, 21)).shape == (1, C, 19, 21)


def test_feature_stride_of_each_head_and_the_decoder_counts():
    net = build_model(OmegaConf.structured(TINY), C)
    assert feature_stride(net) == 4  # DeepLabv3+: the stride-4 fusion
    v2_cfg = OmegaConf.merge(OmegaConf.structured(TINY), {"head": "deeplabv2", "output_stride": 8})
    v2 = build_model(v2_cfg, C)
    assert feature_stride(v2) == 8
    torch.manual_seed(0)
    full = CCT(CCTConfig(), TINY, RunInfo(num_classes=C))  # the authors' VOC config: 30 decoders
    counts = {k: full.aux.kinds.count(k) for k in KINDS}
    assert counts == {"vat": 2, "dropout": 6, "cutout": 6, "context_masking": 2, "object_masking": 2,
                      "feature_drop": 6, "feature_noise": 6}
    # z: the ASPP output at the output stride (16) by default, four x2 stages; the fused features: two
    assert len(full.aux.decoders) == 30 and len(full.aux.decoders[0].stages) == 4
    assert len(CCT(CCTConfig(z="fused"), TINY, RunInfo(num_classes=C)).aux.decoders[0].stages) == 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="auxiliary decoder"):
        build(**{f"aux_{k}": 0 for k in KINDS})
    with pytest.raises(ConfigError, match="sup_loss"):
        build(sup_loss="focal")
    with pytest.raises(ConfigError, match="ohem"):
        build(sup_loss="abce", ohem=True)


# ------------------------------------------------------------------------------------------------ method
def test_unsup_weight_ramp_up_is_relative_to_the_run_and_announced():
    m = build(max_iters=1000)
    assert m.rampup_steps == 100 and m.phases() == [("unsupervised weight ramp-up (sigmoid, to 30)", 0, 100)]
    m.train()
    batch = make_batch()
    assert m.training_step(batch, 0)["unsup_weight"].item() == pytest.approx(30 * math.exp(-5))  # 0.202
    assert m.training_step(batch, 100)["unsup_weight"].item() == pytest.approx(30.0)


def test_consistency_trains_the_encoder_and_aux_decoders_but_not_the_main_classifier():
    m = build()
    m.train()
    out = m.training_step(make_batch(), step=5)
    assert reaches(m, out["loss_unsup"]) == {"net": True, "aux": True}
    assert reaches(m, out["loss_sup"]) == {"net": True, "aux": False}
    classifier = list(m.net.head.classifier.parameters())
    grads = torch.autograd.grad(out["loss_unsup"], classifier, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # the main prediction is a detached target
    assert all(0 <= out[f"agree_{k}"].item() <= 1 for k in KINDS)


def test_z_is_the_aspp_output_of_the_unlabeled_images_and_the_consistency_trains_no_fusion_layer():
    m = build()  # z: context, the default
    m.train()
    batch = make_batch()
    seen, aspp = [], []
    m.aux.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    m.net.head.aspp.register_forward_hook(lambda module, args, out: aspp.append(out))
    out = m.training_step(batch, step=5)
    # the decoders got the ASPP output of the unlabeled half of the one forward, at the output stride
    assert len(aspp) == 1 and seen[0].shape == (2, m.net.head.out_channels, 2, 2)
    assert torch.equal(seen[0], aspp[0][2:])
    assert m.context.out is None  # handed over, not held until the next forward
    fuse = list(m.net.head.fuse.parameters()) + list(m.net.head.low_level_project.parameters())
    grads = torch.autograd.grad(out["loss_unsup"], fuse, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # the fusion is the main decoder's: untouched
    aspp = list(m.net.head.aspp.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(out["loss_unsup"], aspp,
                                                                                 allow_unused=True))
    fused = build(z="fused")  # the head's stride-4 fusion: the consistency trains it
    fused.train()
    out = fused.training_step(batch, step=5)
    grads = torch.autograd.grad(out["loss_unsup"], list(fused.net.head.fuse.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ConfigError, match="method.z"):
        build(z="encoder")


def test_conf_mask_above_every_confidence_leaves_no_consistency_pixel():
    m = build(conf_mask=True, conf_thresh=1.0)
    m.train()
    assert m.training_step(make_batch(), step=5)["loss_unsup"].item() == 0.0


def test_abce_step_uses_the_annealed_threshold(monkeypatch):
    m = build(sup_loss="abce", max_iters=100)
    m.train()
    seen = []

    def spy(logits, target, eta, min_kept):
        seen.append(eta)
        return ce_loss(logits, target)

    monkeypatch.setattr("lesseg.methods.cct.abce_loss", spy)
    m.training_step(make_batch(), step=40)  # the ramp's end: 40 % of the run
    assert seen == [pytest.approx(abce_threshold(40, C, 40.0))]


def test_checkpoint_round_trip_restores_every_auxiliary_decoder():
    m = build()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)  # another init
    clone = CCT(CCTConfig(**SMALL), TINY, RunInfo(num_classes=C, max_iters=10))
    assert not torch.equal(clone.aux.decoders[3].classify.weight, m.aux.decoders[3].classify.weight)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    m.train(), clone.train()
    batch = make_batch()
    torch.manual_seed(2)
    a = m.training_step(batch, 3)
    torch.manual_seed(2)
    b = clone.training_step(batch, 3)
    assert all(torch.allclose(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- cost, training
def test_one_step_of_cost_and_a_tiny_training(shapes_root, tmp_path):
    from conftest import tiny_dict

    from lesseg import config
    from lesseg.bench.cost import bench_overhead
    from lesseg.engine.trainer import Trainer

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": "cct", **SMALL})
    unlabeled = {"split": "train", "batch_size": 3, "labeled": False, "true_masks": True}
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2}, "unlabeled": unlabeled}
    cost = bench_overhead(config.from_dict(d), iters=1, warmup=0)
    # the auxiliary decoders are network passes of the reference: one per perturbation on the 3 unlabeled
    # images, the VAT decoder's also its target (no gradient) and its power iteration
    assert cost["passes"] == ["net 5 images forward+backward", "aux.decoders.* 3 images forward, no gradient",
                              f"{len(KINDS) + 1} x aux.decoders.* 3 images forward+backward"] and cost["step_s"] > 0
    d["train"].update(iters=3, log_every=1)
    trainer = Trainer(config.from_dict(d))
    trainer.fit()
    events = [json.loads(s) for s in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 3 and all(0 <= e["pl_acc"] <= 1 and 0 <= e["fg_frac"] <= 1 for e in train)
