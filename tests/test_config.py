import dataclasses

import pytest
import yaml

from frcnn.config import CONFIG_DIR, Config, ConfigError, load_config, save_config


def test_base_yaml_restates_the_dataclass_defaults():
    with open(f"{CONFIG_DIR}/base.yaml") as f:
        documented = yaml.safe_load(f)
    assert documented == Config().to_dict()


@pytest.mark.parametrize("name", ["voc.yaml", "voc", "coco.yaml", "shapes.yaml", "shapes_long.yaml", "test.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)


def test_shapes_long_is_the_shapes_recipe_trained_longer():
    # Only the length of training, the data it needs and the ROIs sampled per training image may differ: the same
    # model (the same weights fit both), the same validation images.
    short, long = load_config("shapes.yaml").to_dict(), load_config("shapes_long.yaml").to_dict()
    differ = {(section, key) for section in short for key in short[section]
              if short[section][key] != long[section][key]}
    assert differ == {("data", "root"), ("data", "synthetic"), ("train", "epochs"), ("train", "lr_decay_epochs"),
                      ("model", "num_rois")}
    assert {k for k in short["data"]["synthetic"] if short["data"]["synthetic"][k] != long["data"]["synthetic"][k]} \
        == {"num_train"}
    assert long["train"]["epochs"] * long["train"]["steps_per_epoch"] == 2000
    assert (short["model"]["num_rois"], long["model"]["num_rois"]) == (16, 32)


def test_voc_recipe():
    cfg = load_config("voc.yaml")
    assert (cfg.input.min_size, cfg.input.max_size) == (600, 1000)
    assert cfg.model.anchor_sizes == (128.0, 256.0, 512.0)
    assert cfg.model.anchor_ratios == (0.5, 1.0, 2.0)
    assert cfg.model.feature_stride == 16
    assert cfg.model.rpn_post_nms_topk_test == 300
    assert cfg.num_classes == 21
    assert cfg.data.root == ("data/VOCdevkit/VOC2007", "data/VOCdevkit/VOC2012")


def test_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: voc.yaml\nmodel:\n  num_rois: 64\n")
    cfg = load_config(str(path), ["train.lr=0.005", "model.anchor_ratios=[1.0]", "data.val_split=null"])
    assert cfg.model.num_rois == 64
    assert cfg.train.lr == 0.005
    assert cfg.model.anchor_ratios == (1.0,)
    assert cfg.data.val_split is None
    assert cfg.input.min_size == 600  # from voc.yaml's base


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_roiz: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.num_roiz"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config("voc.yaml", ["train.lrr=1"])


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  min_size: large\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*input\.min_size.*int"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="model.anchor_sizes"):
        load_config(None, ["model.anchor_sizes=12"])


@pytest.mark.parametrize("override, key", [
    ("input.min_size=-5", "input.min_size"),
    ("model.anchor_sizes=[]", "model.anchor_sizes"),
    ("model.norm=layer", "model.norm"),
    ("model.roi_positive_fraction=1.5", "model.roi_positive_fraction"),
    ("input.max_size=100", "input.max_size"),
    ("model.rpn_box_weights=[1, 1]", "model.rpn_box_weights"),
    ("data.classes=[a, a]", "data.classes"),
])
def test_impossible_values_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config("voc.yaml", ["model.num_rois=32"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert dataclasses.is_dataclass(again.model)
    assert not list(tmp_path.glob(".config-*"))  # no temporary file left behind


def test_bare_off_is_read_as_the_string():
    assert load_config(None, ["train.mixed_precision=off"]).train.mixed_precision == "off"
