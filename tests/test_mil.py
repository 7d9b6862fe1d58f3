"""Proposal-based MIL (methods.md section 7): selective-search boxes and their seeded subset, batched crops,
votes by hand, localisation maps from a fake classifier with known scores, the stage configs, and the three
stages on tiny shapes data, killed inside the proposals stage and rerun to the same masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lesseg.data import stream_source
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import trainer as trainer_mod
from lesseg.engine.context import EngineContext
from lesseg.engine.stages import MARKER, STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.errors import ConfigError
from lesseg.methods import METHODS, mil
from lesseg.methods.base import stage_config
from lesseg.methods.cam import load_classifier
from lesseg.methods.mil import MIL
from lesseg.methods.weak import pseudo_masks
from lesseg.methods.weak.proposals import (
    crop_proposals,
    localization_maps,
    propose,
    select_proposals,
    selective_search,
    vote_maps,
)

# -- proposals ---------------------------------------------------------------------------------------------


def test_selective_search_finds_a_plain_square_and_gives_the_same_boxes_every_time():
    rgb = np.full((32, 32, 3), 90, np.uint8)
    rgb[8:20, 10:24] = (230, 20, 20)  # rows 8..19, columns 10..23
    boxes = selective_search(rgb)
    assert boxes.dtype == np.int64 and boxes.shape[1] == 4 and len(boxes) > 1
    assert [10, 8, 24, 20] in boxes.tolist()  # x0, y0, x1, y1 with the far edges exclusive
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert boxes.tolist() == sorted(boxes.tolist())  # OpenCV's own order is random; the set is not
    assert all(np.array_equal(selective_search(rgb), boxes) for _ in range(3))
    with pytest.raises(ConfigError, match="not one of fast, quality"):
        selective_search(rgb, "slow")


def test_select_proposals_drops_small_boxes_and_keeps_a_seeded_subset_in_order():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 5, 5], [1, 1, 9, 9], [2, 0, 10, 4]])
    # areas 4, 100, 25, 64, 32: at least 0.1 of 10x10 keeps the last four
    assert select_proposals(boxes, (10, 10), 9, 0.1, np.random.default_rng(0)).tolist() == boxes[1:].tolist()
    subsets = set()
    for seed in range(20):
        two = select_proposals(boxes, (10, 10), 2, 0.1, np.random.default_rng(seed))
        assert len(two) == 2 and all(b in boxes[1:].tolist() for b in two.tolist())
        order = [boxes.tolist().index(b) for b in two.tolist()]
        assert order[0] < order[1]  # in their given order
        assert np.array_equal(select_proposals(boxes, (10, 10), 2, 0.1, np.random.default_rng(seed)), two)
        subsets.add(tuple(order))
    assert len(subsets) > 1  # the seed picks the subset


def test_crops_are_bilinear_resizes_of_the_boxes():
    image = torch.arange(48.0).reshape(3, 4, 4)
    crops = crop_proposals(image, torch.tensor([[1, 1, 3, 3], [0, 0, 4, 4], [0, 0, 4, 2]]), (2, 2))
    assert crops.shape == (3, 3, 2, 2)
    assert crops[0, 0].tolist() == [[5, 6], [9, 10]]  # a box of the crop's size: its pixels
    assert crops[1, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # halved: the means of 2x2 blocks
    assert crops[2, 0].tolist() == [[0.5, 2.5], [4.5, 6.5]]  # rows kept, column pairs averaged
    assert torch.equal(crops[1, 1], crops[1, 0] + 16)  # every channel
    up = crop_proposals(image, torch.tensor([[0, 0, 4, 4]]), (8, 8))[0]
    assert torch.allclose(up, F.interpolate(image[None], size=(8, 8), mode="bilinear", align_corners=False)[0])


def test_votes_sum_the_scores_of_the_boxes_covering_each_pixel():
    boxes = torch.tensor([[0, 0, 2, 2], [1, 0, 3, 3]])  # A: x 0-1, y 0-1; B: x 1-2, y 0-2
    scores = torch.tensor([[0.5, 1.0], [0.25, 0.0]])
    votes = vote_maps(boxes, scores, (3, 3))
    assert votes.shape == (2, 3, 3)
    assert votes[0].tolist() == [[0.5, 0.75, 0.25], [0.5, 0.75, 0.25], [0.0, 0.25, 0.25]]
    assert votes[1].tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    # a score below min_score casts no vote
    assert vote_maps(boxes, scores, (3, 3), min_score=0.3)[0].tolist() == [
        [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]


def fake_classifier(crops: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is, for class 1, the crop's mean of channel 0 (clamped to [0.1, 0.9]), for
    class 2 one minus that, for class 0 one half."""
    p1 = crops[:, 0].mean((1, 2)).clamp(0.1, 0.9)
    return torch.logit(torch.stack([torch.full_like(p1, 0.5), p1, 1 - p1], 1))


