import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesseg import bench, config
from lesseg.bench import summarize_semi


def test_semi_summary_gap_closed_and_spread():
    rows = [
        {"method": "supervised", "budget": "all", "seed": 0, "miou": 0.80, "s_per_iter": 0.1, "peak_mib": 100},
        {"method": "supervised", "budget": "all", "seed": 1, "miou": 0.80, "s_per_iter": 0.1, "peak_mib": 100},
        {"method": "supervised", "budget": "1-16", "seed": 0, "miou": 0.50, "s_per_iter": 0.1, "peak_mib": 90},
        {"method": "supervised", "budget": "1-16", "seed": 1, "miou": 0.60, "s_per_iter": 0.1, "peak_mib": 90},
        {"method": "u2pl", "budget": "1-16", "seed": 0, "miou": 0.70, "s_per_iter": 0.3, "peak_mib": 200,
         "pl_miou": 0.40, "pl_c0": 0.9, "true_c0": 0.8},
        {"method": "u2pl", "budget": "1-16", "seed": 1, "miou": 0.72, "s_per_iter": 0.3, "peak_mib": 210,
         "pl_miou": 0.50, "pl_c0": 0.7, "true_c0": 0.8},
    ]
    table = {(r["method"], r["budget"]): r for r in summarize_semi(rows)}
    u = table[("u2pl", "1-16")]
    assert u["miou"] == pytest.approx(0.71) and u["spread"] == pytest.approx(0.01)
    assert u["gain"] == pytest.approx(0.16)  # vs SupOnly mean 0.55
    assert u["gap_closed"] == pytest.approx(0.16 / 0.25)  # gap to the full reference 0.80
    assert u["peak_mib"] == 210 and table[("supervised", "all")]["gap_closed"] is None
    alone = summarize_semi([r for r in rows if r["method"] == "u2pl"])  # no SupOnly: no gain, no NaN
    assert alone[0]["gain"] is None and alone[0]["gap_closed"] is None
    assert u["pl_miou"] == pytest.approx(0.45) and u["pl_c0"] == pytest.approx(0.8)
    assert table[("supervised", "1-16")]["pl_miou"] is None  # no pseudo-labels


def test_semi_table_prints_pseudo_label_columns(capsys):
    from lesseg.bench import print_semi_table

    row = {"method": "u2pl", "budget": "1-16", "seeds": 2, "miou": 0.5, "spread": 0.01, "gain": 0.05,
           "gap_closed": 0.5, "s_per_iter": 0.3, "peak_mib": 100, "pl_miou": 0.4567, "pl_c0": 0.9, "true_c0": 0.78}
    print_semi_table([row, {**row, "method": "supervised", "pl_miou": None, "pl_c0": None, "true_c0": None}])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "PL mIoU" in lines[0] and lines[1].split()[-2:] == ["45.67", "0.90/0.78"]
    assert lines[2].split()[-1] == "100"  # supervised: the PL columns stay empty


