"""Classifier + CAM (methods.md section 7): CAM arithmetic on hand-built weights, per-class normalisation and
tag filtering, multi-scale + flip aggregation, pseudo-masks with their uncertain band and background map, the
foreground scores, loading the classifier, and the three stages on tiny shapes data (rerun skips them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from lesseg.config import ModelConfig
from lesseg.data import stream_source
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.stages import MARKER, STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.errors import ConfigError
from lesseg.methods import METHODS
from lesseg.methods.base import RunInfo, stage_config
from lesseg.methods.cam import CAM, load_classifier, same_size_batches
from lesseg.methods.weak import (
    class_activation_maps,
    foreground_counts,
    foreground_quality,
    multiscale_cams,
    normalize_cams,
    pseudo_masks,
    relu_cams,
)
from lesseg.models import build_classifier, build_model
from lesseg.models.heads import ClassificationHead

# -- CAM arithmetic ----------------------------------------------------------------------------------------

# features: 2 channels on a 2x2 grid; classifier weights of 3 classes (background, a, b)
F0 = [[1.0, 0.0], [0.0, 2.0]]
F1 = [[0.0, 1.0], [1.0, 0.0]]
FEATURES = torch.tensor([[F0, F1]])  # 1,2,2,2
WEIGHT = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 2.0]])  # 3,2
# by hand: class a = F0 - F1 = [[1,-1],[-1,2]] -> ReLU [[1,0],[0,2]]; class b = -F0 + 2 F1 = [[-1,2],[2,-2]]
# -> ReLU [[0,2],[2,0]]; background = F0 + F1 = [[1,1],[1,2]]


def test_cam_of_a_hand_built_classifier_is_relu_of_the_weighted_features():
    raw = relu_cams(FEATURES, WEIGHT, (2, 2))
    assert raw[0].tolist() == [[[1, 1], [1, 2]], [[1, 0], [0, 2]], [[0, 2], [2, 0]]]
    cams = class_activation_maps(FEATURES, WEIGHT, torch.tensor([[0.0, 1.0, 1.0]]), (2, 2))
    assert cams[0, 1].tolist() == [[0.5, 0.0], [0.0, 1.0]]  # divided by its own peak, 2
    assert cams[0, 2].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert cams[0, 0].tolist() == [[0.0, 0.0], [0.0, 0.0]]  # not tagged: no map
    # the 1x1 conv's C,K,1,1 weight and the classifier head's own maps give the same
    head = ClassificationHead(2, 3)
    with torch.no_grad():
        head.classifier.weight.copy_(WEIGHT[:, :, None, None])
    assert torch.equal(relu_cams(FEATURES, head.classifier.weight, (2, 2)), F.relu(head.cam(FEATURES)))


def test_cam_is_rectified_before_it_is_upsampled():
    # class a's ReLU map [[1,0],[0,2]] upsampled 2 -> 4 (bilinear, half-pixel centres): row 0 of the input,
    # [1, 0], becomes [1, 0.75, 0.25, 0]; the map's peak stays 2 at the corner. Upsampling first would give
    # 0.75 * 1 + 0.25 * (-1) = 0.5 at (0, 1) instead of 0.75.
    cams = class_activation_maps(FEATURES, WEIGHT, torch.tensor([[0.0, 1.0, 0.0]]), (4, 4))
    assert cams.shape == (1, 3, 4, 4)
    assert cams[0, 1, 0].tolist() == pytest.approx([0.5, 0.375, 0.125, 0.0])
    assert cams[0, 1, 3, 3].item() == 1.0 and cams[0, 1].max().item() == 1.0
    assert cams[0, 2].abs().sum().item() == 0.0


def test_normalisation_is_per_class_and_image_and_keeps_empty_maps_zero():
    cams = torch.zeros(2, 3, 1, 2)
    cams[0, 1] = torch.tensor([[2.0, 4.0]])
    cams[0, 2] = torch.tensor([[0.5, 0.25]])
    cams[1, 1] = torch.tensor([[3.0, 1.0]])  # tagged with 2 only: class 1's evidence is dropped
    tags = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    out = normalize_cams(cams, tags)
    assert out[0, 1].tolist() == [[0.5, 1.0]] and out[0, 2].tolist() == [[1.0, 0.5]]
    assert out[1].abs().sum().item() == 0.0  # class 2 tagged but all zero: zero, not NaN
    assert torch.isfinite(out).all()


def test_multiscale_sums_the_scales_before_normalising():
    # a "network" of output stride 2 (2x2 average pooling): at scale 1 the 4x4 image with a 2x2 block of 4s
    # gives [[4,0],[0,0]], upsampled to 4 * r_i * r_j with r = [1, .75, .25, 0]; at scale 0.5 the 2x2 image
    # (block means) gives one value, the mean 1, upsampled to 1 everywhere. Sum / peak 5:
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, :2, :2] = 4.0
    cams = multiscale_cams(lambda x: F.avg_pool2d(x, 2), image, torch.ones(1, 1), scales=[1.0, 0.5])
    r = torch.tensor([1.0, 0.75, 0.25, 0.0])
    assert torch.allclose(cams[0, 0], (4 * r[:, None] * r[None, :] + 1) / 5)
    assert cams[0, 0, 3, 3].item() == pytest.approx(0.2) and cams[0, 0, 1, 1].item() == pytest.approx(0.65)


def test_multiscale_flip_mirrors_the_flipped_view_back():
    # a network that is not mirror-symmetric: it adds [0, 1] along the width. Channel 0 of the image is
    # [1, 3]: the view gives [1, 4], the mirrored view [3, 1] + [0, 1] = [3, 2], mirrored back [2, 3];
    # sum [3, 7] -> [3/7, 1]. Channel 1 (zeros): [0, 1] + [1, 0] = [1, 1] -> [1, 1].
    image = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # 1,2,1,2

    def net(x):
        return x + torch.tensor([0.0, 1.0])

    cams = multiscale_cams(net, image, torch.ones(1, 2), scales=[1.0], flip=True)
    assert cams[0, 0].tolist() == [[pytest.approx(3 / 7), 1.0]] and cams[0, 1].tolist() == [[1.0, 1.0]]
    assert multiscale_cams(net, image, torch.ones(1, 2), scales=[1.0])[0, 0].tolist() == [[0.25, 1.0]]
    # each view is rectified before the views are summed: with [0, -3] added, the view gives [1, 0], the
    # mirrored one [3, -2] -> ReLU [3, 0] -> back [0, 3]; sum [1, 3] (rectifying the sum would give [0, 3])
    cams = multiscale_cams(lambda x: x + torch.tensor([0.0, -3.0]), image, torch.ones(1, 2), [1.0], flip=True)
    assert cams[0, 0].tolist() == [[pytest.approx(1 / 3), 1.0]]
    # a tiny image at a small scale still gets a map (one pixel at least)
    assert multiscale_cams(net, image, torch.ones(1, 2), scales=[0.1]).shape == (1, 2, 1, 2)


def test_multiscale_treats_the_images_of_a_batch_apart():
    image = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 0.0]]]])  # 2,1,1,2
    tags = torch.tensor([[1.0], [1.0]])
    both = multiscale_cams(lambda x: x, image, tags, scales=[1.0], flip=True)
    assert both[0, 0].tolist() == [[pytest.approx(1 / 3), 1.0]] and both[1, 0].tolist() == [[1.0, 0.0]]


# -- pseudo-masks ------------------------------------------------------------------------------------------

# one image, five pixels, classes background, 1, 2
CAM1 = [0.9, 0.5, 0.2, 0.02, 0.6]
CAM2 = [0.1, 0.6, 0.1, 0.0, 0.6]


def cams_of(*rows) -> torch.Tensor:
    return torch.tensor([[[r] for r in rows]])  # 1,C,1,W


def test_pseudo_mask_foreground_uncertain_band_and_background():
    cams, tags = cams_of([0.0] * 5, CAM1, CAM2), torch.tensor([[0.0, 1.0, 1.0]])
    # best: 0.9 (1), 0.6 (2), 0.2 (1), 0.02 (1), 0.6 (tie: the first class, 1)
    mask = pseudo_masks(cams, tags, fg_threshold=0.4, bg_threshold=0.1)
    assert mask.dtype == torch.uint8 and mask.tolist() == [[[1, 2, 255, 0, 1]]]
    assert pseudo_masks(cams, tags, 0.4).tolist() == [[[1, 2, 0, 0, 1]]]  # no band: below fg is background
    assert pseudo_masks(cams, tags, 0.6, 0.6).tolist() == [[[1, 2, 0, 0, 1]]]  # >= fg_threshold is foreground
    assert pseudo_masks(cams, tags, 0.4, 0.0).tolist() == [[[1, 2, 255, 255, 1]]]  # no background from CAMs
    with pytest.raises(ValueError, match="above"):
        pseudo_masks(cams, tags, 0.3, 0.5)


def test_pseudo_mask_uses_only_the_image_tags_and_never_gives_background_a_cam():
    tags = torch.tensor([[0.0, 1.0, 0.0]])  # class 2 is not in the image: its (large) CAM is not used
    assert pseudo_masks(cams_of([0.0] * 5, CAM1, CAM2), tags, 0.4, 0.1).tolist() == [[[1, 1, 255, 0, 1]]]
    # a background "CAM" (even tagged) never makes a pixel: background comes from low object CAMs
    tagged_bg = torch.tensor([[1.0, 1.0, 1.0]])
    assert pseudo_masks(cams_of([1.0] * 5, CAM1, CAM2), tagged_bg, 0.4, 0.1).tolist() == [[[1, 2, 255, 0, 1]]]
    # another background id: the class that gets the background pixels, and has no CAM
    mask = pseudo_masks(cams_of(CAM1, CAM2, [1.0] * 5), torch.tensor([[1.0, 1.0, 1.0]]), 0.4, 0.1, bg_class=2)
    assert mask.tolist() == [[[0, 1, 255, 2, 0]]]


def test_pseudo_mask_of_an_image_without_object_tags_is_background():
    cams = cams_of([0.0] * 5, CAM1, CAM2)
    for tags in (torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])):
        assert pseudo_masks(cams, tags, 0.4, 0.0).tolist() == [[[0, 0, 0, 0, 0]]]
        # also where a background map (which marks only some pixels) is the only background cue
        background = torch.tensor([[[True, False, False, False, False]]])
        assert pseudo_masks(cams, tags, 0.4, background=background).tolist() == [[[0, 0, 0, 0, 0]]]


def test_pseudo_mask_background_map():
    cams, tags = cams_of([0.0] * 5, CAM1, CAM2), torch.tensor([[0.0, 1.0, 1.0]])
    background = torch.tensor([[[False, False, True, False, True]]])
    # the map alone makes background; pixel 4 is foreground by its CAM and background by the map: 255;
    # pixel 3, low CAM but not background in the map, is uncertain
    assert pseudo_masks(cams, tags, 0.4, background=background).tolist() == [[[1, 2, 0, 255, 255]]]
    # with a CAM threshold too, low CAMs add background
    assert pseudo_masks(cams, tags, 0.4, 0.1, background=background).tolist() == [[[1, 2, 0, 0, 255]]]


def test_pseudo_masks_of_a_batch_follow_each_image_tags():
    cams = torch.cat([cams_of([0.0] * 5, CAM1, CAM2), cams_of([0.0] * 5, CAM1, CAM2)])
    tags = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert pseudo_masks(cams, tags, 0.4, 0.1).tolist() == [[[1, 2, 255, 0, 1]], [[255, 2, 255, 0, 2]]]


def test_foreground_scores_by_hand():
    mask = torch.tensor([[[1, 2, 0, 255, 1, 1]]])
    true = torch.tensor([[[1, 1, 0, 2, 255, 0]]])
    # scored: 5 pixels (true 255 left out); labelled: 4 of them; foreground labelled: 1, 2, 1 (pixels 0, 1,
    # 5) of which pixel 0 is right; true foreground: pixels 0, 1, 3
    counts = foreground_counts(mask, true)
    assert counts.tolist() == [1, 3, 3, 4, 5]
    q = foreground_quality(counts)
    assert q == {"fg_precision": pytest.approx(1 / 3), "fg_recall": pytest.approx(1 / 3), "labelled": 0.8}
    assert foreground_counts(mask).tolist() == [0, 4, 0, 5, 6]  # no true masks: only the labelled part
    assert foreground_quality(torch.zeros(5, dtype=torch.long)) == {"fg_precision": 0.0, "fg_recall": 0.0,
                                                                     "labelled": 0.0}


def test_same_size_batches_group_consecutive_images_of_one_size():
    sizes = [(2, 2), (2, 2), (2, 2), (3, 2), (2, 2)]
    items = [{"index": torch.tensor([i]), "image": torch.full((1, 3, *s), float(i)), "tags": torch.ones(1, 3)}
             for i, s in enumerate(sizes)]
    groups = list(same_size_batches(items, 2))
    assert [g["index"].tolist() for g in groups] == [[0, 1], [2], [3], [4]]
    assert groups[0]["image"].shape == (2, 3, 2, 2) and groups[0]["image"][1].max().item() == 1.0
    assert "mask" not in groups[0]
    assert [g["index"].tolist() for g in same_size_batches(items, 10)] == [[0, 1, 2], [3], [4]]


# -- the classifier of a checkpoint ------------------------------------------------------------------------

TINY_MODEL = {"encoder": "test_resnet", "output_stride": 8, "decoder_channels": 16}
NAMES = ["background", "a", "b"]


def fake_checkpoint(path: Path, net: torch.nn.Module, names=NAMES, model=TINY_MODEL) -> Path:
    torch.save({"method": {f"net.{k}": v for k, v in net.state_dict().items()}, "eval_net": "net",
                "info": {"class_names": names},
                "config": {"method": {"name": "classifier"}, "model": model}}, path)
    return path


def test_load_classifier_rebuilds_it_from_its_own_model_settings(tmp_path):
    torch.manual_seed(0)
    net = build_classifier(OmegaConf.create({**TINY_MODEL, "pretrained": None}), 3).eval()
    path = fake_checkpoint(tmp_path / "c.pt", net)
    loaded = load_classifier(path, NAMES)
    x = torch.randn(1, 3, 32, 32)
    assert not loaded.training and torch.equal(loaded.cam(x), net.cam(x))
    assert loaded.cam(x).shape[-2:] == (4, 4)  # output stride 8, from the checkpoint, not a caller's config

    with pytest.raises(ConfigError, match="was trained on classes"):
        load_classifier(path, ["background", "a", "c"])
    seg = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), TINY_MODEL), 3)
    with pytest.raises(ConfigError, match="not of a classifier"):
        load_classifier(fake_checkpoint(tmp_path / "s.pt", seg), NAMES)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="not a lesseg training checkpoint"):
        load_classifier(tmp_path / "x.pt", NAMES)


# -- the method and its stages -----------------------------------------------------------------------------


def cam_cfg(tiny_cfg, overrides=(), **method):
    """The three stages on tiny shapes data: the tagged train split (32 images, masks only for scoring)."""
    return tiny_cfg(["train.iters=2", "stages.classifier.train.iters=3", *overrides],
                    method={"name": "cam", "scales": [1.0, 2.0], "flip": True, "fg_threshold": 0.3,
                            "bg_threshold": 0.1, "cam_batch": 5, **method},
                    data={"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False,
                                                  "true_masks": True}}})


def test_bad_thresholds_and_a_missing_stream_are_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="bg_threshold 0.5 must not exceed"):
        CAM.pipeline(cam_cfg(tiny_cfg, bg_threshold=0.5))
    with pytest.raises(ConfigError, match="stream 'labeled'"):
        CAM.pipeline(tiny_cfg(method={"name": "cam"}, data={"streams": {"other": {"split": "train"}}}))
    with pytest.raises(ConfigError, match="method cam has the stages classifier, cams, train"):
        cam_cfg(tiny_cfg, ["stages.stage1.train.iters=3"])


def test_stage_configs(tiny_cfg):
    cfg = cam_cfg(tiny_cfg, ["eval.metric=acc"], init_from_classifier=True)
    assert METHODS.get("cam") is CAM and [s.name for s in CAM.pipeline(cfg)] == list(CAM.stage_names)
    products = {"classifier": Path("/x/classifier/last.pt"), "cams": Path("/x/cams")}
    first = stage_config(cfg, CAM.pipeline(cfg), 0, products)
    assert first.method.name == "classifier" and list(first.data.streams) == ["labeled"]
    assert first.train.iters == 3 and first.out == str(Path(cfg.out) / "classifier")  # its own override
    tagged = first.data.streams.labeled
    assert not tagged.labeled and not tagged.true_masks  # its masks are not even read
    assert first.eval.metric is None  # tag mAP, not the last stage's metric
    last = CAM.final_config(cfg)
    assert list(last.data.streams) == ["pseudo"] and last.method.name == "cam" and last.eval.metric == "acc"
    pseudo = last.data.streams.pseudo
    assert pseudo.dataset == "folder" and pseudo.root == str(Path(cfg.out) / "cams") and pseudo.labeled
    assert pseudo.batch_size == 4 and pseudo.split == "train"
    assert last.model.pretrained == str(Path(cfg.out) / "classifier" / "last.pt")
    assert CAM.final_config(cam_cfg(tiny_cfg)).model.pretrained is None


@pytest.fixture
def fits(monkeypatch):
    """The run folder name of every Trainer.fit call."""
    calls = []
    original = trainer_mod.Trainer.fit

    def fit(self):
        calls.append(Path(self.out).name)
        return original(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    return calls


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


def expected_masks(cfg, classifier: Path) -> dict[str, np.ndarray]:
    """The pseudo-masks recomputed from the classifier checkpoint, in the stage's groups of ``cam_batch``."""
    from lesseg.engine.context import EngineContext

    ctx = EngineContext(cfg=cfg, device=torch.device("cpu"), class_names=NAMES_SHAPES)
    data = ctx.dataset("labeled")
    net = load_classifier(classifier, NAMES_SHAPES)
    m, out = cfg.method, {}
    items = [{**data[i], "index": torch.tensor([i])} for i in range(len(data))]
    items = [{k: (v.unsqueeze(0) if k in ("image", "tags") else v) for k, v in it.items()} for it in items]
    for batch in same_size_batches(items, m.cam_batch):
        tags = batch["tags"].clone()
        tags[:, 0] = 0
        with torch.no_grad():
            cams = multiscale_cams(net.cam, batch["image"], tags, list(m.scales), m.flip)
        masks = pseudo_masks(cams, tags, m.fg_threshold, m.bg_threshold)
        for k, i in enumerate(batch["index"].tolist()):
            out[data.samples[i].name] = masks[k].numpy()
    return out


