"""Mixing masks (methods.md section 0): shapes, coverage statistics, class selection, consistent mixing."""

from __future__ import annotations

import torch

from lesseg.methods.mixing import (
    box_mask_one,
    box_mask_xor,
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


def test_box_mask_xor_coverage_and_parity():
    torch.manual_seed(0)
    m = box_mask_xor(3000, 128, 128, "cpu")
    assert m.shape == (3000, 1, 128, 128) and _is_binary(m)
    assert abs(m.mean().item() - 0.25) < 0.03
    assert m.mean(dim=(1, 2, 3)).std() > 0.03  # random per sample


def test_box_mask_xor_overlaps_cancel():
    # Rebuild the boxes from the same random draws with a slow loop: pixels under exactly two boxes are 0.
    g = torch.Generator().manual_seed(0)
    m = box_mask_xor(64, 32, 32, "cpu", generator=g)
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


def test_classmix_picks_whole_classes_of_the_partner():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (16, 20, 20))
    labels[:, :4] = 255
    labels[3] = 2  # a single class: ceil(1/2) = 1 -> all of it
    labels[4] = 255  # nothing valid -> empty mask
    m = classmix_mask(labels)
    assert m.shape == (16, 1, 20, 20) and _is_binary(m)
    for i in range(16):
        src = labels[(i + 1) % 16]  # image i's mask picks classes of its partner, the image pasted onto it
        present = [c for c in src.unique().tolist() if c != 255]
        chosen = [c for c in present if m[i, 0][src == c].all()]
        for c in present:  # every class is fully in or fully out
            assert m[i, 0][src == c].all() or not m[i, 0][src == c].any()
        assert len(chosen) == (len(present) + 1) // 2
        assert not m[i, 0][src == 255].any()
    assert m[2].all() and not m[3].any()  # partner with one class: all of it; with no valid pixel: nothing
    chosen_sets = {tuple(c for c in range(6) if m[i, 0][labels[i + 1] == c].any()) for i in range(5, 15)}
    assert len(chosen_sets) > 1  # random choice, not always the same classes


def _tagged_batch(labels: torch.Tensor) -> torch.Tensor:
    """B,2,H,W images whose pixels tell their source image (channel 0) and position (channel 1)."""
    b, h, w = labels.shape
    src = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, h, w)
    pos = torch.arange(h * w, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    return torch.stack([src, pos], 1)


def _pasted_classes(out_label: torch.Tensor, pasted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Classes of ``pasted`` (not in ``base``) that appear in the mixed labels."""
    own = set(base.unique().tolist())
    return torch.tensor(sorted(set(out_label.unique().tolist()) - own), dtype=pasted.dtype)


def test_classmix_mixed_result_pastes_the_picked_classes_of_the_partner():
    """Two images with disjoint classes: each mixed image is its partner's ceil(n/2) picked classes, at their
    original pixels, over the image itself; the partner's ignore pixels are never pasted."""
    h, w = 8, 12
    a = torch.full((h, w), 1)
    a[:, 6:] = 2  # image 0: classes 1 | 2 (n = 2, one pasted)
    b = torch.full((h, w), 3)
    b[2:4] = 4
    b[4:6] = 5
    b[6:, :3] = 255  # image 1: classes 3, 4, 5 (n = 3, two pasted) and ignore pixels
    labels = torch.stack([a, b])
    image = _tagged_batch(labels)
    seen = {0: set(), 1: set()}
    for seed in range(40):
        m = classmix_mask(labels, generator=torch.Generator().manual_seed(seed))
        out = mix_batch({"image": image, "label": labels}, m)
        for i, n_classes in ((0, 3), (1, 2)):
            j = 1 - i  # the partner, pasted onto image i
            picked = _pasted_classes(out["label"][i], labels[j], labels[i])
            assert len(picked) == (n_classes + 1) // 2
            pasted = torch.isin(labels[j], picked)  # the picked classes' own pixels in the partner
            assert torch.equal(out["label"][i], torch.where(pasted, labels[j], labels[i]))
            assert torch.equal(out["image"][i], torch.where(pasted, image[j], image[i]))
            assert not pasted[labels[j] == 255].any()
            seen[i].add(tuple(picked.tolist()))
    assert seen[0] == {(3, 4), (3, 5), (4, 5)} and seen[1] == {(1,), (2,)}  # every pick occurs


def test_classmix_mixed_result_single_class_and_empty_partners():
    """B = 3 (image i takes from image (i+1) mod 3): a one-class partner is pasted whole except its ignore
    pixels; a partner with no valid pixel leaves the image unchanged."""
    h, w = 6, 6
    one = torch.full((h, w), 4)
    one[0, :2] = 255  # image 0: one class and a few ignore pixels
    empty = torch.full((h, w), 255)  # image 1: nothing valid
    two = torch.zeros(h, w, dtype=torch.long)
    two[3:] = 1  # image 2: classes 0 | 1
    labels = torch.stack([one, empty, two])
    image = _tagged_batch(labels)
    for seed in range(10):
        m = classmix_mask(labels, generator=torch.Generator().manual_seed(seed))
        out = mix_batch({"image": image, "label": labels}, m)
        # image 0 takes from image 1 (no valid pixel): unchanged
        assert torch.equal(out["image"][0], image[0]) and torch.equal(out["label"][0], labels[0])
        # image 1 takes from image 2 (classes 0 | 1): one of them, at its pixels, over image 1's 255
        picked = _pasted_classes(out["label"][1], labels[2], labels[1])
        assert len(picked) == 1
        pasted = two == picked
        assert torch.equal(out["label"][1], torch.where(pasted, two, empty))
        assert torch.equal(out["image"][1], torch.where(pasted, image[2], image[1]))
        # image 2 takes from image 0 (one class): all of it, except image 0's ignore pixels
        assert torch.equal(out["label"][2], torch.where(one == 4, one, two))
        assert torch.equal(out["image"][2], torch.where(one == 4, image[0], image[2]))


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
