"""Self-training (methods.md section 4): pseudo-mask thresholding, stems, stage-3 step, the three stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_mean_teacher import TINY, C, reaches

from lesseg import config as config_mod
from lesseg.data import SegDataset, build_source, stream_source
from lesseg.data.writer import safe_stems
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.evaluate import predict_probs
from lesseg.engine.stages import MARKER, STATUS, PipelineRun
from lesseg.engine.trainer import train
from lesseg.methods.base import METHODS, RunInfo
from lesseg.methods.self_training import SelfTraining, SelfTrainingConfig, pseudo_mask
from lesseg.methods.supervised import Supervised, SupervisedConfig


def test_pseudo_mask_thresholds_confidence():
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]).reshape(1, 2, 1, 3)
    assert pseudo_mask(probs, 0.0).tolist() == [[[0, 1, 0]]]  # ties take the first class
    assert pseudo_mask(probs, 0.85).tolist() == [[[0, 255, 255]]]
    assert pseudo_mask(probs, 0.5).tolist() == [[[0, 1, 0]]]  # >= threshold is kept
    assert pseudo_mask(probs, 0.0).dtype == torch.uint8


def test_safe_stems_are_unique_and_plain():
    assert safe_stems(["a/b", "a_b", "x.png", "c d", "a/b"]) == ["a_b", "a_b-1", "x_png", "c_d", "a_b-2"]


def test_stage3_step_trains_on_both_streams():
    torch.manual_seed(0)
    method = SelfTraining(SelfTrainingConfig(), TINY, RunInfo(num_classes=C)).train()
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, C, (2, 32, 32), generator=g)
    batch = {
        s: {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask} for s in ("labeled", "pseudo")
    }
    out = method.training_step(batch, 0)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert reaches(method, out["loss_sup"]) == {"net": True}
    assert reaches(method, out["loss_pseudo"]) == {"net": True}
    assert SelfTraining.streams == ("labeled", "pseudo") and METHODS.get("self_training") is SelfTraining


def make_folder_dataset(root: Path) -> None:
    """3 classes, 32x32 images: 4 labeled, 4 unlabeled (no mask file), 2 val."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("background\nsquare\nbar\n")
    names = {"labeled": ["l0", "l1", "l2", "l3"], "unlabeled": ["u0", "u1", "u2", "u3"], "val": ["v0", "v1"]}
    for split, stems in names.items():
        for stem in stems:
            mask = np.zeros((32, 32), np.uint8)
            mask[4:16, 4:16], mask[20:28, :] = 1, 2
            image = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8) + (mask[..., None] * 90).astype(
                np.uint8
            )
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
            if split != "unlabeled":
                Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))


def run_config(data: Path, out: Path, threshold: float) -> dict:
    stream = {"batch_size": 2}
    return {
        "method": {"name": "self_training", "threshold": threshold, "align": "none"},
        "data": {
            "dataset": "folder",
            "root": str(data),
            "crop_size": [32, 32],
            "workers": 0,
            "val_split": "val",
            "streams": {
                "labeled": {**stream, "split": "labeled"},
                "unlabeled": {**stream, "split": "unlabeled", "labeled": False},
            },
        },
        "model": {"encoder": "test_resnet", "decoder_channels": 16},
        "train": {"iters": 2, "device": "cpu", "amp": "none", "progress": False},
        "out": str(out),
    }


def stage1_probs(cfg, out: Path, checkpoint: Path | None = None) -> list[torch.Tensor]:
    """Probabilities of the stage-1 network (``checkpoint``, by default the run's stage-1 last.pt, a
    supervised run) on the unlabeled images, as stage 2 computes them. 1,C,H,W each"""
    method = Supervised(SupervisedConfig(), cfg.model, RunInfo(num_classes=C))
    method.load_state_dict(ckpt.load(checkpoint or out / "stage1" / "last.pt")["method"])
    src = build_source("folder", cfg.data.root)
    data = SegDataset(
        src,
        src.samples("unlabeled"),
        train=False,
        labeled=False,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
    )
    net = method.net.eval()
    return [predict_probs(net, data[i]["image"][None], cfg.eval, [32, 32], C) for i in range(len(data))]


def read_masks(pseudo: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((pseudo / "masks").glob("*.png"))}


def prepare(cfg):
    """Run the stages before the last one; the last one's config."""
    PipelineRun(cfg).run(until="pseudo")
    return SelfTraining.final_config(cfg)


