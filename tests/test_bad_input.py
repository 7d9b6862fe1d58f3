"""Bad input gets one clear error naming the culprit, before training starts (architecture.md, item 9).

``lesseg train`` on a folder dataset with one bad file, a bad split or a bad config value must exit with
code 2 and a ``lesseg: error: ...`` line (or a short list headed by it) that names the file or the key, with
no traceback, and without taking a training step. A checkpoint crafted to run code is refused unexecuted.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# one_thread: the autouse one-intra-op-thread fixture, imported to apply here too
from test_cli import folder_config, folder_tree, last_json, one_thread, run_cli, run_subprocess  # noqa: F401


def assert_one_clear_error(rc: int, err: str, *culprits, max_lines: int = 2) -> None:
    """Exit code 2, one ``lesseg: error:`` heading (with at most a short list under it), no traceback, and
    every culprit (a path or a key) named."""
    assert rc == 2, err
    assert err.startswith("lesseg: error: ") and err.count("lesseg: error") == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= max_lines, err
    for culprit in culprits:
        assert str(culprit) in err, (culprit, err)


def assert_no_training_step(run: Path) -> None:
    assert not (run / "last.pt").exists()
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or '"train"' not in metrics.read_text()


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _out_of_range(root: Path) -> Path:
    path = root / "masks" / "img_002.png"
    mask = np.array(Image.open(path))
    mask[5, 5] = 7  # 3 classes
    Image.fromarray(mask).save(path)
    return path


def _half_height_mask(root: Path) -> Path:
    path = root / "masks" / "img_003.png"
    Image.fromarray(np.array(Image.open(path))[:8]).save(path)
    return path


def _ghost_in_split(root: Path) -> Path:
    with open(root / "splits" / "labeled.txt", "a") as f:
        f.write("ghost\n")
    return root / "images" / "ghost"


def _delete_split(root: Path) -> Path:
    path = root / "splits" / "labeled.txt"
    path.unlink()
    return path


# each spoils one thing of the training split of the folder tree (img_000.png, img_001.jpg, img_002.jpeg,
# img_003.png; the validation split, img_004.jpg, stays clean) and returns what the message must name
SPOILERS = {
    "truncated_png_image": lambda root: _truncate(root / "images" / "img_000.png"),
    "truncated_jpeg_image": lambda root: _truncate(root / "images" / "img_001.jpg"),
    "mask_value_7_with_3_classes": _out_of_range,
    "mask_smaller_than_image": _half_height_mask,
    "split_lists_a_stem_without_image": _ghost_in_split,
    "missing_split_file": _delete_split,
}


@pytest.mark.parametrize("spoil", SPOILERS.values(), ids=SPOILERS.keys())
def test_bad_data_stops_train_before_the_first_step_with_one_error_naming_the_file(spoil, tmp_path, capsys):
    tree = folder_tree(tmp_path)
    culprit = spoil(tree.root)
    rc, out, err = run_cli(capsys, "train", folder_config(tmp_path, tree.root))
    assert_one_clear_error(rc, err, culprit)
    assert out == ""
    assert_no_training_step(tmp_path / "run")


def test_mask_errors_say_what_is_wrong(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    bad = _out_of_range(tree.root)
    small = _half_height_mask(tree.root)
    rc, _, err = run_cli(capsys, "train", folder_config(tmp_path, tree.root))
    assert_one_clear_error(rc, err, bad, small, tree.root / "images" / "img_003.png", max_lines=3)
    assert "[7]" in err and "0..2" in err  # the bad value and the valid range
    assert "32x16" in err and "32x8" in err  # both sizes


def test_corrupt_image_error_through_the_real_entry_point_has_no_traceback(tmp_path):
    tree = folder_tree(tmp_path)
    culprit = tree.root / "images" / "img_000.png"
    culprit.write_bytes(b"not a PNG at all\n" * 8)  # an unidentifiable header, not only a cut-off file
    r = run_subprocess("train", folder_config(tmp_path, tree.root))
    lines = [line for line in r.stderr.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    assert r.returncode == 2, r.stderr
    assert lines and lines[0].startswith("lesseg: error: ") and len(lines) <= 2, r.stderr
    assert str(culprit) in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.count(str(culprit)) == 1, r.stderr  # PIL's own message would name it a second time
    assert_no_training_step(tmp_path / "run")


CONFIG_ERRORS = {
    # id: (YAML change or None, override or None, what the message must name)
    "unknown_key_in_yaml": ({"data": {"bogus": 1}}, None, ["data.bogus"]),
    "unknown_key_in_override": (None, "train.itres=3", ["train.itres", "iters"]),  # with a suggestion
    "wrongly_typed_value": (None, "train.iters=abc", ["train.iters", "abc"]),
    "wrongly_typed_value_in_yaml": ({"train": {"iters": "lots"}}, None, ["train.iters", "lots"]),
    "unknown_dataset": (None, "data.dataset=foldr", ["foldr", "folder"]),  # and the known ones
    "unknown_method": (None, "method.name=meanteacher", ["meanteacher", "mean_teacher"]),
    "unknown_dataset_option": (None, "data.options.binary=true", ["binary", "binary_mask"]),
}


@pytest.mark.parametrize("change,override,names", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_bad_config_is_one_line_naming_the_key(change, override, names, tmp_path, capsys):
    tree = folder_tree(tmp_path)
    cfg_path = folder_config(tmp_path, tree.root)
    if change:
        d = yaml.safe_load(cfg_path.read_text())
        for section, values in change.items():
            d[section].update(values)
        cfg_path.write_text(yaml.safe_dump(d))
        names = [*names, cfg_path]  # a YAML error names the file
    rc, _, err = run_cli(capsys, "train", cfg_path, *([override] if override else []))
    assert_one_clear_error(rc, err, *names, max_lines=1)
    assert_no_training_step(tmp_path / "run")


def test_unknown_key_in_the_method_section_is_one_line_naming_method_key(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    rc, _, err = run_cli(capsys, "train", folder_config(tmp_path, tree.root), "method.bogus=1")
    assert_one_clear_error(rc, err, "method.bogus", max_lines=1)


def test_data_check_reports_a_missing_image_and_the_other_problems_of_the_split(tmp_path, capsys):
    tree = folder_tree(tmp_path)
    ghost = _ghost_in_split(tree.root)
    truncated = _truncate(tree.root / "images" / "img_000.png")
    rc, out, _ = run_cli(capsys, "data", "check", folder_config(tmp_path, tree.root))
    assert rc == 1 and str(ghost) in out and str(truncated) in out, out
    assert f"{ghost}.{{png,jpg,jpeg}}" in out, out  # every image suffix looked for, not only .png


# make_folder(binary=True) saves class 1 as 255. Class sets -> class 1 pixels: 3 x 256 + 512, class 0: 3 x 256
BINARY_SETS = ((0, 1), (0, 1), (1,), (0, 1))
BINARY_CLASSES = ("background", "object")


def test_binary_0_255_masks_with_binary_mask_option_read_255_as_class_1_and_train(tmp_path, capsys):
    tree = folder_tree(tmp_path, BINARY_SETS, BINARY_CLASSES, binary=True)
    cfg_path = folder_config(tmp_path, tree.root, options={"binary_mask": True})
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path)
    assert rc == 0, err
    assert last_json(out)["pixels"] == {"background": 768, "object": 1280}
    rc, out, err = run_cli(capsys, "train", cfg_path)
    assert rc == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_binary_0_255_masks_without_binary_mask_option_read_255_as_ignore_so_class_1_has_no_pixels(
    tmp_path, capsys, caplog
):
    """Documented behaviour: 255 is the ignore label, so 0/255 masks pass the checks but teach only class 0.
    ``lesseg data stats``, ``data check`` and training warn that every labeled pixel is background and name
    data.options.binary_mask=true; values other than 0, 1 and 255 are errors that suggest it too."""
    tree = folder_tree(tmp_path, BINARY_SETS, BINARY_CLASSES, binary=True)
    cfg_path = folder_config(tmp_path, tree.root)
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path)
    assert rc == 0, err
    assert last_json(out)["pixels"] == {"background": 768, "object": 0}
    assert "every labeled pixel of" in err and "binary_mask=true" in err
    rc, out, err = run_cli(capsys, "data", "check", cfg_path)
    assert rc == 0, out + err
    assert "warning: every labeled pixel of" in err and "binary_mask=true" in err
    with caplog.at_level(logging.WARNING, logger="lesseg.data.check"):
        rc, _, err = run_cli(capsys, "train", cfg_path)
    assert rc == 0, err
    assert any("binary_mask=true" in r.getMessage() and "'labeled'" in r.getMessage() for r in caplog.records)


def test_masks_with_foreground_give_no_background_only_warning(tmp_path, capsys):
    tree = folder_tree(tmp_path, BINARY_SETS, BINARY_CLASSES, binary=True)
    rc, _, err = run_cli(capsys, "data", "check", folder_config(tmp_path, tree.root, options={"binary_mask": True}))
    assert rc == 0 and "warning" not in err, err


class RunsCode:
    """Unpickling this calls os.system, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture
