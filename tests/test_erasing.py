"""Adversarial erasing (methods.md section 7): regions and masks from hand-made CAMs, the mean-pixel fill, the
tag prior and the stopping rule by hand, the stored regions, and the ``ae`` pipeline on tiny shapes data: each
step erases what it mined from the images the next classifier trains on, the rule stops the mining, and the
settings that do not fit are config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg.data.transforms import normalize
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import STATUS, PipelineRun
from lesseg.errors import ConfigError
from lesseg.methods import METHODS
from lesseg.methods.psl import AE, PSL
from lesseg.methods.weak.crf import CrfParams, crf_missing
from lesseg.methods.weak.erasing import (
    STATE,
    crf_object_masks,
    erase,
    erase_regions,
    erasing_converged,
    erasing_inputs,
    erasing_stopped,
    fill_values,
    load_regions,
    object_masks,
    region_unary,
    save_regions,
    tag_prior_loss,
)
from lesseg.metrics import confusion_matrix, iou_from_confusion

needs_crf = pytest.mark.skipif(crf_missing() is not None, reason=str(crf_missing()))

# one image, five pixels, classes background, 1, 2 (as tests/test_cam.py)
CAM1 = [0.9, 0.5, 0.2, 0.6, 0.0]
CAM2 = [0.1, 0.6, 0.0, 0.7, 0.0]
TAGS = torch.tensor([[0.0, 1.0, 1.0]])


def maps(*rows) -> torch.Tensor:
    return torch.tensor([[[r] for r in rows]])  # 1,C,1,W


def test_regions_are_the_tagged_object_cams_at_or_above_the_threshold():
    regions = erase_regions(maps([1.0] * 5, CAM1, CAM2), TAGS, 0.5)
    assert regions.dtype == torch.bool and regions.shape == (1, 3, 1, 5)
    assert regions[0, 1, 0].tolist() == [True, True, False, True, False]  # 0.5 itself is erased
    assert regions[0, 2, 0].tolist() == [False, True, False, True, False]
    assert not regions[0, 0].any()  # background has no CAM, even a high one
    untagged = erase_regions(maps([0.0] * 5, CAM1, CAM2), torch.tensor([[0.0, 1.0, 0.0]]), 0.5)
    assert not untagged[0, 2].any()  # class 2's large CAM is not used: it is not in the image
    with pytest.raises(ValueError, match="threshold"):
        erase_regions(maps([0.0] * 5, CAM1, CAM2), TAGS, 0.0)


def test_object_masks_of_the_union_of_the_regions():
    step1 = erase_regions(maps([0.0] * 5, CAM1, CAM2), TAGS, 0.5)
    step2 = erase_regions(maps([0.0] * 5, [0.0, 0.0, 0.8, 0.0, 0.0], [0.0] * 5), TAGS, 0.5)
    union = step1 | step2  # class 1: pixels 0-3; class 2: pixels 1, 3
    # without saliency: one class -> it, two -> 255 (ambiguous), none -> background
    assert object_masks(union, TAGS).tolist() == [[[1, 255, 1, 255, 0]]]
    # low saliency at pixels 2 and 4: background there, 255 where it meets a region (pixel 2) and where
    # neither cue says anything (none here: every other pixel is in a region)
    background = torch.tensor([[[False, False, True, False, True]]])
    assert object_masks(union, TAGS, background).tolist() == [[[1, 255, 255, 255, 0]]]
    assert object_masks(step1, TAGS, background).tolist() == [[[1, 255, 0, 255, 0]]]
    assert object_masks(step2, TAGS, background).tolist() == [[[255, 255, 255, 255, 0]]]
    # another background id; an image with no object tag is all background
    assert object_masks(step1, TAGS, bg_class=2).tolist() == [[[1, 255, 2, 255, 2]]]
    empty = torch.zeros(1, 3, 1, 5, dtype=torch.bool)
    assert object_masks(empty, torch.tensor([[1.0, 0.0, 0.0]]), background).tolist() == [[[0] * 5]]


def test_the_crf_unary_of_the_regions_by_hand():
    step1 = erase_regions(maps([0.0] * 5, CAM1, CAM2), TAGS, 0.5)[0]  # class 1: pixels 0, 1, 3; class 2: 1, 3
    u = region_unary(step1, [0, 1, 2], 0.7)
    assert u.shape == (3, 1, 5) and u.dtype == np.float32
    # in class 1's region: 0.7 for it, (1 - 0.7) / 2 for the two others; in both regions: 0.7 for each of
    # them before renormalising; in none: 0.7 for background
    one, both, none = [0.15, 0.7, 0.15], [0.15 / 1.55, 0.7 / 1.55, 0.7 / 1.55], [0.7, 0.15, 0.15]
    assert np.allclose(u[:, 0].T, [one, both, none, both, none])
    # a saliency cue: where it is high (not background) and no region is, nothing is known (1/3 each); a
    # region keeps its class even where saliency is low
    background = torch.tensor([[True, True, False, False, True]])
    u = region_unary(step1, [0, 1, 2], 0.7, background)
    assert np.allclose(u[:, 0].T, [one, both, [1 / 3] * 3, both, none])
    # only the image's classes, in the given order; another background id, whose own regions (erasing never
    # makes any) are not read: background is where no object class's region is
    assert np.allclose(region_unary(step1, [1, 2], 0.6, bg_class=2)[:, 0].T,
                       [[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])
    with pytest.raises(ValueError, match="background"):
        region_unary(step1, [1, 2], 0.7)


@needs_crf
def test_crf_masks_move_a_region_to_the_colour_edge():
    # a 4x8 image, red left of column 4, blue from it; class 1's region ends one column late
    image = np.zeros((4, 8, 3), np.uint8)
    image[:, :4] = (255, 0, 0)
    image[:, 4:] = (0, 0, 255)
    regions = torch.zeros(3, 4, 8, dtype=torch.bool)
    regions[1, :, :5] = True
    mask = crf_object_masks(image, regions, torch.tensor([1.0, 1.0, 0.0]), 0.7, CrfParams())
    assert mask.dtype == torch.uint8 and (mask == torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])).all()
    # background id 2: the same pixels, labelled with it
    assert (crf_object_masks(image, regions, torch.tensor([0.0, 1.0, 1.0]), 0.7, CrfParams(), bg_class=2)
            == torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])).all()
    # an image tagged with no object: background everywhere, without a CRF
    assert (crf_object_masks(image, regions, torch.tensor([1.0, 0.0, 0.0]), 0.7, CrfParams()) == 0).all()
    with pytest.raises(ValueError, match="regions are 8x4"):
        crf_object_masks(image[:, :6], regions, torch.tensor([1.0, 1.0, 0.0]), 0.7, CrfParams())


def test_erasing_sets_the_mean_pixel_the_same_in_memory_and_in_the_written_file():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pixel, fill = fill_values(mean, std)
    assert pixel.tolist() == [124, 116, 104]  # round(255 x mean)
    assert fill.tolist() == pytest.approx([(124 / 255 - 0.485) / 0.229, (116 / 255 - 0.456) / 0.224,
                                           (104 / 255 - 0.406) / 0.225], abs=1e-6)  # float32
    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    region = np.zeros((4, 6), bool)
    region[1:3, 2:5] = True
    written = rgb.copy()
    written[region] = pixel  # what the erasing step writes for the next classifier
    norm = normalize(mean, std)
    as_read = norm(torch.from_numpy(written).permute(2, 0, 1))
    in_memory = erase(norm(torch.from_numpy(rgb).permute(2, 0, 1))[None], torch.from_numpy(region)[None], fill)[0]
    assert torch.allclose(in_memory, as_read, atol=1e-6)
    assert torch.equal(in_memory[:, ~torch.from_numpy(region)], as_read[:, ~torch.from_numpy(region)])


def test_tag_prior_and_the_stopping_rule_by_hand():
    # 4 images: class 0 in all, class 1 in one, class 2 in none -> entropies 0, H(1/4), 0
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))  # 0.5623
    assert tag_prior_loss(torch.tensor([4.0, 1.0, 0.0]), 4) == pytest.approx(h / 3)
    assert tag_prior_loss(torch.tensor([2.0, 2.0]), 4) == pytest.approx(np.log(2))  # p = 1/2: ln 2
    assert erasing_converged(0.09, 0.2, 0.5) and erasing_converged(0.1, 0.2, 0.5)
    assert not erasing_converged(0.11, 0.2, 0.5)
    assert erasing_converged(5.0, 0.2, None)  # no rule: every step mines


def test_regions_round_trip_through_their_file(tmp_path):
    regions = torch.zeros(4, 3, 5, dtype=torch.bool)
    regions[2, 1:, 3:] = True
    regions[3, 0, 0] = True
    save_regions(tmp_path / "a.npz", regions)
    with np.load(tmp_path / "a.npz") as f:
        assert f["classes"].tolist() == [2, 3]  # only the classes that have a region are stored
    assert torch.equal(load_regions(tmp_path / "a.npz", 4, (3, 5)), regions)
    save_regions(tmp_path / "none.npz", torch.zeros(4, 3, 5, dtype=torch.bool))
    assert not load_regions(tmp_path / "none.npz", 4, (3, 5)).any()
    with pytest.raises(ValueError, match="a.npz holds regions of shape"):
        load_regions(tmp_path / "a.npz", 4, (5, 3))


def test_a_step_is_skipped_once_the_step_before_stopped(tmp_path):
    assert erasing_stopped({}, 1) is None  # the first step always runs
    for name, record in (("mined", {"step": 1, "mined": True}),
                         ("stopped", {"step": 2, "mined": False, "loss_ratio": 0.8123})):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE).write_text(json.dumps(record))
    assert erasing_stopped({"erase1": tmp_path / "mined"}, 2) is None
    assert erasing_stopped({"erase2": tmp_path / "stopped"}, 3) == (
        "the erasing stopped at step 2 (its classifier's loss: 0.81 x the tag prior's)")


# -- the pipeline ---------------------------------------------------------------------------------------------


def ae_cfg(tiny_cfg, overrides=(), name="ae", **method):
    """Two erasing steps on the tagged tiny shapes train split (masks read only to score)."""
    return tiny_cfg(["train.iters=2", "stages.classifier.train.iters=3", *overrides],
                    method={"name": name, "steps": 2, "scales": [1.0, 2.0], "cam_batch": 5, **method},
                    data={"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False,
                                                  "true_masks": True}}})


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


def test_stage_names_and_configs(tiny_cfg):
    assert METHODS.get("ae") is AE and METHODS.get("psl") is PSL
    cfg = ae_cfg(tiny_cfg, ["stages.classifier.train.iters=7", "stages.classifier2.optim.lr=0.5"], steps=4)
    stages = AE.pipeline(cfg)
    assert [s.name for s in stages] == list(AE.stage_names) == [
        "classifier", "erase1", "classifier2", "erase2", "classifier3", "erase3", "classifier4", "erase4",
        "train"]
    from lesseg.methods.base import stage_config

    products = {s.name: Path(f"/x/{s.name}") for s in stages}
    second = stage_config(cfg, stages, 2, products)
    stream = second.data.streams.labeled
    assert second.method.name == "classifier" and stream.dataset == "folder" and stream.split == "train"
    assert stream.root == "/x/erase1/erased" and not stream.labeled  # the erased images of step 1
    assert second.train.iters == 7 and second.optim.lr == 0.5  # stages.classifier for every step, then its own
    assert stage_config(cfg, stages, 4, products).optim.lr == 0.01
    last = AE.final_config(cfg)
    assert last.data.streams.pseudo.root == str(Path(cfg.out) / "erase4") and not last.model.cls_head
    assert PSL.final_config(ae_cfg(tiny_cfg, name="psl")).data.streams.pseudo.root == str(Path(cfg.out) / "refine")
    plain = PSL.final_config(ae_cfg(tiny_cfg, name="psl", plus=False))
    assert plain.data.streams.pseudo.root == str(Path(cfg.out) / "erase2") and plain.model.cls_head


def test_bad_settings_are_config_errors(tiny_cfg, monkeypatch):
    with pytest.raises(ConfigError, match=r"method.steps must be in \[1, 4\]"):
        ae_cfg(tiny_cfg, steps=5)
    with pytest.raises(ConfigError, match="stages.erase3: this run of ae has no such stage"):
        AE.pipeline(ae_cfg(tiny_cfg, ["stages.erase3.eval.flip=true"]))
    with pytest.raises(ConfigError, match="stages.refine: this run of psl has no such stage"):
        PSL.pipeline(ae_cfg(tiny_cfg, ["stages.refine.eval.flip=true"], name="psl", plus=False))
    with pytest.raises(ConfigError, match="saliency_dir"):
        AE.pipeline(ae_cfg(tiny_cfg, saliency="folder"))
    monkeypatch.setattr("lesseg.methods.psl.crf_missing", lambda: "no pydensecrf here")
    with pytest.raises(ConfigError, match="no pydensecrf here; or set method.crf=false"):
        PSL.pipeline(ae_cfg(tiny_cfg, name="psl"))
    assert PSL.pipeline(ae_cfg(tiny_cfg, name="psl", crf=False))[-2].name == "refine"


def test_each_step_erases_what_it_mined_and_the_union_makes_the_masks(tiny_cfg):
    cfg = ae_cfg(tiny_cfg, stop_loss=None)
    out = Path(cfg.out)
    result = PipelineRun(cfg).run()
    assert 0.0 <= result["miou"] <= 1.0
    status = json.loads((out / STATUS).read_text())
    assert [s["stage"] for s in status] == ["classifier", "erase1", "classifier2", "erase2", "train"]
    from lesseg.data import stream_source

    src = stream_source(cfg.data)
    samples = src.samples("train")
    pixel, _ = fill_values(cfg.data.mean, cfg.data.std)
    step1 = {s.name: load_regions(out / "erase1" / "regions" / f"{s.name}.npz", 7, (32, 32)) for s in samples}
    step2 = {s.name: load_regions(out / "erase2" / "regions" / f"{s.name}.npz", 7, (32, 32)) for s in samples}
    assert any(r.any() for r in step1.values())
    for s in samples:
        a, b = step1[s.name], step2[s.name]
        assert not (a & ~b).any()  # the union only grows
        assert set(torch.nonzero(b.flatten(1).any(1)).flatten().tolist()) <= set(s.tags)  # tagged classes only
        # the images classifier2 trained on: the originals, the mean pixel where step 1 erased
        erased = np.array(Image.open(out / "erase1" / "erased" / "images" / f"{s.name}.png"))
        original = src.read_image(s.image)
        hit = a.any(0).numpy()
        assert (erased[hit] == pixel).all() and np.array_equal(erased[~hit], original[~hit])
        # the masks: the object masks of the regions, background from spectral-residual saliency
        from lesseg.data.saliency import saliency_map

        low = torch.from_numpy(saliency_map(original, "spectral_residual") / 255.0 < 0.2)[None]
        expected = object_masks(b[None], torch.zeros(1, 7).index_fill_(1, torch.tensor(s.tags), 1.0), low)
        assert np.array_equal(masks_of(out / "erase2")[s.name], expected[0].numpy()), s.name
    assert not (out / "erase2" / "erased").exists()  # the last step writes no images to erase
    assert (out / "erase2" / "image_labels.csv").read_text().splitlines()[0] == (
        f"{samples[0].name},{';'.join(map(str, samples[0].tags))}")
    second = ckpt.load(out / "classifier2" / "last.pt")["config"]["data"]["streams"]["labeled"]
    assert second["root"] == str(out / "erase1" / "erased")
    for k, step in enumerate(("erase1", "erase2")):
        record = json.loads((out / step / STATE).read_text())
        assert record["mined"] is True and record["step"] == k + 1
        quality = json.loads((out / step / "quality.json").read_text())
        assert status[2 * k + 1]["metrics"]["pseudo_miou"] == quality["miou"] and "fg_recall" in quality
        assert status[2 * k + 1]["metrics"]["erased"] == pytest.approx(
            float(np.mean([(step1 if k == 0 else step2)[s.name].any(0).float().mean() for s in samples])))
    final = ckpt.load(out / "last.pt")["config"]
    assert final["method"]["name"] == "ae" and final["data"]["streams"]["pseudo"]["root"] == str(out / "erase2")


def test_the_stopping_rule_ends_the_mining_and_the_later_steps_are_skipped(tiny_cfg, monkeypatch):
    # a threshold no 3-step classifier meets: step 2 measures its classifier, stops, and adds nothing
    cfg = ae_cfg(tiny_cfg, stop_loss=1e-4, steps=3)
    out = Path(cfg.out)
    trained = []
    fit = trainer_mod.Trainer.fit
    monkeypatch.setattr(trainer_mod.Trainer, "fit", lambda self: trained.append(Path(self.out).name) or fit(self))
    PipelineRun(cfg).run(until="erase3")
    record = json.loads((out / "erase2" / STATE).read_text())
    assert record["mined"] is False and record["classifier_loss"] > 1e-4 * record["prior_loss"]
    assert record["loss_ratio"] == pytest.approx(record["classifier_loss"] / record["prior_loss"])
    assert 0.0 < record["prior_loss"] < np.log(2)
    assert masks_of(out / "erase2").keys() == masks_of(out / "erase1").keys()
    for name, m in masks_of(out / "erase1").items():
        assert np.array_equal(masks_of(out / "erase2")[name], m)
        assert torch.equal(load_regions(out / "erase2" / "regions" / f"{name}.npz", 7, (32, 32)),
                           load_regions(out / "erase1" / "regions" / f"{name}.npz", 7, (32, 32)))
    status = json.loads((out / STATUS).read_text())
    assert status[3]["metrics"]["mined"] == 0.0 and status[1]["metrics"]["mined"] == 1.0
    # the CAM extraction speed of a step that mined (none where the step stopped before computing CAMs)
    assert status[1]["metrics"]["images_per_s"] > 0 and "images_per_s" not in status[3]["metrics"]
    # step 3 is unnecessary: its classifier does not train, its products are step 2's
    assert trained == ["classifier", "classifier2"]
    assert [s["state"] for s in status[4:6]] == ["skipped", "skipped"]
    assert [s["same_as"] for s in status[4:6]] == ["classifier2", "erase2"]
    assert status[5]["reason"].startswith("the erasing stopped at step 2 (its classifier's loss: ")
    assert (out / "erase3").resolve() == (out / "erase2").resolve()
    assert (out / "classifier3" / "last.pt").resolve() == (out / "classifier2" / "last.pt").resolve()
    assert AE.final_config(cfg).data.streams.pseudo.root == str(out / "erase3")  # the last stage reads step 2's


@needs_crf
def test_crf_masks_in_the_pipeline_label_every_pixel_and_keep_the_regions_masks_score(tiny_cfg):
    cfg = ae_cfg(tiny_cfg, mask_crf=True, steps=1, crf_bi_rgb=13.0)
    out = Path(cfg.out)
    PipelineRun(cfg).run(until="erase1")
    from lesseg.data import stream_source
    from lesseg.data.saliency import saliency_map

    src = stream_source(cfg.data)
    samples = src.samples("train")
    masks = masks_of(out / "erase1")
    raw = torch.zeros(7, 7, dtype=torch.long)
    for s in samples:
        regions = load_regions(out / "erase1" / "regions" / f"{s.name}.npz", 7, (32, 32))
        tags = torch.zeros(7).index_fill_(0, torch.tensor(s.tags), 1.0)
        original = src.read_image(s.image)
        low = torch.from_numpy(saliency_map(original, "spectral_residual") / 255.0 < 0.2)
        expected = crf_object_masks(original, regions, tags, 0.7, CrfParams(bi_rgb=13.0), low)
        assert np.array_equal(masks[s.name], expected.numpy()), s.name
        true = torch.from_numpy(np.array(Image.open(s.mask)).astype(np.int64))
        before = object_masks(regions[None], tags[None], low[None])
        raw += confusion_matrix(before, true[None].masked_fill(before == 255, 255), 7)  # its labelled pixels
    assert all((m != 255).all() for m in masks.values())  # the CRF labels every pixel
    status = json.loads((out / STATUS).read_text())
    quality = json.loads((out / "erase1" / "quality.json").read_text())
    assert status[1]["metrics"]["pseudo_miou"] == quality["miou"] and status[1]["metrics"]["pseudo_labelled"] == 1.0
    # the masks of the regions and saliency, before the CRF, are scored apart
    assert status[1]["metrics"]["raw_miou"] == pytest.approx(iou_from_confusion(raw)["miou"])
    assert quality["raw"]["miou"] == status[1]["metrics"]["raw_miou"]
    assert status[1]["metrics"]["crf_miou"] == quality["miou"]  # (lesseg bench weak shows both)
    # the CRF's settings are the step's inputs only when its masks use the CRF
    on = erasing_inputs(cfg, last=True)["method"]
    off = erasing_inputs(ae_cfg(tiny_cfg, steps=1), last=True)["method"]
    assert on["crf_bi_rgb"] == 13.0 and on["mask_crf"] and "crf_bi_rgb" not in off and not off["mask_crf"]


@needs_crf
def test_a_stopped_step_reuses_the_crf_masks_of_the_step_before(tiny_cfg, monkeypatch):
    from lesseg.methods.weak import erasing

    cfg = ae_cfg(tiny_cfg, mask_crf=True, stop_loss=1e-4, steps=2)  # step 2 stops: its regions are step 1's
    out = Path(cfg.out)
    PipelineRun(cfg).run(until="erase1")
    calls = []
    monkeypatch.setattr(erasing, "crf_object_masks", lambda *a, **k: calls.append(1) or crf_object_masks(*a, **k))
    PipelineRun(cfg).run(until="erase2")
    assert json.loads((out / "erase2" / STATE).read_text())["mined"] is False
    assert calls == []  # no CRF again on the same regions
    assert masks_of(out / "erase2").keys() == masks_of(out / "erase1").keys()
    assert all(np.array_equal(masks_of(out / "erase2")[n], m) for n, m in masks_of(out / "erase1").items())
    status = json.loads((out / STATUS).read_text())
    assert status[3]["metrics"]["pseudo_miou"] == status[1]["metrics"]["pseudo_miou"]
    assert status[3]["metrics"]["raw_miou"] == status[1]["metrics"]["raw_miou"]
