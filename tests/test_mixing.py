"""Mixing masks (methods.md section 0): shapes, coverage statistics, class selection, consistent mixing."""

from __future__ import annotations

import torch

from lesseg.methods.mixing import (
    box_mask_cps,
    box_mask_one,
    classmix_mask,
    cutout,
    mix,
    mix_batch,
    partner,
)


def _is_binary(m: torch.Tensor) -> bool:
    return bool(((m == 0) | (m == 1)).all())


def test_box_mask_one_is_one_rectangle_of_half_the_area():
    torch.manual_seed(0)
    m = box_mask_one(500, 64, 48, "cpu")
    assert m.shape == (500, 1, 64, 48) and m.dtype == torch.float32 and _is_binary(m)
    area = m.mean(dim=(1, 2, 3))
    assert (area - 0.5).abs().max() < 0.03  # rounding only
    rows, cols = m[:, 0].amax(2), m[:, 0].amax(1)  # B,H ; B,W
    assert torch.equal(m[:, 0], rows[:, :, None] * cols[:, None, :])  # a single axis-aligned rectangle
    assert (
        rows.diff(dim=1).abs().sum(1).le(2).all() and cols.diff(dim=1).abs().sum(1).le(2).all()
    )  # contiguous
    assert cols.sum(1).float().std() > 2  # random widths
    assert m[:, 0, 0, 0].any() and m[:, 0, -1, -1].any()  # positions reach the borders


def test_box_mask_cps_coverage_and_xor():
    torch.manual_seed(0)
    m = box_mask_cps(3000, 128, 128, "cpu")
    assert m.shape == (3000, 1, 128, 128) and _is_binary(m)
    assert abs(m.mean().item() - 0.25) < 0.03
    assert m.mean(dim=(1, 2, 3)).std() > 0.03  # random per sample


def test_box_mask_cps_overlaps_cancel():
    # Rebuild the boxes from the same random draws with a slow loop: pixels under exactly two boxes are 0.
    g = torch.Generator().manual_seed(0)
    m = box_mask_cps(64, 32, 32, "cpu", generator=g)
    g.manual_seed(0)
    u = torch.rand(4, 64, 3, generator=g)
    prop = 0.25 + u[0] * 0.25
    y_prop = torch.exp(u[1] * torch.log(prop))
    bh, bw = torch.round(y_prop * (1.0 / 3) ** 0.5 * 32), torch.round(prop / y_prop * (1.0 / 3) ** 0.5 * 32)
    y0, x0 = torch.round((32 - bh) * u[2]), torch.round((32 - bw) * u[3])
    count = torch.zeros(64, 32, 32)
    for i in range(64):
        for k in range(3):
            ys, xs = int(y0[i, k]), int(x0[i, k])
            count[i, ys : ys + int(bh[i, k]), xs : xs + int(bw[i, k])] += 1
    assert (count == 2).any()
    assert (m[:, 0][count == 2] == 0).all()
    assert torch.equal(m[:, 0], count.remainder(2))


def test_classmix_picks_whole_classes():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (16, 20, 20))
    labels[:, :4] = 255
    labels[3] = 2  # a single class: ceil(1/2) = 1 -> all of it
    labels[4] = 255  # nothing valid -> empty mask
    m = classmix_mask(labels)
    assert m.shape == (16, 1, 20, 20) and _is_binary(m)
    for i in range(16):
        present = [c for c in labels[i].unique().tolist() if c != 255]
        chosen = [c for c in present if m[i, 0][labels[i] == c].all()]
        for c in present:  # every class is fully in or fully out
            assert m[i, 0][labels[i] == c].all() or not m[i, 0][labels[i] == c].any()
        assert len(chosen) == (len(present) + 1) // 2
        assert not m[i, 0][labels[i] == 255].any()
    chosen_sets = {tuple(c for c in range(6) if m[i, 0][labels[i] == c].any()) for i in range(5, 16)}
    assert len(chosen_sets) > 1  # random choice, not always the same classes


def test_mix_is_consistent_across_images_labels_and_maps():
    torch.manual_seed(0)
    b, h, w = 4, 16, 16
    source = torch.arange(b).view(b, 1, 1)
    image = source.view(b, 1, 1, 1).float().expand(b, 3, h, w) * 10  # pixel value tells its source image
    labels = source.expand(b, h, w).clone()  # long
    ent = source.expand(b, h, w).float() / 10
    valid = (source % 2 == 0).expand(b, h, w).clone()  # bool
    m = box_mask_one(b, h, w, "cpu")
    out = mix_batch({"image": image, "label": labels, "entropy": ent, "valid": valid}, m)
    assert out["label"].dtype == torch.long and out["valid"].dtype == torch.bool
    src = out["label"]
    assert torch.equal(src, torch.where(m[:, 0].bool(), (source + 1) % b, source).expand(b, h, w))
    assert torch.equal(out["image"], src.unsqueeze(1).float().expand(b, 3, h, w) * 10)
    assert torch.equal(out["entropy"], src.float() / 10)
    assert torch.equal(out["valid"], src % 2 == 0)


def test_mix_and_partner_formula():
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    m = (torch.rand(2, 1, 4, 4) > 0.5).float()
    assert torch.allclose(mix(a, b, m), a * (1 - m) + b * m)
    x = torch.arange(3)
    assert partner(x).tolist() == [1, 2, 0]


def test_cutout_zeroes_box_and_ignores_its_labels():
    torch.manual_seed(0)
    image, labels = torch.rand(3, 3, 12, 12) + 1, torch.randint(0, 4, (3, 12, 12))
    m = box_mask_one(3, 12, 12, "cpu")
    img_c, lab_c = cutout(image, labels, m)
    inside = m[:, 0].bool()
    assert (img_c.permute(1, 0, 2, 3)[:, inside] == 0).all() and (lab_c[inside] == 255).all()
    assert torch.equal(img_c.permute(1, 0, 2, 3)[:, ~inside], image.permute(1, 0, 2, 3)[:, ~inside])
    assert torch.equal(lab_c[~inside], labels[~inside])
