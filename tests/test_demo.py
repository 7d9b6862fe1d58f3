import json

from lesseg.demo import demo_config, demo_runs, run_demo


def test_demo_trains_every_run_prints_a_table_and_draws_the_figure(tmp_path, capsys):
    tiny = [
        f"data.root={tmp_path / 'shapes'}", "data.options.n_train=64", "data.options.n_val=7", "data.options.size=32",
        "data.crop_size=[32,32]", "data.workers=0", "model.encoder=test_resnet", "model.decoder_channels=16",
        "model.rep_dim=16", "model.pretrained=null", "train.progress=false", "data.streams.labeled.batch_size=4",
        "data.streams.unlabeled.batch_size=4",
    ]
    runs = demo_runs()
    assert [r.name for r in runs] == ["supervised_1-16", "supervised_all", "mean_teacher_1-16"]
    # by default every run starts from ImageNet MobileNetV2, fine-tuned with the encoder at a tenth of the head
    cfg = demo_config(runs[2], 300, tmp_path / "x")
    assert (cfg.model.encoder, cfg.model.pretrained) == ("mobilenetv2_100", "imagenet")
    assert cfg.optim.head_lr_mult == 10 and cfg.train.iters == 300
    assert cfg.data.streams.unlabeled.split == "unlabeled_1-16" and cfg.method.name == "mean_teacher"
    rows = run_demo(tmp_path / "demo", iters=2, overrides=tiny)
    out = capsys.readouterr().out
    assert [r["run"] for r in rows] == [r.name for r in runs]
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows)
    assert "supervised_all" in out and "mIoU" in out
    assert (tmp_path / "demo" / "demo.png").is_file()
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["labels"] for r in saved][:2] == ["1/16", "all"]
    # a second call reuses the finished runs instead of training again
    again = run_demo(tmp_path / "demo", iters=2, overrides=tiny)
    assert [r["miou"] for r in again] == [r["miou"] for r in rows]
    assert "== " not in capsys.readouterr().out  # no run header: nothing was trained again
