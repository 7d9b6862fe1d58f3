"""The embedded fashion dataset: Fashion-MNIST IDX reading and its errors, scene invariants (masks where the
products were placed, ignore borders, tags), the folder tree, determinism, partitions, regeneration and a
tiny training run through the packaged config.

The tests write their own tiny Fashion-MNIST folder (40 train + 20 test items in the exact IDX gz format), so
they need neither the Debian package nor a download. Train items have labels 0-4 and test items 5-9, so the
classes of a scene tell which file its products came from.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesseg.data import fashion, shapes
from lesseg.data.base import IGNORE
from lesseg.data.fashion import (
    CLASSES,
    DOMAINS,
    ENV_VAR,
    FILES,
    ProductOrder,
    ensure_fashion,
    find_fashion_mnist,
    generate_fashion,
    load_products,
    read_idx,
    render_scene,
    scene,
)
from lesseg.errors import ConfigError, DataError

N_TRAIN_ITEMS, N_TEST_ITEMS = 40, 20
TRAIN_LABELS, TEST_LABELS = range(5), range(5, 10)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it: magic 0x0000080N (unsigned bytes, N dims), big-endian int32
    dimensions, the raw bytes; gzipped."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def blob(rng: np.random.Generator, label: int) -> np.ndarray:
    """A 28x28 product on a 0 background: a textured ellipse whose size depends on the label."""
    yy, xx = np.mgrid[0:28, 0:28] + 0.5
    rx, ry = 5 + label % 5 + rng.uniform(0, 2), 6 + label // 2 + rng.uniform(0, 2)
    inside = ((xx - 14) / rx) ** 2 + ((yy - 14) / ry) ** 2 <= 1
    return np.where(inside, rng.integers(70, 256, (28, 28)), 0).astype(np.uint8)


def make_fake(folder: Path, n_train: int = N_TRAIN_ITEMS, n_test: int = N_TEST_ITEMS) -> dict:
    """The four files of a tiny Fashion-MNIST in ``folder``; returns {split: (images, labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, labels in (("train", n_train, TRAIN_LABELS), ("val", n_test, TEST_LABELS)):
        lab = np.array([labels[i % len(labels)] for i in range(n)], np.uint8)
        img = np.stack([blob(rng, int(v)) for v in lab])
        write_idx(folder / FILES[split][0], img)
        write_idx(folder / FILES[split][1], lab)
        arrays[split] = (img, lab)
    return arrays


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    make_fake(folder)
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _windows(a: np.ndarray, r: int) -> np.ndarray:
    """(2r+1)^2 x H x W stack of the shifted copies of ``a`` (edge-padded)."""
    h, w = a.shape
    p = np.pad(a, r, mode="edge")
    return np.stack([p[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)])


# -- Fashion-MNIST files


def test_reads_the_idx_files_it_wrote(tmp_path: Path) -> None:
    arrays = make_fake(tmp_path)
    for split in ("train", "val"):
        images, labels = load_products(tmp_path, split)
        assert images.shape == (len(labels), 28, 28) and images.dtype == np.uint8
        assert np.array_equal(images, arrays[split][0]) and np.array_equal(labels, arrays[split][1])


def _corrupt(folder: Path, case: str) -> str:
    """Break one file of a fake folder; return the name of the file the error must name."""
    images, labels = FILES["train"]
    if case == "magic":  # a labels file where the images file should be
        write_idx(folder / images, np.zeros(40, np.uint8))
        return images
    if case == "truncated":  # header says 40 images, fewer bytes follow
        raw = gzip.decompress((folder / images).read_bytes())
        (folder / images).write_bytes(gzip.compress(raw[:-100]))
        return images
    if case == "not_gzip":
        (folder / labels).write_bytes(b"\x00\x00\x08\x01 plain bytes")
        return labels
    if case == "item_size":
        write_idx(folder / images, np.zeros((40, 27, 27), np.uint8))
        return images
    if case == "count":  # 40 images, 39 labels
        write_idx(folder / labels, np.zeros(39, np.uint8))
        return labels
    if case == "label_range":
        write_idx(folder / labels, np.full(40, 10, np.uint8))
        return labels
    raise ValueError(case)


@pytest.mark.parametrize("case", ["magic", "truncated", "not_gzip", "item_size", "count", "label_range"])
def test_bad_idx_file_is_a_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    make_fake(tmp_path / "src")
    name = _corrupt(tmp_path / "src", case)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_products(tmp_path / "src", "train")
    with pytest.raises(DataError, match=name.replace(".", r"\.")):  # also through the generator
        generate_fashion(tmp_path / "ds", n_train=2, n_val=1, size=32, fashion_mnist=tmp_path / "src",
                         progress=False)
    assert not (tmp_path / "ds").exists()


def test_read_idx_checks_the_magic_number(tmp_path: Path) -> None:
    write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8))
    assert read_idx(tmp_path / "x.gz", 0x803).shape == (2, 28, 28)
    with pytest.raises(DataError, match=r"x\.gz has magic number 0x00000803, expected 0x00000801"):
        read_idx(tmp_path / "x.gz", 0x801)


