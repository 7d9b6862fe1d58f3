"""The embedded shapes dataset: rendering invariants, domains, folder layout, regeneration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesseg.data import shapes
from lesseg.data.base import IGNORE
from lesseg.data.shapes import (
    CLASSES,
    DOMAINS,
    ensure_shapes,
    generate_shapes,
    render_sample,
    render_sample_full,
    sample_rng,
)
from lesseg.errors import ConfigError, DataError

C = len(CLASSES)
N = 150


@pytest.fixture(scope="module")
def samples() -> dict[str, list[tuple[np.ndarray, np.ndarray, tuple[int, ...]]]]:
    return {d: [render_sample(sample_rng(0, d, i), d, 64) for i in range(N)] for d in DOMAINS}


def _windows(a: np.ndarray, r: int) -> np.ndarray:
    """(2r+1)^2 x H x W stack of the shifted copies of ``a`` (edge-padded)."""
    h, w = a.shape
    p = np.pad(a, r, mode="edge")
    return np.stack([p[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)])


def test_classes() -> None:
    assert CLASSES[0] == "background" and len(CLASSES) >= 7
    assert CLASSES[1:7] == ("disk", "square", "triangle", "star", "ring", "cross")


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic(domain: str) -> None:
    a = render_sample(np.random.default_rng(5), domain, 64)
    b = render_sample(np.random.default_rng(5), domain, 64)
    c = render_sample(np.random.default_rng(6), domain, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes(size: int) -> None:
    image, mask, tags = render_sample(np.random.default_rng(0), "real", size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8 and tags


@pytest.mark.parametrize("domain", DOMAINS)
def test_mask_values_and_tags(samples, domain: str) -> None:
    for _, mask, tags in samples[domain]:
        values = set(np.unique(mask).tolist())
        assert values <= set(range(C)) | {255}
        assert tags and set(tags) == values - {0, 255}, "tags are exactly the classes visible in the mask"
        assert list(tags) == sorted(tags)
        for t in tags:  # no sliver objects: each tagged class keeps a decent labeled area
            assert (mask == t).sum() >= 20


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_class_appears(samples, domain: str) -> None:
    seen = set().union(*(tags for _, _, tags in samples[domain]))
    assert seen == set(range(1, C))
    counts = np.bincount(np.concatenate([s[1].ravel() for s in samples[domain]]), minlength=256)
    share = counts[1:C] / counts[1:C].sum()
    assert share.min() > 0.5 / (C - 1), f"unbalanced classes: {share}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_ignore_borders(samples, domain: str) -> None:
    solid = 0
    for _, mask, _ in samples[domain]:
        ign = mask == IGNORE
        assert ign.any(), "every object is outlined with ignore pixels"
        win = _windows(mask, 1)
        # Two different labels never touch (8-neighbourhood): a 255 outline always separates them.
        labeled = win != IGNORE
        assert not (labeled & ~ign & (win != mask)).any()
        # Ignore pixels only lie on outlines: next to an object pixel, and thin (hardly ever a solid 3x3
        # block, which only happens in narrow gaps between objects).
        win2 = _windows(mask, 2)
        assert ((win2 > 0) & (win2 != IGNORE)).any(0)[ign].all()
        solid += int((win == IGNORE).all(0).sum())
    ignored = sum(int((s[1] == IGNORE).sum()) for s in samples[domain])
    assert solid < 0.002 * ignored
    assert 0.01 < ignored / (N * 64 * 64) < 0.12



@pytest.mark.parametrize("domain", DOMAINS)
def test_colour_not_predictive_of_class(domain: str) -> None:
    """The mean colour of each class is close to the mean over all classes (colour is drawn independently)."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(C)]
    for i in range(600):
        image, mask, tags = render_sample(sample_rng(1, domain, i), domain, 32)
        for t in tags:
            per_class[t].append(image[mask == t].mean(0))
    means = np.array([np.mean(v, 0) for v in per_class[1:]])
    overall = np.concatenate(per_class[1:]).mean(0)
    assert np.abs(means - overall).max() < 20, f"class mean colours differ: {np.round(means)}"
    spread = np.array([np.std(v, 0) for v in per_class[1:]])
    assert spread.min() > 50, "each class takes all kinds of colours"


