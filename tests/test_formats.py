"""Dataset formats on tiny trees in the real layouts: split listing, split files, label mapping, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_trees import H, W, make_cityscapes, make_folder, make_gtav, make_synthia, make_voc
from PIL import Image

from lesseg import config
from lesseg.data import SegDataset, build_source, build_streams
from lesseg.data.base import SOURCES, SegSource
from lesseg.data.check import require_clean, resized_warning, scan
from lesseg.data.sources.cityscapes import CityscapesSource, GTAVSource, SynthiaSource
from lesseg.data.sources.folder import FolderSource
from lesseg.data.sources.voc import VOCSource
from lesseg.errors import ConfigError, DataError

# The SYNTHIA -> Cityscapes protocols, written out here (not taken from lesseg.data.sources)
CLASSES_16 = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
]  # fmt: skip
CLASSES_13 = [c for c in CLASSES_16 if c not in ("wall", "fence", "pole")]


def counts(mask: np.ndarray) -> dict[int, int]:
    values, n = np.unique(mask, return_counts=True)
    return dict(zip(values.tolist(), n.tolist()))


def pillow(path: Path) -> tuple[str, np.ndarray]:
    """Mode and pixels of a file as Pillow decodes it, without lesseg's readers."""
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def names(samples) -> list[str]:
    return [s.name for s in samples]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ---------------------------------------------------------------- shared behaviour


def test_sources_are_registered() -> None:
    assert {"folder", "voc", "cityscapes", "gtav", "synthia"} <= set(SOURCES.names())
    assert SOURCES.get("voc") is VOCSource


@pytest.mark.parametrize(
    ("cls", "build", "known"),
    [
        (FolderSource, make_folder, "binary_mask, masks_dir"),
        (VOCSource, make_voc, "aug_masks, tags"),
        (CityscapesSource, make_cityscapes, "classes"),
        (GTAVSource, make_gtav, "none"),
        (SynthiaSource, make_synthia, "classes"),
    ],
)
def test_unknown_option_is_config_error_naming_it_and_the_known_ones(tmp_path, cls, build, known) -> None:
    root = build(tmp_path).root
    with pytest.raises(ConfigError, match=rf"'colour_jitter'.*known options: {known}$"):
        cls(root, colour_jitter=True)


def test_option_of_wrong_type_is_config_error(tmp_path) -> None:
    root = make_voc(tmp_path).root
    with pytest.raises(ConfigError, match="aug_masks.*bool.*'yes'"):
        VOCSource(root, aug_masks="yes")


def test_missing_split_file_names_the_path(tmp_path) -> None:
    src = VOCSource(make_voc(tmp_path).root)
    with pytest.raises(DataError, match="trian") as e:
        src.samples("trian")
    assert str(src.root / "trian") in str(e.value) and "train_aug" in str(e.value)
    missing = tmp_path / "lists" / "labeled.txt"
    with pytest.raises(DataError, match=str(missing)):
        src.samples(str(missing))


def test_missing_images_are_one_error_listing_the_first_ten_and_the_count(tmp_path) -> None:
    src = VOCSource(make_voc(tmp_path).root)
    ids = ["2007_000032"] + [f"2010_{i:06d}" for i in range(12)]
    with pytest.raises(DataError) as e:
        src.samples(str(write(tmp_path / "l.txt", ids)))
    message = str(e.value)
    assert message.startswith("12 file(s)") and "(and 2 more)" in message
    assert str(src.root / "JPEGImages" / "2010_000000.jpg") in message
    assert "2010_000011" not in message  # only the first ten are shown


def test_split_file_line_with_three_fields_names_file_and_line(tmp_path) -> None:
    src = VOCSource(make_voc(tmp_path).root)
    path = write(tmp_path / "l.txt", ["2007_000032", "JPEGImages/a b.jpg SegmentationClass/a.png"])
    with pytest.raises(DataError, match=rf"{path}:2: .*3 whitespace-separated fields"):
        src.samples(str(path))


def test_empty_split_is_an_error(tmp_path) -> None:
    src = VOCSource(make_voc(tmp_path).root)
    with pytest.raises(DataError, match="lists no images"):
        src.samples(str(write(tmp_path / "empty.txt", [""])))


# ---------------------------------------------------------------- split differences: "train - labeled"


def test_split_difference_is_the_rest_of_a_split_in_its_order(tmp_path) -> None:
    tree = make_folder(tmp_path, unlabeled=3)
    src = FolderSource(tree.root)
    rest = src.samples("train - labeled")
    assert names(rest) == ["img_003", "img_004", "img_005"]
    assert all(s.mask is None for s in rest)
    write(tree.root / "splits" / "hard.txt", ["img_004"])
    assert names(src.samples("train - labeled - hard")) == ["img_003", "img_005"]
    assert names(src.samples("  train   -   labeled  ")) == names(rest)  # spaces around the terms