def test_missing_folder_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError) as e:
        generate_fashion(tmp_path / "ds", n_train=2, n_val=1, size=32, fashion_mnist=tmp_path / "nowhere",
                         progress=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "fashion_mnist" in msg and ENV_VAR in msg
    assert all(n in msg for pair in FILES.values() for n in pair)
    assert not (tmp_path / "ds").exists()
    # a folder lacking one file names that file
    make_fake(tmp_path / "partial")
    (tmp_path / "partial" / FILES["val"][1]).unlink()
    with pytest.raises(DataError, match=f"lacks {FILES['val'][1]}"):
        find_fashion_mnist(tmp_path / "partial")


def test_folder_from_the_option_then_the_environment(fake: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(fake))
    assert find_fashion_mnist() == fake.resolve() and find_fashion_mnist("") == fake.resolve()
    with pytest.raises(DataError, match="option fashion_mnist"):
        find_fashion_mnist(tmp_path)  # the option wins over the environment
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=f"\\${ENV_VAR}"):
        find_fashion_mnist()


# -- scenes


@pytest.fixture(scope="module")
def scenes(fake: Path) -> dict[str, list]:
    """40 scenes per domain at 48x48 from the fake train products: (Scene, item indices)."""
    images, labels = load_products(fake, "train")
    return {d: [scene(0, d, "train", i, images, labels, 48) for i in range(40)] for d in DOMAINS}


@pytest.mark.parametrize("domain", DOMAINS)
def test_masks_are_where_the_products_were_placed(scenes, fake: Path, domain: str) -> None:
    _, labels = load_products(fake, "train")
    n_objects = []
    for sc, items in scenes[domain]:
        mask = sc.mask
        assert sc.image.shape == (48, 48, 3) and sc.image.dtype == np.uint8 and mask.dtype == np.uint8
        assert 1 <= len(sc.objects) <= len(items) <= 4
        n_objects.append(len(sc.objects))
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(CLASSES))) | {IGNORE}
        assert sc.tags and set(sc.tags) == values - {0, IGNORE}, "tags are exactly the classes in the mask"
        assert list(sc.tags) == sorted(sc.tags) and set(sc.tags) == {o.cls for o in sc.objects}
        near = np.zeros(mask.shape, bool)  # the boxes of the placed products, grown by the 1 px border
        for o in sc.objects:
            assert o.cls == int(labels[items[o.slot]]) + 1, "class = the product's Fashion-MNIST label + 1"
            x0, y0, w, h = o.box
            inside = np.zeros(mask.shape, bool)
            inside[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] = True
            grown = np.zeros(mask.shape, bool)
            grown[max(y0 - 1, 0):max(y0 + h + 1, 0), max(x0 - 1, 0):max(x0 + w + 1, 0)] = True
            near |= grown
            assert o.visible >= shapes._MIN_VISIBLE_PX * (48 / 64) ** 2  # shapes' rule (_layout)
            assert (mask[inside] == o.cls).sum() >= o.visible
        for c in sc.tags:  # every pixel of class c lies in the box of a product of class c ...
            boxes = np.zeros(mask.shape, bool)
            for o in sc.objects:
                if o.cls == c:
                    x0, y0, w, h = o.box
                    boxes[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] = True
            assert not ((mask == c) & ~boxes).any()
            # ... and its pixel count is the visible area of those products
            assert (mask == c).sum() == sum(o.visible for o in sc.objects if o.cls == c)
        assert (mask[~near] == 0).all(), "away from every product, the mask is background"
    assert set(n_objects) >= {1, 2, 3}


