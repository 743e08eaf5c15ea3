"""Fine-tuning: an encoder with a linear head, trained end to end with MAE's recipe (the paper's
ImageNet-1% and full fine-tuning), augmented on the device. ``fastjepa finetune`` runs
``fastjepa.finetune.loop.main``; ``fit`` is the one-call form.

Modules: ``recipe`` (the config, the presets, layer-wise lr decay, the schedule), ``model``
(``Classifier``), ``augment`` (RandAugment, mixup/cutmix, random erasing as batched tensor ops),
``data`` (the splits and their loaders), ``loop`` (the loop, its checkpoints and logs), ``plan``
(``--dry-run``).
"""

from __future__ import annotations


def fit(weights=None, data: str = "digits", preset: str = "finetune_digits", overrides: dict | None = None, **options):
    """One call: ``preset`` (a shipped preset's name or a YAML path) with keys overridden by
    ``section.key`` name (``fit("ckpt.pth.tar", overrides={"optimization.epochs": 3})``), plus
    ``fastjepa.finetune.loop.main``'s options (per_class, fraction, subset, device, out, seed,
    max_steps, resume, checkpoint_every, progress). Returns its ``FinetuneResult``."""
    from fastjepa.errors import ConfigError
    from fastjepa.finetune.loop import main
    from fastjepa.finetune.recipe import load_preset

    config = load_preset(preset)
    for name, value in (overrides or {}).items():
        section, dot, key = name.partition(".")
        if not dot:
            raise ConfigError(f"an override is named section.key, got {name!r}")
        config.setdefault(section, {})[key] = value  # validated with the rest in main
    return main(config, weights, data, **options)