def test_split_difference_matches_names_of_pair_lists_and_standard_splits(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root)
    # a U2PL-style list of pairs: names are the image stems
    pairs = write(tmp_path / "labeled.txt", ["JPEGImages/2008_000002.jpg SegmentationClassAug/2008_000002.png"])
    assert names(src.samples(f"train_aug - {pairs}")) == sorted(set(tree.splits["train_aug"]) - {"2008_000002"})
    assert names(src.samples("train_aug - train")) == sorted(set(tree.splits["train_aug"]) - set(tree.splits["train"]))
    # names of the excluded split that the first does not have (val is not in train_aug) are ignored
    assert names(src.samples("train_aug - trainval")) == names(src.samples("train_aug - train"))


def test_split_difference_ignores_missing_files_of_the_images_it_removes(tmp_path) -> None:
    tree = make_folder(tmp_path, unlabeled=2)
    (tree.root / "images" / "img_003.png").unlink()  # unlabeled img_003, excluded below
    write(tree.root / "splits" / "gone.txt", ["img_003"])
    src = FolderSource(tree.root)
    assert names(src.samples("train - gone")) == ["img_000", "img_001", "img_002", "img_004"]
    with pytest.raises(DataError, match=r"1 file\(s\) of split 'train - labeled' of .*/images/img_003\.\{png"):
        src.samples("train - labeled")  # the missing image is in the difference: reported under its name


def test_split_difference_that_removes_nothing_is_one_warning(tmp_path, caplog) -> None:
    tree = make_folder(tmp_path, unlabeled=1)
    write(tree.root / "splits" / "other.txt", ["elsewhere_1", "elsewhere_2"])
    src = FolderSource(tree.root)
    for _ in range(3):  # listed again and again (check, streams, evaluation): warned once
        assert names(src.samples("train - other")) == tree.splits["train"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        (
            "split 'train - other': none of the 2 images of 'other' is in 'train', so it removes nothing (is it "
            "the list of another split or dataset?)"
        )
    ]


def test_split_difference_errors_name_the_split_and_what_is_wrong(tmp_path) -> None:
    tree = make_folder(tmp_path, unlabeled=0)
    src = FolderSource(tree.root)
    with pytest.raises(DataError, match=r"^split 'train - labeled' of .* is empty: each of the 3 images of "
                                        r"'train' is in 'labeled'$"):
        src.samples("train - labeled")
    with pytest.raises(DataError, match=r"^split 'train - labeld': split 'labeld' of .* is not one of its "
                                        r"splits \(labeled, train\)"):
        src.samples("train - labeld")
    with pytest.raises(DataError, match=r"^split 'trian - labeled': split 'trian'"):
        src.samples("trian - labeled")
    with pytest.raises(ConfigError, match=r"split 'train - ' has an empty term"):
        src.samples("train - ")
    # without spaces it is one name (labeled_1-16 is a split name), and the message says how to subtract
    with pytest.raises(DataError, match=r"to take the images of 'train' that 'labeled' does not list, write "
                                        r"'train - labeled'"):
        src.samples("train-labeled")


def test_split_difference_streams_train_on_the_rest(tmp_path) -> None:
    tree = make_folder(tmp_path, unlabeled=2)
    data = data_cfg("folder", tree.root, {}, labeled={"split": "labeled", "batch_size": 2},
                    unlabeled={"split": "train - labeled", "batch_size": 2, "labeled": False})
    streams = build_streams(data, ("labeled", "unlabeled"), progress=False)
    assert [s.name for s in streams["unlabeled"].dataset.samples] == ["img_003", "img_004"]


# ---------------------------------------------------------------- folder


def test_folder_lists_a_split_with_optional_masks_and_tags(tmp_path) -> None:
    tree = make_folder(tmp_path, unlabeled=2)
    src = FolderSource(tree.root)
    assert src.classes == ["background", "cat", "dog", "bird"]
    samples = src.samples("train")
    assert names(samples) == tree.splits["train"]
    assert [s.image.suffix for s in samples] == [".png", ".jpg", ".jpeg", ".png", ".jpg"]
    for s in samples:
        if s.name in tree.masks:
            np.testing.assert_array_equal(src.read_mask(s.mask), tree.masks[s.name])
            assert s.tags == tree.extra["tags"][s.name]
        else:
            assert s.mask is None and s.tags is None  # unlabeled, and absent from image_labels.csv
    assert names(src.samples("labeled")) == tree.splits["labeled"]


