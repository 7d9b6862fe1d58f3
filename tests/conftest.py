"""Shared fixtures: a tiny shapes dataset and tiny configs (timm's test encoder, 32x32 crops)."""

from __future__ import annotations

import pytest

from lesseg import config

TINY = "test_resnet"


def tiny_dict(root, out, **sections) -> dict:
    """A config dict for a few CPU steps on the tiny shapes dataset at ``root``."""
    d = {
        "data": {
            "dataset": "shapes",
            "root": str(root),
            "options": {"n_train": 32, "n_val": 15, "size": 32},
            "crop_size": [32, 32],
            "workers": 0,
            "aug": {"scale": [0.75, 1.25]},
            "streams": {"labeled": {"split": "train", "batch_size": 4}},
        },
        "model": {"encoder": TINY, "decoder_channels": 16, "rep_dim": 16},
        "optim": {"lr": 0.01},
        "train": {"iters": 4, "log_every": 2, "progress": False},
        "eval": {"batch_size": 8},
        "out": str(out),
    }
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return d


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """The tiny shapes dataset, generated once per test session."""
    from lesseg.data import build_source

    root = tmp_path_factory.mktemp("data") / "shapes"
    build_source("shapes", str(root), {"n_train": 32, "n_val": 15, "size": 32})
    return root


@pytest.fixture
def tiny_cfg(shapes_root, tmp_path):
    def make(overrides: list[str] = (), **sections):
        return config.from_dict(tiny_dict(shapes_root, tmp_path / "run", **sections), list(overrides))

    return make