def test_domains_differ(samples) -> None:
    def bg_energy(domain: str) -> float:
        """Mean absolute Laplacian over background pixels (high-frequency texture and noise)."""
        vals = []
        for image, mask, _ in samples[domain]:
            g = image.astype(np.float64).mean(2)
            lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
            vals.append(np.abs(lap)[mask[1:-1, 1:-1] == 0].mean())
        return float(np.mean(vals))

    def object_share(domain: str) -> float:
        return float(np.mean([((s[1] > 0) & (s[1] != IGNORE)).mean() for s in samples[domain]]))

    assert bg_energy("real") > 5 * bg_energy("synthetic") + 1
    assert object_share("real") < object_share("synthetic")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_written_layout(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "real", domain="real", n_train=6, n_val=3, size=32, seed=3,
                           progress=False)
    assert root == tmp_path / "real" and sorted(p.name for p in tmp_path.iterdir()) == ["real"]
    stems = [f"real_{i:05d}" for i in range(9)]
    tree = _tree(root)
    expected = {f"{d}/{s}.png" for d in ("images", "masks", "masks_full") for s in stems}
    expected |= {"classes.txt", "image_labels.csv", "meta.json", "splits/train.txt", "splits/val.txt"}
    assert set(tree) == expected
    assert (root / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert (root / "splits/train.txt").read_text().splitlines() == stems[:6]
    assert (root / "splits/val.txt").read_text().splitlines() == stems[6:]
    meta = json.loads((root / "meta.json").read_text())
    assert meta == {"format": "lesseg-shapes", "version": shapes.VERSION, "domain": "real", "n_train": 6,
                    "n_val": 3, "size": 32, "seed": 3, "classes": list(CLASSES)}
    lines = (root / "image_labels.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == stems
    for i, (stem, line) in enumerate(zip(stems, lines, strict=True)):
        with Image.open(root / "images" / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            image = np.asarray(im)
        with Image.open(root / "masks" / f"{stem}.png") as m:
            assert m.mode == "L"
            mask = np.asarray(m)
        ref_image, ref_mask, tags = render_sample(sample_rng(3, "real", i), "real", 32)
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
        with Image.open(root / "masks_full" / f"{stem}.png") as m:
            full = np.asarray(m)
        # the border's pixels get the class they were drawn as; every other pixel keeps its class
        assert IGNORE not in full and np.array_equal(full[mask != IGNORE], mask[mask != IGNORE])
        assert set(np.unique(full[mask == IGNORE]).tolist()) <= {0, *tags}
        assert line == f"{stem},{';'.join(map(str, tags))}"


def test_folder_loader_reads_it_back(tmp_path: Path) -> None:
    from lesseg.data.sources.folder import FolderSource

    root = generate_shapes(tmp_path / "real", domain="real", n_train=6, n_val=3, size=32, progress=False)
    src = FolderSource(root)
    assert src.classes == list(CLASSES)
    train, val = src.samples("train"), src.samples("val")
    assert [s.name for s in train + val] == [f"real_{i:05d}" for i in range(9)]
    for i, s in enumerate(train + val):
        image, mask, tags = render_sample(sample_rng(0, "real", i), "real", 32)
        assert np.array_equal(src.read_image(s.image), image)
        assert s.mask is not None and np.array_equal(src.read_mask(s.mask), mask)
        assert s.tags == tags


def test_files_are_reproducible(tmp_path: Path) -> None:
    kw = {"domain": "synthetic", "n_train": 4, "n_val": 2, "size": 32, "progress": False}
    a = _tree(generate_shapes(tmp_path / "a", seed=1, **kw))
    b = _tree(generate_shapes(tmp_path / "b", seed=1, **kw))
    c = _tree(generate_shapes(tmp_path / "c", seed=2, **kw))
    assert a == b
    assert all(k.startswith("images/synthetic_") for k in a if k.startswith("images/"))
    assert a["images/synthetic_00000.png"] != c["images/synthetic_00000.png"]


def test_domains_side_by_side(tmp_path: Path) -> None:
    for d in DOMAINS:
        ensure_shapes(tmp_path / d, domain=d, n_train=2, n_val=1, size=32, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == set(DOMAINS)
    assert (tmp_path / "real/classes.txt").read_text() == (tmp_path / "synthetic/classes.txt").read_text()
    assert (tmp_path / "real/images/real_00000.png").exists()
    assert (tmp_path / "synthetic/images/synthetic_00000.png").exists()


def test_ensure_regenerates_only_on_change(tmp_path: Path) -> None:
    kw = {"domain": "real", "n_train": 4, "n_val": 2, "size": 32, "progress": False}
    root = ensure_shapes(tmp_path / "ds", seed=0, **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_shapes(root, seed=0, **kw) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes

    before = (root / "images/real_00000.png").read_bytes()
    ensure_shapes(root, seed=1, **kw)
    assert json.loads((root / "meta.json").read_text())["seed"] == 1
    assert (root / "images/real_00000.png").read_bytes() != before

    ensure_shapes(root, seed=1, **{**kw, "n_train": 2})  # smaller: no stale files remain
    assert len(list((root / "images").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_interrupted_generation_leaves_no_complete_looking_folder(tmp_path: Path, monkeypatch) -> None:
    kw = {"domain": "real", "n_train": 4, "n_val": 2, "size": 32, "progress": False}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_sample_full(*args, **kwargs)

    monkeypatch.setattr(shapes, "render_sample_full", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "ds", **kw)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a partial folder

    monkeypatch.setattr(shapes, "render_sample_full", render_sample_full)
    root = ensure_shapes(tmp_path / "ds", **kw)
    old = _tree(root)
    monkeypatch.setattr(shapes, "render_sample_full", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(root, **{**kw, "seed": 9})
    assert _tree(root) == old and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a shapes dataset"):
        generate_shapes(tmp_path, n_train=1, n_val=1, size=32, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


BAD = [{"domain": "cartoon"}, {"size": 8}, {"n_train": -1}, {"seed": -1}, {"n_train": 0, "n_val": 0}]


@pytest.mark.parametrize("kw", BAD)
def test_bad_parameters(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(ConfigError):
        ensure_shapes(tmp_path / "ds", **{"progress": False, **kw})


def test_annotator_masks_and_stream_options(tmp_path: Path) -> None:
    """``masks_dir: masks_full`` reads the masks without border (RIPU's simulated annotator); the standard
    partitions are drawn from ``masks/`` whichever source comes first; a stream's options of the same dataset
    are set over ``data.options`` (RIPU's target stream keeps the run's n_train, size, ...)."""
    from lesseg import config
    from lesseg.data import build_source, stream_source

    opts = {"n_train": 32, "n_val": 4, "size": 32}
    full = build_source("shapes", str(tmp_path / "ds"), {**opts, "masks_dir": "masks_full"})  # first
    plain = build_source("shapes", str(tmp_path / "ds"), opts)
    ref = build_source("shapes", str(tmp_path / "ref"), opts)
    for k in (16, 8, 4, 2):
        for kind in ("labeled", "unlabeled"):
            assert [s.name for s in full.samples(f"{kind}_1-{k}")] == [s.name for s in ref.samples(f"{kind}_1-{k}")]
    border = 0
    for a, b in zip(plain.samples("train"), full.samples("train"), strict=True):
        mask, whole = plain.read_mask(a.mask), full.read_mask(b.mask)
        assert IGNORE not in whole and np.array_equal(whole[mask != IGNORE], mask[mask != IGNORE])
        border += int((mask == IGNORE).sum())
    assert border > 0

    options = "data.options={n_train: 32, n_val: 4, size: 32}"
    cfg = config.load("shapes/ripu.yaml", [f"data.root={tmp_path / 'ds'}", options])
    target = stream_source(cfg.data, cfg.data.streams.target)
    assert target.options["masks_dir"] == "masks_full" and target.options["n_train"] == 32
    assert stream_source(cfg.data).options["masks_dir"] == "masks"  # evaluation keeps the border
    assert len(target.samples("train")) == 32  # n_train inherited: no regeneration at the default size