def test_folder_split_file_relative_to_root_or_absolute(tmp_path) -> None:
    tree = make_folder(tmp_path)
    src = FolderSource(tree.root)
    assert names(src.samples("splits/labeled.txt")) == tree.splits["labeled"]
    assert names(src.samples(str(tree.root / "splits" / "labeled.txt"))) == tree.splits["labeled"]


def test_folder_requires_classes_txt(tmp_path) -> None:
    root = make_folder(tmp_path).root
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=str(root / "classes.txt")):
        FolderSource(root)


def test_folder_tag_out_of_range_names_file_and_line(tmp_path) -> None:
    root = make_folder(tmp_path).root
    write(root / "image_labels.csv", ["img_000,0;1", "img_001,2;4"])
    with pytest.raises(DataError, match=rf"{root / 'image_labels.csv'}:2: .*0\.\.3"):
        FolderSource(root)


def test_folder_binary_masks_map_255_to_1(tmp_path) -> None:
    tree = make_folder(
        tmp_path, [(0, 1), (1,), (0,)], classes=("background", "lesion"), unlabeled=0, binary=True
    )
    src = FolderSource(tree.root, binary_mask=True)
    for s in src.samples("train"):
        raw = pillow(s.mask)[1]
        assert set(np.unique(raw)) <= {0, 255}
        mask = src.read_mask(s.mask)
        np.testing.assert_array_equal(mask, tree.masks[s.name])
        assert set(np.unique(mask)) <= {0, 1}
    bad = tree.root / "masks" / "img_000.png"
    Image.fromarray(np.full((H, W), 128, np.uint8)).save(bad)
    with pytest.raises(DataError, match=rf"{bad}.*\[128\]"):
        src.read_mask(bad)
    with pytest.raises(ConfigError, match="2 classes"):
        FolderSource(make_folder(tmp_path / "multi", binary=False).root, binary_mask=True)


def test_folder_masks_dir_reads_masks_from_another_folder(tmp_path) -> None:
    tree = make_folder(tmp_path, [(0, 1), (1,), (0,)], classes=("background", "lesion"), unlabeled=1,
                       binary=True, masks_dir="masks_binary")
    assert not (tree.root / "masks").exists()
    src = FolderSource(tree.root, binary_mask=True, masks_dir="masks_binary")
    samples = src.samples("train")
    assert [s.mask for s in samples] == [tree.root / "masks_binary" / f"{n}.png" for n in tree.splits["labeled"]] + [None]
    for s in samples[:3]:
        np.testing.assert_array_equal(src.read_mask(s.mask), tree.masks[s.name])
    assert all(s.mask is None for s in FolderSource(tree.root).samples("train"))  # default masks/: none
    absolute = FolderSource(tree.root, binary_mask=True, masks_dir=str(tree.root / "masks_binary"))
    assert [s.mask for s in absolute.samples("train")] == [s.mask for s in samples]
    with pytest.raises(DataError, match=rf"masks folder {tree.root / 'masks_bin'} \(option masks_dir\) does not"):
        FolderSource(tree.root, masks_dir="masks_bin")


def test_out_of_range_mask_value_names_the_file(tmp_path) -> None:
    tree = make_folder(tmp_path)
    src = FolderSource(tree.root)
    path = tree.root / "masks" / "img_000.png"
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"{path}.*\[7\]"):
        src.read_mask(path)


def test_sixteen_bit_masks_are_range_checked_before_the_uint8_cast(tmp_path) -> None:
    tree = make_folder(tmp_path)
    src = FolderSource(tree.root)
    path = tree.root / "masks" / "img_000.png"
    Image.fromarray(tree.masks["img_000"].astype(np.uint16)).save(path)
    assert pillow(path)[0] == "I;16"
    np.testing.assert_array_equal(src.read_mask(path), tree.masks["img_000"])
    Image.fromarray(np.full((H, W), 257, np.uint16)).save(path)  # a uint8 cast would wrap it to 1
    with pytest.raises(DataError, match=rf"{path}.*\[257\]"):
        src.read_mask(path)


def test_colour_masks_are_rejected(tmp_path) -> None:
    tree = make_folder(tmp_path)
    path = tree.root / "masks" / "img_000.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"{path} has 3 channels"):
        FolderSource(tree.root).read_mask(path)


def test_grayscale_16bit_palette_and_rgba_images_read_as_rgb(tmp_path) -> None:
    modes = ("L", "I;16", "P", "RGBA", "RGB")
    tree = make_folder(tmp_path, [(0,)] * len(modes), unlabeled=0, suffixes=(".png",), modes=modes)
    src = FolderSource(tree.root)
    for s, mode in zip(src.samples("train"), modes):
        assert pillow(s.image)[0] == mode
        rgb = src.read_image(s.image)
        assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3), mode
        np.testing.assert_array_equal(rgb, tree.extra["images"][s.name], err_msg=mode)


