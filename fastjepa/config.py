"""The trainer's configuration: the reference's YAML schema, validated key by key.

A config is a dict of sections (data, logging, mask, meta, optimization), exactly as
the reference's YAML files hold it. ``validate`` fills missing keys with the
reference's ViT-H/14 values, checks every key's type and range and returns a new
dict; any problem raises ``ConfigError`` with one line naming the key.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fastjepa.data.base import LoaderSettings
from fastjepa.data.loader import make_loader
from fastjepa.errors import ConfigError
from fastjepa.helper import MODEL_NAMES
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.models.vision_transformer import VIT_SHAPES


@dataclass(frozen=True)
class Key:
    kind: str  # bool | int | float | str | path | pair | choice (one of ``choices``: bools and strings)
    default: Any
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # said when ``check`` fails
    optional: bool = False  # None is allowed
    choices: tuple = ()  # kind "choice": the values allowed, compared with their type (true is not 1)


def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


def _fraction_pair(pair):
    return 0 < pair[0] <= pair[1] <= 1


DATA_BACKENDS = ("auto", "dali", "torchvision", "pil")  # fastjepa.data.loader
SHARDINGS = ("ddp", "fsdp")  # fastjepa.distributed
GRAD_REDUCE_DTYPES = ("float32", "bfloat16")

SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "backend": Key("str", "auto", lambda v: v in DATA_BACKENDS, f"one of {', '.join(DATA_BACKENDS)}"),
        "batch_size": Key("int", 128, _positive, ">= 1 (images per process)"),
        "color_jitter_strength": Key("float", 0.0, _non_negative, ">= 0"),
        "crop_scale": Key("pair", [0.3, 1.0], _fraction_pair, "[min, max] with 0 < min <= max <= 1"),
        "crop_size": Key("int", 224, _positive, ">= 1 pixels"),
        "image_folder": Key("path", "", None),
        "num_workers": Key("int", 10, _non_negative, ">= 0"),
        "pin_mem": Key("bool", True),
        "repeat": Key("int", 1, _positive, ">= 1 (passes over the images per epoch)"),
        "root_path": Key("path", "", None),
        "use_color_distortion": Key("bool", False),
        "use_gaussian_blur": Key("bool", False),
        "use_horizontal_flip": Key("bool", False),
    },
    "logging": {
        "folder": Key("path", None, None, optional=True),
        # collapse and health diagnostics every N steps (null: 4 per epoch, at least 10 steps apart; 0: never); see fastjepa.step.diagnose
        "diagnostics_every": Key("int", None, _non_negative, ">= 0 steps (0 turns them off)", optional=True),
        "write_tag": Key("str", "jepa", lambda s: s != "" and os.sep not in s, "a non-empty name without path separators"),
    },
    "mask": {
        "allow_overlap": Key("bool", False),
        "aspect_ratio": Key("pair", [0.75, 1.5], lambda p: 0 < p[0] <= p[1], "[min, max] with 0 < min <= max"),
        "enc_mask_scale": Key("pair", [0.85, 1.0], _fraction_pair, "[min, max] with 0 < min <= max <= 1"),
        "fix_position_range": Key("bool", False),
        "min_keep": Key("int", 10, _non_negative, ">= 0"),
        "num_enc_masks": Key("int", 1, _positive, ">= 1"),
        "num_pred_masks": Key("int", 4, _positive, ">= 1"),
        "patch_size": Key("int", 14, _positive, ">= 1"),
        "pred_mask_scale": Key("pair", [0.15, 0.2], _fraction_pair, "[min, max] with 0 < min <= max <= 1"),
        "ragged": Key("bool", False),  # keep every sampled context token (no truncation to the batch minimum)
    },
    "meta": {
        "activation_checkpointing": Key("bool", False),  # recompute the encoder's and predictor's blocks in the backward
        # torch.compile of the encoder's, predictor's and target's blocks, the token dimension dynamic (fastjepa.models.compile_blocks)
        "compile": Key("choice", False, choices=(False, True, "max-autotune")),
        "copy_data": Key("bool", False, lambda v: v is False, "false (copying ImageNet to node-local scratch is not supported)"),
        # DDP all-reduce bucket: 100 MB keeps ViT-H's ~2.5 GB of fp32 gradients in ~25 NCCL calls large enough
        # for full bus bandwidth while the last (exposed) bucket stays short; not yet measured on a cluster
        "ddp_bucket_mb": Key("int", 100, _positive, ">= 1 (MB)"),
        "grad_reduce_dtype": Key("str", "float32", lambda v: v in GRAD_REDUCE_DTYPES, f"one of {', '.join(GRAD_REDUCE_DTYPES)} (bfloat16 changes numerics)"),
        # encoder weights to start from (a checkpoint's target encoder, an hf folder, a .safetensors file); a resume overrides them
        "init_weights": Key("path", None, None, optional=True),
        "load_checkpoint": Key("bool", False),
        "model_name": Key("str", "vit_huge", lambda v: v in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}"),
        "pred_depth": Key("int", 12, _positive, ">= 1"),
        "pred_emb_dim": Key("int", 384, _positive, ">= 1"),
        "read_checkpoint": Key("path", None, None, optional=True),
        "shared_context_predictor": Key("bool", False),  # one predictor sequence per sample: changes the model
        "sharding": Key("str", "ddp", lambda v: v in SHARDINGS, f"one of {', '.join(SHARDINGS)}"),
        "skip_nonfinite": Key("bool", False),  # skip a step whose loss or gradients are not finite, instead of stopping
        "use_bfloat16": Key("bool", True),
    },
    "optimization": {
        "ema": Key("pair", [0.996, 1.0], lambda p: 0 <= p[0] <= p[1] <= 1, "[start, end] with 0 <= start <= end <= 1"),
        "epochs": Key("int", 300, _positive, ">= 1"),
        "final_lr": Key("float", 1.0e-6, _non_negative, ">= 0"),
        "final_weight_decay": Key("float", 0.4, _non_negative, ">= 0"),
        # AdamW and the target's EMA as one adamw_ema_ pass (auto: on a GPU with the CUDA extension); the same math
        "fused_optimizer_ema": Key("choice", "auto", choices=("auto", True, False)),
        # micro-batches per optimizer step: data.batch_size stays the step's batch, accumulation changes memory only
        "grad_accum_steps": Key("int", 1, _positive, ">= 1 (micro-batches per step)"),
        "ipe_scale": Key("float", 1.0, _positive, "> 0"),
        "lr": Key("float", 0.001, _positive, "> 0"),
        "start_lr": Key("float", 0.0002, _non_negative, ">= 0"),
        "warmup": Key("float", 40, _non_negative, ">= 0 epochs"),
        "weight_decay": Key("float", 0.04, _non_negative, ">= 0"),
    },
}


def _typed(name: str, key: Key, value):
    if value is None:
        if key.optional:
            return None
        raise ConfigError(f"{name} must not be empty (null)")
    kind = key.kind
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind in ("str", "path"):
        ok = isinstance(value, str)
    elif kind == "choice":
        if not any(type(value) is type(choice) and value == choice for choice in key.choices):
            raise ConfigError(f"{name} must be one of {', '.join(_yaml_word(c) for c in key.choices)}, got {value!r}")
        return value
    else:  # pair
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )
        value = [float(v) for v in value] if ok else value
    if not ok:
        expected = {"pair": "a list of two numbers", "path": "a path (string)", "float": "a number", "int": "an integer",
                    "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if key.check is not None and not key.check(value):
        raise ConfigError(f"{name} must be {key.allowed}, got {value!r}")
    return value


def _yaml_word(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_sections(config: dict, schema: dict[str, dict[str, Key]]) -> dict:
    """A complete, checked copy of ``config`` against ``schema`` (section -> key -> ``Key``):
    every key typed and in range, missing keys at their defaults; ``ConfigError`` names the
    first bad one."""
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(schema)}), got {type(config).__name__}")
    for section, entries in config.items():
        if section not in schema:
            raise ConfigError(f"unknown section {section!r}; sections are {', '.join(schema)}")
        if entries is not None and not isinstance(entries, dict):
            raise ConfigError(f"section {section} must be a mapping of keys, got {type(entries).__name__}")
        for key in entries or {}:
            if key not in schema[section]:
                raise ConfigError(f"unknown key {section}.{key}; {section} keys are {', '.join(schema[section])}")
    checked = {}
    for section, keys in schema.items():
        given = config.get(section) or {}
        checked[section] = {
            key: _typed(f"{section}.{key}", spec, copy.deepcopy(given[key]) if key in given else copy.deepcopy(spec.default))
            for key, spec in keys.items()
        }
    return checked


def validate(config: dict) -> dict:
    """A complete, checked copy of ``config``; ``ConfigError`` names the first bad key."""
    checked = check_sections(config, SCHEMA)
    data, mask, meta = checked["data"], checked["mask"], checked["meta"]
    if data["crop_size"] % mask["patch_size"]:
        raise ConfigError(f"data.crop_size {data['crop_size']} must be divisible by mask.patch_size {mask['patch_size']}")
    if meta["pred_emb_dim"] % 4:
        raise ConfigError(f"meta.pred_emb_dim must be a multiple of 4 (2-D sin-cos positions), got {meta['pred_emb_dim']}")
    accum = checked["optimization"]["grad_accum_steps"]
    if accum > data["batch_size"]:
        raise ConfigError(f"optimization.grad_accum_steps {accum} is larger than data.batch_size {data['batch_size']}: "
                          "a micro-batch needs at least one image")
    if data["batch_size"] % accum:
        raise ConfigError(f"data.batch_size {data['batch_size']} is not divisible by optimization.grad_accum_steps {accum}")
    heads = VIT_SHAPES[meta["model_name"]][2]  # the predictor has the encoder's heads
    if meta["pred_emb_dim"] % heads:
        raise ConfigError(f"meta.pred_emb_dim must be divisible by {meta['model_name']}'s {heads} heads, got {meta['pred_emb_dim']}")
    try:
        mask_sampler(checked)
    except ValueError as e:
        raise ConfigError(f"mask: {e}") from e
    return checked


def tiny_preset() -> dict:
    """What ``fastjepa train`` runs without a config: ViT-tiny on 64 px crops of the
    embedded photographs, sized to finish in a few minutes on two CPU cores."""
    from fastjepa.data import default_photos_dir

    return validate(
        {
            "data": {"batch_size": 16, "crop_size": 64, "crop_scale": [0.3, 1.0], "num_workers": 0, "pin_mem": False,
                     "root_path": default_photos_dir(), "image_folder": "", "repeat": 32},
            "logging": {"folder": None, "write_tag": "jepa"},
            "mask": {"patch_size": 8, "min_keep": 4},
            "meta": {"model_name": "vit_tiny", "pred_depth": 4, "pred_emb_dim": 96, "use_bfloat16": False},
            "optimization": {"epochs": 10, "warmup": 1, "start_lr": 0.0002, "lr": 0.001, "final_lr": 1.0e-6},
        }
    )


def mask_sampler(config: dict) -> MultiBlockMaskSampler:
    """The MultiBlockMaskSampler a checked config describes."""
    mask = config["mask"]
    return MultiBlockMaskSampler(
        input_size=config["data"]["crop_size"],
        patch_size=mask["patch_size"],
        enc_mask_scale=tuple(mask["enc_mask_scale"]),
        pred_mask_scale=tuple(mask["pred_mask_scale"]),
        aspect_ratio=tuple(mask["aspect_ratio"]),
        nenc=mask["num_enc_masks"],
        npred=mask["num_pred_masks"],
        min_keep=mask["min_keep"],
        allow_overlap=mask["allow_overlap"],
        fix_position_range=mask["fix_position_range"],
    )


def loader_settings(config: dict) -> LoaderSettings:
    """The loader's settings a checked config describes."""
    data = config["data"]
    return LoaderSettings(
        backend=data["backend"], batch_size=data["batch_size"], crop_size=data["crop_size"], crop_scale=tuple(data["crop_scale"]),
        flip=data["use_horizontal_flip"], color_distortion=data["use_color_distortion"], color_strength=data["color_jitter_strength"],
        blur=data["use_gaussian_blur"], num_workers=data["num_workers"], repeat=data["repeat"], pin_memory=data["pin_mem"],
        ragged=config["mask"]["ragged"],
    )