def test_viz_writes_entropy_partition_and_curves(tiny_cfg, tmp_path):
    from lesseg.engine.trainer import train
    from lesseg.viz import curves_figure, entropy_figure

    cfg = tiny_cfg(
        ["train.iters=2"],
        method={"name": "u2pl", "sup_only_epochs": 0, "num_queries": 4, "num_negatives": 4, "bank_size": 16,
                "bank_size_bg": 16},
        data={"streams": {"labeled": {"split": "train", "batch_size": 4},
                          "unlabeled": {"split": "train", "batch_size": 4, "labeled": False, "strong": True}}},
    )
    train(cfg)
    run = tmp_path / "run"
    ent = entropy_figure(run / "last.pt", tmp_path / "entropy.png", n=3)
    assert np.asarray(Image.open(ent)).shape[0] > 200  # 3 rows of panels
    curves = curves_figure(run / "metrics.jsonl", tmp_path / "curves.png")
    assert curves is not None and curves.is_file()
    logged = {k for line in (run / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"loss_unsup", "loss_contra", "reliable_frac", "drop_percent"} <= logged


@pytest.mark.parametrize("flag, value, culprit", [("--budgets", "1-3", "'1-3'"), ("--methods", "u2pll", "'u2pll'")])
def test_bench_semi_refuses_an_unknown_budget_or_method_before_training(flag, value, culprit, tmp_path, capsys):
    from test_cli import run_cli

    rc, out, err = run_cli(capsys, "bench", "semi", flag, value, "--out", tmp_path / "bench")
    assert rc == 2 and culprit in err and out == ""
    assert not (tmp_path / "bench").exists()  # nothing trained


def test_bench_semi_plan_adds_the_all_labels_reference_only_with_supervised(tmp_path, monkeypatch):
    from lesseg import bench
    from lesseg.engine import trainer

    trained = []

    def fake_train(cfg, resume=False):
        trained.append((cfg.method.name, cfg.data.streams.labeled.split, cfg.train.seed))
        Path(cfg.out).mkdir(parents=True)
        return {"miou": 0.5}

    monkeypatch.setattr(trainer, "train", fake_train)
    rows = bench.bench_semi(tmp_path, ("cps",), ("1-16",), (0, 1))
    assert trained == [("cps", "labeled_1-16", 0), ("cps", "labeled_1-16", 1)]
    trained.clear()
    bench.bench_semi(tmp_path / "b", ("supervised", "u2pl"), ("1-8",), (0,))
    assert trained == [("supervised", "train", 0), ("supervised", "labeled_1-8", 0), ("u2pl", "labeled_1-8", 0)]
    assert [r["budget"] for r in rows] == ["1-16", "1-16"]


def test_bench_semi_pretrain_trains_on_synthetic_once_and_every_run_starts_from_it(tmp_path, monkeypatch):
    from lesseg import bench
    from lesseg.engine import trainer

    trained = []

    def fake_train(cfg, resume=False):
        trained.append(cfg)
        Path(cfg.out).mkdir(parents=True)
        return {"miou": 0.5}

    monkeypatch.setattr(trainer, "train", fake_train)
    bench.bench_semi(tmp_path, ("supervised", "u2pl"), ("1-16",), (0,), pretrain=True,
                     extra=["data.root=elsewhere", "model.decoder_channels=32", "optim.weight_decay=0.5"])
    pre, *runs = trained
    assert pre.data.options.domain == "synthetic" and pre.model.pretrained is None and pre.out == str(tmp_path / "pretrain")
    assert pre.data.root == "data/shapes_synthetic" and pre.model.decoder_channels == 32  # its own data
    assert all(c.data.root == "elsewhere" and c.model.decoder_channels == 32 for c in runs)
    assert [c.method.name for c in runs] == ["supervised", "supervised", "u2pl"]
    assert all(c.model.pretrained == str(tmp_path / "pretrain" / "last.pt") for c in runs)
    assert all(c.data.options is None or c.data.options.get("domain", "real") == "real" for c in runs)
    assert runs[-1].data.streams.unlabeled.true_masks  # the pseudo-label diagnostics are logged
    # the runs fine-tune the encoder at a tenth of the head's lr; the pretraining keeps its own lr; given overrides
    # apply to both
    assert all(c.optim.lr == pytest.approx(2e-4) and c.optim.head_lr_mult == 10 for c in runs)
    assert pre.optim.lr == pytest.approx(2e-3) and pre.optim.head_lr_mult == 1
    assert all(c.optim.weight_decay == 0.5 for c in trained)
    trained.clear()
    bench.bench_semi(tmp_path / "b", ("supervised",), ("1-16",), (0,), pretrain=True, extra=["optim.lr=0.001"])
    assert [c.optim.lr for c in trained] == [0.001, 0.001, 0.001]  # the bench's fine-tuning lr does not override


def test_bench_semi_cost_only_measures_without_training(shapes_root, tmp_path, capsys):
    from test_cli import run_cli

    tiny = [f"data.root={shapes_root}", "data.options={n_train: 32, n_val: 15, size: 32}", "data.crop_size=[32,32]",
            "data.workers=0", "model.encoder=test_resnet", "model.decoder_channels=16", "model.rep_dim=16",
            "data.streams.labeled.batch_size=2", "data.streams.unlabeled.batch_size=2",
            "method.num_queries=4", "method.num_negatives=4", "method.bank_size=16", "method.bank_size_bg=16"]
    rc, out, err = run_cli(capsys, "bench", "semi", "--cost-only", "--methods", "u2pl", "--iters", "2",
                           "--out", tmp_path / "b", *tiny)
    assert rc == 0, err
    cost = json.loads((tmp_path / "b" / "cost.json").read_text())["cost"]
    # the reference replays the passes of a real step: the teacher on labeled + unlabeled without gradient,
    # the student on the same images with
    assert [c["method"] for c in cost] == ["u2pl"]
    assert cost[0]["passes"] == ["teacher 4 images forward, no gradient", "student 4 images forward+backward"]
    assert cost[0]["step_s"] > 0 and cost[0]["passes_s"] > 0 and "method-specific" in out
    assert not (tmp_path / "b" / "1-16").exists() and not (tmp_path / "b" / "all").exists()  # nothing trained


def test_bench_speed_prints_a_row_and_profile_prints_the_op_table(tiny_cfg, tmp_path, capsys, monkeypatch):
    from test_cli import run_cli

    from lesseg import config
    from lesseg.engine.trainer import Trainer

    path = tmp_path / "tiny.yaml"
    config.save(tiny_cfg(["train.iters=100"]), path)
    steps = []
    original = Trainer.train_step

    def recording(self, batch):
        steps.append(self.step)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", recording)
    rc, out, err = run_cli(capsys, "bench", "speed", path, "--iters", "2", "--warmup", "1")
    assert rc == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["batch"] == {"labeled": 4}
    assert steps == [50, 51, 52]  # timed mid-schedule: past any supervised warm-up of a method
    rc, out, err = run_cli(capsys, "bench", "speed", path, "--profile", "--iters", "2", "--warmup", "1")
    assert rc == 0, err
    assert "aten::convolution_backward" in out and "Self CPU time total" in out


def test_fg_identity_script_agrees_with_evaluate(tiny_cfg, tmp_path):
    import importlib.util

    from lesseg.engine.trainer import train

    result = train(tiny_cfg(["train.iters=2"]))
    path = Path(__file__).resolve().parents[1] / "scripts" / "fg_identity.py"
    spec = importlib.util.spec_from_file_location("fg_identity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.diagnose(str(tmp_path / "run" / "last.pt"), "val")
    assert r["miou"] == pytest.approx(result["miou"])  # same predictions, same matrix as training's eval
    assert 0.0 <= r["fg_iou"] <= 1.0 and r["chance"] == pytest.approx(1 / 6)
    assert math.isnan(r["right_class"]) or 0.0 <= r["right_class"] <= 1.0  # NaN: no pixel called fg
    from lesseg.data import build_eval_dataset

    masks = [item["mask"] for item in build_eval_dataset(tiny_cfg().data, split="val", progress=False)]
    scored = sum(int((m != 255).sum()) for m in masks)
    assert r["bg_true"] == pytest.approx(sum(int((m == 0).sum()) for m in masks) / scored)
    assert 0.0 <= r["bg_pred"] <= 1.0


def test_curves_draw_the_true_class0_share_into_the_pseudo_label_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    from lesseg.viz import curves_figure

    records = [{"event": "train", "step": s, "loss": 1.0 / s, "pl_c0": 0.9, "true_c0": 0.78} for s in (1, 2, 3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    titles, dashed = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **k: titles.append(t))
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        if "--" in args:
            dashed.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    assert curves_figure(tmp_path / "m.jsonl", tmp_path / "c.png").is_file()
    assert sorted(titles) == ["loss", "pl_c0"] and dashed == ["true_c0"]


@pytest.mark.parametrize("flags, folder, pretrain, family", [
    ([], "runs/bench_semi_pretrained", True, "shapes"),
    (["--no-pretrain"], "runs/bench_semi", False, "shapes"),
    (["--start", "imagenet", "--dataset", "fashion"], "runs/bench_semi_imagenet_fashion", "imagenet", "fashion")])
def test_bench_semi_pretrains_by_default_and_keeps_scratch_runs_apart(flags, folder, pretrain, family, tmp_path,
                                                                      capsys, monkeypatch):
    from test_cli import run_cli

    from lesseg import bench

    calls = []
    monkeypatch.setattr(bench, "bench_semi",
                        lambda out, *a, pretrain, family, **k: calls.append((out, pretrain, family)) or [])
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "bench", "semi", "--methods", "u2pl", "--no-cost", *flags)
    assert rc == 0, err
    assert calls == [(Path(folder), pretrain, family)]


def test_bench_semi_imagenet_start_fine_tunes_torchvisions_mobilenetv2(tmp_path, monkeypatch):
    from lesseg import bench
    from lesseg.engine import trainer

    seen = []

    def fake_train(cfg, resume=False):
        seen.append((cfg.model.encoder, cfg.model.pretrained, cfg.optim.lr, cfg.optim.head_lr_mult))
        Path(cfg.out).mkdir(parents=True)
        return {"miou": 0.5}

    monkeypatch.setattr(trainer, "train", fake_train)
    bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), pretrain="imagenet")
    assert seen == [("mobilenetv2_100", "imagenet", 0.0002, 10.0)]