def test_localization_maps_of_known_proposals_and_scores():
    image = torch.zeros(3, 4, 4)
    image[0, :2, :2] = 1.0  # the object: the top-left 2x2 block
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 2, 2], [2, 2, 4, 4]])  # whole image, object, bottom right
    # crops of 2x2: class-1 scores 0.25 (mean of the whole image), 0.9 (clamped 1), 0.1 (clamped 0);
    # class 2: 0.75, 0.1, 0.9. The top-left block gets the votes of the whole image and the object box, the
    # bottom-right block those of the whole image and the corner box, the rest only the whole image's
    tags = torch.tensor([0.0, 1.0, 1.0])
    maps = localization_maps(fake_classifier, image, boxes, tags, (2, 2), batch=2)
    one = torch.full((4, 4), 0.25)
    one[:2, :2], one[2:, 2:] = 1.15, 0.35
    two = torch.full((4, 4), 0.75)
    two[:2, :2], two[2:, 2:] = 0.85, 1.65
    assert torch.allclose(maps[1], one / 1.15, atol=1e-5) and torch.allclose(maps[2], two / 1.65, atol=1e-5)
    assert maps[0].abs().sum() == 0  # not tagged: no map, though the classifier scores it 0.5
    only_one = localization_maps(fake_classifier, image, boxes, torch.tensor([0.0, 1.0, 0.0]), (2, 2),
                                 min_score=0.2)
    one[2:, 2:] = 0.25  # the corner's 0.1 is below min_score
    assert torch.allclose(only_one[1], one / 1.15, atol=1e-5) and only_one[2].abs().sum() == 0
    assert localization_maps(fake_classifier, image, boxes[:0], tags, (2, 2)).abs().sum() == 0


# -- the method and its stages -----------------------------------------------------------------------------


def mil_cfg(tiny_cfg, overrides=(), **method):
    """The three stages on tiny shapes data: the tagged train split (32 images, masks only for scoring)."""
    return tiny_cfg(["train.iters=2", "stages.classifier.train.iters=3", *overrides],
                    method={"name": "mil", "max_proposals": 8, "min_area": 0.02, "proposal_batch": 5, **method},
                    data={"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False,
                                                  "true_masks": True}}})


def test_bad_settings_are_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="must not exceed"):
        MIL.pipeline(mil_cfg(tiny_cfg, bg_threshold=0.6))
    with pytest.raises(ConfigError, match="method.search 'slow'"):
        MIL.pipeline(mil_cfg(tiny_cfg, search="slow"))
    with pytest.raises(ConfigError, match="stream 'labeled'"):
        MIL.pipeline(tiny_cfg(method={"name": "mil"}, data={"streams": {"other": {"split": "train"}}}))


def test_stage_configs(tiny_cfg):
    cfg = mil_cfg(tiny_cfg, init_from_classifier=True)
    stages = MIL.pipeline(cfg)
    assert METHODS.get("mil") is MIL and [s.name for s in stages] == list(MIL.stage_names)
    out = Path(cfg.out)
    first = stage_config(cfg, stages, 0, {})
    assert first.method.name == "classifier" and first.train.iters == 3
    assert not first.data.streams.labeled.labeled and not first.data.streams.labeled.true_masks
    last = MIL.final_config(cfg)
    assert last.method.name == "mil" and list(last.data.streams) == ["pseudo"]
    assert last.data.streams.pseudo.root == str(out / "proposals") and last.data.streams.pseudo.labeled
    assert last.model.pretrained == str(out / "classifier" / "last.pt")
    given = mil_cfg(tiny_cfg, classifier_checkpoint="/x/c.pt")
    assert MIL.pipeline(given)[0].given == "/x/c.pt"


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


