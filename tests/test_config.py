import pytest
from omegaconf import OmegaConf

from lesseg import config
from lesseg.errors import ConfigError

BASE = {"train": {"iters": 10}}


def test_defaults_and_override_types():
    cfg = config.from_dict(BASE, ["optim.lr=0.5", "data.crop_size=[32,48]"])
    assert cfg.optim.lr == 0.5
    assert list(cfg.data.crop_size) == [32, 48]
    assert cfg.method.name == "supervised" and cfg.method.ohem is False  # method defaults filled in


@pytest.mark.parametrize(
    "layer, override, culprit",
    [
        ({"train": {"iters": 10, "itres": 3}}, None, "itres"),
        (BASE, "optim.lr=fast", "optim.lr"),
        (BASE, "model.encoderr=resnet50", "encoderr"),
        ({"train": {"iters": 10}, "method": {"name": "supervised", "ohme": True}}, None, "ohme"),
        ({"train": {"iters": 10}, "data": {"streams": {"labeled": {"batchsize": 4}}}}, None, "batchsize"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_culprit(layer, override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        config.from_dict(layer, [override] if override else [])


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="supervised"):
        config.from_dict({"train": {"iters": 1}, "method": {"name": "nope"}})


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        config.from_dict(BASE, ["train.iters"])


def test_unknown_optimizer_is_refused_at_load_naming_the_choices():
    with pytest.raises(ConfigError, match="optim.name must be sgd or adamw, not 'adam'"):
        config.from_dict(BASE, ["optim.name=adam"])


def test_iterations_or_epochs_required():
    with pytest.raises(ConfigError, match="train.iters or train.epochs"):
        config.from_dict({})


def test_base_inheritance_and_saved_config_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {iters: 7, seed: 3}\noptim: {lr: 0.1}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.2}\n")
    cfg = config.load(tmp_path / "child.yaml", ["train.seed=5"])
    assert (cfg.train.iters, cfg.optim.lr, cfg.train.seed) == (7, 0.2, 5)
    assert cfg.out.endswith("child")
    config.save(cfg, tmp_path / "saved.yaml")
    again = config.load(tmp_path / "saved.yaml")
    assert again == cfg


def test_two_base_levels_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {iters: 1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="one level"):
        config.load(tmp_path / "c.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        config.load(tmp_path / "bad.yaml")


def test_packaged_configs_resolve():
    cfg = config.load("configs/shapes/supervised.yaml")
    assert cfg.data.dataset == "shapes" and cfg.method.name == "supervised"


ALL_CONFIGS = sorted(p for p in config.PACKAGED.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(config.PACKAGED)))
def test_every_packaged_config_is_valid(path):
    cfg = config.load(path)
    assert cfg.train.iters > 0 or cfg.train.epochs > 0


def test_paper_configs_encode_the_papers_settings():
    u2pl_city = config.load("cityscapes/u2pl.yaml")
    assert list(u2pl_city.data.crop_size) == [769, 769] and u2pl_city.eval.mode == "slide"
    assert u2pl_city.method.ohem and u2pl_city.model.aux_head and u2pl_city.method.sup_only_epochs == 0
    assert u2pl_city.method.contra_weight == 0.1  # the paper's lambda_c, not the authors' code default 1
    u2pl_voc = config.load("voc/classic/u2pl.yaml")
    assert u2pl_voc.optim.lr == 0.001 and u2pl_voc.train.epochs == 80 and u2pl_voc.method.sup_only_epochs == 1
    cps_voc = config.load("voc/blended/cps.yaml")
    assert cps_voc.method.cps_weight == 1.0 and list(cps_voc.data.crop_size) == [512, 512]
    assert cps_voc.data.options.aug_masks and "aug_masks" not in config.load("voc/classic/cps.yaml").data.options
    cps_city = config.load("cityscapes/cps.yaml")
    assert cps_city.method.cps_weight == 5.0 and cps_city.method.ohem and list(cps_city.eval.crop_size) == [800, 800]


PAPER = {"voc/blended": ("voc_blended", "1-16", "1-8"), "voc/classic": ("voc_classic", "92", "366"),
         "cityscapes": ("cityscapes", "1-16", "1-2")}


@pytest.mark.parametrize("method", ["supervised", "cps", "u2pl"])
@pytest.mark.parametrize("setting", sorted(PAPER))
def test_paper_config_budget_sets_every_split_path_and_the_run_folder(setting, method):
    tag, default, other = PAPER[setting]
    for overrides, budget in (([], default), ([f"data.budget={other}"], other)):
        cfg = config.load(f"{setting}/{method}.yaml", overrides)
        streams = ["labeled"] if method == "supervised" else ["labeled", "unlabeled"]
        assert cfg.data.budget == budget and list(cfg.data.streams) == streams
        for name in streams:
            assert cfg.data.streams[name].split == f"data/splits/{tag}/{budget}/{name}.txt"
        assert cfg.out == f"runs/{tag}/{method}_{budget}"


def test_saved_config_states_the_resolved_split_paths(tmp_path):
    cfg = config.load("voc/blended/u2pl.yaml", ["data.budget=1-8"])
    config.save(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "${" not in text and "${" not in str(OmegaConf.to_container(cfg))  # also the checkpoint's copy
    assert "split: data/splits/voc_blended/1-8/labeled.txt" in text
    assert "split: data/splits/voc_blended/1-8/unlabeled.txt" in text
    assert "out: runs/voc_blended/u2pl_1-8" in text
    assert config.load(tmp_path / "config.yaml") == cfg


def test_bad_interpolation_is_one_config_error_naming_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text(
        'train: {iters: 1}\ndata:\n  budget: "92"\n  streams: {labeled: {split: "s/${data.budgte}/l.txt"}}\n')
    with pytest.raises(ConfigError, match=r"data.streams.labeled.split.*data.budgte"):
        config.load(tmp_path / "c.yaml")
