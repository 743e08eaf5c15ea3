"""Frozen-encoder evaluation: kNN and linear-probe top-1 on pooled encoder features.

As in the I-JEPA paper's evaluations, the encoder (by default the EMA target
encoder) is frozen and its output tokens are average-pooled into one vector per
image. Two read-outs are measured on those vectors:

* ``knn_top1``: a weighted k-nearest-neighbour vote (cosine similarity, votes
  weighted by ``exp(sim / temperature)``, as in DINO's kNN evaluation);
* ``linear_probe_top1``: multinomial logistic regression on standardised features.

``evaluate`` ties it together for a checkpoint file or an encoder module. The
built-in data set is scikit-learn's 8x8 digits (offline, 1,797 images): a smoke
test that an encoder learned something, not a benchmark.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from fastjepa.data.normalize import normalize
from fastjepa.helper import MODEL_NAMES, CheckpointError, _fit_prefix, first_problem, read_checkpoint
from fastjepa.models import vision_transformer as vit

__all__ = [
    "load_digits",
    "encoder_from_checkpoint",
    "extract_features",
    "knn_top1",
    "linear_probe_top1",
    "evaluate",
]

ENCODER_ENTRIES = ("target_encoder", "encoder")
METHODS = ("knn", "linear")
DATASETS = ("digits",)
SHAPE_ARGS = ("model_name", "patch_size", "crop_size")
KNN_CHUNK_ELEMENTS = 2**24  # similarities held at once by knn_top1 (64 MB in float32)


# ----------------------------------------------------------------------------- data


def load_digits(image_size: int = 32, test_fraction: float = 0.3, seed: int = 0):
    """scikit-learn's 1,797 8x8 digits as ``(train_images, train_labels, test_images, test_labels)``.

    Images are uint8 (N, 3, S, S): the 0..16 grey levels scaled to 0..255,
    bilinearly upsampled to ``image_size`` and replicated to three channels.
    Labels are int64. The split is stratified (each digit contributes
    ``round(test_fraction * count)`` test images) and depends only on ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install 'fastjepa[eval]'") from e
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")

    digits = sklearn_load_digits()
    grey = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    if image_size != grey.shape[-1]:
        grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)

    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_test[members[: round(test_fraction * len(members))]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]


# -------------------------------------------------------------------------- encoder


def _config_shape(checkpoint: dict) -> dict:
    """model_name / patch_size / crop_size from a fastjepa checkpoint's config; {} if absent."""
    meta = checkpoint.get("fastjepa")
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        return {}
    places = {"model_name": ("meta", "model_name"), "patch_size": ("mask", "patch_size"), "crop_size": ("data", "crop_size")}
    shape = {}
    for name, (section, key) in places.items():
        value = config.get(section, {}).get(key) if isinstance(config.get(section), dict) else None
        if value is not None:
            shape[name] = value
    return shape


def encoder_from_checkpoint(path, which: str = "target_encoder", model_name=None, patch_size=None, crop_size=None):
    """The frozen encoder stored under ``which`` in the checkpoint at ``path``.

    The model's shape comes from the checkpoint's ``fastjepa.config`` when it has
    one (fastjepa's trainer writes it); ``model_name``, ``patch_size`` and
    ``crop_size`` fill in or override it (reference checkpoints carry no config, so
    all three must be passed for them). Returns the VisionTransformer on the CPU,
    in eval mode, with ``requires_grad`` False. Raises ``CheckpointError`` for an
    unreadable file, a missing entry or weights that do not fit the shape.
    """
    if which not in ENCODER_ENTRIES:
        raise ValueError(f"which must be one of {', '.join(ENCODER_ENTRIES)}; got {which!r}")
    checkpoint = read_checkpoint(path)
    shape = _config_shape(checkpoint)
    given = {"model_name": model_name, "patch_size": patch_size, "crop_size": crop_size}
    shape.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in SHAPE_ARGS if k not in shape]
    if missing:
        if "fastjepa" in checkpoint:
            origin = "has a fastjepa config that lacks"
        else:
            origin = "has no fastjepa config (reference checkpoints do not) to give"
        raise ValueError(
            f"checkpoint {os.fspath(path)} {origin} the model's {', '.join(missing)}; "
            f"pass {', '.join(f'{k}=...' for k in missing)} "
            "(the reference's released ViT-H/14: model_name='vit_huge', patch_size=14, crop_size=224)"
        )
    if shape["model_name"] not in MODEL_NAMES:
        raise ValueError(f"unknown model_name {shape['model_name']!r}; choose one of {', '.join(MODEL_NAMES)}")

    state = checkpoint.get(which)
    if not isinstance(state, dict):
        what = "lacks" if which not in checkpoint else f"holds a {type(state).__name__} under"
        raise CheckpointError(f"checkpoint {os.fspath(path)} {what} '{which}'; it has {', '.join(map(str, checkpoint))}")

    model = getattr(vit, shape["model_name"])(img_size=[shape["crop_size"]], patch_size=shape["patch_size"])
    try:
        model.load_state_dict(_fit_prefix(state, model))
    except RuntimeError as e:
        described = ", ".join(f"{k}={shape[k]!r}" for k in SHAPE_ARGS)
        raise CheckpointError(f"checkpoint {os.fspath(path)}: '{which}' does not fit a {described} encoder: {first_problem(e)}") from e
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------- features


