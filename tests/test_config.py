import dataclasses

import pytest
import yaml

from frcnn.config import CONFIG_DIR, Config, ConfigError, load_config, save_config


def test_base_yaml_restates_the_dataclass_defaults():
    with open(f"{CONFIG_DIR}/base.yaml") as f:
        documented = yaml.safe_load(f)
    assert documented == Config().to_dict()


@pytest.mark.parametrize("name", ["voc.yaml", "voc", "coco.yaml", "shapes.yaml", "test.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)


def test_shapes_default_trains_2000_steps_on_as_many_images_as_it_sees():
    cfg = load_config("shapes.yaml")
    t = cfg.train
    assert (t.epochs * t.steps_per_epoch, t.batch_size, cfg.roi_heads.num_rois) == (2000, 2, 32)
    assert cfg.data.synthetic.num_train == t.epochs * t.steps_per_epoch * t.batch_size  # each image seen once
    assert t.lr_decay_epochs == (18,) and t.epochs % t.val_every == 0  # the last epoch is validated


def test_voc_recipe():
    cfg = load_config("voc.yaml")
    assert (cfg.input.min_size, cfg.input.max_size) == (600, 1000)
    assert cfg.anchors.sizes == (128.0, 256.0, 512.0)
    assert cfg.anchors.ratios == (0.5, 1.0, 2.0)
    assert cfg.model.feature_stride == 16
    assert cfg.rpn.post_nms_topk_test == 300
    assert cfg.num_classes == 21
    assert cfg.data.root == ("data/VOCdevkit/VOC2007", "data/VOCdevkit/VOC2012")


def test_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: voc.yaml\nmodel:\n  num_rois: 64\n")
    cfg = load_config(str(path), ["train.lr=0.005", "model.anchor_ratios=[1.0]", "data.val_split=null"])
    assert cfg.roi_heads.num_rois == 64
    assert cfg.train.lr == 0.005
    assert cfg.anchors.ratios == (1.0,)
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
    with pytest.raises(ConfigError, match="anchors.sizes"):
        load_config(None, ["anchors.sizes=12"])


@pytest.mark.parametrize("override, key", [
    ("input.min_size=-5", "input.min_size"),
    ("anchors.sizes=[]", "anchors.sizes"),
    ("model.norm=layer", "model.norm"),
    ("roi_heads.positive_fraction=1.5", "roi_heads.positive_fraction"),
    ("model.roi_positive_fraction=1.5", "roi_heads.positive_fraction"),  # an old key names its new place
    ("input.max_size=100", "input.max_size"),
    ("rpn.box_weights=[1, 1]", "rpn.box_weights"),
    ("rpn.bg_iou=0.8", "rpn.bg_iou"),
    ("model.freeze_at=7", "model.freeze_at"),
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


# The flat model section of frcnn 0.1 (model.num_rois, model.rpn_channels, ...): its keys keep loading from YAML
# files, --set overrides and saved config.yaml files, mapped to their sections.
OLD_MODEL_SECTION = {
    "backbone_weights": "none", "norm": "group", "anchor_sizes": [32.0, 64.0], "anchor_offset": 0.0,
    "rpn_channels": 128, "rpn_post_nms_topk_test": 77, "rpn_smooth_l1_beta": 0.0, "num_rois": 24,
    "roi_positive_fraction": 0.5, "pool_size": 6, "head_pooling": "none", "score_thresh": 0.25,
    "rpn_loss_weight": 2.0, "roi_loss_weight": 0.5,
}


def test_old_flat_model_keys_load_from_files_overrides_and_saved_configs(tmp_path):
    from frcnn.config import LEGACY_KEYS

    path = tmp_path / "old_config.yaml"  # e.g. a config.yaml saved by a frcnn 0.1 training run
    path.write_text(yaml.safe_dump({"model": OLD_MODEL_SECTION}))
    cfg = load_config(str(path), ["model.max_detections=33", "model.rpn_nms_thresh=0.6"])
    assert (cfg.anchors.sizes, cfg.anchors.offset) == ((32.0, 64.0), 0.0)
    assert (cfg.rpn.channels, cfg.rpn.post_nms_topk_test, cfg.rpn.smooth_l1_beta) == (128, 77, 0.0)
    assert (cfg.roi_heads.num_rois, cfg.roi_heads.positive_fraction, cfg.roi_heads.pool_size) == (24, 0.5, 6)
    assert (cfg.roi_heads.head_pooling, cfg.roi_heads.score_thresh) == ("none", 0.25)
    assert (cfg.rpn.loss_weight, cfg.roi_heads.loss_weight) == (2.0, 0.5)
    assert (cfg.roi_heads.max_detections, cfg.rpn.nms_thresh) == (33, 0.6)
    assert (cfg.model.backbone_weights, cfg.model.norm) == ("none", "group")
    # Every old key maps to an existing key of today's config.
    new = Config().to_dict()
    for old, current in LEGACY_KEYS.items():
        section, name = current.split(".")
        assert name in new[section], (old, current)
    # Saved again, it is written with today's keys only, and reads back the same.
    save_config(cfg, str(tmp_path / "saved.yaml"))
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert set(saved["model"]) == {"backbone_weights", "norm", "freeze_at", "feature_stride"}
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_a_key_set_under_its_old_and_new_name_is_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  num_rois: 8\nroi_heads:\n  num_rois: 16\n")
    with pytest.raises(ConfigError, match=r"both\.yaml.*model\.num_rois.*roi_heads\.num_rois"):
        load_config(str(path))


def test_each_section_checks_its_own_values():
    from frcnn.config import ROIHeadsConfig, RPNConfig

    problems = []
    RPNConfig(bg_iou=0.9, fg_iou=0.7).validate(lambda key, why: problems.append(key))
    ROIHeadsConfig(num_rois=0).validate(lambda key, why: problems.append(key))
    assert problems == ["bg_iou", "num_rois"]