def test_bench_semi_reuses_a_finished_run_only_with_the_same_config(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lesseg import bench
    from lesseg.engine import checkpoint as ckpt
    from lesseg.engine import trainer
    from lesseg.errors import LessegError

    trained = []

    def fake_train(cfg, resume=False):  # a finished run: last.pt at the last step, with its config
        trained.append(cfg.method.name)
        state = {"config": OmegaConf.to_container(cfg), "step": 1, "info": {"max_iters": 1}, "eval": {"miou": 0.5}}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        ckpt.save_atomic(state, Path(cfg.out) / "last.pt")
        return {"miou": 0.5}

    monkeypatch.setattr(trainer, "train", fake_train)
    bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), extra=["train.device=cpu"])
    bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), device="cpu")  # same run: reused, not retrained
    assert trained == ["u2pl"]
    bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), extra=["data.streams.unlabeled.true_masks=false"])
    assert trained == ["u2pl"]  # the diagnostics do not change the run
    with pytest.raises(LessegError, match=r"another config \(method.num_queries: 256 -> 8\)"):
        bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), extra=["method.num_queries=8"])
    # a run from before a key existed counts with that key's default
    path = tmp_path / "1-16" / "u2pl" / "seed0" / "last.pt"
    state = ckpt.load(path)
    del state["config"]["method"]["teacher_bn"]
    ckpt.save_atomic(state, path)
    bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,))  # the shapes config's teacher_bn is the default
    with pytest.raises(LessegError, match="method.teacher_bn: 'student' -> 'weak'"):
        bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,), extra=["method.teacher_bn=weak"])
    state["config"]["method"]["gone_key"] = 1  # a key this version does not know
    ckpt.save_atomic(state, path)
    with pytest.raises(LessegError, match="cannot compare.*gone_key"):
        bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,))
    assert trained == ["u2pl"]


