"""One evaluation run: a frozen encoder, a data set, a low-shot subset, features, one probe.

``evaluate(method, encoder, data=...)`` is what ``fastjepa eval METHOD`` runs: it loads the
train and val splits, keeps the requested subset of train, extracts (or re-reads) the features
the probe needs, fits the probe with selection on held-out train, and returns its
``ProbeResult`` with the run's context (what was evaluated on what).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastjepa.eval.attentive import attentive_probe
from fastjepa.eval.datasets import Split, load_splits
from fastjepa.eval.features import AUGMENTATIONS, features, weights_digest
from fastjepa.eval.knn import knn_probe
from fastjepa.eval.linear import linear_probe
from fastjepa.eval.logreg import logreg_probe
from fastjepa.eval.results import ProbeResult
from fastjepa.eval.subsets import class_balanced_subset, subset_from_file

METHODS = ("linear", "logreg", "attentive", "knn")
LAYERS_OF = {"linear": ("last", "last4"), "logreg": ("last",), "attentive": ("tokens",), "knn": ("last",)}


def load_frozen_encoder(path, encoder: str = "target", device=None) -> torch.nn.Module:
    """The encoder in any form ``fastjepa export`` reads or writes (a training checkpoint, a
    Hugging Face IJepa folder, a timm or fastjepa .safetensors file), frozen, in eval mode, on
    ``device``. ``encoder`` picks a training checkpoint's target (the paper's) or context encoder."""
    from fastjepa.weights import load_encoder

    model = load_encoder(path, encoder=encoder)
    model.requires_grad_(False)
    return model.eval().to(device if device is not None else "cpu")


def train_subset(train: Split, per_class: int | None = None, fraction: float | None = None, subset: str | os.PathLike | None = None,
                 seed: int = 0) -> tuple[Split, dict]:
    """The part of train a probe sees, and how it was chosen (for the results file)."""
    given = [name for name, value in (("per_class", per_class), ("fraction", fraction), ("subset", subset)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of --per-class, --fraction and --subset, got {', '.join(given)}")
    if not given:
        return train, {"subset": "all"}
    if subset is not None:
        return train.take(subset_from_file(train.ids, subset)), {"subset": os.fspath(subset)}
    indices = class_balanced_subset(train.labels, per_class=per_class, fraction=fraction, seed=seed, classes=train.classes)
    return train.take(indices), {"subset": {"per_class": per_class} if per_class is not None else {"fraction": fraction}, "subset_seed": seed}


def _check_labels(train: Split, val: Split) -> None:
    missing = sorted(set(val.labels.unique().tolist()) - set(train.labels.unique().tolist()))
    if missing:
        names = ", ".join(train.classes[c] for c in missing[:10])
        raise ValueError(f"the chosen training images lack val classes {names}: a probe cannot predict a class it never saw")


def evaluate(method: str, encoder: torch.nn.Module, data: str = "digits", *, image_size: int | None = None, per_class: int | None = None,
             fraction: float | None = None, subset=None, seed: int = 0, batch_size: int = 256, cache=None, num_workers: int = 0,
             augmentation: str = "none", progress: bool = True, **options) -> tuple[ProbeResult, dict]:
    """Fit probe ``method`` on ``encoder``'s frozen features of ``data`` and return
    ``(result, context)``. ``options`` go to the probe (``linear_probe``, ``logreg_probe``,
    ``attentive_probe`` or ``knn_probe``); ``augmentation`` (linear only) re-encodes augmented
    train images every epoch instead of reading cached features."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
    if augmentation != "none" and method != "linear":
        raise ValueError(f"augmentation {augmentation} applies to the linear probe only (the others read fixed features)")
    size = encoder.patch_embed.img_size if image_size is None else image_size
    train, val = load_splits(data, size)
    train, subset_context = train_subset(train, per_class, fraction, subset, seed)
    _check_labels(train, val)
    layers = LAYERS_OF[method]
    if method == "linear" and len(encoder.blocks) < 4:
        layers = ("last",)
    extract = dict(image_size=size, batch_size=batch_size, cache=cache, num_workers=num_workers, progress=progress)
    val_features = features(encoder, val, layers, **extract)
    if augmentation == "none":
        train_features = features(encoder, train, layers, **extract)
    else:
        def train_features(epoch: int) -> dict[str, torch.Tensor]:
            return features(encoder, train, layers, **{**extract, "cache": None}, augmentation=augmentation, seed=seed, epoch=epoch)

    device = next(encoder.parameters()).device
    common = dict(num_classes=len(train.classes), device=device)
    if method == "linear":
        result = linear_probe(train_features, train.labels, val_features, val.labels, seed=seed, progress=progress, **common, **options)
    elif method == "logreg":
        result = logreg_probe(train_features["last"], train.labels, val_features["last"], val.labels, **common, **options)
    elif method == "knn":
        result = knn_probe(train_features["last"], train.labels, val_features["last"], val.labels, seed=seed, **common, **options)
    else:
        result = attentive_probe(train_features["tokens"], train.labels, val_features["tokens"], val.labels, num_heads=encoder.num_heads,
                                 seed=seed, progress=progress, **common, **options)
    result.protocol.update(image_size=size, augmentation=augmentation, layers=list(layers))
    context = {"data": data, **subset_context, "seed": seed, "weights_sha256": weights_digest(encoder),
               "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1}
    return result, context
