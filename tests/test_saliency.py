"""Saliency maps (issue 19): OpenCV contrib's detectors find a bright object, the folder reader reads the
user's maps and refuses missing or misfit ones by name, the maps follow the image through augmentation, and
the cam method's pseudo-masks take their background from low saliency (and remake when the setting
changes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from lesseg import config as config_mod
from lesseg.config import AugConfig
from lesseg.data import build_source
from lesseg.data.loader import SegDataset
from lesseg.data.saliency import SaliencyMaps, saliency_map
from lesseg.engine.stages import PipelineRun
from lesseg.errors import ConfigError, DataError
from lesseg.methods.cam import CAM

H, W = 30, 40  # not square: a transposed or mis-flipped map shows
NAMES = ["i0", "i1", "i2", "i3"]
TAGS = "i0,1\ni1,1;2\ni2,2\ni3,1\n"


def gradient_image(k: int) -> np.ndarray:
    """An image whose red channel is a smooth ramp 2x + 3y + k (<= 171: never 255, the padding value), so
    nearest and bilinear resampling of it differ by a few levels only; green and blue are noise."""
    y, x = np.mgrid[:H, :W]
    rng = np.random.default_rng(k)
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    image[..., 0] = 2 * x + 3 * y + k
    return image


def make_dataset(root: Path) -> None:
    """A folder dataset of 4 tagged HxW images with masks (classes background, square, bar), split ``all``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("background\nsquare\nbar\n")
    mask = np.zeros((H, W), np.uint8)
    mask[4:16, 4:16], mask[20:26, :] = 1, 2
    for k, name in enumerate(NAMES):
        Image.fromarray(gradient_image(k)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    for split in ("all", "val"):
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (root / "image_labels.csv").write_text(TAGS)


def write_maps(folder: Path, maps: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        Image.fromarray(m).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    make_dataset(root)
    src = build_source("folder", str(root))
    return root, src, src.samples("all")


# -- the detectors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spectral_residual", "fine_grained"])
def test_detector_finds_a_bright_object_on_a_flat_background(method):
    image = np.full((64, 80, 3), 60, np.uint8)
    image[14:34, 40:64] = (230, 210, 40)  # off-centre, not square
    obj = np.zeros((64, 80), bool)
    obj[14:34, 40:64] = True
    sal = saliency_map(image, method)
    assert sal.dtype == np.uint8 and sal.shape == (64, 80) and sal.max() == 255  # peak scaled to 255
    inside, outside = sal[obj].mean(), sal[~obj].mean()
    assert inside > 1.5 * outside, (inside, outside)  # spectral residual: about 2.8x, fine-grained 1.9x
    # the map is the image's, not a transposed or mirrored one: the mirrored object is less salient
    assert sal[obj].mean() > sal[:, ::-1][obj].mean()


def test_detector_errors():
    with pytest.raises(ConfigError, match="unknown saliency detector 'bogus'"):
        saliency_map(np.zeros((8, 8, 3), np.uint8), "bogus")
    with pytest.raises(ValueError, match="H,W,3 uint8"):
        saliency_map(np.zeros((8, 8), np.uint8), "spectral_residual")
    with pytest.raises(ValueError, match="H,W,3 uint8"):
        saliency_map(np.zeros((8, 8, 3), np.float32), "spectral_residual")


# -- the map reader ----------------------------------------------------------------------------------------


def test_folder_reader_reads_the_maps_and_names_a_missing_or_misfit_one(data, tmp_path):
    _, src, samples = data
    maps = {n: np.random.default_rng(k).integers(0, 256, (H, W)).astype(np.uint8) for k, n in enumerate(NAMES)}
    folder = write_maps(tmp_path / "sal", maps)
    reader = SaliencyMaps(src, samples, "folder", folder)
    for i, s in enumerate(samples):
        assert np.array_equal(reader(i, (H, W)), maps[s.name])
    assert np.array_equal(pickle.loads(pickle.dumps(reader))(2, (H, W)), maps[samples[2].name])  # workers
    # a colour map is read as its luminance (grey in, the same grey out)
    Image.fromarray(np.repeat(maps["i1"][..., None], 3, axis=2)).save(folder / "i1.png")
    assert np.array_equal(reader(NAMES.index("i1"), (H, W)), maps["i1"])

    (folder / "i0.png").unlink()
    with pytest.raises(DataError, match=r"saliency map .*i0\.png does not exist"):
        reader(NAMES.index("i0"), (H, W))
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(folder / "i2.png")
    with pytest.raises(DataError, match=r"i2\.png is 41x30, its image 40x30"):
        reader(NAMES.index("i2"), (H, W))
    Image.fromarray(np.zeros((H, W), np.uint16)).save(folder / "i3.png")  # 16-bit: not a 0..255 map
    with pytest.raises(DataError, match=r"i3\.png is a I;16 image"):
        reader(NAMES.index("i3"), (H, W))
    (folder / "i1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read saliency map .*i1\.png"):
        reader(NAMES.index("i1"), (H, W))

    with pytest.raises(DataError, match="does not exist or is not a folder"):
        SaliencyMaps(src, samples, "folder", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="saliency_dir"):
        SaliencyMaps(src, samples, "folder")
    with pytest.raises(ConfigError, match="unknown saliency source 'salient'"):
        SaliencyMaps(src, samples, "salient")


def test_detector_reader_computes_the_map_of_the_image(data):
    _, src, samples = data
    reader = pickle.loads(pickle.dumps(SaliencyMaps(src, samples, "fine_grained")))
    for i in (0, 3):
        expected = saliency_map(src.read_image(samples[i].image), "fine_grained")
        assert np.array_equal(reader(i, (H, W)), expected)
    with pytest.raises(DataError, match="is 40x30, its saliency map is asked for at 30x40"):
        reader(0, (W, H))


# -- the maps follow the geometry --------------------------------------------------------------------------


def augmented(src, samples, folder: Path, aug: AugConfig, crop: list[int], seeds=range(12)):
    """(saliency plane, red channel 0..255, mask) of training items of every image, with the red channel as
    the saliency map."""
    ds = SegDataset(src, samples, train=True, labeled=True, crop_size=crop, aug=aug, mean=[0.0] * 3,
                    std=[1.0] * 3, maps={"saliency": SaliencyMaps(src, samples, "folder", folder)})
    for i in range(len(samples)):
        for seed in seeds:
            item = ds[(i, 1000 * i + seed)]
            red = (item["image"][0] * 255).round().long()
            yield item["saliency"], red, item["mask"]


def red_maps(src, samples, folder: Path) -> Path:
    return write_maps(folder, {s.name: src.read_image(s.image)[..., 0].copy() for s in samples})


@pytest.mark.parametrize("crop", [[24, 16], [36, 44]])  # random crops; crops larger than the image: padding
def test_saliency_follows_crops_and_flips_exactly(data, tmp_path, crop):
    _, src, samples = data
    folder = red_maps(src, samples, tmp_path / "sal")
    aug = OmegaConf.structured(AugConfig(scale=[1.0, 1.0], hflip=True, vflip=True, rotate=0.0))
    planes = []
    for sal, red, mask in augmented(src, samples, folder, aug, crop):
        assert sal.shape == tuple(crop)
        pad = sal == 255  # the map's padding is the mask's, and the image is 0 there
        assert pad.equal(mask == 255) and (red[pad] == 0).all()
        assert sal[~pad].equal(red[~pad])
        planes.append(sal)
    # the augmentation did move things: the items of one image differ (else the check above proves little)
    assert len({tuple(p.flatten().tolist()) for p in planes[:12]}) > 3


def test_saliency_follows_scale_and_rotation(data, tmp_path):
    _, src, samples = data
    folder = red_maps(src, samples, tmp_path / "sal")
    aug = OmegaConf.structured(AugConfig(scale=[0.6, 1.6], hflip=True, vflip=True, rotate=30.0))
    close = total = 0
    for sal, red, _ in augmented(src, samples, folder, aug, [24, 24]):
        inside = sal != 255
        # map nearest, image bilinear: a ramp of slope <= 3 a pixel differs by a few levels, except at the
        # rotated image's edges (blended with the 0 fill); a mirrored or shifted map differs by tens
        close += int(((sal - red).abs()[inside] <= 6).sum())
        total += int(inside.sum())
    assert total > 0 and close / total > 0.95, close / total


# -- the cam method ----------------------------------------------------------------------------------------


def cam_config(root: Path, out: Path, checkpoint: Path, **method) -> object:
    return config_mod.from_dict({
        "method": {"name": "cam", "scales": [1.0], "flip": False, "fg_threshold": 0.5, "bg_threshold": 0.05,
                   "classifier_checkpoint": str(checkpoint), **method},
        "data": {"dataset": "folder", "root": str(root), "crop_size": [24, 24], "workers": 0,
                 "val_split": "val", "streams": {"labeled": {"split": "all", "batch_size": 2}}},
        "model": {"encoder": "test_resnet", "decoder_channels": 16},
        "train": {"iters": 1, "device": "cpu", "amp": "none", "progress": False},
        "out": str(out),
    })  # fmt: skip


def classifier_checkpoint(path: Path) -> Path:
    import torch
    from test_cam import fake_checkpoint

    from lesseg.config import ModelConfig
    from lesseg.models import build_classifier

    torch.manual_seed(0)
    net = build_classifier(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                           {"encoder": "test_resnet", "pretrained": None}), 3)
    return fake_checkpoint(path, net, names=["background", "square", "bar"], model={"encoder": "test_resnet"})


def cam_masks(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((out / "cams" / "masks").glob("*.png"))}


def with_background(plain: np.ndarray, low: np.ndarray) -> np.ndarray:
    """What low saliency does to a mask made without it: background where the CAMs were uncertain (or already
    background), 255 where they said an object (the cues disagree); elsewhere nothing."""
    objects = (plain != 0) & (plain != 255)
    return np.where(low, np.where(objects, 255, 0), plain).astype(np.uint8)


def test_cams_stage_takes_background_from_low_saliency(data, tmp_path):
    root, src, samples = data
    given = classifier_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "run"
    PipelineRun(cam_config(root, out, given)).run(until="cams")
    plain = cam_masks(out)
    assert len(plain) == 4

    # the user's maps: low (20 < 0.2 * 255) on the left 24 columns, high (200) on the right
    sal = np.full((H, W), 200, np.uint8)
    sal[:, :24] = 20
    folder = write_maps(tmp_path / "sal", {n: sal for n in NAMES})
    low = sal < 51
    PipelineRun(cam_config(root, out, given, saliency="folder", saliency_dir=str(folder))).run(until="cams")
    masks = cam_masks(out)  # the same run folder: a new saliency setting remakes the masks
    assert masks.keys() == plain.keys()
    for name in NAMES:
        assert np.array_equal(masks[name], with_background(plain[name], low)), name
        assert np.array_equal(masks[name][~low], plain[name][~low])
    # the maps did change the masks, both ways: uncertain pixels became background, objects uncertain
    before = np.stack([plain[n][low] for n in NAMES])
    after = np.stack([masks[n][low] for n in NAMES])
    assert ((before == 255) & (after == 0)).any() and ((before != 0) & (before != 255) & (after == 255)).any()

    # a higher threshold: the right half (200 < 0.8 * 255) is background too
    PipelineRun(cam_config(root, out, given, saliency="folder", saliency_dir=str(folder),
                           saliency_threshold=0.8)).run(until="cams")
    for name, m in cam_masks(out).items():
        assert np.array_equal(m, with_background(plain[name], np.ones((H, W), bool))), name

    # a detector, on each image at its native size
    PipelineRun(cam_config(root, out, given, saliency="spectral_residual")).run(until="cams")
    for s, (name, m) in zip(samples, sorted(cam_masks(out).items()), strict=True):
        low = saliency_map(src.read_image(s.image), "spectral_residual") / 255.0 < 0.2
        assert name == s.name and np.array_equal(m, with_background(plain[name], low)), name


def test_bad_saliency_settings_are_config_errors(data, tmp_path):
    root, _, _ = data
    given = tmp_path / "c.pt"
    for method, match in [({"saliency": "deep"}, "method.saliency 'deep' is not one of"),
                          ({"saliency": "folder"}, "saliency_dir, which is not set"),
                          ({"saliency": "fine_grained", "saliency_dir": str(tmp_path)}, "only read with")]:
        with pytest.raises(ConfigError, match=match):
            CAM.pipeline(cam_config(root, tmp_path / "run", given, **method))
    with pytest.raises(ConfigError, match="saliency_threshold"):
        cam_config(root, tmp_path / "run", given, saliency="fine_grained", saliency_threshold=1.5)
    assert [s.name for s in CAM.pipeline(cam_config(root, tmp_path / "run", given, saliency="folder",
                                                    saliency_dir=str(tmp_path)))] == list(CAM.stage_names)