def test_bench_semi_resumes_an_interrupted_run_and_reuses_a_finished_self_training(tmp_path, monkeypatch):
    """A run killed half-way (same config) goes on from its last.pt instead of starting over; a finished
    self-training run, whose checkpoints store its stage-3 config (the pseudo-mask stream), is reused."""
    from omegaconf import OmegaConf

    from lesseg import bench
    from lesseg.engine import checkpoint as ckpt
    from lesseg.engine import trainer
    from lesseg.methods.self_training import SelfTraining

    calls, stage1 = [], []

    class Killed(Exception):
        pass

    def fake_train(cfg, resume=False):  # as the trainer saves: the prepared config, max_iters 2
        calls.append((cfg.method.name, resume))
        stored = SelfTraining.final_config(cfg) if cfg.method.name == "self_training" else cfg
        if cfg.method.name == "self_training":
            stage1.append(cfg.method.stage1_checkpoint)
        step = 1 if cfg.method.name == "u2pl" and not resume else 2  # u2pl: killed after one step
        state = {"config": OmegaConf.to_container(stored), "step": step, "info": {"max_iters": 2},
                 "eval": {"miou": 0.25 * step}}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        ckpt.save_atomic(state, Path(cfg.out) / "last.pt")
        if step < 2:
            raise Killed
        return state["eval"]

    monkeypatch.setattr(trainer, "train", fake_train)
    with pytest.raises(Killed):
        bench.bench_semi(tmp_path, ("u2pl",), ("1-16",), (0,))
    rows = bench.bench_semi(tmp_path, ("u2pl", "self_training"), ("1-16",), (0,))
    # self-training's stage 1 is the SupOnly run of its budget and seed, trained first (no row of its own)
    assert calls == [("u2pl", False), ("u2pl", True), ("supervised", False), ("self_training", False)]
    assert stage1 == [str(tmp_path / "1-16" / "supervised" / "seed0" / "last.pt")]
    assert [r["miou"] for r in rows] == [0.5, 0.5]
    assert not (tmp_path / "1-16" / "u2pl" / "seed0" / "wall_s.txt").exists()  # only its last part was timed
    assert (tmp_path / "1-16" / "self_training" / "seed0" / "wall_s.txt").exists()
    bench.bench_semi(tmp_path, ("u2pl", "self_training"), ("1-16",), (0,))  # all finished: reused
    assert len(calls) == 4


