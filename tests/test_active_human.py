"""A person as RIPU's annotator: the run pauses at a round (resumable), ``lesseg active export`` writes the
requests (also as a CVAT "Segmentation mask 1.1" archive), ``lesseg active import`` takes labels only inside
the requested regions, refuses wrong class maps and sizes without changing anything, and the resumed run
with the true labels ends exactly where the simulated (gt) annotator's run ends."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg.cli import main
from lesseg.data.label_store import LabelStore
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.annotation import _colors, cvat_names, export_requests, import_labels
from lesseg.engine.trainer import Trainer
from lesseg.errors import PAUSED_EXIT, DataError, LessegError, Paused

STREAMS = {"streams": {"source": {"split": "train", "batch_size": 4},
                       "target": {"split": "val", "batch_size": 4, "labeled": False}}}
METHOD = {"name": "ripu", "mode": "region", "rounds": [0.34, 0.67], "ratio": 0.05}


def _run(tiny_cfg, annotator: str, out: Path):
    return tiny_cfg(["train.iters=6", f"out={out}"], method={**METHOD, "annotator": annotator}, data=STREAMS)


def _truth(trainer) -> list[np.ndarray]:
    data = trainer.streams["target"].dataset
    return [data.source.read_mask(s.mask) for s in data.samples]


def _write_true_labels(export: Path, truths: list[np.ndarray], skip: set[str] = frozenset()) -> dict:
    """labels/<name>.png = the ground truth inside the requested regions (255 elsewhere), as a careful person."""
    req = json.loads((export / "requests.json").read_text())
    for item in req["images"]:
        if item["name"] in skip:
            continue
        inside = np.array(Image.open(export / "regions" / f"{item['name']}.png")) == 255
        lab = np.where(inside, truths[item["index"]], 255).astype(np.uint8)
        Image.fromarray(lab).save(export / "labels" / f"{item['name']}.png")
    return req


def test_label_store_requests_survive_a_checkpoint_and_resolve_into_entries():
    store = LabelStore(3)
    store.request(1, [0, 1, 4, 5], [0, 0, 1, 1], 2, (4, 4))
    assert store.pending() == {"round": 2, "images": 1, "regions": 2, "pixels": 4}
    copy = LabelStore(3)
    copy.set_extra_state(store.get_extra_state())
    assert copy.pending() == store.pending() and copy.requested(1)[1].tolist() == [0, 0, 1, 1]
    with pytest.raises(LessegError, match="round 2's requests still wait"):
        copy.request(0, [3], [0], 3, (4, 4))
    assert copy.resolve({1: np.array([3, 255, 1, 1])}) == 4  # 255: asked, left unlabeled
    assert copy.pending() is None and copy.count(2) == 4 and copy.labeled(1, (4, 4)).ravel()[1]
    assert copy.rasterize(1, (4, 4)).ravel()[[0, 1, 4, 5]].tolist() == [3, 255, 1, 1]
    with pytest.raises(LessegError, match="labeled twice"):
        copy.request(1, [4], [0], 3, (4, 4))


def test_human_annotator_pauses_exports_imports_and_ends_like_the_gt_annotator(tiny_cfg, tmp_path):
    gt = Trainer(_run(tiny_cfg, "gt", tmp_path / "gt"))
    gt.fit()
    truths = _truth(gt)

    run = tmp_path / "human"
    trainer = Trainer(_run(tiny_cfg, "human", run))
    with pytest.raises(Paused, match="selection round 0 asks a person to label"):
        trainer.fit()
    assert ckpt.load(run / "last.pt")["step"] == 2
    with pytest.raises(Paused, match="round 0 asks"):  # a resume before the import refuses to train
        Trainer(_run(tiny_cfg, "human", run), resume=True).fit()

    for r in (0, 1):
        export = tmp_path / f"export{r}"
        summary = export_requests(run, export, progress=False)
        assert summary["round"] == r
        req = _write_true_labels(export, truths)
        n = len(req["images"])
        assert n == len(truths)  # every target image got regions
        for sub in ("images", "prelabels"):
            assert len(list((export / sub).iterdir())) == n
        assert len(list((export / "regions").glob("*_overlay.png"))) == n
        assert len(list((export / "regions").glob("*.json"))) == n
        report = import_labels(run, export)
        ignored = sum(int((truths[i["index"]][np.array(Image.open(export / "regions" / f"{i['name']}.png")) == 255]
                           == 255).sum()) for i in req["images"])  # the ground truth's own 255 border
        assert report.labeled_pixels == report.requested_pixels - ignored > 0
        assert not report.unlabeled_regions and not report.outside and not report.missing
        if r == 0:
            with pytest.raises(Paused, match="selection round 1"):
                Trainer(_run(tiny_cfg, "human", run), resume=True).fit()
    final = Trainer(_run(tiny_cfg, "human", run), resume=True)
    final.fit()
    # the person labeled exactly what the simulated annotator copied: same picks, same labels, same weights
    a, b = gt.method.label_store, final.method.label_store
    for i in range(a.num_images):
        assert np.array_equal(a.rasterize(i, a.size(i)), b.rasterize(i, b.size(i)))
    for (k, x), (_, y) in zip(gt.method.state_dict().items(), final.method.state_dict().items()):
        if torch.is_tensor(x):
            assert torch.equal(x, y), k
    events = [json.loads(x)["event"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("import") == 2 and events.count("round") == 2


def _paused_run(tiny_cfg, tmp_path) -> tuple[Path, Path, list[np.ndarray]]:
    run = tmp_path / "run"
    trainer = Trainer(_run(tiny_cfg, "human", run))
    truths = _truth(trainer)
    with pytest.raises(Paused):
        trainer.fit()
    export = tmp_path / "export"
    export_requests(run, export, progress=False)
    return run, export, truths


def test_import_takes_only_the_regions_and_reports_what_is_missing_or_outside(tiny_cfg, tmp_path):
    run, export, truths = _paused_run(tiny_cfg, tmp_path)
    req = json.loads((export / "requests.json").read_text())
    _, second, third = (item["name"] for item in req["images"][:3])
    _write_true_labels(export, truths, skip={third})
    # the second image: labeled everywhere (outside the regions too) except its first region
    regions = json.loads((export / "regions" / f"{second}.json").read_text())
    inside = np.array(Image.open(export / "regions" / f"{second}.png")) == 255
    full = truths[req["images"][1]["index"]].astype(np.uint8).copy()
    x0, y0, x1, y1 = regions[0]["bbox"]
    full[y0 : y1 + 1, x0 : x1 + 1] = 255
    Image.fromarray(full).save(export / "labels" / f"{second}.png")
    report = import_labels(run, export)
    assert report.missing == [third]
    assert report.unlabeled_regions == {second: 1}
    assert report.outside[second] == int(((full != 255) & ~inside).sum()) > 0
    store = ckpt.load(run / "last.pt")["method"]["label_store._extra_state"]
    s = LabelStore()
    s.set_extra_state(store)
    assert s.pending() is None
    i2 = req["images"][1]["index"]
    got = s.rasterize(i2, s.size(i2))
    assert ((got != 255) <= inside).all()  # nothing outside the requested regions was taken
    assert (got[inside & (full != 255)] == full[inside & (full != 255)]).all()
    assert (s.rasterize(req["images"][2]["index"], s.size(req["images"][2]["index"])) == 255).all()


@pytest.mark.parametrize("case", ["class", "size", "cvat_name", "cvat_colour", "nothing"])
def test_a_failing_import_changes_nothing(tiny_cfg, tmp_path, case):
    run, export, truths = _paused_run(tiny_cfg, tmp_path)
    before = (run / "last.pt").read_bytes()
    req = _write_true_labels(export, truths)
    name = req["images"][-1]["name"]
    source: Path = export
    if case == "class":
        lab = np.array(Image.open(export / "labels" / f"{name}.png"))
        lab[0, 0] = 9  # 7 classes
        Image.fromarray(lab).save(export / "labels" / f"{name}.png")
        err, match = DataError, rf"{name}.png: values \[9\] are not classes"
    elif case == "size":
        Image.fromarray(np.zeros((5, 7), np.uint8)).save(export / "labels" / f"{name}.png")
        err, match = DataError, f"{name}.png is 7x5, the image is 32x32"
    elif case in ("cvat_name", "cvat_colour"):
        source = tmp_path / "cvat.zip"
        with zipfile.ZipFile(export / "cvat_prelabels.zip") as z, zipfile.ZipFile(source, "w") as out:
            for n in z.namelist():
                data = z.read(n)
                if n == "labelmap.txt" and case == "cvat_name":
                    data = data.replace(b"\ndisk:", b"\ncircle:")
                if n == f"SegmentationClass/{name}.png" and case == "cvat_colour":
                    rgb = np.array(Image.open(io.BytesIO(data)))
                    rgb[3, 4] = (1, 2, 3)
                    buf = io.BytesIO()
                    Image.fromarray(rgb).save(buf, format="PNG")
                    data = buf.getvalue()
                out.writestr(n, data)
        err, match = (DataError, "CVAT label 'circle' is not a class") if case == "cvat_name" else \
            (DataError, r"colour \(1, 2, 3\) at \(4, 3\) is not in labelmap.txt")
    else:
        source = tmp_path / "empty"
        source.mkdir()
        err, match = LessegError, "no label file for any of the"
    with pytest.raises(err, match=match):
        import_labels(run, source)
    assert (run / "last.pt").read_bytes() == before


def test_cvat_round_trip_reads_the_exported_prelabels_back(tiny_cfg, tmp_path):
    """Importing the CVAT archive untouched gives the network's pre-labels inside the regions, with black
    (CVAT's background) as unlabeled, and a class named background mapped through `background-class`."""
    run, export, _ = _paused_run(tiny_cfg, tmp_path)
    req = json.loads((export / "requests.json").read_text())
    with zipfile.ZipFile(export / "cvat_prelabels.zip") as z:
        labelmap = z.read("labelmap.txt").decode()
        assert "background:0,0,0::" in labelmap and "background-class:" in labelmap
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == [i["name"] for i in req["images"]]
    expected = {}
    for item in req["images"]:
        pre = np.array(Image.open(export / "prelabels" / f"{item['name']}.png"))
        inside = np.array(Image.open(export / "regions" / f"{item['name']}.png")) == 255
        expected[item["index"]] = np.where(inside, pre, 255)
    assert main(["active", "import", str(run), str(export / "cvat_prelabels.zip")]) == 0
    s = LabelStore()
    s.set_extra_state(ckpt.load(run / "last.pt")["method"]["label_store._extra_state"])
    for i, exp in expected.items():
        assert np.array_equal(s.rasterize(i, exp.shape), exp)
    assert cvat_names(["background", "disk"]) == ["background-class", "disk"]
    assert not (_colors(20) == 0).all(1).any()  # no class is black


def test_cli_exits_with_the_paused_status_and_names_the_next_commands(tiny_cfg, tmp_path, capsys):
    from lesseg import config

    cfg = _run(tiny_cfg, "human", tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    config.save(cfg, path)
    assert main(["train", str(path)]) == PAUSED_EXIT
    err = capsys.readouterr().err
    assert "lesseg active export" in err and "--resume" in err and "paused" in err
    assert main(["active", "export", str(tmp_path / "run"), "--out", str(tmp_path / "ex")]) == 0
    assert main(["active", "export", str(tmp_path / "run"), "--out", str(tmp_path / "ex")]) == 2  # not empty
