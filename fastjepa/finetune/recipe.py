"""The fine-tuning recipe: its config (MAE's fine-tuning keys, in sections like the trainer's),
the presets in ``configs/finetune_*.yaml``, MAE's layer-wise lr decay groups and its schedule.

A config is a dict of sections (model, data, augment, optimization, meta); ``validate`` fills
missing keys with MAE's ViT-B fine-tuning values and checks every key (``ConfigError`` names
the first bad one).
"""

from __future__ import annotations

import math

from torch import nn

from fastjepa.config import DATA_BACKENDS, SHARDINGS, Key, _fraction_pair, _non_negative, _positive, check_sections, config_path, load_yaml
from fastjepa.errors import ConfigError

MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("pixel", "rand", "const")
ENCODERS = ("target", "context")


def _probability(x):
    return 0 <= x <= 1


def _holdout(x):
    return 0 < x < 1


def _minmax(pair):
    return 0 < pair[0] < pair[1] <= 1


SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "encoder": Key("choice", "target", choices=ENCODERS),  # which encoder of a pretraining checkpoint
        "drop_path": Key("float", 0.1, _probability, "in [0, 1]"),
        "head_norm": Key("bool", False),  # BatchNorm (no affine) before the linear head, as MAE's linear probe
    },
    "data": {
        "backend": Key("str", "auto", lambda v: v in DATA_BACKENDS, f"one of {', '.join(DATA_BACKENDS)}"),
        "batch_size": Key("int", 32, _positive, ">= 1 (images per process)"),
        # null: the encoder's pretraining crop; another size interpolates the position table (bicubic), as the encoder does
        "crop_size": Key("int", None, _positive, ">= 1 pixels", optional=True),
        "crop_scale": Key("pair", [0.08, 1.0], _fraction_pair, "[min, max] with 0 < min <= max <= 1"),
        "flip": Key("bool", True),
        "num_workers": Key("int", 0, _non_negative, ">= 0"),
        "holdout": Key("float", 0.1, _holdout, "in (0, 1): the part of each class of train that chooses the best checkpoint"),
    },
    "augment": {
        "rand_augment": Key("str", "rand-m9-mstd0.5-inc1", optional=True),  # timm's config string; null: off
        "mixup": Key("float", 0.8, _non_negative, ">= 0 (Beta alpha; 0: off)"),
        "cutmix": Key("float", 1.0, _non_negative, ">= 0 (Beta alpha; 0: off)"),
        "cutmix_minmax": Key("pair", None, _minmax, "[min, max] with 0 < min < max <= 1", optional=True),
        "mixup_prob": Key("float", 1.0, _probability, "in [0, 1]"),
        "mixup_switch_prob": Key("float", 0.5, _probability, "in [0, 1]"),
        "mixup_mode": Key("choice", "batch", choices=MIXUP_MODES),
        "label_smoothing": Key("float", 0.1, lambda x: 0 <= x < 1, "in [0, 1)"),
        "erase_prob": Key("float", 0.25, _probability, "in [0, 1]"),
        "erase_mode": Key("choice", "pixel", choices=ERASE_MODES),
    },
    "optimization": {
        "epochs": Key("int", 100, _positive, ">= 1"),
        "warmup_epochs": Key("float", 5, _non_negative, ">= 0"),
        "blr": Key("float", 5e-4, _positive, "> 0", optional=True),  # lr = blr x global batch / 256
        "lr": Key("float", None, _positive, "> 0", optional=True),  # absolute; set it or blr, not both
        "min_lr": Key("float", 1e-6, _non_negative, ">= 0"),
        "weight_decay": Key("float", 0.05, _non_negative, ">= 0"),
        "layer_decay": Key("float", 0.65, lambda x: 0 < x <= 1, "in (0, 1]"),
        "grad_accum_steps": Key("int", 1, _positive, ">= 1"),
        "clip_grad": Key("float", None, _positive, "> 0 (a max gradient norm)", optional=True),
    },
    "meta": {
        "use_bfloat16": Key("bool", False),
        "compile": Key("choice", False, choices=(False, True, "max-autotune")),  # as the trainer's meta.compile
        "activation_checkpointing": Key("bool", False),
        "sharding": Key("str", "ddp", lambda v: v in SHARDINGS, f"one of {', '.join(SHARDINGS)}"),
        "skip_nonfinite": Key("bool", False),
    },
}


def validate(config: dict) -> dict:
    """A complete, checked copy of a fine-tuning config; ``ConfigError`` names the first bad key."""
    checked = check_sections(config, SCHEMA)
    opt, data = checked["optimization"], checked["data"]
    if (opt["lr"] is None) == (opt["blr"] is None):
        raise ConfigError("set one of optimization.lr (absolute) and optimization.blr (scaled by batch / 256), not "
                          + ("both" if opt["lr"] is not None else "neither"))
    if opt["warmup_epochs"] > opt["epochs"]:
        raise ConfigError(f"optimization.warmup_epochs {opt['warmup_epochs']} is longer than optimization.epochs {opt['epochs']}")
    if data["batch_size"] % opt["grad_accum_steps"]:
        raise ConfigError(f"data.batch_size {data['batch_size']} is not divisible by optimization.grad_accum_steps {opt['grad_accum_steps']}")
    return checked


def load_preset(name) -> dict:
    """A preset of ``configs/finetune_*.yaml`` by name, or a YAML file by path (not yet validated)."""
    return load_yaml(config_path(name, finetune=True))


def base_lr(config: dict, global_batch: int) -> float:
    """The peak lr: ``optimization.lr``, or ``blr`` x global batch / 256 (MAE's rule)."""
    opt = config["optimization"]
    return opt["lr"] if opt["lr"] is not None else opt["blr"] * global_batch / 256


# ---------------------------------------------------------------------------- layer-wise lr decay


def layer_id(name: str, depth: int) -> int:
    """MAE's layer of an encoder parameter (its name without the ``encoder.`` prefix): 0 for the
    patch and position embeddings, i + 1 for block i, depth + 1 for the rest (the final norm)."""
    if name in ("pos_embed", "cls_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW's groups with MAE's layer-wise lr decay (``param_groups_lrd``) for a ``Classifier``:
    layer l of the encoder (``layer_id``) scales its lr by layer_decay ** (depth + 1 - l), so
    the embeddings get decay^(depth+1), block i decay^(depth-i), the final norm and the head 1.
    Norms, biases and every other 1-D tensor, and the position table, have no weight decay.
    Each group holds ``lr_scale`` (the schedule multiplies it in) and a ``name``; groups are
    ordered by layer then decay, empty ones left out, parameters in the model's order."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name.removeprefix("encoder.")
        layer = layer_id(inner, depth) if name.startswith("encoder.") else depth + 1
        decayed = p.ndim > 1 and inner not in ("pos_embed", "cls_token")
        group = groups.setdefault((layer, decayed), {
            "name": f"layer_{layer}_{'decay' if decayed else 'no_decay'}", "params": [], "param_names": [],
            "weight_decay": weight_decay if decayed else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------- the schedule


def lr_at(epoch: float, peak: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's lr at a fractional epoch: linear warmup from 0, then a half-cycle cosine to min_lr."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