NAMES_SHAPES = ["background", "disk", "square", "triangle", "star", "ring", "cross"]


def test_three_stages_end_to_end_and_a_rerun_skips_them(tiny_cfg, fits):
    cfg = cam_cfg(tiny_cfg, init_from_classifier=True)
    out = Path(cfg.out)
    result = train(cfg)
    assert 0.0 <= result["miou"] <= 1.0
    assert fits == ["classifier", "run"]
    status = json.loads((out / STATUS).read_text())
    assert [(s["stage"], s["state"]) for s in status] == [
        ("classifier", "done"), ("cams", "done"), ("train", "done")]
    for s in status:
        assert Path(s["product"]).exists(), s

    # stage classifier: the classifier method, its own iterations, scored by tag mAP
    classifier = ckpt.load(out / "classifier" / "last.pt")
    assert classifier["step"] == 3 and classifier["config"]["method"] == {"name": "classifier"}
    assert (out / "classifier" / MARKER).is_file()

    # stage cams: a folder dataset of every tagged image, masks with the image's tags, background and 255 only
    cams = out / "cams"
    src = stream_source(cfg.data)
    samples = src.samples("train")
    assert (cams / "classes.txt").read_text().split() == NAMES_SHAPES
    assert (cams / "splits" / "train.txt").read_text().split() == [s.name for s in samples]
    masks = read_masks(cams)
    assert len(masks) == len(samples) == 32
    for s in samples:
        m = masks[s.name]
        assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255, *s.tags}, (s.name, s.tags)
        assert (cams / "images" / f"{s.name}.png").resolve() == s.image.resolve()
    values = np.concatenate([m.ravel() for m in masks.values()])
    assert {0, 255} <= set(values.tolist()) and bool(((values > 0) & (values < 255)).any())
    for name, m in expected_masks(cfg, out / "classifier" / "last.pt").items():
        assert np.array_equal(masks[name], m), name

    quality = json.loads((cams / "quality.json").read_text())
    assert {"miou", "acc", "iou", "fg_precision", "fg_recall", "labelled"} <= set(quality)
    marker = json.loads((cams / MARKER).read_text())
    assert marker["metrics"]["pseudo_miou"] == quality["miou"]
    assert marker["metrics"]["pseudo_fg_recall"] == quality["fg_recall"]
    true = {s.name: src.read_mask(s.mask) for s in samples}  # the scored pixels: not 255 in the true mask
    labelled = sum(int(((masks[n] != 255) & (t != 255)).sum()) for n, t in true.items())
    assert quality["labelled"] == pytest.approx(labelled / sum(int((t != 255).sum()) for t in true.values()))
    right = sum(int(((masks[n] == t) & (t != 0) & (t != 255)).sum()) for n, t in true.items())
    objects = sum(int(((t != 0) & (t != 255)).sum()) for t in true.values())
    assert quality["fg_recall"] == pytest.approx(right / objects)

    # the last stage: the pseudo stream, its encoder started from the classifier's
    final = ckpt.load(out / "last.pt")
    assert final["step"] == 2 and final["config"]["method"]["name"] == "cam"
    assert list(final["config"]["data"]["streams"]) == ["pseudo"]
    assert final["config"]["model"]["pretrained"] == str(out / "classifier" / "last.pt")

    # a rerun skips the finished stages; another threshold remakes the masks only
    times = {p: p.stat().st_mtime_ns for p in (cams / "masks").iterdir()}
    PipelineRun(cfg).run(until="cams")
    assert fits == ["classifier", "run"]
    assert {p: p.stat().st_mtime_ns for p in (cams / "masks").iterdir()} == times
    cfg2 = cam_cfg(tiny_cfg, init_from_classifier=True, fg_threshold=0.6)
    PipelineRun(cfg2).run(until="cams")
    assert fits == ["classifier", "run"]  # the classifier is not retrained
    for name, m in expected_masks(cfg2, out / "classifier" / "last.pt").items():
        assert np.array_equal(read_masks(cams)[name], m), name