def malicious(tmp_path):
    """Crafted checkpoints (plain pickle and torch.save zip) and the marker file their code would create."""
    marker = tmp_path / "code_ran"
    payload = {"method": RunsCode(marker), "config": {}, "info": {}}
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(payload))
    zipped = tmp_path / "evil.pt"
    torch.save(payload, zipped)
    probe = tmp_path / "probe_ran"  # the payload really runs code when unpickled unsafely
    pickle.loads(pickle.dumps(RunsCode(probe)))
    assert probe.exists()
    return {"pickle": raw, "torch_save": zipped}, marker


@pytest.mark.parametrize("kind", ["pickle", "torch_save"])
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_a_checkpoint_crafted_to_run_code_is_refused_without_running_it(
    command, kind, malicious, tmp_path, capsys
):
    files, marker = malicious
    evil = files[kind]
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    args = {
        "eval": lambda: ["eval", folder_config(tmp_path, folder_tree(tmp_path).root)],
        "predict": lambda: ["predict", image, "--out", tmp_path / "pred"],
        "export": lambda: ["export", "--out", tmp_path / "model.onnx"],
    }[command]()
    with warnings.catch_warnings():  # torch warns about the plain pickle's protocol before refusing it
        warnings.filterwarnings("ignore", "Detected pickle protocol")
        rc, _, err = run_cli(capsys, *args, "--checkpoint", evil)
    assert_one_clear_error(rc, err, evil, max_lines=1)
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "pred").exists()