@pytest.mark.parametrize("domain", DOMAINS)
def test_ignore_border_separates_labels(scenes, domain: str) -> None:
    ignored = 0
    for sc, _ in scenes[domain]:
        mask = sc.mask
        ign = mask == IGNORE
        assert ign.any(), "every object is outlined with ignore pixels"
        win = _windows(mask, 1)
        # two different labels (background included) never touch: a 255 outline always separates them
        assert not ((win != IGNORE) & ~ign & (win != mask)).any()
        # ignore pixels lie on outlines: within 2 px of an object pixel (2: the outline of a sliver of a lower
        # object, itself ignored, next to the object above it)
        win2 = _windows(mask, 2)
        assert ((win2 > 0) & (win2 != IGNORE)).any(0)[ign].all()
        ignored += int(ign.sum())
    assert 0.01 < ignored / (len(scenes[domain]) * 48 * 48) < 0.25


def test_products_stand_out_from_what_lies_below(scenes) -> None:
    """In the synthetic domain (plain or gradient backgrounds), an object's mean colour differs from the
    mean colour of the background next to it."""
    dists = []
    for sc, _ in scenes["synthetic"]:
        win = _windows(sc.mask, 3)
        for o in sc.objects:
            ring = (sc.mask == 0) & (win == o.cls).any(0)
            if ring.sum() >= 10:
                obj = sc.image[sc.mask == o.cls].astype(float).mean(0)
                dists.append(np.linalg.norm(obj - sc.image[ring].astype(float).mean(0)))
    assert len(dists) >= 20 and np.median(dists) > 40, np.round(dists)


def test_real_domain_draws_photograph_backgrounds_offline(scenes) -> None:
    colour, grey = fashion._photos()
    assert len(colour) == len(fashion.PHOTOS) and len(grey) == len(fashion.TEXTURES)
    assert all(p.mode == "RGB" and min(p.size) >= 256 for p in colour)

    def bg_energy(domain: str) -> float:
        """Mean absolute Laplacian over background pixels (texture and noise)."""
        vals = []
        for sc, _ in scenes[domain]:
            g = sc.image.astype(np.float64).mean(2)
            lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
            vals.append(np.abs(lap)[sc.mask[1:-1, 1:-1] == 0].mean())
        return float(np.mean(vals))

    assert bg_energy("real") > 5 * bg_energy("synthetic") + 1


def test_render_scene_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    products = [(blob(rng, k), k) for k in (0, 3, 7)]
    a, b = (render_scene(np.random.default_rng(5), products, "real", 48) for _ in range(2))
    c = render_scene(np.random.default_rng(6), products, "real", 48)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


def test_product_order_uses_every_item_once_before_repeating() -> None:
    order = ProductOrder(0, "real", "train", 40)
    slots = [i for k in range(10) for i in order(k)]
    assert sorted(slots) == list(range(40))  # 10 scenes x 4 slots: the 40 items, each once
    assert ProductOrder(0, "real", "train", 40)(7) == order(7)  # a scene's products do not depend on others
    assert ProductOrder(1, "real", "train", 40)(0) != order(0)
    assert len(order(10)) == 4 and set(order(10)) <= set(range(40))  # the next cycle


# -- the tree