def test_bench_semi_refuses_a_run_that_started_from_another_version_of_the_pretrained_encoder(tmp_path, monkeypatch):
    """Same config, same model.pretrained path, but the encoder file was retrained since: not reused."""
    import os

    from omegaconf import OmegaConf

    from lesseg import bench
    from lesseg.engine import checkpoint as ckpt
    from lesseg.engine import trainer
    from lesseg.errors import LessegError

    trained = []

    def fake_train(cfg, resume=False):  # a finished run, as the trainer saves it (digest of the weights it started from)
        trained.append(cfg.method.name)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text("written at the start\n")
        digest = ckpt.file_digest(cfg.model.pretrained) if cfg.model.pretrained else None
        state = {"config": OmegaConf.to_container(cfg), "step": 1, "info": {"max_iters": 1}, "eval": {"miou": 0.5},
                 "pretrained_sha256": digest, "weights": torch.full((4,), float(len(trained)))}
        ckpt.save_atomic(state, out / "last.pt")
        return {"miou": 0.5}

    monkeypatch.setattr(trainer, "train", fake_train)
    plan = ((tmp_path, ("u2pl",), ("1-16",), (0,)), {"pretrain": True})
    bench.bench_semi(*plan[0], **plan[1])
    bench.bench_semi(*plan[0], **plan[1])
    assert trained == ["supervised", "u2pl"]  # both reused the second time
    encoder, run = tmp_path / "pretrain" / "last.pt", tmp_path / "1-16" / "u2pl" / "seed0"
    state = ckpt.load(encoder)
    state["weights"] += 1  # the encoder retrained with the same config (its folder deleted and rerun, say)
    ckpt.save_atomic(state, encoder)
    with pytest.raises(LessegError, match=f"{run}.*another version of {encoder}"):
        bench.bench_semi(*plan[0], **plan[1])
    # a run saved before checkpoints kept the digest: the encoder must predate the run's start
    old = ckpt.load(run / "last.pt")
    del old["pretrained_sha256"]
    ckpt.save_atomic(old, run / "last.pt")
    started = (run / "config.yaml").stat().st_mtime
    os.utime(encoder, (started - 60, started - 60))
    bench.bench_semi(*plan[0], **plan[1])
    os.utime(encoder, (started + 60, started + 60))
    with pytest.raises(LessegError, match="another version"):
        bench.bench_semi(*plan[0], **plan[1])
    assert trained == ["supervised", "u2pl"]


