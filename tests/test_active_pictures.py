"""Pictures of active learning rounds: the overlay changes the selected pixels and a band around them and
nothing else, a 3x3 region stays visible in the saved picture of a 1024x2048 image, the files are PNGs of
plausible size, and the curve's series and axis scale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lesseg.methods.active.pictures import (
    SELECTED_COLOR,
    curve_series,
    default_thickness,
    labels_curve,
    overlay,
    round_picture,
    x_scale,
)


def _grey(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A grey image (R = G = B): it never holds the strong overlay colour."""
    v = np.random.default_rng(seed).integers(40, 200, (h, w), dtype=np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def _chebyshev_to(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance of every pixel to the nearest True pixel (brute force)."""
    ys, xs = np.nonzero(mask)
    gy, gx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    d = np.maximum(np.abs(gy[..., None] - ys), np.abs(gx[..., None] - xs))
    return d.min(-1)


@pytest.mark.parametrize("thickness", [1, 3])
def test_overlay_changes_the_selection_and_a_band_around_it_only(thickness):
    image = _grey(30, 40)
    selected = np.zeros((30, 40), bool)
    selected[10:13, 5:8] = True  # a RIPU 3x3 square
    selected[25, 35] = True  # a single pixel
    selected[0, 39] = True  # a corner (the band is clipped, not wrapped around)
    before = image.copy()
    out = overlay(image, selected, thickness=thickness)
    assert np.array_equal(image, before)  # the input is left alone
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != image).any(-1)
    dist = _chebyshev_to(selected)
    assert np.array_equal(changed, dist <= thickness)  # exactly the selection and its band
    band = (dist > 0) & (dist <= thickness)
    assert (out[band] == SELECTED_COLOR).all()  # the band is solid
    # the selection is tinted (half the colour), not painted over: what is under it stays visible
    want = np.round(image[selected] * 0.5 + np.array(SELECTED_COLOR) * 0.5)
    assert np.array_equal(out[selected], want.astype(np.uint8))


def test_overlay_of_nothing_is_the_image_and_bad_shapes_fail():
    image = _grey(8, 9)
    assert np.array_equal(overlay(image, np.zeros((8, 9), bool)), image)
    with pytest.raises(ValueError):
        overlay(image, np.zeros((9, 8), bool))


def test_default_thickness_grows_with_the_image():
    assert default_thickness(32, 32) == 1
    assert default_thickness(1024, 2048) == 10
    assert default_thickness(2048, 1024) == 10


def _magenta_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] > 200)).sum())


def test_a_3x3_region_stays_visible_in_a_cityscapes_sized_picture(tmp_path):
    """A 1024x2048 image shrunk into a 400-pixel panel: the 3x3 square must still show as strong-colour pixels
    (drawn as it is, it would be about one blended pixel); without a selection there are none."""
    image = _grey(1024, 2048)
    score = np.random.default_rng(1).random((1024, 2048)).astype(np.float32)
    none = np.zeros((1024, 2048), bool)
    one = none.copy()
    one[500:503, 1000:1003] = True
    blank = round_picture([image], [score], [none], tmp_path / "none.png", "round 1")
    marked = round_picture([image], [score], [one], tmp_path / "one.png", "round 1")
    assert _magenta_pixels(blank) == 0
    assert _magenta_pixels(marked) >= 9


def test_round_picture_writes_a_png_for_images_of_different_sizes(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(64, 128), (96, 96), (50, 120)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    scores = [rng.random((h, w)) for h, w in sizes]
    selected = [rng.random((h, w)) < 0.01 for h, w in sizes]
    path = round_picture(images, scores, selected, tmp_path / "sub" / "round.png", "round 2: ripu")
    assert path == tmp_path / "sub" / "round.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        w3, h3 = im.size
    assert 900 <= w3 <= 2000 and 300 <= h3 <= 2500  # three 4-inch panels wide at 100 dpi
    one = round_picture(images[:1], scores[:1], selected[:1], tmp_path / "one.png", "round 2")
    with Image.open(one) as im:
        assert im.size[1] < h3  # one row is shorter than three
    with pytest.raises(ValueError):
        round_picture(images, scores[:2], selected, tmp_path / "bad.png", "x")
    with pytest.raises(ValueError):
        round_picture(images[:1], [scores[1]], selected[:1], tmp_path / "bad.png", "x")


def test_curve_series_groups_and_sorts():
    points = [
        {"series": "ripu", "pixels": 4000, "miou": 0.5},
        {"series": "random", "pixels": 1000, "miou": 0.3},
        {"series": "ripu", "pixels": 1000, "miou": 0.4},
        {"series": "random", "pixels": 4000, "miou": 0.45},
        {"series": "ripu", "pixels": 0, "miou": 0.2},
    ]
    series = curve_series(points)
    assert list(series) == ["ripu", "random"]
    assert series["ripu"] == ([0, 1000, 4000], [0.2, 0.4, 0.5])
    assert series["random"] == ([1000, 4000], [0.3, 0.45])
    with pytest.raises(ValueError, match="miou"):
        curve_series([{"series": "a", "pixels": 1}])


def test_x_scale():
    assert x_scale([100, 1000, 100000]) == "log"
    assert x_scale([0, 100, 100000]) == "symlog"  # 0 cannot go on a log axis
    assert x_scale([100, 200, 500]) == "linear"
    assert x_scale([0, 0]) == "linear"


def test_labels_curve_writes_a_png(tmp_path):
    points = [{"series": s, "pixels": p, "miou": m}
              for s, off in (("ripu", 0.05), ("random", 0.0)) for p, m in ((0, 0.3), (2000, 0.4), (20000, 0.5))
              for m in [m + off]]
    path = labels_curve(points, tmp_path / "curve.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (600, 400)
        colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 20  # something was drawn (lines, text), not a blank canvas
    with pytest.raises(ValueError):
        labels_curve([], tmp_path / "empty.png")