def test_written_layout_and_file_separation(fake: Path, tmp_path: Path) -> None:
    root = generate_fashion(tmp_path / "fashion", n_train=8, n_val=4, size=32, seed=3, fashion_mnist=fake,
                            progress=False)
    assert root == tmp_path / "fashion" and sorted(p.name for p in tmp_path.iterdir()) == ["fashion"]
    train = [f"real_train_{i:05d}" for i in range(8)]
    val = [f"real_val_{i:05d}" for i in range(4)]
    tree = _tree(root)
    expected = {f"{d}/{s}.png" for d in ("images", "masks", "masks_full") for s in train + val}
    expected |= {"classes.txt", "image_labels.csv", "meta.json", "splits/train.txt", "splits/val.txt"}
    assert set(tree) == expected
    assert (root / "classes.txt").read_text().splitlines() == list(CLASSES) and len(CLASSES) == 11
    assert (root / "splits/train.txt").read_text().splitlines() == train
    assert (root / "splits/val.txt").read_text().splitlines() == val
    meta = json.loads((root / "meta.json").read_text())
    assert {k: meta[k] for k in ("format", "version", "domain", "n_train", "n_val", "size", "seed")} == {
        "format": "lesseg-fashion", "version": fashion.VERSION, "domain": "real", "n_train": 8, "n_val": 4,
        "size": 32, "seed": 3}
    assert meta["source"]["folder"] == str(fake.resolve())
    lines = dict(line.split(",") for line in (root / "image_labels.csv").read_text().splitlines())
    assert list(lines) == train + val
    arrays = {s: load_products(fake, s) for s in ("train", "val")}
    for split, stems in (("train", train), ("val", val)):
        for i, stem in enumerate(stems):
            with Image.open(root / "images" / f"{stem}.png") as im, Image.open(root / "masks" / f"{stem}.png") as m:
                assert im.mode == "RGB" and im.size == (32, 32) and m.mode == "L"
                image, mask = np.asarray(im), np.asarray(m)
            ref, _ = scene(3, "real", split, i, *arrays[split], 32)
            assert np.array_equal(image, ref.image) and np.array_equal(mask, ref.mask)
            with Image.open(root / "masks_full" / f"{stem}.png") as m:
                full = np.asarray(m)
            # the same classes without the 255 border: each border pixel its drawn class (mostly background)
            assert np.array_equal(full, ref.full) and IGNORE not in full and (mask == IGNORE).any()
            assert np.array_equal(full[mask != IGNORE], mask[mask != IGNORE])
            tags = [int(t) for t in lines[stem].split(";")]
            assert tags == list(ref.tags) == sorted(set(np.unique(mask).tolist()) - {0, IGNORE})
            # train products come from the train file (labels 0-4), val products from t10k (labels 5-9)
            allowed = TRAIN_LABELS if split == "train" else TEST_LABELS
            assert {t - 1 for t in tags} <= set(allowed)


def test_files_are_reproducible(fake: Path, tmp_path: Path) -> None:
    kw = {"n_train": 5, "n_val": 3, "size": 32, "fashion_mnist": fake, "progress": False}
    a = _tree(generate_fashion(tmp_path / "a", seed=1, **kw))
    b = _tree(generate_fashion(tmp_path / "b", seed=1, **kw))
    c = _tree(generate_fashion(tmp_path / "c", seed=2, **kw))
    assert a == b
    assert a["images/real_train_00000.png"] != c["images/real_train_00000.png"]
    # datasets nest: a larger tree starts with the same scenes
    d = _tree(generate_fashion(tmp_path / "d", seed=1, **{**kw, "n_train": 7}))
    assert all(d[k] == v for k, v in a.items() if k.startswith(("images/", "masks/")))


def test_source_has_the_standard_partitions(fake: Path, tmp_path: Path) -> None:
    from lesseg.data import build_source

    src = build_source("fashion", str(tmp_path / "ds"),
                       {"n_train": 32, "n_val": 4, "size": 32, "fashion_mnist": str(fake)})
    assert src.classes == list(CLASSES)
    train = {s.name for s in src.samples("train")}
    assert len(train) == 32 and len(src.samples("val")) == 4
    for k in (16, 8, 4, 2):
        labeled = {s.name for s in src.samples(f"labeled_1-{k}")}
        unlabeled = {s.name for s in src.samples(f"unlabeled_1-{k}")}
        assert len(labeled) == math.ceil(32 / k) and not labeled & unlabeled and labeled | unlabeled == train
    assert all(s.tags for s in src.samples("train"))