# ---------------------------------------------------------------- VOC


def test_voc_standard_splits(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root)
    for split in ("train", "val", "trainval", "train_aug"):
        assert names(src.samples(split)) == tree.splits[split], split
    assert src.num_classes == 21 and src.classes[15] == "person"
    assert src.palette[1].tolist() == [128, 0, 0] and src.palette[15].tolist() == [192, 128, 128]


def test_voc_palette_masks_read_as_indices_with_255_borders(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root)
    s = src.samples("train")[0]
    assert s.mask == tree.root / "SegmentationClass" / f"{s.name}.png"
    assert pillow(s.mask)[0] == "P"
    mask = src.read_mask(s.mask)
    np.testing.assert_array_equal(mask, tree.masks[s.name])
    assert counts(mask) == {0: 12 * H, 1: 8 * H, 15: 8 * H, 255: 4 * H}


def test_voc_masks_prefer_segmentationclass_unless_aug_masks(tmp_path) -> None:
    tree = make_voc(tmp_path)
    fine, aug = VOCSource(tree.root), VOCSource(tree.root, aug_masks=True)
    by_name = {s.name: s for s in fine.samples("train_aug")}
    assert by_name["2007_000032"].mask.parent.name == "SegmentationClass"
    assert by_name["2008_000002"].mask.parent.name == "SegmentationClassAug"  # SBD only
    for s in aug.samples("train_aug"):
        assert s.mask.parent.name == "SegmentationClassAug"
        np.testing.assert_array_equal(aug.read_mask(s.mask), tree.extra["aug"][s.name])


def test_voc_train_aug_txt_in_deeplab_format_is_used_when_present(tmp_path) -> None:
    tree = make_voc(tmp_path)
    ids = ["2007_000039", "2008_000003"]
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
    write(tree.root / "ImageSets" / "Segmentation" / "train_aug.txt", lines)
    samples = VOCSource(tree.root).samples("train_aug")
    assert names(samples) == ids
    assert [s.mask for s in samples] == [tree.root / "SegmentationClassAug" / f"{i}.png" for i in ids]


def test_voc_unimatch_and_u2pl_split_files(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root)
    lines = [
        "JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png",  # UniMatch labeled
        "JPEGImages/2007_000039.jpg",  # UniMatch unlabeled: mask inferred
        "2008_000002",  # U2PL bare id: mask inferred (SBD only)
        tree.extra["no_mask"],  # an image without any mask
    ]
    samples = src.samples(str(write(tmp_path / "split.txt", lines)))
    assert names(samples) == ["2007_000032", "2007_000039", "2008_000002", "2009_000001"]
    assert [s.image for s in samples] == [tree.root / "JPEGImages" / f"{n}.jpg" for n in names(samples)]
    assert [s.mask.parent.name if s.mask else None for s in samples] == [
        "SegmentationClass",
        "SegmentationClass",
        "SegmentationClassAug",
        None,
    ]
    bad = write(tmp_path / "bad.txt", ["JPEGImages/2007_000032.jpg SegmentationClass/2007_999999.png"])
    with pytest.raises(DataError, match=str(tree.root / "SegmentationClass" / "2007_999999.png")):
        src.samples(str(bad))


def voc_tags(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(sorted(set(np.unique(mask).tolist()) - {0, 255}))


def test_voc_has_no_tags_unless_asked(tmp_path) -> None:
    src = VOCSource(make_voc(tmp_path).root)
    assert all(s.tags is None for s in src.samples("train_aug"))


def test_voc_tags_are_the_classes_of_each_mask_without_background_and_ignore(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root, tags=True)
    samples = src.samples("train_aug")
    assert names(samples) == tree.splits["train_aug"]
    assert {s.name: s.tags for s in samples} == {s.name: voc_tags(tree.masks[s.name]) for s in samples}
    assert {s.name: s.tags for s in samples}["2007_000039"] == (5, 20)  # bands 0, 20, 0, 5 (+ 255 borders)
    for s in VOCSource(tree.root, aug_masks=True, tags=True).samples("train_aug"):  # the SBD masks agree
        assert s.tags == voc_tags(tree.extra["aug"][s.name])
    ds = SegDataset(src, samples, train=False, labeled=True, mean=[0.0] * 3, std=[1.0] * 3)
    assert ds.with_tags
    multi_hot = ds[1]["tags"]
    assert multi_hot.shape == (21,) and multi_hot.nonzero().flatten().tolist() == [5, 20]


def test_voc_image_without_mask_has_no_tags(tmp_path) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root, tags=True)
    samples = src.samples(str(write(tmp_path / "l.txt", ["2007_000032", tree.extra["no_mask"]])))
    assert [s.tags for s in samples] == [(1, 15), None]
    assert not SegDataset(src, samples, train=False, labeled=False, mean=[0.0] * 3, std=[1.0] * 3).with_tags