def test_three_stages_end_to_end_and_resumable(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    make_folder_dataset(data)
    cfg = config_mod.from_dict(run_config(data, out, threshold=0.0))
    result = train(cfg)  # the stages stage1, pseudo and train
    assert 0.0 <= result["miou"] <= 1.0
    assert ckpt.load(out / "stage1" / "last.pt")["step"] == 2
    final = ckpt.load(out / "last.pt")
    assert final["step"] == 2 and final["config"]["method"]["name"] == "self_training"
    assert set(final["config"]["data"]["streams"]) == {"labeled", "pseudo"}

    pseudo = out / "pseudo"
    status = json.loads((out / STATUS).read_text())
    assert [(st["stage"], st["state"]) for st in status] == [("stage1", "done"), ("pseudo", "done"), ("train", "done")]
    assert (pseudo / MARKER).is_file() and (pseudo / "classes.txt").read_text().split() == [
        "background",
        "square",
        "bar",
    ]
    assert (pseudo / "splits" / "train.txt").read_text().split() == ["u0", "u1", "u2", "u3"]
    for stem in ["u0", "u1", "u2", "u3"]:
        link = pseudo / "images" / f"{stem}.png"
        assert link.resolve() == (data / "images" / f"{stem}.png").resolve()
    masks = read_masks(pseudo)
    assert list(masks) == ["u0", "u1", "u2", "u3"]
    for m in masks.values():
        assert m.dtype == np.uint8 and m.shape == (32, 32) and bool((m < C).all())  # threshold 0 keeps all

    # another threshold (the median confidence): the pseudo stage's settings changed, it runs again; stage 1
    # is complete and not retrained
    probs = stage1_probs(cfg, out)
    thr = float(torch.cat([p.max(1).values.flatten() for p in probs]).median())
    stage1_time = (out / "stage1" / "last.pt").stat().st_mtime_ns
    cfg = config_mod.from_dict(run_config(data, out, threshold=thr))
    stage3 = prepare(cfg)
    assert (out / "stage1" / "last.pt").stat().st_mtime_ns == stage1_time
    masks = read_masks(pseudo)
    for p, m in zip(probs, masks.values()):
        assert np.array_equal(m, pseudo_mask(p, thr)[0].numpy())
        conf = p.max(1).values[0].numpy()
        assert bool((m[conf < thr] == 255).all()) and bool((m[conf >= thr] < C).all())
    assert any(bool((m == 255).any()) for m in masks.values()) and any(
        bool((m < C).any()) for m in masks.values()
    )
    s = stage3.data.streams
    assert list(s) == ["labeled", "pseudo"] and s.pseudo.dataset == "folder" and s.pseudo.root == str(pseudo)
    assert s.pseudo.labeled and s.pseudo.split == "train" and s.labeled == cfg.data.streams.labeled

    # a third call skips both stages
    times = {p: p.stat().st_mtime_ns for p in (pseudo / "masks").iterdir()}
    assert prepare(cfg) == stage3
    assert {p: p.stat().st_mtime_ns for p in (pseudo / "masks").iterdir()} == times


def test_stage1_checkpoint_labels_with_a_network_trained_before(tmp_path):
    """method.stage1_checkpoint: stage 2 writes the given supervised run's argmax, and stage 1 is not trained;
    a missing file or a checkpoint of other classes is a config error naming it."""
    from lesseg.errors import ConfigError

    data = tmp_path / "data"
    make_folder_dataset(data)
    sup = run_config(data, tmp_path / "sup", 0.0)
    sup["method"] = {"name": "supervised"}
    sup["train"]["seed"] = 1  # other initial weights than the self-training run's own network
    train(config_mod.from_dict(sup))
    given = tmp_path / "sup" / "last.pt"

    d = run_config(data, tmp_path / "run", 0.0)
    d["method"]["stage1_checkpoint"] = str(given)
    cfg = config_mod.from_dict(d)
    prepare(cfg)
    assert not (tmp_path / "run" / "stage1").exists()  # nothing trained there, no folder left behind
    masks = read_masks(tmp_path / "run" / "pseudo")
    probs = stage1_probs(cfg, tmp_path / "run", given)
    assert len(masks) == len(probs) == 4
    for p, m in zip(probs, masks.values()):
        assert np.array_equal(m, pseudo_mask(p, 0.0)[0].numpy())

    d["method"]["stage1_checkpoint"] = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="nope.pt"):
        prepare(config_mod.from_dict(d))
    other = tmp_path / "other"  # same class count, other names (a new root: sources are cached per root)
    shutil.copytree(data, other)
    (other / "classes.txt").write_text("background\nsquare\ncircle\n")
    d = run_config(other, tmp_path / "run2", 0.0)
    d["method"]["stage1_checkpoint"] = str(given)
    with pytest.raises(ConfigError, match="sup/last.pt was trained on classes"):
        prepare(config_mod.from_dict(d))


def test_prepare_needs_an_unlabeled_stream(tmp_path):
    from lesseg.errors import ConfigError

    d = run_config(tmp_path, tmp_path / "run", 0.0)
    del d["data"]["streams"]["unlabeled"]
    with pytest.raises(ConfigError, match="unlabeled"):
        prepare(config_mod.from_dict(d))


