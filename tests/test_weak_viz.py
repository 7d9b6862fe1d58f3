"""Pictures and speed of the weakly supervised pipelines (issue 19): ``lesseg viz --weak`` on cam, ae and stc
runs (the cells are the run's CAMs, erased regions, pseudo-masks and true masks, checked pixel by pixel), the
CAM extraction speed in the stages' metrics, and the timer behind it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg import config
from lesseg.cli import main
from lesseg.data import stream_source
from lesseg.data.transforms import normalize
from lesseg.engine.stages import PIPELINE, STATUS
from lesseg.engine.trainer import train
from lesseg.methods import cam as cam_mod
from lesseg.methods.cam import Throughput, load_classifier
from lesseg.methods.weak.cam import multiscale_cams
from lesseg.methods.weak.erasing import fill_values, load_regions
from lesseg.viz import _blend, color_array, heat, weak_panels
from tests.conftest import tiny_dict

TAGGED = {"streams": {"labeled": {"split": "train", "batch_size": 4, "labeled": False, "true_masks": True}}}
METHODS = {
    "cam": {"name": "cam", "scales": [1.0, 2.0], "flip": True, "fg_threshold": 0.3, "bg_threshold": 0.1,
            "cam_batch": 5},
    "ae": {"name": "ae", "steps": 2, "scales": [1.0], "cam_batch": 5, "stop_loss": None},
    "stc": {"name": "stc", "saliency": "spectral_residual"},
    "mil": {"name": "mil", "max_proposals": 8, "min_area": 0.02, "proposal_batch": 5},
}


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory):
    """Finished tiny runs by method name, trained when first asked for."""
    done: dict[str, object] = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "run"
            cfg = config.from_dict(tiny_dict(shapes_root, out, method=METHODS[name], data=TAGGED),
                                   ["train.iters=2", "stages.classifier.train.iters=3"] if name != "stc"
                                   else ["train.iters=2"])
            train(cfg)
            done[name] = cfg
        return done[name]

    return get


def tagged(cfg, n: int):
    src = stream_source(cfg.data, cfg.data.streams.labeled)
    return src, src.samples("train")[:n]


def test_throughput_is_images_over_the_timed_seconds_summed_over_processes(monkeypatch):
    clock = iter([10.0, 12.0, 20.0, 23.0])  # two timed blocks: 2 s and 3 s
    monkeypatch.setattr(cam_mod.time, "perf_counter", lambda: next(clock))
    speed = Throughput(torch.device("cpu"))
    with speed.timing(4):
        pass
    with speed.timing(6):
        pass
    assert speed.images_per_s(lambda t: t) == pytest.approx(10 / 5)
    assert speed.images_per_s(lambda t: 3 * t) == pytest.approx(3 * 10 / 5)  # three processes at that rate
    assert Throughput(torch.device("cpu")).images_per_s(lambda t: t) == 0.0  # nothing timed


def test_cam_and_mil_stages_report_their_speed(runs):
    for name, stage in (("cam", "cams"), ("mil", "proposals")):
        status = json.loads((Path(runs(name).out) / STATUS).read_text())
        metrics = next(s["metrics"] for s in status if s["stage"] == stage)
        assert metrics["images_per_s"] > 0 and "pseudo_miou" in metrics, name


def test_cam_run_pictures_are_its_cams_masks_and_prediction(runs):
    cfg = runs("cam")
    out = Path(cfg.out)
    panels = weak_panels(out, n=3)
    assert set(panels) == {"cams", "masks"}  # no erasing in a cam run
    src, samples = tagged(cfg, 3)
    names = list(src.classes)

    rows, titles, labels = panels["cams"]
    shown = sorted({c for s in samples for c in s.tags if c != 0})
    assert titles == ["image", *[f"CAM {names[c]}" for c in shown]] and len(rows) == 3
    net = load_classifier(out / "classifier" / "last.pt", names)
    for row, s, label in zip(rows, samples, labels):
        image = src.read_image(s.image)
        assert np.array_equal(row[0], image) and label.startswith(s.name)
        x = normalize(list(cfg.data.mean), list(cfg.data.std))(torch.from_numpy(image).permute(2, 0, 1))
        tags = torch.zeros(1, len(names))
        tags[0, [c for c in s.tags if c != 0]] = 1.0
        with torch.no_grad():  # the run's scales and flip
            cams = multiscale_cams(net.cam, x[None], tags, [1.0, 2.0], True)[0]
        for c, cell in zip(shown, row[1:]):
            if c in s.tags:
                assert np.array_equal(cell, _blend(image, heat(cams[c].numpy(), vmax=1.0))), (s.name, c)
            else:  # a class the image is not tagged with has no CAM: a grey cell
                assert (cell == 235).all()

    rows, titles, _ = panels["masks"]
    status = json.loads((out / STATUS).read_text())
    miou = status[1]["metrics"]["pseudo_miou"]
    assert titles == ["image", "true mask", f"cams (mIoU {100 * miou:.1f})", "final network"]
    for row, s in zip(rows, samples):
        assert np.array_equal(row[1], color_array(src.read_mask(s.mask), len(names)))
        written = np.array(Image.open(out / "cams" / "masks" / f"{s.name}.png"))
        assert np.array_equal(row[2], color_array(written, len(names)))
        assert row[3].shape == row[0].shape


def test_ae_run_pictures_show_what_each_step_saw_and_mined(runs):
    cfg = runs("ae")
    out = Path(cfg.out)
    panels = weak_panels(out, n=2)
    rows, titles, _ = panels["erasing"]
    assert titles == ["image", "erase1: mined", "erase2: mined"]
    assert panels["masks"][1][2:4] == [t for t in panels["masks"][1] if t.startswith("erase")]
    src, samples = tagged(cfg, 2)
    pixel, _ = fill_values(cfg.data.mean, cfg.data.std)
    for row, s in zip(rows, samples):
        image = src.read_image(s.image)
        r1 = load_regions(out / "erase1" / "regions" / f"{s.name}.npz", 7, (32, 32)).any(0).numpy()
        r2 = load_regions(out / "erase2" / "regions" / f"{s.name}.npz", 7, (32, 32)).any(0).numpy()
        # step 1: the image, coloured where step 1 mined
        assert np.array_equal(row[1][~r1], image[~r1]) and (row[1][r1] != image[r1]).any(-1).all()
        # step 2: step 1's regions at the mean pixel (what classifier2 saw), coloured where step 2 added
        assert (row[2][r1] == pixel).all()
        added = r2 & ~r1
        assert np.array_equal(row[2][~r2], image[~r2])
        assert not added.any() or (row[2][added] != image[added]).any(-1).all()
    status = json.loads((out / STATUS).read_text())
    assert status[1]["metrics"]["images_per_s"] > 0 and status[3]["metrics"]["images_per_s"] > 0


def test_stc_masks_of_images_a_stage_did_not_label_are_grey(runs):
    cfg = runs("stc")
    rows, titles, _ = weak_panels(Path(cfg.out), n=8)["masks"]
    _, samples = tagged(cfg, 8)
    simple = [len(set(s.tags) - {0}) == 1 for s in samples]
    assert any(simple) and not all(simple)
    col = titles.index(next(t for t in titles if t.startswith("saliency")))
    for row, one in zip(rows, simple):  # the saliency stage labels the simple images only
        assert (row[col] == 235).all() != one
    assert "cams" not in weak_panels(Path(cfg.out), n=1)  # no classifier, no CAMs


def test_lesseg_viz_weak_writes_the_pictures_and_reads_a_given_config(runs, tmp_path, capsys):
    cfg = runs("cam")
    out = Path(cfg.out)
    assert main(["viz", "--weak", str(out), "--out", str(tmp_path / "a"), "--n", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["weak_cams.png", "weak_masks.png"]
    assert Image.open(tmp_path / "a" / "weak_masks.png").size[0] > 300
    # a run folder without pipeline.yaml: one clear message, or the config given by hand
    run = tmp_path / "copy"
    shutil.copytree(out, run, symlinks=True)
    (run / PIPELINE).rename(tmp_path / "run.yaml")
    assert main(["viz", "--weak", str(run), "--out", str(tmp_path / "b")]) != 0
    assert "has no pipeline.yaml" in capsys.readouterr().err
    assert main(["viz", "--weak", str(run), "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "b"),
                 "--n", "1"]) == 0
    assert (tmp_path / "b" / "weak_cams.png").is_file()
    assert main(["viz", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "c")]) != 0