def test_voc_tags_are_derived_once_per_mask_file(tmp_path, monkeypatch) -> None:
    tree = make_voc(tmp_path)
    src = VOCSource(tree.root, tags=True)
    read = []
    original = src.read_mask
    monkeypatch.setattr(src, "read_mask", lambda path: read.append(path.name) or original(path))
    first = src.samples("train")
    assert sorted(read) == ["2007_000032.png", "2007_000039.png"]
    assert src.samples("trainval") == [*first[:1], *src.samples("val"), *first[1:]]
    assert sorted(read) == ["2007_000032.png", "2007_000033.png", "2007_000039.png"]  # only val's was new


def test_voc_unreadable_masks_are_one_tag_error_unless_not_strict(tmp_path) -> None:
    tree = make_voc(tmp_path)
    bad = [tree.root / "SegmentationClass" / f"{n}.png" for n in tree.splits["train"]]
    for path in bad:
        path.write_bytes(b"not a png")
    src = VOCSource(tree.root, tags=True)
    with pytest.raises(DataError, match=r"image tags of 2 mask\(s\) of split 'train'") as e:
        src.samples("train")
    assert all(str(p) in str(e.value) for p in bad)
    assert [s.tags for s in src.samples("trainval", strict=False)] == [None, (7, 9), None]


# ---------------------------------------------------------------- Cityscapes


def test_voc_root_at_the_devkit_level_names_the_voc2012_folder(tmp_path) -> None:
    tree = make_voc(tmp_path / "VOCdevkit", folder="VOC2012")
    for root in (tmp_path / "VOCdevkit", tmp_path):  # the devkit folder, and the folder the tar was unpacked in
        with pytest.raises(DataError, match=rf"^dataset root {root} has no JPEGImages/ folder, but {tree.root} "
                                            rf"has: set data.root \(or the stream's root\) to {tree.root}$"):
            VOCSource(root)
    assert names(VOCSource(tree.root).samples("train")) == tree.splits["train"]
    make_voc(tmp_path / "VOCdevkit", folder="VOC2007")
    with pytest.raises(DataError, match=rf"to {tree.root} \(also found in {tmp_path / 'VOCdevkit' / 'VOC2007'}\)"):
        VOCSource(tmp_path / "VOCdevkit")


def test_cityscapes_standard_splits_use_label_ids(tmp_path) -> None:
    tree = make_cityscapes(tmp_path)
    src = CityscapesSource(tree.root)
    for split in ("train", "val"):
        samples = src.samples(split)
        assert names(samples) == tree.splits[split]
        assert all(s.mask.name.endswith("_gtFine_labelIds.png") for s in samples)
        for s in samples:
            np.testing.assert_array_equal(src.read_mask(s.mask), tree.masks[s.name])


def test_cityscapes_label_ids_map_to_train_ids(tmp_path) -> None:
    tree = make_cityscapes(tmp_path)
    src = CityscapesSource(tree.root)
    s = src.samples("train")[0]  # bands of label ids 7, 26, 0, 24, 4, 33 with widths 8, 6, 4, 6, 4, 4
    assert counts(pillow(s.mask)[1]) == {
        0: 4 * H,
        4: 4 * H,
        7: 8 * H,
        24: 6 * H,
        26: 6 * H,
        33: 4 * H,
    }
    assert counts(src.read_mask(s.mask)) == {0: 8 * H, 11: 6 * H, 13: 6 * H, 18: 4 * H, 255: 8 * H}
    assert src.classes[13] == "car" and src.palette[13].tolist() == [0, 0, 142]


def test_cityscapes_u2pl_and_unimatch_split_files(tmp_path) -> None:
    tree = make_cityscapes(tmp_path)
    src = CityscapesSource(tree.root)
    a, b = "aachen_000000_000019", "aachen_000001_000019"
    lines = [
        f"leftImg8bit/train/aachen/{a}_leftImg8bit.png gtFine/train/aachen/{a}_gtFine_labelTrainIds.png",
        f"leftImg8bit/train/aachen/{b}_leftImg8bit.png",  # unlabeled line: mask inferred from the layout
        "frankfurt_000000_000294",  # bare name: found in val
    ]
    samples = src.samples(str(write(tmp_path / "labeled.txt", lines)))
    assert names(samples) == [a, b, "frankfurt_000000_000294"]
    assert samples[0].mask.name.endswith("_labelTrainIds.png")
    assert samples[1].mask.name.endswith("_labelIds.png")
    assert samples[2].image.parent.parent.name == "val"
    for s in samples:  # train ids are not mapped a second time, label ids are
        np.testing.assert_array_equal(src.read_mask(s.mask), tree.masks[s.name])


