"""Users' own data in the folder format (docs/own_data.md): the page's configs, commands and script stay valid,
and its flow (0/255 masks in their own folder, the unlabeled rest of the training split) trains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_dict
from fake_trees import make_folder

# one_thread: the autouse one-intra-op-thread fixture, imported to apply here too
from test_cli import last_json, one_thread, run_cli  # noqa: F401

from lesseg import config
from lesseg.cli import build_parser

PAGE = Path(__file__).parents[1] / "docs" / "own_data.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), re.DOTALL)


def commands() -> list[tuple[str, list[str]]]:
    """The page's ``$ command`` lines with the output lines shown under each."""
    steps = [s for body in blocks("console") for s in re.split(r"^\$ ", body, flags=re.MULTILINE)[1:]]
    return [(cmd, out.splitlines()) for cmd, _, out in (s.partition("\n") for s in steps)]


def write_configs(folder: Path) -> None:
    for body in blocks("yaml"):
        name = re.match(r"# (\S+\.yaml):", body).group(1)
        (folder / name).write_text(body)


def test_the_pages_configs_load_and_read_the_rest_of_the_training_split(tmp_path) -> None:
    write_configs(tmp_path)
    cfg = config.load(tmp_path / "own_semi.yaml")
    assert cfg.method.name == "mean_teacher" and cfg.data.dataset == "folder" and cfg.data.root == "own"
    assert cfg.data.streams.unlabeled.split == "train - labeled" and not cfg.data.streams.unlabeled.labeled
    assert cfg.model.pretrained == "runs/own/last.pt"


def test_the_pages_lesseg_commands_parse() -> None:
    parser = build_parser()
    lesseg = [cmd.split()[1:] for cmd, _ in commands() if cmd.startswith("lesseg ")]
    assert len(lesseg) >= 8
    for argv in lesseg:
        _, extra = parser.parse_known_args(argv)
        assert all("=" in e for e in extra), argv  # key=value overrides only


def test_the_pages_script_compiles() -> None:
    (script,) = blocks("python")
    compile(script, "make_own.py", "exec")


def test_the_pages_set_gives_the_pages_checks_and_statistics(tmp_path, capsys, caplog, monkeypatch) -> None:
    """With scikit-image (the page's photographs), the page's script and its data commands give its outputs."""
    pytest.importorskip("skimage")
    (tmp_path / "make_own.py").write_text(blocks("python")[0])
    write_configs(tmp_path)
    made = subprocess.run([sys.executable, "make_own.py"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    monkeypatch.chdir(tmp_path)
    checked = 0
    for cmd, shown in commands():
        if not cmd.startswith(("lesseg data", "lesseg splits")):
            continue
        caplog.clear()
        rc, out, err = run_cli(capsys, *cmd.split()[1:])
        assert rc == 0, err
        err += caplog.text  # warnings logged (a terminal shows them on stderr)
        json_lines = [line for line in shown if line.startswith("{")]
        assert out.strip().splitlines()[-1:] == json_lines[-1:], cmd
        for line in shown:
            if not line.startswith("{"):
                assert line in err, (cmd, line, err)
        checked += 1
    assert checked == 7


def test_binary_masks_in_their_own_folder_with_the_unlabeled_rest_train(tmp_path, capsys) -> None:
    tree = make_folder(tmp_path, [(0, 1), (1,), (0, 1), (0,)], classes=("background", "lesion"), unlabeled=3,
                       binary=True, masks_dir="masks_binary", suffixes=(".png",))
    (tree.root / "splits" / "val.txt").write_text("img_003\n")
    d = tiny_dict(tree.root, tmp_path / "run", train={"iters": 2})
    d["method"] = {"name": "mean_teacher"}
    d["data"].update(
        dataset="folder",
        options={"binary_mask": True, "masks_dir": "masks_binary"},
        val_split="val",
        streams={
            "labeled": {"split": "labeled - val", "batch_size": 2},
            "unlabeled": {"split": "train - labeled", "batch_size": 2, "labeled": False},
        },
    )
    cfg_path = tmp_path / "own.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    rc, out, err = run_cli(capsys, "data", "check", cfg_path)
    assert rc == 0, out + err
    assert "labeled - val: 3 images, 0 problem(s)" in err and "train - labeled: 3 images, 0 problem(s)" in err
    rc, out, err = run_cli(capsys, "data", "stats", cfg_path)
    assert rc == 0 and "warning" not in err, err
    assert last_json(out)["pixels"]["lesion"] > 0
    rc, out, err = run_cli(capsys, "train", cfg_path)
    assert rc == 0, err
    assert set(json.loads(out.strip().splitlines()[-1])["iou"]) == {"background", "lesion"}
