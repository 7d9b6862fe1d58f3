"""STC (methods.md section 7): the simple/complex split, saliency masks with their band (ignored or drawn),
the tag filter, the stage configs, and the six stages on tiny shapes data, killed inside a training stage and
resumed to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg.data import stream_source
from lesseg.data.base import Sample
from lesseg.data.saliency import saliency_map
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import MARKER, STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.errors import ConfigError
from lesseg.methods import METHODS
from lesseg.methods.base import stage_config
from lesseg.methods.stc import STC, saliency_masks, split_by_tags, tag_filtered_masks

# -- pure pieces -------------------------------------------------------------------------------------------


def test_simple_images_have_exactly_one_object_tag():
    samples = [Sample(f"s{k}", Path(f"s{k}.png"), tags=t)
               for k, t in enumerate([(1,), (1, 2), (), (0, 3), (2, 3, 4), (0,), (5,)])]
    # (0, 3): background does not count, so one object; (0,) and (): no object, not simple
    assert split_by_tags(samples) == ([0, 3, 6], [1, 2, 4, 5])
    # another background id: 0 is then an object tag and 3 is not, so (0, 3) and (0,) are simple, (2, 3, 4) not
    assert split_by_tags(samples, bg_class=3) == ([0, 3, 5, 6], [1, 2, 4])


def test_saliency_masks_threshold_the_saliency_into_the_image_class_background_and_a_band():
    sal = torch.tensor([[[255, 200, 179, 178, 100, 51, 50, 0]]], dtype=torch.uint8)  # 1,1,8
    tags = torch.tensor([[0.0, 0.0, 1.0]])  # class 2
    # 0.7 * 255 = 178.5 and 0.2 * 255 = 51: >= 178.5 class 2, < 51 background, between 255
    mask = saliency_masks(sal, tags, 0.7, 0.2)
    assert mask.dtype == torch.uint8 and mask.tolist() == [[[2, 2, 2, 255, 255, 255, 0, 0]]]
    assert saliency_masks(sal, torch.tensor([[1.0, 0.0, 1.0]]), 0.7, 0.2).equal(mask)  # a background tag
    assert saliency_masks(sal, torch.tensor([[0.0, 1.0, 0.0]]), 0.7, 0.2, bg_class=2).tolist() == [
        [[1, 1, 1, 255, 255, 255, 2, 2]]]
    with pytest.raises(ValueError, match="exactly one object tag"):
        saliency_masks(sal, torch.tensor([[0.0, 1.0, 1.0]]), 0.7, 0.2)


def test_saliency_band_draws_the_class_with_probability_saliency():
    sal = torch.tensor([[[255, 178, 178, 100, 100, 0]]], dtype=torch.uint8)
    draws = torch.tensor([[[0.99, 0.69, 0.70, 0.39, 0.40, 0.0]]])
    # 178 / 255 = 0.698 and 100 / 255 = 0.392: a draw below them gives the class; outside the band the
    # thresholds decide whatever the draw
    mask = saliency_masks(sal, torch.tensor([[0.0, 1.0]]), 0.7, 0.2, draws=draws)
    assert mask.tolist() == [[[1, 1, 0, 1, 0, 0]]]
    # thresholds 0 and 1: every pixel drawn, so the mean label is the mean saliency (the paper's soft target)
    g = torch.Generator().manual_seed(0)
    sal = torch.full((1, 200, 200), 64, dtype=torch.uint8)
    mask = saliency_masks(sal, torch.tensor([[0.0, 1.0]]), 1.0, 0.0, draws=torch.rand(1, 200, 200, generator=g))
    assert set(mask.unique().tolist()) == {0, 1}
    assert mask.float().mean().item() == pytest.approx(64 / 255, abs=0.01)


def test_tag_filter_takes_the_best_of_background_and_the_image_tags():
    # classes (rows) x pixels (columns): pixel 0 (0.1, 0.3, 0.6), pixel 1 (0.5, 0.1, 0.4), pixel 2 (0.2, 0.3, 0.5)
    probs = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.1, 0.3], [0.6, 0.4, 0.5]])[None, :, None, :]  # 1,3,1,3
    assert tag_filtered_masks(probs, torch.tensor([[0.0, 1.0, 0.0]])).tolist() == [[[1, 0, 1]]]
    assert tag_filtered_masks(probs, torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[[2, 0, 2]]]
    assert tag_filtered_masks(probs, torch.tensor([[0.0, 0.0, 0.0]])).tolist() == [[[0, 0, 0]]]
    # background is always allowed, also when it is not tagged, and may be another class id
    assert tag_filtered_masks(probs, torch.tensor([[1.0, 0.0, 0.0]]), bg_class=2).tolist() == [[[2, 0, 2]]]


# -- the method and its stages -----------------------------------------------------------------------------

NAMES = ["background", "disk", "square", "triangle", "star", "ring", "cross"]


def stc_cfg(tiny_cfg, overrides=(), **method):
    """The six stages on tiny shapes data: the tagged train split (32 images, masks only for scoring)."""
    return tiny_cfg(["train.iters=2", *overrides],
                    method={"name": "stc", "saliency": "fine_grained", "fg_threshold": 0.7, "bg_threshold": 0.3,
                            **method},
                    data={"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False,
                                                  "true_masks": True}}})


def test_bad_settings_are_config_errors(tiny_cfg):
    for method, message in [({"bg_threshold": 0.8}, "must not exceed"), ({"band": "soft"}, "method.band 'soft'"),
                            ({"powerful_images": "some"}, "method.powerful_images"),
                            ({"saliency_dir": "/x"}, "only read with method.saliency: folder"),
                            ({"saliency": None}, "method.saliency"), ({"saliency": "magic"}, "not one of")]:
        with pytest.raises(ConfigError, match=message):
            STC.pipeline(stc_cfg(tiny_cfg, **method))
    with pytest.raises(ConfigError, match="stream 'labeled'"):
        STC.pipeline(tiny_cfg(method={"name": "stc"}, data={"streams": {"other": {"split": "train"}}}))


def test_stage_configs(tiny_cfg):
    cfg = stc_cfg(tiny_cfg, ["stages.initial.train.iters=3", "method.ohem=true"])
    stages = STC.pipeline(cfg)
    assert METHODS.get("stc") is STC and [s.name for s in stages] == list(STC.stage_names)
    assert [s.trains for s in stages] == [False, True, False, True, False, True]
    out = Path(cfg.out)
    products = {s.name: out / s.name for s in stages}
    for k, masks in ((1, "saliency"), (3, "simple_masks")):
        scfg = stage_config(cfg, stages, k, products)
        assert scfg.method.name == "supervised" and scfg.method.ohem  # the method's CE settings
        assert list(scfg.data.streams) == ["labeled"] and scfg.out == str(out / stages[k].name)
        stream = scfg.data.streams.labeled
        assert stream.dataset == "folder" and stream.root == str(out / masks) and stream.labeled
        assert stream.batch_size == 4 and not stream.true_masks
    assert stage_config(cfg, stages, 1, products).train.iters == 3  # its own override
    last = STC.final_config(cfg)
    assert last.method.name == "stc" and list(last.data.streams) == ["pseudo"] and last.train.iters == 2
    assert last.data.streams.pseudo.root == str(out / "complex_masks") and last.data.val_split == "val"


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


@pytest.fixture
def fits(monkeypatch):
    """The (run folder name, resumed step) of every Trainer.fit call."""
    calls = []
    original = trainer_mod.Trainer.fit

    def fit(self):
        calls.append((Path(self.out).name, self.resumed_from))
        return original(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    return calls


def check_products(cfg) -> None:
    """Every stage's product: the right images, labels of their tags only, scores in stages.json."""
    out = Path(cfg.out)
    src = stream_source(cfg.data)
    samples = src.samples("train")
    tags = {s.name: set(s.tags) for s in samples}
    simple = [s.name for s in samples if len(s.tags) == 1]
    complex_ = [s.name for s in samples if len(s.tags) > 1]
    assert simple and complex_
    status = json.loads((out / STATUS).read_text())
    assert [(s["stage"], s["state"]) for s in status] == [(n, "done") for n in STC.stage_names]
    for s in status:
        assert Path(s["product"]).exists(), s
        metrics = s["metrics"]
        assert set(metrics) == ({"miou"} if s["kind"] == "train" else
                                {"pseudo_miou", "pseudo_acc", "pseudo_fg_precision", "pseudo_fg_recall",
                                 "pseudo_labelled"}), s
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), s
    for stage, names, band in (("saliency", simple, True), ("simple_masks", simple, False),
                               ("complex_masks", complex_, False)):
        masks = read_masks(out / stage)
        assert sorted(masks) == sorted(names), stage
        assert (out / stage / "splits" / "train.txt").read_text().split() == names
        for name, m in masks.items():
            assert set(np.unique(m).tolist()) <= {0, *tags[name], *([255] if band else [])}, (stage, name)
        quality = json.loads((out / stage / "quality.json").read_text())
        marker = json.loads((out / stage / MARKER).read_text())
        assert marker["metrics"]["pseudo_miou"] == quality["miou"]
    # the saliency masks are the thresholded saliency of each simple image
    for name, m in read_masks(out / "saliency").items():
        sal = saliency_map(np.array(Image.open(out / "saliency" / "images" / f"{name}.png").convert("RGB")),
                           "fine_grained")
        want = saliency_masks(torch.from_numpy(sal)[None], torch.eye(7)[[min(tags[name])]], 0.7, 0.3)[0]
        assert np.array_equal(m, want.numpy()), name
    for stage in ("initial", "enhanced"):
        state = ckpt.load(out / stage / "last.pt")
        assert state["config"]["method"]["name"] == "supervised"
        assert state["config"]["data"]["streams"]["labeled"]["root"] == str(out / {"initial": "saliency",
                                                                                 "enhanced": "simple_masks"}[stage])
    final = ckpt.load(out / "last.pt")
    assert final["config"]["method"]["name"] == "stc" and list(final["config"]["data"]["streams"]) == ["pseudo"]


