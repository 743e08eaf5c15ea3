"""Config validation: the published configs, overrides, and one-line errors for bad keys."""

from pathlib import Path

import pytest

from fastjepa.config import ConfigError, apply_override, load_yaml, tiny_preset, validate

CONFIGS = sorted((Path(__file__).parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_published_configs_validate_unchanged(path):
    raw = load_yaml(path)
    checked = validate(raw)
    for section, keys in raw.items():
        for key, value in keys.items():
            assert checked[section][key] == value, f"{section}.{key}"
    assert checked["mask"]["fix_position_range"] is False  # fastjepa's extra keys take their defaults
    assert checked["mask"]["ragged"] is False and checked["meta"]["shared_context_predictor"] is False


def test_four_published_configs_are_present():
    assert [p.stem for p in CONFIGS] == ["in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vitg16_ep44", "in22k_vith14_ep66"]


def test_missing_keys_take_defaults_and_the_preset_is_valid():
    assert validate({})["meta"]["model_name"] == "vit_huge"
    preset = tiny_preset()
    assert preset["meta"]["model_name"] == "vit_tiny" and Path(preset["data"]["root_path"]).is_dir()


def test_overrides_parse_yaml_values():
    config = {}
    for assignment in ("data.batch_size=64", "mask.enc_mask_scale=[0.8, 1.0]", "meta.use_bfloat16=false", "meta.read_checkpoint=null",
                       "mask.ragged=true", "meta.shared_context_predictor=true"):
        apply_override(config, assignment)
    checked = validate(config)
    assert checked["mask"]["ragged"] is True and checked["meta"]["shared_context_predictor"] is True
    assert checked["data"]["batch_size"] == 64 and checked["mask"]["enc_mask_scale"] == [0.8, 1.0]
    assert checked["meta"]["use_bfloat16"] is False and checked["meta"]["read_checkpoint"] is None


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mask": {"min_kepe": 3}}, "unknown key mask.min_kepe; mask keys are"),
        ({"masks": {}}, "unknown section 'masks'"),
        ({"data": {"batch_size": "big"}}, "data.batch_size must be an integer, got 'big'"),
        ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1"),
        ({"data": {"batch_size": True}}, "data.batch_size must be an integer"),
        ({"data": {"crop_scale": [0.3]}}, "data.crop_scale must be a list of two numbers"),
        ({"data": {"crop_scale": [0.5, 1.5]}}, "data.crop_scale must be [min, max] with 0 < min <= max <= 1"),
        ({"data": {"crop_size": 225}}, "data.crop_size 225 must be divisible by mask.patch_size 14"),
        ({"meta": {"model_name": "vit_enormous"}}, "meta.model_name must be one of vit_tiny"),
        ({"meta": {"copy_data": True}}, "meta.copy_data must be false"),
        ({"meta": {"pred_emb_dim": 100}}, "meta.pred_emb_dim must be divisible by vit_huge's 16 heads"),
        ({"optimization": {"lr": float("nan")}}, "optimization.lr must be a number"),
        ({"optimization": {"ema": [1.0, 0.9]}}, "optimization.ema must be [start, end]"),
        ({"mask": {"min_keep": 256}}, "mask: min_keep must be an int in [0, 256)"),
        ({"mask": {"pred_mask_scale": [0.0, 0.2]}}, "mask.pred_mask_scale must be [min, max] with 0 < min"),
        ({"logging": {"write_tag": "a/b"}}, "logging.write_tag must be a non-empty name"),
        ({"data": {"root_path": None}}, "data.root_path must not be empty"),
        ({"mask": {"ragged": "yes"}}, "mask.ragged must be true or false, got 'yes'"),
        ({"meta": {"shared_context_predictor": 1}}, "meta.shared_context_predictor must be true or false, got 1"),
    ],
)
def test_bad_configs_name_the_key(config, message):
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("assignment, message", [("batch_size=3", "section.key=value"), ("data.batchsize=3", "unknown key data.batchsize"),
                                                 ("data.crop_scale=[0.3", "cannot parse"), ("nosuch.key=1", "unknown key nosuch.key")])
def test_bad_overrides(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        apply_override({}, assignment)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_yaml(scalar)