def build_loader(config: dict, device, seed: int, root: str, rank: int = 0, world_size: int = 1, gather=None):
    """The image loader of a checked config (``fastjepa.data.loader.make_loader`` with the
    config's loader settings and mask sampler) over the images under ``root``."""
    return make_loader(loader_settings(config), mask_sampler(config), device, seed, root, rank, world_size, gather)


RECIPES = Path(__file__).resolve().parent / "configs"  # the shipped recipes (configs/ at the repository root)


FINETUNE_PREFIX = "finetune_"  # configs/finetune_*.yaml are fastjepa finetune's presets; the others pretraining recipes


def recipe_names(finetune: bool = False) -> list[str]:
    """The shipped pretraining recipes, or with ``finetune`` the fine-tuning presets."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml") if path.stem.startswith(FINETUNE_PREFIX) == finetune)


def config_path(name, finetune: bool = False) -> Path:
    """``name`` as a path when it is a file or looks like one (a folder or a suffix in it), else the
    shipped recipe (or with ``finetune`` the preset) of that name; ``ConfigError`` lists them when there is none."""
    path = Path(name)
    if path.is_file() or path.parent != Path(".") or path.suffix:
        return path
    recipe = RECIPES / f"{name}.yaml"
    if not recipe.is_file() or name.startswith(FINETUNE_PREFIX) != finetune:
        kind, plural = ("fine-tuning preset", "presets") if finetune else ("shipped recipe", "recipes")
        raise ConfigError(f"config {name} is neither a file nor a {kind}; the {plural} are {', '.join(recipe_names(finetune))}")
    return recipe


def load_yaml(path) -> dict:
    """A config file's dict; ``ConfigError`` when it is missing or not YAML."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must hold a mapping of sections, got {type(config).__name__}")
    return config


def apply_override(config: dict, assignment: str, schema: dict[str, dict[str, Key]] = SCHEMA) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to ``config`` in place."""
    name, sep, text = assignment.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set takes section.key=value, got {assignment!r}")
    if section not in schema or key not in schema[section]:
        known = ", ".join(f"{s}.{k}" for s in schema for k in schema[s]) if section not in schema else ", ".join(schema[section])
        raise ConfigError(f"unknown key {name.strip()}; known: {known}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""  # "key=" sets an empty string
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {name.strip()}: cannot parse {text!r}: {str(e).splitlines()[0]}") from e
    config.setdefault(section, {})[key] = value


def find_key(name: str) -> str:
    """The section of a key name (every key name is unique across sections)."""
    sections = [s for s in SCHEMA if name in SCHEMA[s]]
    if not sections:
        raise ConfigError(f"unknown config key {name!r}")
    return sections[0]
