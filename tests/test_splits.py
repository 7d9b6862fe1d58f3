"""Split files and labeled/unlabeled partitions."""

from __future__ import annotations

import logging
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from fake_trees import make_folder

from lesseg.data.base import Sample
from lesseg.data.sources.folder import FolderSource
from lesseg.data.splits import (
    labeled_count,
    make_splits,
    parse_amount,
    read_split_file,
    split_terms,
    write_complement,
    write_partition,
    write_split,
)
from lesseg.errors import ConfigError, DataError


class Masks:
    """An in-memory ``masks_reader``: sample name -> 4x4 mask holding the given classes; counts reads."""

    def __init__(self, class_sets: dict[str, set[int]]) -> None:
        self.arrays = {
            n: np.array(sorted(c) * 16, np.uint8)[:16].reshape(4, 4) for n, c in class_sets.items()
        }
        self.reads = 0

    def __call__(self, path: Path) -> np.ndarray:
        self.reads += 1
        return self.arrays[path.name]


def pool(class_sets: dict[str, set[int]], unlabeled: int = 0) -> list[Sample]:
    samples = [Sample(n, Path(f"{n}.jpg"), Path(n)) for n in class_sets]
    return samples + [Sample(f"u{i:03d}", Path(f"u{i:03d}.jpg")) for i in range(unlabeled)]


def rare_classes(common: int = 36) -> dict[str, set[int]]:
    """``common`` images of class 0 only, and one image for each of classes 1..4 (with 0)."""
    sets = {f"c{i:03d}": {0} for i in range(common)}
    sets.update({f"r{k}": {0, k} for k in range(1, 5)})
    return sets


# ---------------------------------------------------------------- amounts


@pytest.mark.parametrize(
    ("text", "value"),
    [("92", 92), ("1/16", Fraction(1, 16)), ("0.0625", Fraction(1, 16)), (" 1/8 ", Fraction(1, 8))],
)
def test_parse_amount(text, value) -> None:
    parsed = parse_amount(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["abc", "1/0", "", "-"])
def test_parse_amount_rejects_garbage(text) -> None:
    with pytest.raises(ConfigError, match="neither a count"):
        parse_amount(text)


@pytest.mark.parametrize(
    ("labeled", "available", "count"),
    [
        (Fraction(1, 16), 10582, 662),  # U2PL's VOC blended splits: 662 / 1323 / 2646 / 5291
        (Fraction(1, 8), 10582, 1323),
        (Fraction(1, 4), 10582, 2646),
        (0.5, 10582, 5291),
        (Fraction(1, 16), 2975, 186),  # Cityscapes: 186 / 372 / 744 / 1488
        (Fraction(1, 8), 2975, 372),
        (0.25, 2975, 744),
        (0.1, 100, 10),  # no float fuzz: 0.1 * 100 is exactly 10
        (92, 1464, 92),
    ],
)
def test_labeled_count_rounds_fractions_up(labeled, available, count) -> None:
    assert labeled_count(labeled, available) == count


@pytest.mark.parametrize(
    ("labeled", "available"), [(0, 10), (10, 10), (11, 10), (1.0, 10), (0.0, 10), (-0.5, 10)]
)
def test_labeled_count_rejects_impossible_amounts(labeled, available) -> None:
    with pytest.raises(ConfigError):
        labeled_count(labeled, available)


# ---------------------------------------------------------------- partitions


def test_make_splits_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    sets = rare_classes()
    samples = pool(sets, unlabeled=5)
    first = make_splits(samples, Masks(sets), 5, 10, seed=0)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert make_splits(shuffled, Masks(sets), 5, 10, seed=0) == first  # input order does not matter
    assert make_splits(samples, Masks(sets), 5, 10, seed=1) != first


def test_make_splits_respects_counts_fractions_and_masks() -> None:
    sets = rare_classes()
    samples = pool(sets, unlabeled=5)
    everyone = sorted(s.name for s in samples)
    for amount, expected in [(7, 7), (0.25, 10), (Fraction(1, 16), 3)]:
        labeled, unlabeled = make_splits(samples, Masks(sets), 5, amount, seed=3)
        assert len(labeled) == expected
        assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
        assert sorted(labeled + unlabeled) == everyone and not set(labeled) & set(unlabeled)
        assert not any(n.startswith("u") for n in labeled)  # images without a mask are never labeled


@pytest.mark.parametrize("seed", range(20))
def test_make_splits_covers_every_class_when_the_budget_allows(seed) -> None:
    sets = rare_classes()
    for amount in (4, 6):  # 4: only the four rare images cover everything (no slot to waste)
        labeled, _ = make_splits(pool(sets), Masks(sets), 5, amount, seed=seed)
        assert {"r1", "r2", "r3", "r4"} <= set(labeled)


