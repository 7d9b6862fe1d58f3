"""The ``lesseg`` command line: every command on tiny data, its output format and its exit codes.

Most commands run in this process through ``lesseg.cli.main`` (a subprocess pays ~5 s of interpreter and
torch start-up on the shared CPUs); one test per entry point (``python -m lesseg``) runs a real subprocess.
The helpers here are shared with ``test_bad_input.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_dict
from fake_trees import make_folder, make_gtav
from PIL import Image

from lesseg import config
from lesseg.cli import main
from lesseg.data import stream_source
from lesseg.engine import checkpoint as ckpt
from lesseg.engine import train

# 3 classes; 5 labeled 16x32 images (png, jpg, jpeg, png, jpg) in splits/labeled.txt, the last in val.txt
CLASS_SETS = ((0, 1), (0, 2), (0, 1, 2), (1, 2), (0, 1, 2))
CLASSES = ("a", "b", "c")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``lesseg ARGS`` in this process: (exit code, stdout, stderr). argparse errors exit with code 2."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m lesseg ARGS`` in a fresh interpreter (one thread: the CPUs are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lesseg", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def folder_tree(tmp: Path, class_sets=CLASS_SETS, classes=CLASSES, **kw):
    """make_folder without unlabeled images, plus ``splits/val.txt`` listing the last image."""
    tree = make_folder(tmp, class_sets=class_sets, classes=classes, unlabeled=0, **kw)
    (tree.root / "splits" / "val.txt").write_text(f"{tree.splits['labeled'][-1]}\n")
    return tree


def folder_config(
    tmp: Path, root: Path, split: str = "labeled", val: str = "val", options: dict | None = None
) -> Path:
    """A YAML config: 2 supervised steps on the folder dataset at ``root`` (training split ``split``,
    validation split ``val``), run folder ``tmp/run``."""
    d = tiny_dict(root, tmp / "run", train={"iters": 2})
    d["data"].update(
        dataset="folder",
        options=options or {},
        val_split=val,
        streams={"labeled": {"split": split, "batch_size": 2}},
    )
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses get: on shared CPUs, 2 threads make tiny convs 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A 2-step supervised run on a 3-class folder dataset: (tree, config path, last.pt)."""
    tmp = tmp_path_factory.mktemp("trained")
    tree = folder_tree(tmp)
    cfg_path = folder_config(tmp, tree.root)
    train(config.load(cfg_path))
    return tree, cfg_path, tmp / "run" / "last.pt"


def test_python_m_lesseg_help_lists_every_command():
    r = run_subprocess("--help")
    assert r.returncode == 0, r.stderr
    for command in ("train", "eval", "predict", "export", "splits", "data"):
        assert command in r.stdout
    assert "Traceback" not in r.stderr


def test_train_resume_continues_at_the_saved_step(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root)
    rc, out, err = run_cli(capsys, "train", cfg_path)
    assert rc == 0, err
    assert 0.0 <= last_json(out)["miou"] <= 1.0
    assert ckpt.load(tmp_path / "run" / "last.pt")["step"] == 2
    # the override after an option is accepted too (argparse alone rejects it)
    rc, out, err = run_cli(capsys, "train", cfg_path, "--resume", "train.iters=4")
    assert rc == 0, err
    assert ckpt.load(tmp_path / "run" / "last.pt")["step"] == 4
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # a restart from step 0 would log step 2 twice
    assert [e["step"] for e in events if e["event"] == "train"] == [2, 4]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]


def test_eval_last_line_equals_the_trainers_final_eval(trained, capsys):
    _, cfg_path, last = trained
    rc, out, err = run_cli(capsys, "eval", cfg_path, "--checkpoint", last)
    assert rc == 0, err
    got = last_json(out)
    final = ckpt.load(last)["eval"]  # what the trainer evaluated before saving this checkpoint
    logged = [json.loads(line) for line in (last.parent / "metrics.jsonl").read_text().splitlines()][-1]
    assert logged["event"] == "eval"
    assert set(got["iou"]) == set(CLASSES)
    assert got["miou"] == final["miou"] == logged["miou"]
    assert got["iou"] == final["iou"] == logged["iou"]
    assert got["mode"] == final["mode"] == "whole"


def test_eval_overrides_after_the_checkpoint_option_change_the_eval_settings(trained, capsys):
    _, cfg_path, last = trained
    rc, out, err = run_cli(
        capsys, "eval", cfg_path, "--checkpoint", last, "eval.mode=slide", "eval.crop_size=[16,16]"
    )
    assert rc == 0, err
    assert last_json(out)["mode"].startswith("slide crop=[16, 16]")


