"""The shipped recipes in configs/: valid, dry-runnable by path and by name, and each header names
every value that differs from the reference's ViT-H/14 config."""

from pathlib import Path

import pytest
import yaml

from fastjepa.cli import main as cli
from fastjepa.config import RECIPES, ConfigError, config_path, load_yaml, recipe_names, validate

ROOT = Path(__file__).resolve().parents[1]
VIT_H14 = Path(__file__).parent / "configs" / "in1k_vith14_ep300.yaml"
NAMES = ["vit_b16_in1k", "vit_b16_in1k_1gpu", "vit_s16_in1k"]


def test_the_recipes_are_the_files_in_configs():
    assert recipe_names() == NAMES == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("finetune_"))
    assert RECIPES.resolve() == (ROOT / "configs").resolve()


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_by_path_and_by_name(name, capsys):
    assert cli(["train", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--dry-run"]) == 0
    by_path = capsys.readouterr().out
    assert cli(["train", "--config", name, "--dry-run"]) == 0
    assert capsys.readouterr().out == by_path and "the config is valid" in by_path


def flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, keys in config.items() for key, value in keys.items()}


@pytest.mark.parametrize("name", NAMES)
def test_each_header_names_every_value_that_differs_from_vit_h14(name):
    path = ROOT / "configs" / f"{name}.yaml"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    recipe, reference = flat(validate(yaml.safe_load(path.read_text()))), flat(validate(load_yaml(VIT_H14)))
    changed = [key for key in recipe if recipe[key] != reference[key]]
    assert "mask.patch_size" in changed and "logging.folder" in changed
    for key in changed:
        assert key in header, f"{name}: {key} differs from the ViT-H/14 config but the header does not say why"


def test_the_one_gpu_recipe_reaches_the_published_global_batch():
    config = validate(load_yaml(config_path("vit_b16_in1k_1gpu")))
    assert config["data"]["batch_size"] == 2048 and config["data"]["batch_size"] // config["optimization"]["grad_accum_steps"] == 128
    assert {k: v for k, v in flat(config).items() if k not in ("data.batch_size", "optimization.grad_accum_steps", "logging.folder")} == \
        {k: v for k, v in flat(validate(load_yaml(config_path("vit_b16_in1k")))).items()
         if k not in ("data.batch_size", "optimization.grad_accum_steps", "logging.folder")}


def test_an_unknown_recipe_lists_the_names(capsys):
    with pytest.raises(ConfigError, match="config vit_l16 is neither a file nor a shipped recipe; the recipes are vit_b16_in1k, "
                                          "vit_b16_in1k_1gpu, vit_s16_in1k"):
        config_path("vit_l16")
    assert cli(["train", "--config", "vit_l16", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the recipes are vit_b16_in1k" in err and "\n" not in err