def test_cityscapes_train_id_mask_out_of_range_names_the_file(tmp_path) -> None:
    tree = make_cityscapes(tmp_path)
    path = next((tree.root / "gtFine" / "train").glob("*/*_labelTrainIds.png"))
    Image.fromarray(np.full((H, W), 19, np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"{path}.*\[19\]"):
        CityscapesSource(tree.root).read_mask(path)


@pytest.mark.parametrize("n", [16, 13])
def test_cityscapes_16_and_13_class_protocols(tmp_path, n) -> None:
    tree = make_cityscapes(tmp_path)
    src = CityscapesSource(tree.root, classes=n)
    assert src.classes == (CLASSES_16 if n == 16 else CLASSES_13)
    assert src.palette[src.classes.index("bus")].tolist() == [0, 60, 100] and len(src.palette) == n
    expected = tree.extra[f"masks{n}"]
    for split in ("train", "val"):
        for s in src.samples(split):
            assert s.mask.name.endswith("_labelIds.png")
            np.testing.assert_array_equal(src.read_mask(s.mask), expected[s.name])
            trainids = s.mask.with_name(s.mask.name.replace("_labelIds", "_labelTrainIds"))
            if trainids.exists():  # 19-class train ids are narrowed the same way
                np.testing.assert_array_equal(src.read_mask(trainids), expected[s.name])
    # ids 12 wall, 13 fence, 17 pole, 22 terrain, 27 truck, 31 train, 28 bus, 32 motorcycle: 4 columns each
    mask = src.read_mask(next(s.mask for s in src.samples("train") if s.name == tree.extra["protocol"]))
    if n == 16:
        assert counts(mask) == {3: 4 * H, 4: 4 * H, 5: 4 * H, 13: 4 * H, 14: 4 * H, 255: 12 * H}
    else:
        assert counts(mask) == {10: 4 * H, 11: 4 * H, 255: 24 * H}
    # first train image: ids 7 road, 26 car, 0, 24 person, 4, 33 bicycle
    car, person, bicycle = (12, 10, 15) if n == 16 else (9, 7, 12)
    first = src.read_mask(src.samples("train")[0].mask)
    assert counts(first) == {0: 8 * H, car: 6 * H, person: 6 * H, bicycle: 4 * H, 255: 8 * H}


def test_cityscapes_classes_option_is_checked(tmp_path) -> None:
    tree = make_cityscapes(tmp_path)
    assert CityscapesSource(tree.root, classes=19).classes == CityscapesSource(tree.root).classes
    with pytest.raises(ConfigError, match="19, 16 or 13, got 17"):
        CityscapesSource(tree.root, classes=17)
    with pytest.raises(ConfigError, match="classes.*int.*'16'"):
        CityscapesSource(tree.root, classes="16")
    path = next((tree.root / "gtFine" / "train").glob("*/*_labelTrainIds.png"))
    Image.fromarray(np.full((H, W), 19, np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"{path}.*\[19\]"):
        CityscapesSource(tree.root, classes=16).read_mask(path)


# ---------------------------------------------------------------- GTAV


def test_gtav_lists_all_and_resizes_a_mismatched_label_to_its_image(tmp_path) -> None:
    tree = make_gtav(tmp_path)
    src = GTAVSource(tree.root)
    samples = src.samples("all")
    assert names(samples) == tree.splits["all"]
    for s in samples:
        image, mask = src.read_image(s.image), src.read_mask(s.mask)
        if s.name == tree.extra["mismatched"]:
            assert mask.shape == (H // 2, W // 2)
            with pytest.raises(DataError, match=rf"{s.image}.*{s.mask}"):
                SegSource.align(src, image, mask, s)  # the default refuses
        image2, mask2 = src.align(image, mask, s)
        assert image2 is image
        np.testing.assert_array_equal(mask2, tree.masks[s.name])


def test_gtav_lists_at_the_root_are_splits_by_name(tmp_path) -> None:
    tree = make_gtav(tmp_path)
    src = GTAVSource(tree.root)
    samples = src.samples("train")  # root/train.txt: 00001.png, 00002.png
    assert names(samples) == tree.splits["train"]
    assert [s.mask for s in samples] == [tree.root / "labels" / f"{n}.png" for n in tree.splits["train"]]
    assert names(src.samples("all - train")) == [tree.extra["mismatched"]]
    with pytest.raises(DataError, match=r"split 'val' of .* is not one of its splits \(all, train\) and no "
                                        rf"split file exists at {tree.root / 'val.txt'}"):
        src.samples("val")


def test_check_notes_resized_gtav_masks_and_the_training_check_logs_them(tmp_path, caplog) -> None:
    tree = make_gtav(tmp_path)
    src = GTAVSource(tree.root)
    samples = src.samples("all")
    result = scan(src, samples, progress=False)
    label, image = (tree.root / d / f"{tree.extra['mismatched']}.png" for d in ("labels", "images"))
    assert result.problems == [] and result.resized == [f"{label} (16x8, image {image} 32x16)"]
    assert result.counts.sum() == 3 * 3 * 8 * H  # 3 labeled bands of 8 columns per mask, all at the image size
    require_clean(src, samples, True, "stream 'source' (all)", progress=False)
    assert (f"1 mask(s) of stream 'source' (all) differ in size from their image and are resized to it (nearest "
            f"neighbour):\n  {label} (16x8") in caplog.text
    notes = [f"labels/{i}.png" for i in range(7)]
    assert resized_warning(notes, "all", shown=5).endswith(
        "labels/4.png\n  ... and 2 more (lesseg data check lists them all)")
    assert resized_warning(notes, "all").count("labels/") == 7 and resized_warning([], "all") is None


def test_gtav_advent_style_file_names(tmp_path) -> None:
    tree = make_gtav(tmp_path, mismatched=False)
    samples = GTAVSource(tree.root).samples(str(write(tmp_path / "all.txt", ["00002.png", "00003.png"])))
    assert names(samples) == ["00002", "00003"]
    assert [s.mask for s in samples] == [tree.root / "labels" / f"{n}.png" for n in ("00002", "00003")]


# ---------------------------------------------------------------- SYNTHIA


def test_synthia_fixture_has_the_real_encoding(tmp_path) -> None:
    """16-bit RGB, class id in R: Pillow keeps only high bytes, so R reads 0 and G the instance >> 8."""
    tree = make_synthia(tmp_path)
    name = tree.splits["all"][0]
    path = tree.root / "GT" / "LABELS" / f"{name}.png"
    assert path.read_bytes()[24:26] == bytes([16, 2])  # IHDR: bit depth 16, colour type 2 (RGB)
    mode, truncated = pillow(path)
    assert mode == "RGB"
    assert not truncated[..., 0].any()
    np.testing.assert_array_equal(truncated[..., 1], tree.extra["instances"][name] >> 8)


@pytest.mark.parametrize("n", [16, 13])
def test_synthia_maps_class_ids_to_the_benchmark_classes(tmp_path, n) -> None:
    tree = make_synthia(tmp_path)
    src = SynthiaSource(tree.root) if n == 16 else SynthiaSource(tree.root, classes=13)
    assert src.num_classes == n and len(src.palette) == n
    assert ("wall" in src.classes) == (n == 16) and src.classes[-1] == "bicycle"
    expected = tree.masks if n == 16 else tree.extra["masks13"]
    samples = src.samples("all")
    assert names(samples) == tree.splits["all"]
    for s in samples:
        np.testing.assert_array_equal(src.read_mask(s.mask), expected[s.name])
    # first label: ids 3 (road), 8 (car), 21 (wall), 0 (void), 16 (terrain), 1 (sky), 12 (motorcycle)
    car, sky, moto = (12, 9, 14) if n == 16 else (9, 6, 11)
    wall = {3: 4 * H} if n == 16 else {}
    ignored = (8 if n == 16 else 12) * H
    assert counts(src.read_mask(samples[0].mask)) == {
        0: 8 * H,
        car: 4 * H,
        sky: 4 * H,
        moto: 4 * H,
        **wall,
        255: ignored,
    }


def test_synthia_rejects_other_class_counts_and_missing_labels(tmp_path) -> None:
    tree = make_synthia(tmp_path)
    with pytest.raises(ConfigError, match="16 or 13"):
        SynthiaSource(tree.root, classes=19)
    missing = tree.root / "GT" / "LABELS" / "9999999.png"
    with pytest.raises(DataError, match=str(missing)):
        SynthiaSource(tree.root).read_mask(missing)


@pytest.mark.parametrize("n", [16, 13])
def test_synthia_and_cityscapes_protocols_have_equal_class_lists(tmp_path, n) -> None:
    synthia = SynthiaSource(make_synthia(tmp_path).root, classes=n)
    cityscapes = CityscapesSource(make_cityscapes(tmp_path).root, classes=n)
    assert synthia.classes == cityscapes.classes == (CLASSES_16 if n == 16 else CLASSES_13)
    np.testing.assert_array_equal(synthia.palette, cityscapes.palette)


# ---------------------------------------------------------------- class lists of the streams


def data_cfg(dataset: str, root: Path, options: dict, **streams: dict):
    """A config whose data section reads ``dataset`` and the given streams (no check before training)."""
    data = {"dataset": dataset, "root": str(root), "options": options, "check": False, "streams": streams}
    return config.from_dict({"data": data, "train": {"iters": 1}}).data


def test_synthia_stream_with_cityscapes_run_needs_the_same_protocol(tmp_path) -> None:
    synthia, cityscapes = make_synthia(tmp_path).root, make_cityscapes(tmp_path).root
    source = {"dataset": "synthia", "root": str(synthia), "split": "all", "batch_size": 2}
    target = {"split": "train", "batch_size": 2, "labeled": False}
    for n in (16, 13):
        data = data_cfg("cityscapes", cityscapes, {"classes": n},
                        source={**source, "options": {"classes": n}}, target=target)  # fmt: skip
        streams = build_streams(data, ("source", "target"), progress=False)
        assert streams["source"].dataset.source.classes == streams["target"].dataset.source.classes
    data = data_cfg("cityscapes", cityscapes, {}, source=source, target=target)
    with pytest.raises(ConfigError) as e:
        build_streams(data, ("source", "target"), progress=False)
    message = str(e.value)
    assert message.startswith(f"stream 'source' reads dataset synthia at {synthia}")
    assert f"data.dataset cityscapes at {cityscapes}" in message
    assert f"16 classes {CLASSES_16}" in message and "19 classes ['road'" in message
    assert "first differ at class 9: 'sky' in the stream, 'terrain' in the run" in message


def test_folder_stream_of_other_classes_than_a_shapes_run_is_refused(tmp_path, shapes_root) -> None:
    folder = make_folder(tmp_path, [(0, 1), (0, 2)], classes=("background", "cat", "dog"), unlabeled=0).root
    stream = {"dataset": "folder", "root": str(folder), "options": {}, "split": "train", "batch_size": 2}
    shapes = {"n_train": 32, "n_val": 15, "size": 32}  # the session's tiny shapes dataset
    data = data_cfg(
        "shapes", shapes_root, shapes, labeled=stream, unlabeled={"split": "train", "batch_size": 2}
    )
    with pytest.raises(ConfigError, match="stream 'labeled' reads dataset folder") as e:
        build_streams(data, ("labeled", "unlabeled"), progress=False)
    assert "3 classes ['background', 'cat', 'dog']" in str(e.value)
    assert "7 classes ['background', 'disk'" in str(e.value)
    assert "class 1: 'cat' in the stream, 'disk' in the run" in str(e.value)


def test_folder_trees_whose_class_lists_differ_in_length(tmp_path) -> None:
    run = make_folder(tmp_path / "run", [(0, 1), (0, 2)], classes=("background", "cat", "dog"), unlabeled=0)
    other = make_folder(tmp_path / "other", [(0, 1), (0, 1)], classes=("background", "cat"), unlabeled=0)
    stream = {"root": str(other.root), "split": "train", "batch_size": 2}
    data = data_cfg("folder", run.root, {}, labeled=stream)
    with pytest.raises(ConfigError, match=f"dataset folder at {other.root} .*at {run.root}") as e:
        build_streams(data, ("labeled",), progress=False)
    assert "class 2: nothing (its list ends) in the stream, 'dog' in the run" in str(e.value)
    same = make_folder(tmp_path / "same", [(0, 2)] * 3, classes=("background", "cat", "dog"), unlabeled=0)
    data = data_cfg("folder", run.root, {}, labeled={**stream, "root": str(same.root)})
    assert len(build_streams(data, ("labeled",), progress=False)["labeled"].dataset) == 3


# ---------------------------------------------------------------- shapes


def test_shapes_samples_carry_the_generator_tags(shapes_root) -> None:
    src = build_source("shapes", str(shapes_root), {"n_train": 32, "n_val": 15, "size": 32})
    samples = src.samples("train")
    assert all(s.tags == voc_tags(src.read_mask(s.mask)) for s in samples)  # from image_labels.csv
    ds = SegDataset(src, samples, train=False, labeled=True, mean=[0.0] * 3, std=[1.0] * 3)
    assert ds.with_tags and ds[0]["tags"].shape == (7,)
