"""``lesseg bench active``: each variant labels what its name says (source only: nothing; full target: every
target pixel; RIPU RA 5 %: a few percent), measured on tiny runs."""

from __future__ import annotations

import pytest
from conftest import TINY

from lesseg.bench.active import VARIANTS, bench_active, curve_points, print_active_table, summarize_active
from lesseg.cli import main


def _tiny(root, source_root) -> list[str]:
    """The tiny shapes tree as the target; the source (the synthetic domain) in a folder of its own: pointing
    it at the shared tree would regenerate that as synthetic under the other tests."""
    opts = "{n_train: 32, n_val: 15, size: 32}"
    return [f"data.root={root}", f"data.options={opts}", f"data.streams.source.root={source_root}",
            f"data.streams.source.options={opts}", "data.crop_size=[32,32]", "data.workers=0",
            "data.streams.source.batch_size=4", "data.streams.target.batch_size=4", f"model.encoder={TINY}",
            "model.pretrained=null",
            "model.decoder_channels=16", "model.rep_dim=16", "train.iters=6", "train.eval_every=0",
            "train.log_every=2", "eval.batch_size=8", "method.rounds=[0.34,0.67]"]


def test_variants_label_what_their_names_say(shapes_root, tmp_path, capsys):
    names = ("source only", "RIPU RA 5%", "full target")
    tiny = _tiny(shapes_root, tmp_path / "synthetic")
    rows = bench_active(tmp_path, names, (0,), tiny, device="cpu")
    share = {r["variant"]: r["labeled_share"] for r in rows}
    assert share["source only"] == 0.0
    assert share["full target"] == pytest.approx(1.0)  # one round labels every target pixel
    # 5 % over 2 rounds in 3x3 squares: the per-image budget is rounded up to whole squares
    assert 0.04 <= share["RIPU RA 5%"] <= 0.05 + 2 * 9 / (32 * 32)
    table = summarize_active(rows)
    full = next(t for t in table if t["variant"] == "full target")
    assert full["of_full"] == pytest.approx(1.0)
    print_active_table(table)
    out = capsys.readouterr().out
    assert "RIPU RA 5%" in out and "of full" in out
    points = {p["series"]: p for p in curve_points(rows)}
    assert points["source only"]["pixels"] == 0 and points["RIPU RA"]["pixels"] > 0
    assert points["full target"]["pixels"] == 32 * 32 * 32  # the 32 target (train) images, every pixel
    # the simulated annotator answers from masks_full/: no 255 among the labels, where masks/ has its border
    from lesseg.data import build_source
    from lesseg.engine.annotation import _open_run

    labels = _open_run(tmp_path / "full_target" / "seed0").store.get_extra_state()["labels"]
    assert labels.numel() == 32 * 32 * 32 and not (labels == 255).any()
    target = build_source("shapes", str(shapes_root), {"n_train": 32, "n_val": 15, "size": 32})
    assert any((target.read_mask(s.mask) == 255).any() for s in target.samples("train"))
    again = bench_active(tmp_path, names, (0,), tiny, device="cpu", train_missing=False)
    assert [r["miou"] for r in again] == [r["miou"] for r in rows]  # finished runs are reused


def test_cli_refuses_an_unknown_variant(capsys):
    assert main(["bench", "active", "--variants", "RIPU RA 7%"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert "RIPU RA 5%" in VARIANTS