def test_bench_semi_finished_only_trains_nothing_and_reports_the_finished_runs(tmp_path, monkeypatch, capsys):
    """train_missing=False (`--finished-only`): the table of the finished runs; unfinished ones (never
    started, or interrupted) are listed, not trained or resumed."""
    from omegaconf import OmegaConf

    from lesseg import bench
    from lesseg.engine import checkpoint as ckpt
    from lesseg.engine import trainer

    calls = []

    def fake_train(cfg, resume=False):
        calls.append((cfg.method.name, cfg.train.seed))
        step = 1 if cfg.train.seed == 1 else 2  # seed 1: interrupted after one of two steps
        state = {"config": OmegaConf.to_container(cfg), "step": step, "info": {"max_iters": 2},
                 "eval": {"miou": 0.5 if cfg.method.name == "u2pl" else 0.25}}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        ckpt.save_atomic(state, Path(cfg.out) / "last.pt")
        return state["eval"]

    monkeypatch.setattr(trainer, "train", fake_train)
    bench.bench_semi(tmp_path, ("supervised", "u2pl"), ("1-16",), (0, 1))
    assert len(calls) == 6  # all x2, 1-16 x2 for each method
    rows = bench.bench_semi(tmp_path, ("supervised", "u2pl", "cps"), ("1-16",), (0, 1), train_missing=False)
    assert len(calls) == 6  # nothing trained, nothing resumed
    assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [
        ("supervised", "all", 0), ("supervised", "1-16", 0), ("u2pl", "1-16", 0)]
    out = capsys.readouterr().out
    assert "not finished, left out: u2pl 1-16 seed 1" in out and "cps 1-16 seed 0" in out
    table = {(t["method"], t["budget"]): t for t in bench.summarize_semi(rows)}
    assert table[("u2pl", "1-16")]["gain"] == pytest.approx(0.25)


@pytest.mark.parametrize("name, method, expected", [
    ("cps", {"cutmix": True}, [("net1", 3, False), ("net2", 3, False), ("net1", 5, True), ("net2", 5, True)]),
    ("mean_teacher", {}, [("teacher", 3, False), ("net", 5, True)]),
    ("u2pl", {"sup_only_epochs": 0}, [("teacher", 5, False), ("student", 5, True)]),
])
def test_cost_reference_replays_the_passes_of_a_real_step(shapes_root, tmp_path, name, method, expected):
    # the cost bench's reference is these passes: CPS's gradient-free passes on the unmixed images count,
    # and Mean Teacher's teacher sees only the unlabeled images (3 here), not the labeled ones
    from conftest import tiny_dict

    from lesseg.bench.measure import steady_trainer

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": name, **method})
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2},
                            "unlabeled": {"split": "train", "batch_size": 3, "labeled": False, "strong": True}}
    trainer, (batch,) = steady_trainer(config.from_dict(d))
    assert [(c.name, c.images, c.grad) for c in bench.record_passes(trainer, batch)] == expected


@pytest.mark.parametrize("name, method, expected, input_grad", [
    ("advsemseg", {"semi_start": 0}, ["net 5 images forward+backward", "disc 5 images forward+backward",
                                      "disc 7 images forward+backward"], [False, True, False]),
    ("gct", {}, ["net_l 5 images forward+backward", "net_r 5 images forward+backward",
                 "2 x fd 10 images forward+backward"], [False, False, False, True]),
])
def test_cost_reference_counts_the_methods_own_networks(shapes_root, tmp_path, name, method, expected, input_grad):
    # AdvSemSeg's discriminator and GCT's flaw detector are network passes, not method-specific work; the
    # replay asks gradient only towards the inputs that had it (the adversarial terms reach the segmenter's
    # probabilities, the detector's own loss sees detached inputs)
    from conftest import tiny_dict

    from lesseg.bench.cost import _tensors, describe
    from lesseg.bench.measure import steady_trainer

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": name, **method})
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2},
                            "unlabeled": {"split": "train", "batch_size": 3, "labeled": False, "strong": True}}
    trainer, (batch,) = steady_trainer(config.from_dict(d))
    calls = bench.record_passes(trainer, batch)
    assert describe(calls) == expected
    assert [any(t.requires_grad for t in _tensors(c.args)) for c in calls] == input_grad