def test_stage2_scores_the_pseudo_masks_against_true_masks(tiny_cfg):
    """With true_masks on the unlabeled stream, quality.json holds the IoU of the written pseudo-masks against
    the hidden masks."""
    from lesseg.metrics import confusion_matrix, iou_from_confusion

    cfg = tiny_cfg(
        method={"name": "self_training", "threshold": 0.0},
        data={"streams": {"labeled": {"split": "train", "batch_size": 4},
                          "unlabeled": {"split": "val", "batch_size": 4, "labeled": False, "true_masks": True}}},
        train={"iters": 2, "eval_every": 0},
    )  # fmt: skip
    prepare(cfg)
    pseudo = Path(cfg.out) / "pseudo"
    quality = json.loads((pseudo / "quality.json").read_text())
    src = stream_source(cfg.data)
    conf = torch.zeros(7, 7, dtype=torch.long)
    masks = read_masks(pseudo)
    assert len(masks) == len(src.samples("val")) == 15
    for sample in src.samples("val"):
        m = torch.from_numpy(masks[sample.name]).long()
        true = torch.from_numpy(src.read_mask(sample.mask)).long().masked_fill(m == 255, 255)
        conf += confusion_matrix(m, true, 7)
    assert conf.sum() > 0
    assert quality["miou"] == pytest.approx(iou_from_confusion(conf)["miou"])
    marker = json.loads((pseudo / "done.json").read_text())  # the stage's product quality, recorded
    assert marker["metrics"] == {"pseudo_miou": quality["miou"], "pseudo_acc": quality["acc"]}
    assert quality["acc"] == pytest.approx(iou_from_confusion(conf)["acc"])


def test_aligned_pseudo_masks_take_the_labeled_class_shares(tmp_path):
    """method.align=hard (the default; DARS's offline re-distribution): the written pseudo-masks' class shares move to the
    labeled masks' (background 0.61, square 0.14, bar 0.25 here) from the stage-1 network's own argmax, which
    after a short stage 1 is far from them; the masks are the argmax of the shifted probabilities. An unknown
    mode is one config error."""
    from lesseg.errors import ConfigError

    data, out = tmp_path / "data", tmp_path / "run"
    make_folder_dataset(data)
    target = np.array([1024 - 144 - 256, 144, 256]) / 1024
    d = run_config(data, out, 0.0)  # align: none
    prepare(config_mod.from_dict(d))
    plain = np.stack(list(read_masks(out / "pseudo").values()))
    del d["method"]["align"]  # the default: hard
    cfg = config_mod.from_dict(d)
    prepare(cfg)  # the pseudo stage's inputs changed: it runs again with the same stage-1 network
    aligned = np.stack(list(read_masks(out / "pseudo").values()))
    share = lambda m: np.bincount(m.ravel(), minlength=C)[:C] / m.size
    assert np.abs(share(plain) - target).sum() > 0.3  # the unaligned argmax is far from the labeled shares
    assert np.abs(share(aligned) - target).sum() < 0.1
    probs = torch.cat(stage1_probs(cfg, out))  # 4,C,H,W
    logp = probs.clamp_min(1e-12).log()
    # the written class of every pixel is one whose shifted log-probability is the largest: some offset per
    # class explains all of them (the masks are an argmax of logp + s), checked by the pairwise margins
    m = torch.from_numpy(aligned).long()
    for a in range(C):
        for b in range(C):
            if a == b or not ((m == a).any() and (m == b).any()):
                continue
            # pixels labeled a need logp_a + s_a >= logp_b + s_b: s_b - s_a <= min over them of (logp_a - logp_b)
            upper = (logp[:, a] - logp[:, b])[m == a].min()
            lower = -(logp[:, b] - logp[:, a])[m == b].min()  # pixels labeled b: s_b - s_a >= logp_a - logp_b
            assert lower <= upper + 1e-5
    d["method"]["align"] = "sharp"
    with pytest.raises(ConfigError, match="method.align must be one of none, mean, hard"):
        prepare(config_mod.from_dict(d))


def test_mean_alignment_divides_by_the_predicted_class_frequencies(tmp_path):
    """method.align=mean (ReMixMatch's, offline): the written class of a pixel is the argmax of
    p * pi_lab / mean(p), pi_lab from the labeled masks and mean(p) over every unlabeled pixel."""
    data, out = tmp_path / "data", tmp_path / "run"
    make_folder_dataset(data)
    d = run_config(data, out, 0.0)
    d["method"]["align"] = "mean"
    cfg = config_mod.from_dict(d)
    prepare(cfg)
    written = torch.from_numpy(np.stack(list(read_masks(out / "pseudo").values()))).long()
    probs = torch.cat(stage1_probs(cfg, out))  # 4,C,H,W
    target = torch.tensor([1024 - 144 - 256, 144, 256]) / 1024
    mean = probs.sum((0, 2, 3)) / probs.sum()
    want = (probs.log() + (target.log() - mean.log()).view(1, -1, 1, 1)).argmax(1)
    assert (want != probs.argmax(1)).float().mean() > 0.05  # the shift moves pixels here
    assert (written == want).float().mean() > 0.999
