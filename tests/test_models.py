"""Tests of lesseg.models: output contract of every head, BatchNorm freezing, parameter groups, weight loading."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from lesseg.config import ModelConfig
from lesseg.errors import ConfigError
from lesseg.models import build_model, create_encoder, load_encoder_weights

NUM_CLASSES = 5
TINY = "test_resnet"  # timm's tiny ResNet (0.4M parameters), supports features_only and output_stride


def tiny_cfg(**overrides: Any) -> ModelConfig:
    return ModelConfig(**{"encoder": TINY, "decoder_channels": 32, "rep_dim": 16, **overrides})


def downsampled(size: int, halvings: int) -> int:
    """Spatial size after `halvings` stride-2 convs/pools with 'same' padding (ceil division)."""
    for _ in range(halvings):
        size = math.ceil(size / 2)
    return size


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def running_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if "running_" in k}


# ---- output contract ----


@pytest.mark.parametrize(("extras", "size"), [(False, (65, 71)), (True, (50, 97))])
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", ["deeplabv3plus", "deeplabv2"])
def test_output_shapes(head: str, output_stride: int, extras: bool, size: tuple[int, int]) -> None:
    cfg = tiny_cfg(head=head, output_stride=output_stride, rep_head=extras, cls_head=extras, aux_head=extras)
    model = build_model(cfg, NUM_CLASSES)
    H, W = size
    out = model(torch.randn(2, 3, H, W))

    assert set(out) == {"logits", "feat"} | ({"rep", "cls", "aux"} if extras else set())
    if head == "deeplabv3plus":  # decoder features at stride 4 whatever the output stride
        halvings, dim = 2, cfg.decoder_channels
    else:  # the last encoder feature itself, at the output stride
        halvings, dim = int(math.log2(output_stride)), model.encoder.feature_info.channels()[-1]
    h, w = downsampled(H, halvings), downsampled(W, halvings)
    assert out["logits"].shape == (2, NUM_CLASSES, H, W)
    assert out["feat"].shape == (2, dim, h, w)
    if extras:
        assert out["rep"].shape == (2, cfg.rep_dim, h, w)
        assert out["cls"].shape == (2, NUM_CLASSES)
        assert out["aux"].shape == (2, NUM_CLASSES, H, W)


@pytest.mark.parametrize(("flag", "key"), [("rep_head", "rep"), ("cls_head", "cls"), ("aux_head", "aux")])
def test_each_optional_head_adds_only_its_output(flag: str, key: str) -> None:
    model = build_model(tiny_cfg(**{flag: True}), NUM_CLASSES)
    assert set(model(torch.randn(1, 3, 33, 33))) == {"logits", "feat", key}
    assert model.num_classes == NUM_CLASSES


@pytest.mark.parametrize("head", ["deeplabv3plus", "deeplabv2"])
def test_logits_are_bilinear_upsampled_head_logits(head: str) -> None:
    model = build_model(tiny_cfg(head=head), NUM_CLASSES).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        _, small = model.head(model.encoder(x))  # B,C,h,w
        expected = F.interpolate(small, size=(45, 61), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x)["logits"], expected)


def test_dilation_rates_follow_the_papers() -> None:
    for output_stride, rates in ((16, [6, 12, 18]), (8, [12, 24, 36])):
        model = build_model(tiny_cfg(output_stride=output_stride), NUM_CLASSES)
        assert [branch[0].dilation[0] for branch in model.head.aspp.branches[1:]] == rates

    v2 = build_model(tiny_cfg(head="deeplabv2", output_stride=8), NUM_CLASSES).eval()
    assert [conv.dilation[0] for conv in v2.head.branches] == [6, 12, 18, 24]
    feat = torch.randn(1, v2.head.out_channels, 9, 9)
    _, logits = v2.head([feat])
    assert torch.allclose(logits, sum(conv(feat) for conv in v2.head.branches), atol=1e-6)


def test_resnet18_trains_with_one_image_and_every_part_gets_gradient() -> None:
    cfg = ModelConfig(encoder="resnet18", decoder_channels=32, rep_dim=16, rep_head=True, cls_head=True)
    model = build_model(dataclasses.replace(cfg, aux_head=True), NUM_CLASSES).train()
    out = model(torch.randn(1, 3, 65, 65))  # batch 1: image pooling must not need batch statistics
    assert out["logits"].shape == (1, NUM_CLASSES, 65, 65)
    sum(v.pow(2).mean() for v in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # timm zero-initializes each residual block's last BN scale, so only head gradients are surely non-zero
    assert all(p.grad.abs().sum() > 0 for p in model.head_parameters())


def test_cam_is_the_classifier_applied_to_the_last_feature() -> None:
    model = build_model(tiny_cfg(cls_head=True), NUM_CLASSES).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        cams = model.cam(x)  # B,C,h,w
        last = model.encoder(x)[-1]  # B,K,h,w
        weight = model.cls_head.classifier.weight[:, :, 0, 0]  # C,K
        assert torch.allclose(cams, torch.einsum("ck,bkhw->bchw", weight, last), atol=1e-5)
        assert torch.allclose(model(x)["cls"], cams.mean(dim=(2, 3)), atol=1e-5)  # image logit = mean CAM

    with pytest.raises(ConfigError, match="cls_head"):
        build_model(tiny_cfg(), NUM_CLASSES).cam(x)


# ---- training details ----


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_encoder_batchnorm_fixed(freeze_bn: bool) -> None:
    model = build_model(tiny_cfg(freeze_bn=freeze_bn), NUM_CLASSES)
    model.eval()
    model.train()  # the freeze must survive a mode switch
    encoder_bns = batchnorms(model.encoder)
    encoder_stats, head_stats = running_stats(model.encoder), running_stats(model.head)

    model(torch.randn(2, 3, 65, 65))["logits"].sum().backward()

    encoder_unchanged = all(torch.equal(encoder_stats[k], v) for k, v in running_stats(model.encoder).items())
    assert encoder_unchanged == freeze_bn
    assert all(bn.training != freeze_bn for bn in encoder_bns)
    bn_params = [p for bn in encoder_bns for p in bn.parameters()]
    assert all(p.requires_grad != freeze_bn and (p.grad is None) == freeze_bn for p in bn_params)
    # the heads' BatchNorm layers start from random statistics, so they always train
    assert any(not torch.equal(head_stats[k], v) for k, v in running_stats(model.head).items())
    conv_params = [m.weight for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(p.grad is not None for p in conv_params)


def test_encoder_and_head_parameters_partition_the_model() -> None:
    model = build_model(tiny_cfg(rep_head=True, cls_head=True, aux_head=True), NUM_CLASSES)
    encoder, head = model.encoder_parameters(), model.head_parameters()
    encoder_ids, head_ids = {id(p) for p in encoder}, {id(p) for p in head}

    assert len(encoder_ids) == len(encoder) and len(head_ids) == len(head)
    assert not encoder_ids & head_ids
    assert encoder_ids | head_ids == {id(p) for p in model.parameters()}
    assert encoder_ids == {id(p) for p in model.encoder.parameters()}
    for part in (model.head, model.rep_head, model.cls_head, model.aux_head):
        assert {id(p) for p in part.parameters()} <= head_ids


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder": "no_such_net"}, "not a timm model"),
        ({"output_stride": 32}, "8 or 16"),
        ({"head": "pspnet"}, "unknown model.head"),
        ({"encoder": "test_vit"}, "output_stride=16"),  # a ViT has no dilated stages
    ],
)
def test_bad_model_config_is_a_config_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_cfg(**overrides), NUM_CLASSES)


# ---- pretrained weights ----


def assert_loaded(
    encoder: nn.Module, saved: dict[str, torch.Tensor], name: Callable[[str], str] = str
) -> None:
    """Every encoder tensor equals the saved tensor it maps to."""
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, saved[name(key)]), key


def test_load_torchvision_resnet18(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = torchvision.models.resnet18()  # random init, no download
    saved = source.state_dict()
    torch.save(saved, tmp_path / "resnet18.pth")
    encoder = create_encoder("resnet18", 16)
    assert not torch.equal(encoder.state_dict()["conv1.weight"], saved["conv1.weight"])

    with caplog.at_level(logging.WARNING):
        report = load_encoder_weights(encoder, tmp_path / "resnet18.pth")

    assert_loaded(encoder, saved)
    assert len(report.loaded) == len(encoder.state_dict())
    assert report.missing == [] and report.unexpected == []  # `fc.` is the classifier features_only drops
    assert caplog.records == []


def test_load_timm_checkpoint_into_flattened_feature_names(tmp_path: Path) -> None:
    source = timm.create_model("test_convnext", pretrained=False)  # full model: `stages.0.` names
    torch.save(source.state_dict(), tmp_path / "convnext.pth")
    encoder = create_encoder("test_convnext", 16)  # features_only: `stages_0.` names
    assert any(k.startswith("stages_0.") for k in encoder.state_dict())

    report = load_encoder_weights(encoder, tmp_path / "convnext.pth")

    def timm_name(key: str) -> str:
        return key.replace("stages_", "stages.", 1).replace("stem_", "stem.", 1)

    assert_loaded(encoder, source.state_dict(), timm_name)
    assert report.missing == [] and report.unexpected == []  # `head.` is dropped by features_only


WRAPPERS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "ddp_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict_container": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    "segmentor_checkpoint": lambda sd: {
        "model": {**{f"encoder.{k}": v for k, v in sd.items()}, "head.classifier.weight": torch.ones(2)}
    },
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_build_model_loads_wrapped_checkpoint(tmp_path: Path, wrapper: str) -> None:
    saved = create_encoder(TINY, 16).state_dict()
    path = tmp_path / "encoder.pt"
    torch.save(WRAPPERS[wrapper](saved), path)

    model = build_model(tiny_cfg(pretrained=str(path)), NUM_CLASSES)

    assert_loaded(model.encoder, saved)


def test_load_safetensors(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    saved = create_encoder(TINY, 16).state_dict()
    safetensors_torch.save_file(saved, tmp_path / "encoder.safetensors")
    encoder = create_encoder(TINY, 16)
    load_encoder_weights(encoder, tmp_path / "encoder.safetensors")
    assert_loaded(encoder, saved)


def test_checkpoint_of_another_encoder_is_refused_naming_what_it_provides(tmp_path: Path) -> None:
    """A resnet18 file for a resnet34 encoder (the names match, resnet34 has more blocks) and the reverse."""
    r18, r34 = create_encoder("resnet18", 16), create_encoder("resnet34", 16)
    torch.save(r18.state_dict(), tmp_path / "r18.pth")
    torch.save(r34.state_dict(), tmp_path / "r34.pth")
    before = {k: v.clone() for k, v in r34.state_dict().items()}
    n18 = len(r18.state_dict())
    with pytest.raises(ConfigError, match=rf"provides {n18} of the encoder's {len(before)} tensors; it lacks "
                                          r"encoder \d+ keys: layer1\.2\..*pretrained_partial=true"):
        load_encoder_weights(r34, tmp_path / "r18.pth")
    assert all(torch.equal(before[k], v) for k, v in r34.state_dict().items())  # nothing loaded
    with pytest.raises(ConfigError, match=r"has \d+ keys: layer1\.2\..* that the encoder has no place for"):
        load_encoder_weights(create_encoder("resnet18", 16), tmp_path / "r34.pth")
    with pytest.raises(ConfigError, match="pretrained_partial"):  # through the model config too
        build_model(tiny_cfg(encoder="resnet34", pretrained=str(tmp_path / "r18.pth")), NUM_CLASSES)
    model = build_model(tiny_cfg(encoder="resnet34", pretrained=str(tmp_path / "r18.pth"), pretrained_partial=True),
                        NUM_CLASSES)
    assert torch.equal(model.encoder.state_dict()["layer1.0.conv1.weight"], r18.state_dict()["layer1.0.conv1.weight"])


def test_partial_checkpoint_warns_and_loads_what_matches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = create_encoder(TINY, 16).state_dict()
    partial = {k: v for k, v in saved.items() if not k.startswith("layer4.")} | {
        "extra.weight": torch.ones(3)
    }
    torch.save(partial, tmp_path / "partial.pth")
    encoder = create_encoder(TINY, 16)
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}

    with pytest.raises(ConfigError, match="not a checkpoint of this encoder"):
        load_encoder_weights(encoder, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING):
        report = load_encoder_weights(encoder, tmp_path / "partial.pth", partial=True)

    layer4 = [k for k in saved if k.startswith("layer4.") and not k.endswith("num_batches_tracked")]
    assert report.missing == layer4
    assert report.unexpected == ["extra.weight"]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{len(layer4)} keys: {layer4[0]}" in messages and "1 key: extra.weight" in messages
    state = encoder.state_dict()
    assert all(torch.equal(state[k], partial[k] if k in partial else initial[k]) for k in state)


def test_shape_mismatch_names_the_key_and_loads_nothing(tmp_path: Path) -> None:
    saved = create_encoder(TINY, 16).state_dict()
    saved["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(saved, tmp_path / "bad.pth")
    encoder = create_encoder(TINY, 16)
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}

    with pytest.raises(ConfigError, match=r"layer1\.0\.conv1\.weight \(checkpoint \(1, 1, 1, 1\)"):
        load_encoder_weights(encoder, tmp_path / "bad.pth")
    assert all(torch.equal(initial[k], v) for k, v in encoder.state_dict().items())


EXECUTED: list[bool] = []


def _record_execution() -> None:
    EXECUTED.append(True)


class _CodeInPickle:
    """Unpickling this calls a function: a weights-only loader must refuse it."""

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _record_execution, ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"not a checkpoint at all", "cannot load"),
        ({"conv1.weight": _CodeInPickle()}, "refused to load .*could run code"),
        ({"epoch": 3}, "no state dict"),
        ({"foo.weight": torch.ones(3)}, "no key matches"),
    ],
    ids=["missing", "garbage", "code", "no_tensors", "no_match"],
)
def test_unusable_checkpoint_is_a_config_error(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)

    with pytest.raises(ConfigError, match=message) as info:
        load_encoder_weights(create_encoder(TINY, 16), path)
    assert str(path) in str(info.value)
    assert "weights_only" not in str(info.value)  # lesseg's refusal, not PyTorch's advice to load it unsafely
    assert EXECUTED == []


def test_class_map_is_argmax_over_classes_with_the_first_maximum_on_ties():
    from lesseg.models import class_map

    x = torch.randn(3, 5, 7, 9)
    x[0, :, 0, 0] = 1.0  # a full tie: class 0
    x[1, 2:4, 1, 1] = 100.0  # tie between classes 2 and 3: class 2
    assert torch.equal(class_map(x), x.argmax(1))
    assert class_map(x)[0, 0, 0] == 0 and class_map(x)[1, 1, 1] == 2