def test_eval_with_a_config_whose_model_differs_from_the_checkpoint_is_one_clear_error(trained, capsys):
    _, cfg_path, last = trained
    rc, _, err = run_cli(capsys, "eval", cfg_path, "--checkpoint", last, "model.decoder_channels=8")
    assert rc == 2
    assert err.startswith("lesseg: error: ") and len(err.strip().splitlines()) == 1, err
    assert str(last) in err and "model" in err


def test_eval_net_evaluates_the_named_network_of_the_method(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    d = yaml.safe_load(folder_config(tmp_path, tree.root).read_text())
    d["method"] = {"name": "mean_teacher"}
    d["data"]["streams"]["unlabeled"] = {"split": "labeled", "batch_size": 2, "labeled": False, "strong": True}
    cfg_path = tmp_path / "mt.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    rc, _, err = run_cli(capsys, "train", cfg_path)
    assert rc == 0, err
    last = tmp_path / "run" / "last.pt"
    state = ckpt.load(last)
    for net, cls in (("net", 1), ("teacher", 2)):  # the student predicts class 1 everywhere, the teacher 2
        state["method"][f"{net}.head.classifier.weight"].zero_()
        state["method"][f"{net}.head.classifier.bias"].copy_(10.0 * torch.eye(len(CLASSES))[cls])
    ckpt.save_atomic(state, last)
    got = {}
    for net in (None, "net", "teacher"):
        rc, out, err = run_cli(capsys, "eval", cfg_path, "--checkpoint", last, "--split", "labeled",
                               *(["--net", net] if net else []))
        assert rc == 0, err
        got[net] = last_json(out)
    assert got[None] == got["teacher"] and got[None]["net"] == "teacher"  # Mean Teacher evaluates its teacher
    for net, cls in (("net", 1), ("teacher", 2)):
        assert got[net]["net"] == net and got[net]["iou"][CLASSES[cls]] > 0
        assert all(not v for name, v in got[net]["iou"].items() if name != CLASSES[cls])
    rc, _, err = run_cli(capsys, "eval", cfg_path, "--checkpoint", last, "--net", "student")
    assert rc == 2 and "--net 'student'" in err and "net, teacher" in err


def _palette_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P", path
        return np.array(im)


def test_predict_writes_one_palette_mask_per_input_at_its_size_and_overlays(trained, tmp_path, capsys):
    tree, _, last = trained
    other = tmp_path / "in" / "other.png"
    other.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(other)
    (tree.root / "images" / "notes.txt").write_text("not an image")  # skipped in a folder input
    out = tmp_path / "pred"
    rc, _, err = run_cli(
        capsys, "predict", tree.root / "images", other, "--checkpoint", last, "--out", out, "--overlay"
    )
    assert rc == 0, err
    inputs = {p.stem: p for p in (tree.root / "images").iterdir() if p.suffix != ".txt"} | {"other": other}
    assert len(inputs) == len(CLASS_SETS) + 1
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{s}.png" for s in inputs)
    assert sorted(p.name for p in out.glob("*_overlay.jpg")) == sorted(f"{s}_overlay.jpg" for s in inputs)
    for stem, path in inputs.items():
        with Image.open(path) as im:
            size = im.size
        mask = _palette_png(out / f"{stem}.png")
        assert mask.shape == (size[1], size[0]) and mask.max() < len(CLASSES), stem
        with Image.open(out / f"{stem}_overlay.jpg") as ov:
            assert ov.size == size
    # the mask is the argmax of the network on the image normalized by hand (catches a wrong normalization)
    from lesseg.engine.inference import load_checkpoint_net

    net, cfg, _, _ = load_checkpoint_net(last)
    x = (
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(cfg.data.mean)[:, None, None]
    ) / torch.tensor(cfg.data.std)[:, None, None]
    with torch.no_grad():
        expected = net(x[None])["logits"].argmax(1)[0].numpy()
    assert (_palette_png(out / "other.png") == expected).mean() > 0.99


def test_predict_missing_input_is_one_clear_error(trained, tmp_path, capsys):
    _, _, last = trained
    missing = tmp_path / "nope" / "photo.jpg"
    rc, _, err = run_cli(capsys, "predict", missing, "--checkpoint", last, "--out", tmp_path / "pred")
    assert rc == 2 and err.startswith("lesseg: error: ") and str(missing) in err, err
    assert not (tmp_path / "pred").exists()


def test_predict_two_inputs_with_the_same_stem_is_an_error_not_a_silent_overwrite(trained, tmp_path, capsys):
    _, _, last = trained
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"
    for p in (a, b):
        p.parent.mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    rc, _, err = run_cli(capsys, "predict", a, b, "--checkpoint", last, "--out", tmp_path / "pred")
    assert rc == 2 and str(a) in err and str(b) in err, err


def test_export_onnx_matches_pytorch_on_new_inputs_with_dynamic_batch_and_size(trained, tmp_path, capsys):
    import onnxruntime as ort

    from lesseg.engine.inference import load_checkpoint_net

    _, _, last = trained
    model = tmp_path / "model.onnx"
    rc, out, err = run_cli(capsys, "export", "--checkpoint", last, "--out", model)
    assert rc == 0, err
    assert str(model) in out
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # self-contained: weights not in a side file
    net, _, _, _ = load_checkpoint_net(last)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(123)
    shapes = [(1, 3, 32, 32), (2, 3, 32, 32), (2, 3, 40, 24)]  # not the traced input; batch 2; other H, W
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = net(x)["logits"].numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape == (shape[0], len(CLASSES), *shape[2:])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _split(path: Path) -> list[str]:
    return path.read_text().split()


def test_splits_partition_the_split_with_ceil_count_deterministically(tiny_cfg, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg = tiny_cfg()
    config.save(cfg, cfg_path)
    names = [s.name for s in stream_source(cfg.data).samples("train")]
    assert len(names) == 32
    for amount, count in (("1/4", 8), ("1/3", math.ceil(32 / 3))):
        parts = []
        for run in ("a", "b"):
            out = tmp_path / f"{amount.replace('/', '-')}{run}"
            rc, stdout, err = run_cli(
                capsys, "splits", cfg_path, "--labeled", amount, "--seed", 0, "--out", out
            )
            assert rc == 0, err
            labeled, unlabeled = _split(out / "labeled.txt"), _split(out / "unlabeled.txt")
            assert len(labeled) == count and last_json(stdout)["labeled"] == count
            assert not set(labeled) & set(unlabeled)
            assert sorted(labeled + unlabeled) == sorted(names)
            parts.append((labeled, unlabeled))
        assert parts[0] == parts[1], "same seed, different partition"


# masks of make_folder's default class sets (0,1), (0,2), (0,1,3): equal vertical bands over 32 columns of 16
# rows, column 0 ignored. img_000: 15+16 columns, img_001: 15+16, img_002: 9+10+12 (img_003 has no mask).
FOLDER_PIXELS = {"background": 16 * (15 + 15 + 9), "cat": 16 * (16 + 10), "dog": 16 * 16, "bird": 16 * 12}


def test_data_stats_last_line_has_images_and_per_class_pixels_of_a_split(tmp_path, capsys):
    tree = make_folder(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root, val="labeled")
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path)  # the first stream's split: labeled.txt
    assert rc == 0, err
    assert last_json(out) == {"split": "labeled", "images": 3, "pixels": FOLDER_PIXELS}
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path, "--split", "train")  # + the unlabeled image
    assert rc == 0, err
    assert last_json(out) == {"split": "train", "images": 4, "pixels": FOLDER_PIXELS}
    (tree.root / "splits" / "two.txt").write_text("img_001\nimg_002\n")
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path, "data.streams.labeled.split=two")
    assert rc == 0, err
    two = {"background": 16 * (15 + 9), "cat": 16 * 10, "dog": 16 * 16, "bird": 16 * 12}  # img_001, img_002
    assert last_json(out) == {"split": "two", "images": 2, "pixels": two}


