import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lesseg.engine.evaluate import confusion_matrix, iou_from_confusion, predict_probs
from lesseg.engine.evaluate import windows as _windows


def eval_cfg(**kw):
    base = {"mode": "whole", "crop_size": None, "stride": None, "resize": None, "scales": [1.0], "flip": False}
    base.update(kw)
    return SimpleNamespace(**base)


def test_confusion_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 1, 2]])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    r = iou_from_confusion(conf, ["a", "b", "c", "d"])
    # a: TP1 FP1 FN1 -> 1/3; b: TP2 FP1 -> 2/3; c: TP1 FN1 -> 1/2; d absent everywhere: excluded
    assert r["iou"]["a"] == pytest.approx(1 / 3)
    assert r["iou"]["b"] == pytest.approx(2 / 3)
    assert r["iou"]["c"] == pytest.approx(1 / 2)
    assert r["iou"]["d"] is None
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_miou_is_not_a_mean_of_per_image_ious():
    # image 1: class 1 tiny and missed; image 2: class 1 large and right. Dataset IoU of class 1 = 100/101.
    t1, p1 = torch.tensor([1] + [0] * 99), torch.zeros(100, dtype=torch.long)
    t2, p2 = torch.ones(100, dtype=torch.long), torch.ones(100, dtype=torch.long)
    conf = confusion_matrix(p1, t1, 2) + confusion_matrix(p2, t2, 2)
    assert iou_from_confusion(conf)["iou"]["1"] == pytest.approx(100 / 101)


def test_windows_cover_and_align_last_to_border():
    assert _windows(10, 4, 3) == [0, 3, 6]
    assert _windows(11, 4, 3) == [0, 3, 6, 7]
    assert _windows(4, 8, 5) == [0]


class Local(nn.Module):
    """A 1x1 conv: translation-equivariant and local, so sliding windows must reproduce the whole image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def test_slide_equals_whole_for_a_local_net_and_when_window_covers():
    torch.manual_seed(0)
    net, x = Local(), torch.randn(2, 3, 37, 50)
    whole = predict_probs(net, x, eval_cfg(), [16, 16], 5)
    slide = predict_probs(net, x, eval_cfg(mode="slide", stride=[5, 7]), [16, 16], 5)
    assert torch.allclose(whole, slide, atol=1e-6)
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1))
    deep = lambda t: {"logits": conv(t)}
    assert torch.allclose(predict_probs(deep, x, eval_cfg(), [64, 64], 5),
                          predict_probs(deep, x, eval_cfg(mode="slide"), [64, 64], 5), atol=1e-6)
    assert not torch.allclose(predict_probs(deep, x, eval_cfg(), [16, 16], 5),
                              predict_probs(deep, x, eval_cfg(mode="slide"), [16, 16], 5), atol=1e-4)


def test_flip_and_scales_average_softmax():
    torch.manual_seed(0)
    net, x = Local(), torch.randn(1, 3, 8, 8)
    p = predict_probs(net, x, eval_cfg(flip=True), [8, 8], 5)
    ref = (net(x)["logits"].softmax(1) + net(x.flip(-1))["logits"].softmax(1).flip(-1)) / 2
    assert torch.allclose(p, ref, atol=1e-6)
    ms = predict_probs(net, x, eval_cfg(scales=[0.5, 1.0]), [8, 8], 5)
    assert ms.shape == (1, 5, 8, 8)
    assert torch.allclose(ms.sum(1), torch.ones(1, 8, 8), atol=1e-5)
    with torch.no_grad():
        assert not math.isclose(float((ms - net(x)["logits"].softmax(1)).abs().max()), 0.0)