def _model_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
    """Average-pooled encoder tokens, float32 (N, D) on the CPU.

    ``images`` is uint8 (N, 3, H, W), on any device; each batch is moved to
    ``device`` (default: the encoder's device; when given, the encoder is moved
    there) and normalised there. The encoder runs in eval mode and its training
    flag is restored afterwards. A progress bar shows on a terminal for long runs.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"extract_features expects (N, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is not None:
        encoder.to(device)
    device = _model_device(encoder)

    starts = range(0, len(images), batch_size)
    if len(starts) > 8:
        from tqdm.auto import tqdm

        # disable=None: tqdm stays silent when stderr is not a terminal (logs, CI).
        starts = tqdm(starts, desc="features", unit="batch", disable=None, file=sys.stderr)
    was_training = encoder.training
    encoder.eval()
    try:
        pooled = [
            encoder(normalize(images[i : i + batch_size].to(device, non_blocking=True))).mean(dim=1).float().cpu()
            for i in starts
        ]
    finally:
        encoder.train(was_training)
    if not pooled:
        return torch.empty(0, getattr(encoder, "embed_dim", 0))
    return torch.cat(pooled)


# -------------------------------------------------------------------------- probes


def _check_split(train_features, train_labels, test_features, test_labels) -> None:
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
            raise ValueError(
                f"{name}: expected (N, D) features and (N,) labels, got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if len(features) == 0:
            raise ValueError(f"{name} set is empty")
        if labels.is_floating_point() or labels.is_complex() or labels.min() < 0:
            raise ValueError(f"{name} labels must be non-negative integers, got dtype {labels.dtype}, min {labels.min()}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dimensions, test features {test_features.shape[1]}")


@torch.no_grad()
def knn_top1(train_features, train_labels, test_features, test_labels, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of a weighted kNN vote, in [0, 1].

    Features are L2-normalised; each test sample takes its ``k`` most cosine-similar
    training samples (all of them if ``k`` exceeds the training set) and each
    neighbour votes for its label with weight ``exp(similarity / temperature)``.
    Test samples are processed in chunks so the similarity matrix stays bounded.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device, torch.int64)
    test_labels = test_labels.to(train.device, torch.int64)
    k = min(k, len(train))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    chunk = max(1, KNN_CHUNK_ELEMENTS // len(train))

    correct = 0
    for i in range(0, len(test), chunk):
        similarity, neighbours = (test[i : i + chunk] @ train.T).topk(k, dim=1)
        # Subtracting each row's best similarity rescales its weights by one factor
        # (the vote is unchanged) and keeps exp() far from overflow at small temperatures.
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(similarity), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        correct += int((votes.argmax(dim=1) == test_labels[i : i + chunk]).sum())
    return correct / len(test)


def linear_probe_top1(
    train_features,
    train_labels,
    test_features,
    test_labels,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    device=None,
) -> float:
    """Test top-1 of a multinomial logistic regression on standardised features.

    Features are standardised with the training mean and std; the weights start at
    zero and are fitted full-batch with L-BFGS (``epochs`` iterations, step ``lr``,
    strong-Wolfe line search) on mean cross-entropy plus ``weight_decay / 2 * |W|^2``.
    The problem is convex and the start fixed, so the result is deterministic.
    ``device`` defaults to the training features' device.
    """
    _check_split(train_features, train_labels, test_features, test_labels)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    device = torch.device(device) if device is not None else train_features.device
    train = train_features.to(device, torch.float32)
    test = test_features.to(device, torch.float32)
    y_train = train_labels.to(device, torch.int64)
    y_test = test_labels.to(device, torch.int64)
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1

    weight = torch.zeros(train.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, y_train) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = (test @ weight + bias).argmax(dim=1)
    return float((predictions == y_test).float().mean())


# ------------------------------------------------------------------------ evaluate


def _folder_features(encoder, root, size, batch_size, device, num_workers, classes=None):
    """Pooled features and int64 labels of the images under ``root`` (one subfolder
    per class), made with the evaluation transform (shorter side to
    round(size * 256 / 224), central size x size crop). With ``classes`` (the train
    split's class names), labels follow that list so both splits agree.
    Returns ``(features, labels, class_names)``."""
    from fastjepa.data.images import ImageDataset, collate_images, make_eval_transform

    images = ImageDataset(root, transform=make_eval_transform(size))
    relabel = None
    if classes is not None:
        unknown = [name for name in images.classes if name not in classes]
        if unknown:
            raise ValueError(f"{root} has classes the train split lacks: {', '.join(unknown[:10])}")
        relabel = torch.tensor([classes.index(name) for name in images.classes])
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    if len(loader) > 8:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=os.path.basename(os.path.normpath(root)), unit="batch", disable=None, file=sys.stderr)
    features, labels = [], []
    for batch, batch_labels, _ in loader:  # unreadable files were dropped (and logged) by the dataset
        if len(batch):
            features.append(extract_features(encoder, batch, batch_size=batch_size, device=device))
            labels.append(batch_labels if relabel is None else relabel[batch_labels])
    if not features:
        raise ValueError(f"no readable images under {root}")
    return torch.cat(features), torch.cat(labels), images.classes


# Long by its signature (twelve documented keywords, one per line); the body is the data, the features and the probe.
def evaluate(
    method: str,
    checkpoint=None,
    encoder: torch.nn.Module | None = None,
    dataset: str = "digits",
    data=None,
    which: str = "target_encoder",
    k: int = 20,
    batch_size: int = 256,
    device=None,
    image_size: int | None = None,
    num_workers: int | None = None,
    **model_shape,
) -> dict:
    """Evaluate a frozen encoder: ``{"method", "dataset", "top1", "train", "test"}``.

    Give either ``checkpoint`` (a path; ``which`` picks the entry and
    ``model_shape`` holds ``model_name`` / ``patch_size`` / ``crop_size`` when the
    checkpoint has no config) or ``encoder`` (a VisionTransformer). ``method`` is
    ``"knn"`` (``k`` neighbours) or ``"linear"``.

    Images are made at ``image_size``, by default the encoder's own
    (``patch_embed.img_size``). They come from ``dataset="digits"`` (see
    ``load_digits``) or, when ``data`` is a folder, from ``data/train/<class>/*``
    and ``data/val/<class>/*`` (resized and centre-cropped, decoded by
    ``num_workers`` loader processes, default min(8, CPUs)).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if (checkpoint is None) == (encoder is None):
        raise ValueError("evaluate needs exactly one of checkpoint=PATH or encoder=MODULE")
    unknown = set(model_shape) - set(SHAPE_ARGS)
    if unknown:
        raise TypeError(f"evaluate got unexpected keyword arguments {', '.join(sorted(unknown))}")
    if data is None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)} (or pass data=FOLDER); got {dataset!r}")
    if data is not None:
        missing = [split for split in ("train", "val") if not os.path.isdir(os.path.join(data, split))]
        if missing:
            lacking = " and ".join(f"{split}/" for split in missing)
            raise FileNotFoundError(f"data folder {os.fspath(data)} lacks {lacking} (expected train/<class>/* and val/<class>/*)")

    if encoder is None:
        encoder = encoder_from_checkpoint(checkpoint, which=which, **model_shape)
    elif model_shape:
        raise ValueError(f"{', '.join(sorted(model_shape))} only apply with checkpoint=; the encoder module has its shape")
    size = image_size if image_size is not None else encoder.patch_embed.img_size

    if data is None:
        train_images, train_labels, test_images, test_labels = load_digits(image_size=size)
        train_features = extract_features(encoder, train_images, batch_size=batch_size, device=device)
        test_features = extract_features(encoder, test_images, batch_size=batch_size, device=device)
    else:
        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        train_features, train_labels, classes = _folder_features(
            encoder, os.path.join(data, "train"), size, batch_size, device, workers
        )
        test_features, test_labels, _ = _folder_features(
            encoder, os.path.join(data, "val"), size, batch_size, device, workers, classes
        )
        dataset = os.fspath(data)

    if method == "knn":
        top1 = knn_top1(train_features, train_labels, test_features, test_labels, k=k)
    else:
        top1 = linear_probe_top1(train_features, train_labels, test_features, test_labels, device=device)
    return {"method": method, "dataset": dataset, "top1": top1, "train": len(train_labels), "test": len(test_labels)}