def test_ensure_regenerates_only_on_change(fake: Path, tmp_path: Path, monkeypatch) -> None:
    kw = {"n_train": 3, "n_val": 2, "size": 32, "progress": False}
    root = ensure_fashion(tmp_path / "ds", fashion_mnist=fake, **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_fashion(root, fashion_mnist=fake, **kw) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    # the finished tree is enough when the Fashion-MNIST folder is gone
    assert ensure_fashion(root, fashion_mnist=tmp_path / "gone", **kw) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes

    before = (root / "images/real_train_00000.png").read_bytes()
    ensure_fashion(root, fashion_mnist=fake, seed=1, **kw)
    assert json.loads((root / "meta.json").read_text())["seed"] == 1
    assert (root / "images/real_train_00000.png").read_bytes() != before

    monkeypatch.setattr(fashion, "VERSION", fashion.VERSION + 1)  # a new generator version regenerates
    meta_before = (root / "meta.json").stat().st_mtime_ns
    ensure_fashion(root, fashion_mnist=fake, seed=1, **kw)
    assert json.loads((root / "meta.json").read_text())["version"] == fashion.VERSION
    assert (root / "meta.json").stat().st_mtime_ns != meta_before

    other = tmp_path / "other"  # other source files (different sizes) regenerate too
    make_fake(other, n_train=44)
    ensure_fashion(root, fashion_mnist=other, seed=1, **kw)
    assert json.loads((root / "meta.json").read_text())["source"]["folder"] == str(other.resolve())

    ensure_fashion(root, fashion_mnist=other, seed=1, **{**kw, "n_train": 1})  # smaller: no stale files
    assert len(list((root / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other"]


def test_refuses_foreign_folder(fake: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a fashion dataset"):
        generate_fashion(tmp_path, n_train=1, n_val=1, size=32, fashion_mnist=fake, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kw", [{"domain": "cartoon"}, {"size": 16}, {"n_train": -1}, {"seed": -1},
                                {"n_train": 0, "n_val": 0}])
def test_bad_parameters(fake: Path, tmp_path: Path, kw: dict) -> None:
    with pytest.raises(ConfigError):
        ensure_fashion(tmp_path / "ds", **{"fashion_mnist": fake, "progress": False, **kw})


def test_wrong_option_type_is_a_config_error(fake: Path, tmp_path: Path) -> None:
    from lesseg.data import build_source

    with pytest.raises(ConfigError, match="fashion_mnist"):
        build_source("fashion", str(tmp_path / "ds"), {"fashion_mnist": 3})


@pytest.mark.skipif(not (fashion.DEFAULT_DIR / FILES["val"][0]).exists(), reason="no dataset-fashion-mnist")
def test_the_real_fashion_mnist_files() -> None:
    images, labels = load_products(fashion.DEFAULT_DIR, "val")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    sc, _ = scene(0, "real", "val", 0, images, labels)
    assert sc.image.shape == (96, 96, 3) and set(sc.tags) == {o.cls for o in sc.objects}


# -- training


def test_packaged_u2pl_config_trains_on_a_generated_tree(fake: Path, tmp_path: Path) -> None:
    """``lesseg train fashion/u2pl.yaml`` on a tiny tree: the data section's dataset, partitions and options
    work end to end through the loader, the method and the evaluation."""
    import torch

    from lesseg import config
    from lesseg.engine import train

    cfg = config.load("fashion/u2pl.yaml", [
        f"data.root={tmp_path / 'fashion'}", "data.options.n_train=32", "data.options.n_val=8",
        "data.options.size=32", f"data.options.fashion_mnist={fake}", "data.crop_size=[32,32]",
        "data.workers=0", "data.streams.labeled.split=labeled_1-4", "data.streams.labeled.batch_size=4",
        "data.streams.unlabeled.split=unlabeled_1-4", "data.streams.unlabeled.batch_size=4",
        "model.encoder=test_resnet", "model.decoder_channels=16", "model.rep_dim=16", "method.num_queries=4",
        "method.num_negatives=4", "method.bank_size=32", "train.iters=4", "train.eval_every=0",
        "train.log_every=2", "train.progress=false", "eval.batch_size=8", f"out={tmp_path / 'run'}",
    ])
    assert cfg.data.dataset == "fashion" and cfg.method.name == "u2pl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= result["miou"] <= 1.0 and len(result["iou"]) == len(CLASSES)
    assert (tmp_path / "run" / "last.pt").exists()
    assert (tmp_path / "fashion" / "splits" / "labeled_1-4.txt").read_text().count("\n") == 8