def test_cost_reference_counts_cct_decoders_once_each_call(shapes_root, tmp_path):
    # every auxiliary decoder call is a pass (VAT's power iteration included); the decoders sit inside
    # PerturbedDecoders, which is not itself a network; their input is the encoder features, with gradient
    from conftest import tiny_dict

    from lesseg.bench.cost import _tensors
    from lesseg.bench.measure import steady_trainer

    d = tiny_dict(shapes_root, tmp_path / "run", method={"name": "cct"})
    d["data"]["streams"] = {"labeled": {"split": "train", "batch_size": 2},
                            "unlabeled": {"split": "train", "batch_size": 3, "labeled": False, "strong": True}}
    trainer, (batch,) = steady_trainer(config.from_dict(d))
    calls = bench.record_passes(trainer, batch)
    kinds = trainer.method.aux.kinds
    vat = kinds.count("vat")
    assert [c.name for c in calls[:1]] == ["net"]
    assert len(calls) == 1 + len(kinds) + 2 * vat  # VAT decoders: target, power iteration, perturbed pass
    assert all(c.name.startswith("aux.decoders.") and c.images == 3 for c in calls[1:])
    assert all(any(t.requires_grad for t in _tensors(c.args)) == c.grad for c in calls[1:])


def test_bench_rows_say_what_each_run_started_from(tmp_path):
    from lesseg.bench.semi import starting_weights
    from lesseg.engine import checkpoint as ckpt

    record = {"spec": "imagenet", "source": "timm", "tag": "resnet18.a1_in1k", "file": "/x", "sha256": "ab" * 32}
    ckpt.save_atomic({"pretrained": record, "config": {}}, tmp_path / "a.pt")
    assert starting_weights(tmp_path / "a.pt") == "imagenet (sha256 abababababab)"
    ckpt.save_atomic({"pretrained_sha256": "cd" * 32, "config": {"model": {"pretrained": "enc.pt"}}}, tmp_path / "b.pt")
    assert starting_weights(tmp_path / "b.pt") == "enc.pt (sha256 cdcdcdcdcdcd)"  # before the whole record
    ckpt.save_atomic({"pretrained": None, "pretrained_sha256": None, "config": {"model": {}}}, tmp_path / "c.pt")
    assert starting_weights(tmp_path / "c.pt") == "random init" and starting_weights(tmp_path / "none.pt") is None


def test_viz_runs_compares_runs_in_one_figure_and_names_them_apart(tmp_path, capsys):
    """`lesseg viz --runs`: one figure over several runs (bench layouts end in seed0: the labels keep the
    parents that tell them apart); the series read back are the logged ones; a folder without metrics is
    refused by name."""
    from lesseg.cli import main
    from lesseg.viz import _run_name, metric_series

    runs = []
    for method in ("supervised", "u2pl"):
        run = tmp_path / "1-16" / method / "seed0"
        run.mkdir(parents=True)
        recs = [{"event": "train", "step": 25, "loss": 1.0, "loss_sup": 1.0, "lr": 0.1, "it_per_s": 3.0},
                {"event": "eval", "step": 50, "miou": 0.25, "acc": 0.9, "iou": {"a": 0.5}}]
        if method == "u2pl":
            recs[0].update(pl_miou=0.2, pl_c0=0.9, true_c0=0.78)
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        runs.append(run)
    series = metric_series(runs[1] / "metrics.jsonl")
    assert series == {"loss": [(25, 1.0)], "loss_sup": [(25, 1.0)], "pl_miou": [(25, 0.2)], "pl_c0": [(25, 0.9)],
                      "true_c0": [(25, 0.78)], "eval miou": [(50, 0.25)]}
    assert [_run_name(r, runs) for r in runs] == ["supervised/seed0", "u2pl/seed0"]
    assert main(["viz", "--runs", *map(str, runs), "--out", str(tmp_path / "viz")]) == 0
    assert Image.open(tmp_path / "viz" / "runs.png").size[0] > 500
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["viz", "--runs", str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "viz")]) != 0
    err = capsys.readouterr().err
    assert "no metrics.jsonl in" in err and "empty" in err and "seed0" not in err