def test_six_stages_end_to_end_killed_in_a_training_stage_and_resumed_to_the_same_result(
        tiny_cfg, tmp_path, monkeypatch, fits):
    common = ["train.iters=3", "train.ckpt_every=1", "train.deterministic=true"]
    full = stc_cfg(tiny_cfg, [*common, f"out={tmp_path / 'full'}"])
    result = train(full)
    assert 0.0 <= result["miou"] <= 1.0
    assert fits == [("initial", None), ("enhanced", None), ("full", None)]
    check_products(full)

    original = trainer_mod.Trainer.train_step

    def crash(self, batch):
        if Path(self.out).name == "enhanced" and self.step == 2:  # the E-DCNN dies in its 3rd step
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash)
    cfg = stc_cfg(tiny_cfg, [*common, f"out={tmp_path / 'killed'}"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    status = json.loads((tmp_path / "killed" / STATUS).read_text())
    assert [s["state"] for s in status] == ["done", "done", "done", "running", "pending", "pending"]
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    fits.clear()
    train(cfg)
    assert fits == [("enhanced", 2), ("killed", None)]  # the rest is done; E-DCNN from its step-2 checkpoint
    for stage in ("initial/last.pt", "enhanced/last.pt", "last.pt"):
        a, b = ckpt.load(tmp_path / "full" / stage)["method"], ckpt.load(tmp_path / "killed" / stage)["method"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    for stage in ("saliency", "simple_masks", "complex_masks"):
        masks = sorted((tmp_path / "full" / stage / "masks").iterdir())
        assert [p.read_bytes() for p in masks] == [
            (tmp_path / "killed" / stage / "masks" / p.name).read_bytes() for p in masks], stage
    torch.use_deterministic_algorithms(False)

    # a rerun skips every finished stage; another band redoes the saliency masks and what follows them
    fits.clear()
    PipelineRun(cfg).run(until="complex_masks")
    assert fits == []
    PipelineRun(stc_cfg(tiny_cfg, [*common, f"out={tmp_path / 'killed'}"], band="sample")).run(until="initial")
    assert fits == [("initial", None)]
    values = np.concatenate([m.ravel() for m in read_masks(tmp_path / "killed" / "saliency").values()])
    assert 255 not in values.tolist()


def test_powerful_network_on_every_image_and_stages_refuse_data_without_simple_images(tiny_cfg, tmp_path):
    cfg = stc_cfg(tiny_cfg, ["stages.initial.train.iters=1", "stages.enhanced.train.iters=1"],
                  powerful_images="all")
    PipelineRun(cfg).run(until="complex_masks")
    names = [s.name for s in stream_source(cfg.data).samples("train")]
    assert sorted(read_masks(Path(cfg.out) / "complex_masks")) == sorted(names)

    from test_self_training import make_folder_dataset

    from lesseg import config as config_mod

    make_folder_dataset(tmp_path / "data")
    (tmp_path / "data" / "image_labels.csv").write_text("l0,1;2\nl1,1;2\nl2,2;1\nl3,1;2\n")
    folder = config_mod.from_dict({
        "method": {"name": "stc"},
        "data": {"dataset": "folder", "root": str(tmp_path / "data"), "crop_size": [32, 32], "workers": 0,
                 "val_split": "val", "streams": {"labeled": {"split": "labeled", "batch_size": 2}}},
        "model": {"encoder": "test_resnet", "decoder_channels": 16},
        "train": {"iters": 1, "device": "cpu", "amp": "none", "progress": False},
        "out": str(tmp_path / "run"),
    })  # fmt: skip
    with pytest.raises(ConfigError, match="has none"):
        PipelineRun(folder).run(until="saliency")