def test_a_classifier_trained_before_replaces_the_first_stage(tiny_cfg, tmp_path, fits):
    first = cam_cfg(tiny_cfg, [f"out={tmp_path / 'a'}"])
    PipelineRun(first).run(until="cams")
    given = tmp_path / "a" / "classifier" / "last.pt"
    cfg = cam_cfg(tiny_cfg, [f"out={tmp_path / 'b'}"], classifier_checkpoint=str(given))
    PipelineRun(cfg).run(until="cams")
    assert fits == ["classifier"] and not (tmp_path / "b" / "classifier").exists()
    assert read_masks(tmp_path / "b" / "cams").keys() == read_masks(tmp_path / "a" / "cams").keys()
    for name, m in read_masks(tmp_path / "a" / "cams").items():
        assert np.array_equal(read_masks(tmp_path / "b" / "cams")[name], m)


def test_cams_stage_refuses_images_without_tags(tmp_path):
    from test_self_training import make_folder_dataset

    from lesseg import config as config_mod

    make_folder_dataset(tmp_path / "data")  # no image_labels.csv
    torch.manual_seed(0)
    net = build_classifier(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                           {"encoder": "test_resnet", "pretrained": None}), 3)
    given = fake_checkpoint(tmp_path / "c.pt", net, names=["background", "square", "bar"],
                            model={"encoder": "test_resnet"})
    cfg = config_mod.from_dict({
        "method": {"name": "cam", "scales": [1.0], "flip": False, "classifier_checkpoint": str(given)},
        "data": {"dataset": "folder", "root": str(tmp_path / "data"), "crop_size": [32, 32], "workers": 0,
                 "val_split": "val", "streams": {"labeled": {"split": "labeled", "batch_size": 2}}},
        "model": {"encoder": "test_resnet", "decoder_channels": 16},
        "train": {"iters": 1, "device": "cpu", "amp": "none", "progress": False},
        "out": str(tmp_path / "run"),
    })  # fmt: skip
    with pytest.raises(ConfigError, match="needs them"):
        PipelineRun(cfg).run(until="cams")
    (tmp_path / "data" / "image_labels.csv").write_text("l0,1\nl1,1;2\nl2,2\nl3,1\n")
    d = OmegaConf.to_container(cfg)
    d["data"]["root"] = str(tmp_path / "data") + "/"
    cfg = config_mod.from_dict(d)
    PipelineRun(cfg).run(until="cams")  # with tags (a new root string: sources are cached per root)
    assert len(read_masks(tmp_path / "run" / "cams")) == 4


def test_training_step_is_ce_on_the_pseudo_stream():
    from lesseg.methods.cam import CamConfig

    cfg = OmegaConf.structured(ModelConfig)
    method = CAM(CamConfig(), OmegaConf.merge(cfg, {"encoder": "test_resnet", "decoder_channels": 16}),
                 RunInfo(num_classes=3)).eval()  # eval: no dropout, so both passes agree
    image = torch.randn(2, 3, 32, 32)
    mask = torch.full((2, 32, 32), 255)
    mask[:, :4] = 1
    loss = method.training_step({"pseudo": {"image": image, "mask": mask}}, 0)["loss"]
    logits = method.net(image)["logits"]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, mask, ignore_index=255).item(), rel=1e-5)