def test_bench_weak_summary_means_stages_over_seeds_and_shares_of_full(tmp_path):
    """`bench weak`'s table: per method the classifier mAP of the stage reporting it, every pseudo-mask
    stage's mIoU in pipeline order, the final mIoU and its share of the fully supervised one (means over
    seeds); an unknown pipeline is refused naming the ones the family has."""
    from lesseg.bench.weak import bench_weak, summarize_weak
    from lesseg.errors import LessegError

    def row(method, miou, stages, seed=0):
        return {"method": method, "seed": seed, "miou": miou, "wall_s": 10.0,
                "stages": [{"stage": n, "kind": k, "metrics": m} for n, k, m in stages]}

    rows = [row("full", 0.6, []), row("full", 0.4, [], 1),
            row("psl", 0.3, [("classifier", "train", {"map": 0.8}), ("erase", "task", {"pseudo_miou": 0.2}),
                             ("crf", "task", {"pseudo_miou": 0.3, "images_per_s": 50.0, "raw_miou": 0.1,
                                              "crf_miou": 0.3}), ("train", "train", {})]),
            row("psl", 0.2, [("classifier", "train", {"map": 0.6}), ("erase", "task", {"pseudo_miou": 0.4}),
                             ("crf", "task", {"pseudo_miou": 0.5, "raw_miou": 0.3, "crf_miou": 0.5}),
                             ("train", "train", {})], 1)]
    table = {r["method"]: r for r in summarize_weak(rows)}
    assert table["full"]["miou"] == pytest.approx(0.5) and table["full"]["of_full"] is None
    psl = table["psl"]
    assert psl["seeds"] == 2 and psl["classifier_map"] == pytest.approx(0.7)
    assert [n for n, _ in psl["pseudo_miou"]] == ["erase", "crf (before CRF 20.0)"]
    assert [v for _, v in psl["pseudo_miou"]] == pytest.approx([0.3, 0.4])
    assert psl["miou"] == pytest.approx(0.25) and psl["of_full"] == pytest.approx(0.5)
    assert psl["cam_images_per_s"] == pytest.approx(50.0)
    with pytest.raises(LessegError, match=r"nosuch.*shapes has .*cam"):
        bench_weak(tmp_path, ("nosuch",), (0,))


def test_runs_figure_gives_every_run_its_own_line_past_ten_runs():
    # the default colour cycle repeats after 10 (an 11-run comparison drew two runs alike) and its grey is
    # the true-background reference's
    from lesseg.viz import run_styles

    styles = run_styles(30)
    assert len(set(styles)) == 30 and all(color != "C7" for color, _ in styles)
    assert styles[:2] == [("C0", "-"), ("C1", "-")] and styles[9] == ("C0", "--")


@pytest.mark.parametrize("family", ["shapes", "fashion"])
def test_bench_weak_reference_trains_with_the_pipelines_augmentation(tmp_path, monkeypatch, family):
    """The segmentation configs paste objects (data.aug.copy_paste) and the weak pipelines do not: the fully
    supervised reference of `bench weak` must train as the pipelines' final networks do, or "of full" compares
    two recipes."""
    from lesseg.bench import weak

    seen = {}
    monkeypatch.setattr(weak, "finished_or_train", lambda cfg, run_dir, what, train: seen.update(
        {what.split()[0]: cfg.data.aug}))
    methods = tuple(p.stem[5:] for p in (config.PACKAGED / family).glob("weak_*.yaml"))
    weak.bench_weak(tmp_path, methods, (0,), family=family, train_missing=False)
    assert config.load(f"{family}/supervised.yaml").data.aug.copy_paste == 1.0  # what the reference overrides
    assert seen.pop("full").copy_paste == 0.0
    assert all(a.copy_paste == 0.0 for a in seen.values()) and len(seen) == len(methods)