def test_make_splits_warns_when_the_budget_cannot_cover_all_classes(caplog) -> None:
    sets = rare_classes()
    with caplog.at_level(logging.WARNING, logger="lesseg.data.splits"):
        labeled, _ = make_splits(pool(sets), Masks(sets), 5, 2, seed=0)
    assert len(labeled) == 2 and "cannot cover" in caplog.text


def test_make_splits_stops_reading_masks_once_every_class_is_covered() -> None:
    sets = {f"x{i:04d}": {0, 1, 2} for i in range(500)}
    reader = Masks(sets)
    make_splits(pool(sets), reader, 3, Fraction(1, 16), seed=0)
    assert reader.reads == 1


def test_make_splits_rejects_repeated_names() -> None:
    samples = pool({"a": {0}, "b": {0}}) + pool({"a": {0}})
    with pytest.raises(DataError, match="'a'"):
        make_splits(samples, Masks({"a": {0}, "b": {0}}), 1, 1, seed=0)


# ---------------------------------------------------------------- split files


def test_split_files_round_trip(tmp_path) -> None:
    path = write_split(tmp_path / "out" / "labeled.txt", ["b", "a"])
    assert path.read_text() == "b\na\n"
    assert read_split_file(path) == [("b", None), ("a", None)]
    both = tmp_path / "pairs.txt"
    both.write_text("JPEGImages/x.jpg SegmentationClass/x.png\n\n  y  \r\n")
    assert read_split_file(both) == [("JPEGImages/x.jpg", "SegmentationClass/x.png"), ("y", None)]


def test_split_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "none.txt")):
        read_split_file(tmp_path / "none.txt")
    with pytest.raises(DataError, match="whitespace"):
        write_split(tmp_path / "x.txt", ["ok", "has space"])


def test_write_partition_writes_files_the_source_reads_back(tmp_path) -> None:
    class_sets = [(0,)] * 12 + [(0, 1), (0, 2), (0, 3)]
    tree = make_folder(tmp_path, class_sets, unlabeled=3, suffixes=(".png",))
    src = FolderSource(tree.root)
    out = write_partition(src, "train", "1/5", seed=0, out_dir=tmp_path / "splits" / "1_5")
    assert (out["labeled"], out["unlabeled"]) == (3, 15)
    labeled = src.samples(str(out["labeled_path"]))
    unlabeled = src.samples(str(out["unlabeled_path"]))
    assert (
        sorted(names := [s.name for s in labeled + unlabeled]) == sorted(tree.splits["train"])
        and len(names) == 18
    )
    assert all(s.mask is not None for s in labeled)
    covered = set().union(*(np.unique(src.read_mask(s.mask)).tolist() for s in labeled)) - {255}
    assert covered == {0, 1, 2, 3}
    assert write_partition(src, "train", "3", seed=0, out_dir=tmp_path / "again")["labeled"] == 3


# ---------------------------------------------------------------- differences: "train - labeled"


@pytest.mark.parametrize(
    ("split", "terms"),
    [
        ("train", ["train"]),
        ("labeled_1-16", ["labeled_1-16"]),  # a bare "-" belongs to the name
        ("train - labeled_75", ["train", "labeled_75"]),
        ("train_aug - splits/1-8/labeled.txt - val", ["train_aug", "splits/1-8/labeled.txt", "val"]),
        (" train  -  labeled ", ["train", "labeled"]),
    ],
)
def test_split_terms(split, terms) -> None:
    assert split_terms(split) == terms


@pytest.mark.parametrize("split", ["train - ", " - labeled", "a -  - b"])
def test_split_terms_rejects_empty_terms(split) -> None:
    with pytest.raises(ConfigError, match=f"split {split!r} has an empty term"):
        split_terms(split)


def test_write_complement_writes_the_rest_of_the_split(tmp_path) -> None:
    tree = make_folder(tmp_path, [(0, 1), (0, 2), (0, 3), (0, 1)], unlabeled=2, suffixes=(".png",))
    src = FolderSource(tree.root)
    mine = tmp_path / "my_labeled.txt"  # a hand-picked list: pair lines and names, one not in the split
    mine.write_text("images/img_001.png masks/img_001.png\nimg_003\nimg_999\n")
    out = write_complement(src, "train", str(mine), tmp_path / "out")
    assert out == {"labeled": 2, "unlabeled": 4, "unlabeled_path": tmp_path / "out" / "unlabeled.txt"}
    assert read_split_file(out["unlabeled_path"]) == [(n, None) for n in ("img_000", "img_002", "img_004", "img_005")]
    assert [s.name for s in src.samples(str(out["unlabeled_path"]))] == [
        s.name for s in src.samples(f"train - {mine}")
    ]
    with pytest.raises(DataError, match=r"is empty: each of the 6 images of 'train' is in 'train'"):
        write_complement(src, "train", "train", tmp_path / "none")