def expected_masks(cfg, classifier: Path) -> dict[str, np.ndarray]:
    """The pseudo-masks recomputed from the classifier checkpoint, image by image."""
    names = stream_source(cfg.data).classes
    data = EngineContext(cfg=cfg, device=torch.device("cpu"), class_names=names).dataset("labeled")
    net = load_classifier(classifier, names)
    m, out = cfg.method, {}
    for i, s in enumerate(data.samples):
        rgb = data.source.read_image(s.image)
        boxes = propose(rgb, m.search, m.max_proposals, m.min_area, np.random.default_rng([cfg.train.seed, i]))
        assert 0 < len(boxes) <= m.max_proposals
        item = data[i]
        tags = item["tags"][None].clone()
        tags[:, 0] = 0
        with torch.no_grad():
            maps = localization_maps(lambda x: net(x)["cls"], item["image"], torch.from_numpy(boxes), tags[0],
                                     list(cfg.data.crop_size), m.proposal_batch, m.min_score)
        out[s.name] = pseudo_masks(maps[None], tags, m.fg_threshold, m.bg_threshold)[0].numpy()
    return out


@pytest.fixture
def fits(monkeypatch):
    calls = []
    original = trainer_mod.Trainer.fit

    def fit(self):
        calls.append(Path(self.out).name)
        return original(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    return calls


def test_three_stages_end_to_end_killed_in_the_proposals_stage_and_rerun_to_the_same_masks(
        tiny_cfg, tmp_path, monkeypatch, fits):
    common = ["train.deterministic=true"]
    full = mil_cfg(tiny_cfg, [*common, f"out={tmp_path / 'full'}"], init_from_classifier=True)
    result = train(full)
    torch.use_deterministic_algorithms(False)
    assert 0.0 <= result["miou"] <= 1.0 and fits == ["classifier", "full"]
    out = tmp_path / "full"
    status = json.loads((out / STATUS).read_text())
    assert [(s["stage"], s["state"]) for s in status] == [(n, "done") for n in MIL.stage_names]
    assert set(status[1]["metrics"]) == {"pseudo_miou", "pseudo_acc", "pseudo_fg_precision", "pseudo_fg_recall",
                                         "pseudo_labelled", "images_per_s"}
    assert set(status[0]["metrics"]) == {"map"} and set(status[2]["metrics"]) == {"miou"}

    samples = stream_source(full.data).samples("train")
    masks = read_masks(out / "proposals")
    assert len(masks) == len(samples) == 32
    for s in samples:
        assert set(np.unique(masks[s.name]).tolist()) <= {0, 255, *s.tags}, s.name
    values = np.concatenate([m.ravel() for m in masks.values()])
    assert bool(((values > 0) & (values < 255)).any()) and 0 in values
    for name, m in expected_masks(full, out / "classifier" / "last.pt").items():
        assert np.array_equal(masks[name], m), name
    quality = json.loads((out / "proposals" / "quality.json").read_text())
    assert json.loads((out / "proposals" / MARKER).read_text())["metrics"]["pseudo_miou"] == quality["miou"]
    assert ckpt.load(out / "last.pt")["config"]["model"]["pretrained"] == str(out / "classifier" / "last.pt")

    # killed while writing the masks: the rerun keeps the classifier and writes every mask again, the same
    calls = []
    original = mil.localization_maps

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(mil, "localization_maps", dies)
    cfg = mil_cfg(tiny_cfg, [*common, f"out={tmp_path / 'killed'}"], init_from_classifier=True)
    fits.clear()
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    status = json.loads((tmp_path / "killed" / STATUS).read_text())
    assert [s["state"] for s in status] == ["done", "running", "pending"]
    assert len(read_masks(tmp_path / "killed" / "proposals")) == 5
    monkeypatch.setattr(mil, "localization_maps", original)
    train(cfg)
    torch.use_deterministic_algorithms(False)
    assert fits == ["classifier", "killed"]  # the classifier once, before the kill
    again = read_masks(tmp_path / "killed" / "proposals")
    assert again.keys() == masks.keys() and all(np.array_equal(again[n], masks[n]) for n in masks)
    PipelineRun(cfg).run(until="proposals")  # both done: skipped
    assert fits == ["classifier", "killed"]