def test_the_refused_checkpoint_message_does_not_advise_unsafe_loading(malicious, tmp_path, capsys):
    files, _ = malicious
    rc, _, err = run_cli(capsys, "export", "--checkpoint", files["torch_save"], "--out", tmp_path / "m.onnx")
    assert rc == 2 and "weights_only" not in err and "system" in err, err


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "text"])
def test_a_corrupt_checkpoint_is_one_clear_error_that_does_not_cry_code(kind, tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"method": {"w": torch.zeros(64)}, "config": {}, "info": {}}, good)
    bad = tmp_path / f"{kind}.pt"
    bad.write_bytes({
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "random_bytes": np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
        "text": b"hello world",
    }[kind])
    rc, _, err = run_cli(capsys, "export", "--checkpoint", bad, "--out", tmp_path / "m.onnx")
    assert_one_clear_error(rc, err, bad, "cannot load checkpoint", max_lines=1)
    assert "run code" not in err, err


def test_a_config_error_in_the_checkpoints_own_config_names_the_checkpoint(tmp_path, capsys):
    """predict/export rebuild the network from the config stored in the checkpoint."""
    bad = tmp_path / "old.pt"
    torch.save(
        {"method": {}, "config": {"data": {"bogus": 1}}, "info": {"num_classes": 2, "class_names": []}}, bad
    )
    rc, _, err = run_cli(capsys, "export", "--checkpoint", bad, "--out", tmp_path / "m.onnx")
    assert_one_clear_error(rc, err, bad, "data.bogus", max_lines=1)