def test_data_stats_and_a_split_check_run_without_importing_torch(tmp_path):
    """The data commands start in about a second: neither the config (its method section unchecked) nor the
    data layer imports torch (1.5-3 s here) when they only read files; the same result as in-process."""
    tree = make_folder(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root, val="labeled")
    code = (
        "import sys; from lesseg.cli import main; "
        f"rc = [main(['data', a, {str(cfg_path)!r}, '--split', s]) for a, s in (('stats', 'train'), "
        "('check', 'labeled'))]; "
        "print(rc, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[0]) == {"split": "train", "images": 4, "pixels": FOLDER_PIXELS}
    assert lines[-1] == "[0, 0] False"


def test_data_check_reports_every_problem_once_with_its_path(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    root = tree.root
    truncated = root / "images" / "img_000.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    out_of_range = root / "masks" / "img_001.png"
    mask = np.array(Image.open(out_of_range))
    mask[3, 3] = 7
    Image.fromarray(mask).save(out_of_range)
    small = root / "masks" / "img_002.png"
    Image.fromarray(np.array(Image.open(small))[:8]).save(small)
    cfg_path = folder_config(tmp_path, root, val="labeled")  # the stream's split is also the validation split
    rc, out, err = run_cli(capsys, "data", "check", cfg_path)
    assert rc == 1, out + err
    for path in (truncated, out_of_range, small):
        assert out.count(str(path)) == 1, (path, out)
    assert "[7]" in out and "Traceback" not in out + err
    # a clean dataset passes
    clean = folder_tree(tmp_path / "clean")
    rc, out, err = run_cli(capsys, "data", "check", folder_config(tmp_path / "clean", clean.root))
    assert rc == 0 and "problem" not in out, out + err


def test_splits_labeled_list_writes_the_rest_of_the_split_as_unlabeled(tmp_path, capsys):
    tree = make_folder(tmp_path, unlabeled=2)  # train: img_000..img_004; labeled.txt: img_000..img_002
    cfg_path = folder_config(tmp_path, tree.root)
    mine = tmp_path / "mine.txt"
    mine.write_text("img_001\nimg_004\n")
    rc, out, err = run_cli(capsys, "splits", cfg_path, "--split", "train", "--labeled-list", mine,
                           "--out", tmp_path / "s")
    assert rc == 0, err
    assert last_json(out) == {"labeled": 2, "unlabeled": 3, "unlabeled_path": str(tmp_path / "s" / "unlabeled.txt")}
    assert _split(tmp_path / "s" / "unlabeled.txt") == ["img_000", "img_002", "img_003"]
    assert not (tmp_path / "s" / "labeled.txt").exists()  # the list is the user's: not rewritten
    # a split name works too, and the unlabeled part may come from another split
    rc, out, err = run_cli(capsys, "splits", cfg_path, "--labeled-list", "labeled", "--unlabeled-from", "train",
                           "--out", tmp_path / "t")
    assert rc == 0, err
    assert _split(tmp_path / "t" / "unlabeled.txt") == ["img_003", "img_004"]
    for amounts, message in (
        (["--labeled", "1", "--labeled-list", mine], "not allowed with"),
        ([], "one of the arguments --labeled --labeled-list is required"),
    ):  # exactly one of --labeled and --labeled-list
        rc, _, err = run_cli(capsys, "splits", cfg_path, *amounts, "--out", tmp_path / "u")
        assert rc == 2 and message in err, err
    rc, _, err = run_cli(capsys, "splits", cfg_path, "--split", "labeled", "--labeled-list", "labeled",
                         "--out", tmp_path / "u")
    assert rc == 2 and "split 'labeled - labeled' of" in err and "is empty" in err, err


def test_splits_unlabeled_from_takes_the_rest_of_another_split(tmp_path, capsys):
    tree = make_folder(tmp_path, unlabeled=2)
    cfg_path = folder_config(tmp_path, tree.root)
    rc, out, err = run_cli(capsys, "splits", cfg_path, "--split", "labeled", "--labeled", "2",
                           "--unlabeled-from", "train", "--out", tmp_path / "s")
    assert rc == 0, err
    labeled, unlabeled = _split(tmp_path / "s" / "labeled.txt"), _split(tmp_path / "s" / "unlabeled.txt")
    assert len(labeled) == 2 and set(labeled) < set(tree.splits["labeled"])
    assert sorted(labeled + unlabeled) == tree.splits["train"]
    assert last_json(out)["unlabeled"] == 3


def test_data_check_and_stats_read_a_split_difference(tmp_path, capsys):
    tree = make_folder(tmp_path, unlabeled=2)
    cfg_path = folder_config(tmp_path, tree.root, val="labeled")
    unlabeled = "data.streams.unlabeled={split: 'train - labeled', batch_size: 2, labeled: false}"
    rc, out, err = run_cli(capsys, "data", "check", cfg_path, unlabeled)
    assert rc == 0, out + err
    assert "train - labeled: 2 images, 0 problem(s)" in err
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path, "--split", "train - labeled")
    assert rc == 0, err
    assert last_json(out)["images"] == 2 and sum(last_json(out)["pixels"].values()) == 0


def test_data_check_lists_resized_gtav_masks_as_warnings_not_problems(tmp_path, capsys):
    tree = make_gtav(tmp_path)  # 00003's label is half its image's size
    second = tree.root / "labels" / "00001.png"
    with Image.open(second) as im:
        im.crop((0, 0, 30, 16)).save(second)  # 30x16 for a 32x16 image
    d = tiny_dict(tree.root, tmp_path / "run")
    d["data"].update(dataset="gtav", options={}, val_split="all", streams={"labeled": {"split": "all", "batch_size": 2}})
    cfg_path = tmp_path / "gtav.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    rc, out, err = run_cli(capsys, "data", "check", cfg_path)
    assert rc == 0, out + err
    assert out == ""  # no problem
    first = tree.root / "labels" / "00003.png"
    assert (f"warning: 2 mask(s) of all differ in size from their image and are resized to it (nearest "
            f"neighbour):\n  {second} (30x16, image {tree.root / 'images' / '00001.png'} 32x16)\n"
            f"  {first} (16x8, image {tree.root / 'images' / '00003.png'} 32x16)\n") in err
    assert err.count("labels/") == 2
    assert "all: 3 images, 0 problem(s), 2 resized mask(s)" in err
    rc, out, err = run_cli(capsys, "data", "check", cfg_path, "--split", "train")  # root/train.txt
    assert rc == 0 and "train: 2 images, 0 problem(s), 1 resized mask(s)" in err, out + err
