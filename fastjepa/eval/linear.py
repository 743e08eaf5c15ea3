"""Linear probe on frozen features: a grid of linear heads trained together in one pass.

As in the I-JEPA paper (App. A.2), DINOv2 and MSN, the probe's score depends strongly on its
learning rate, so many heads are trained and the best kept. Every grid point (feature set, head
type, lr, weight decay) is one head; all of them see every mini-batch once, stacked on a head
axis (one einsum per feature set and head type), so a 104-head grid costs about one pass over the
features. The head is chosen on a held-out part of train (never on val), then retrained alone on
all of train, and that refit's val top-1 is the reported score.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fastjepa.eval.results import ProbeResult
from fastjepa.eval.subsets import holdout_split

__all__ = ["HEAD_TYPES", "LR_GRID", "OPTIMIZERS", "linear_probe"]

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)  # DINOv2's 13 values, scaled by batch_size / 256
HEAD_TYPES = ("linear", "bn")
OPTIMIZERS = ("sgd", "lars")
# Without ``epochs``, a run takes at least MIN_EPOCHS epochs and MIN_STEPS optimizer steps: on ImageNet
# (1,250 steps per epoch at batch 1,024) that is DINOv2's 10 epochs; a small set needs the step floor for
# the top of the lr grid to converge. ViT-tiny digits features of a trained checkpoint (1,258 images,
# 5 steps per epoch): chosen head 89.4% at 100 epochs, 94.4% at 300, 94.6% at 500 (2,500 steps);
# the logreg probe 95.4%.
MIN_EPOCHS, MIN_STEPS = 10, 2500
MOMENTUM = 0.9
LARS_TRUST = 0.001  # LARS's trust coefficient (You et al.; MAE's linear probe)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # torch.nn.BatchNorm1d's defaults
EVAL_CHUNK_ELEMENTS = 2**24  # logits held at once when scoring (64 MB in float32)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

Features = Mapping[str, torch.Tensor]


class _HeadGroup:
    """Every head of one (feature set, head type), parameters stacked on a leading head axis so
    one einsum runs them all. W and b start at zero and the BN affine at BatchNorm1d's (1, 0): no
    random draw (a linear head's problem is convex), so a head starts the same in any grid and
    trains exactly as it would alone."""

    def __init__(self, features: str, head: str, settings: list[tuple[float, float]], dim: int, num_classes: int, lr_scale: float,
                 dtype: torch.dtype, device: torch.device):
        self.features, self.head, self.settings = features, head, settings
        heads = len(settings)
        self.lr = torch.tensor([lr * lr_scale for lr, _ in settings], dtype=dtype, device=device)
        self.weight_decay = torch.tensor([weight_decay for _, weight_decay in settings], dtype=dtype, device=device)
        self.weight = torch.zeros(heads, dim, num_classes, dtype=dtype, device=device, requires_grad=True)
        self.bias = torch.zeros(heads, num_classes, dtype=dtype, device=device, requires_grad=True)
        if head == "bn":  # BatchNorm1d's affine, one per head; the normalisation itself is the feature set's
            self.bn_weight = torch.ones(heads, dim, dtype=dtype, device=device, requires_grad=True)
            self.bn_bias = torch.zeros(heads, dim, dtype=dtype, device=device, requires_grad=True)

    def parameters(self) -> list[tuple[torch.Tensor, bool]]:
        """(tensor, is_weight): only the linear weights are decayed (and LARS-scaled)."""
        parameters = [(self.weight, True), (self.bias, False)]
        if self.head == "bn":
            parameters += [(self.bn_weight, False), (self.bn_bias, False)]
        return parameters

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, heads) from (B, D) features (batch-normalised for bn heads). Classes on axis 1, as
        F.cross_entropy takes them with (B, heads) targets: its log-softmax runs twice as fast on
        the CPU there as over a last axis of 10 classes."""
        if self.head == "linear":
            return torch.einsum("bd,hdc->bch", x, self.weight) + self.bias.T
        # (x * g + b) @ W + c = x @ (g W) + (b @ W + c): the affine folded into the weights, no (B, heads, D) tensor
        folded = self.bn_weight.unsqueeze(-1) * self.weight
        return torch.einsum("bd,hdc->bch", x, folded) + (torch.einsum("hd,hdc->hc", self.bn_bias, self.weight) + self.bias).T


class _HeadGrid:
    """All heads of a probe: one group per (feature set, head type), one batch normalisation (its
    running statistics) per feature set shared by that set's bn heads. Heads are numbered in the
    order of ``settings``."""

    def __init__(self, settings: list[dict], dims: dict[str, int], num_classes: int, lr_scale: float, dtype: torch.dtype, device: torch.device):
        self.settings, self.dtype, self.device = settings, dtype, device
        grouped: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for setting in settings:
            grouped.setdefault((setting["features"], setting["head"]), []).append((setting["lr"], setting["weight_decay"]))
        self.groups = [_HeadGroup(name, head, pairs, dims[name], num_classes, lr_scale, dtype, device) for (name, head), pairs in grouped.items()]
        self.names = list(dict.fromkeys(group.features for group in self.groups))
        self.running = {group.features: (torch.zeros(dims[group.features], dtype=dtype, device=device),
                                         torch.ones(dims[group.features], dtype=dtype, device=device))
                        for group in self.groups if group.head == "bn"}

    def parameters(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(tensor, per-head lr, per-head weight decay or None when neither decayed nor LARS-scaled)."""
        return [(tensor, group.lr, group.weight_decay if is_weight else None) for group in self.groups for tensor, is_weight in group.parameters()]

    def logits(self, batch: Features, training: bool) -> list[torch.Tensor]:
        """Each group's (B, C, heads) logits; ``training`` normalises with the batch's statistics
        (and updates the running ones), else with the running statistics."""
        normalised = {name: F.batch_norm(batch[name], mean, var, training=training, momentum=BN_MOMENTUM, eps=BN_EPS)
                      for name, (mean, var) in self.running.items()}
        return [group.logits(normalised[group.features] if group.head == "bn" else batch[group.features]) for group in self.groups]

    @torch.no_grad()
    def scores(self, features: Features, labels: torch.Tensor) -> tuple[list[float], list[float]]:
        """Every head's top-1 and mean cross-entropy on ``features`` (eval mode), in chunks of rows."""
        heads, classes = len(self.settings), self.groups[0].weight.shape[-1]
        chunk = max(1, EVAL_CHUNK_ELEMENTS // (heads * classes))
        correct = torch.zeros(heads, dtype=torch.int64, device=self.device)
        loss = torch.zeros(heads, dtype=torch.float64, device=self.device)
        for start in range(0, len(labels), chunk):
            batch = {name: features[name][start : start + chunk].to(self.device, self.dtype) for name in self.names}
            target = labels[start : start + chunk].to(self.device).unsqueeze(1)
            logits = self.logits(batch, training=False)
            correct += torch.cat([(group.argmax(dim=1) == target).sum(dim=0) for group in logits])
            loss += torch.cat([F.cross_entropy(group, target.expand(-1, group.shape[-1]), reduction="none").sum(dim=0) for group in logits]).double()
        return [count / len(labels) for count in correct.tolist()], [total / len(labels) for total in loss.tolist()]

    def top1(self, features: Features, labels: torch.Tensor) -> list[float]:
        return self.scores(features, labels)[0]


def _update(param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor | None, lars: bool) -> None:
    """One step of every head at once, ``lr`` and ``weight_decay`` (H,) broadcast over each
    head's slice: torch.optim.SGD's momentum step (coupled L2, no dampening, no Nesterov), or with
    ``lars`` LARS, the decayed gradient rescaled per head by trust * |w| / |g| (1 when either is
    zero, as in MAE). ``weight_decay`` None (biases, BN affine): no decay, no trust ratio."""
    shape = (-1,) + (1,) * (param.dim() - 1)
    if weight_decay is not None:
        grad = grad + weight_decay.view(shape) * param
        if lars:
            dims = tuple(range(1, param.dim()))
            param_norm, grad_norm = param.norm(dim=dims), grad.norm(dim=dims)
            trust = torch.where((param_norm > 0) & (grad_norm > 0), LARS_TRUST * param_norm / grad_norm, torch.ones_like(param_norm))
            grad = grad * trust.view(shape)
    buffer.mul_(MOMENTUM).add_(grad)  # a zero buffer gives torch's first step, buffer = grad
    param.sub_(lr.view(shape) * buffer)


def _epoch_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``indices`` in a seeded random order, cut into ceil(n / batch_size) batches of near-equal
    size: every image once per epoch, and no tiny last batch for the batch normalisation."""
    order = indices[torch.randperm(len(indices), generator=generator)]
    return order.tensor_split(math.ceil(len(indices) / batch_size))


def _train(grid: _HeadGrid, epoch_features: Callable[[int], Features], labels: torch.Tensor, indices: torch.Tensor, *, epochs: int, batch_size: int,
           lars: bool, seed: int, bar) -> Features:
    """Train every head of ``grid`` on the images ``indices``: per step, one forward of all heads,
    the sum of their mean cross-entropies (so each head gets its own gradient), one update; the
    lr follows a cosine from lr_effective to 0 over all steps. Returns the last epoch's features."""
    generator = torch.Generator().manual_seed(seed)
    parameters = grid.parameters()
    tensors = [tensor for tensor, _, _ in parameters]
    buffers = [torch.zeros_like(tensor) for tensor in tensors]
    labels = labels.to(grid.device)
    steps = epochs * math.ceil(len(indices) / batch_size)
    step = 0
    for epoch in range(epochs):
        features = epoch_features(epoch)
        for batch in _epoch_batches(indices, batch_size, generator):
            x = {name: features[name][batch.to(features[name].device)].to(grid.device, grid.dtype) for name in grid.names}
            target = labels[batch.to(grid.device)]
            logits = grid.logits(x, training=True)
            loss = sum(F.cross_entropy(group_logits, target.unsqueeze(1).expand(-1, group_logits.shape[2]), reduction="sum")
                       for group_logits in logits) / len(batch)
            grads = torch.autograd.grad(loss, tensors)
            schedule = 0.5 * (1.0 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                for (tensor, lr, weight_decay), grad, buffer in zip(parameters, grads, buffers):
                    _update(tensor, grad, buffer, lr * schedule, weight_decay, lars)
            step += 1
        if bar is not None:
            bar.update(1)
    return features


def _check_labels(labels, num_classes: int, name: str) -> torch.Tensor:
    """``labels`` as int64, checked to be a 1-D integer tensor of classes in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got values from {int(labels.min())} to {int(labels.max())}")
    return labels.to(torch.int64)


def _check_features(features, n: int, name: str) -> dict[str, int]:
    """The dimension of every feature set in ``features``, a non-empty dict of float (n, D) tensors."""
    if not isinstance(features, Mapping) or not features:
        raise ValueError(f"{name} must be a non-empty dict of feature sets (name -> (N, D) float tensor), got {type(features).__name__}")
    dims = {}
    for key, tensor in features.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2 or len(tensor) != n:
            described = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name}[{key!r}] must be a float ({n}, D) tensor, one row per label, got {described}")
        dims[key] = tensor.shape[1]
    return dims


def _check_grid(lrs, weight_decays, heads, optimizer: str, epochs: int, batch_size: int, num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    for name, values in (("lrs", lrs), ("weight_decays", weight_decays), ("heads", heads)):
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{name} must be a non-empty sequence, got {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} has repeated values: {values!r}")
    if not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be finite and > 0, got {lrs!r}")
    if not all(isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be finite and >= 0, got {weight_decays!r}")
    unknown = [head for head in heads if head not in HEAD_TYPES]
    if unknown:
        raise ValueError(f"unknown head type {unknown[0]!r} in heads; choose from {', '.join(HEAD_TYPES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if "bn" in heads and batch_size < 2:
        raise ValueError(f"bn heads need batch statistics: batch_size must be >= 2 with them, got {batch_size}")


def linear_probe(train: Features | Callable[[int], Features], train_labels: torch.Tensor, val: Features, val_labels: torch.Tensor, *, num_classes: int,
                 lrs: Sequence[float] = LR_GRID, weight_decays: Sequence[float] = (0.0, 5e-4), heads: Sequence[str] = HEAD_TYPES,
                 epochs: int | None = None, batch_size: int = 256, optimizer: str = "sgd", holdout: float = 0.1, seed: int = 0,
                 device: torch.device | str | None = None, progress: bool = False) -> ProbeResult:
    """Val top-1 of the best of a grid of linear heads on frozen features.

    ``train``: feature sets, name -> (N, D_name) float tensor (e.g. {"last": ..., "last4": ...}),
    or a callable ``epoch -> dict`` giving them for the whole train set, in the same sample order
    every epoch (features of augmented images, recomputed per epoch: it is called for epochs
    0..epochs-1 twice, selection then refit; held-out images are scored on the last epoch's
    features). ``val``: name -> (M, D_name) for at least every train name.

    Heads: every (feature set, head type in ``heads``, lr in ``lrs``, weight decay in
    ``weight_decays``); "linear" is W x + b, "bn" a BatchNorm1d with affine before it. They train
    at once for ``epochs`` (default: at least MIN_EPOCHS and MIN_STEPS steps) with ``optimizer`` ("sgd": momentum 0.9; "lars": LARS for large
    batches), lr_effective = lr * batch_size / 256 on a per-step cosine to 0, weight decay (coupled
    L2) on the weights W only. The head with the best top-1 on ``holdout`` of train (class-balanced,
    drawn with ``seed``), trained on the rest, is chosen (ties: the lower held-out cross-entropy,
    then the smaller lr, then the smaller weight decay); it is then retrained alone on all N train images and its val top-1 is ``top1``.
    Deterministic for a seed on the CPU. ``device`` defaults to the val features' device; heads
    train in float64 when the val features are float64, else in float32.
    """
    if epochs is None:
        epochs = max(MIN_EPOCHS, math.ceil(MIN_STEPS / math.ceil(len(train_labels) / batch_size)))
    _check_grid(lrs, weight_decays, heads, optimizer, epochs, batch_size, num_classes)
    train_labels = _check_labels(train_labels, num_classes, "train_labels")
    val_labels = _check_labels(val_labels, num_classes, "val_labels")
    n = len(train_labels)
    val_dims = _check_features(val, len(val_labels), "val")
    if n < 2 or len(val_labels) == 0:
        raise ValueError(f"need at least 2 train and 1 val images, got {n} train_labels and {len(val_labels)} val_labels")

    first = train(0) if callable(train) else train
    dims = _check_features(first, n, "train(0)" if callable(train) else "train")
    for name, dim in dims.items():
        if name not in val_dims:
            raise ValueError(f"val lacks the train feature set {name!r}; it has {', '.join(map(repr, val_dims))}")
        if val_dims[name] != dim:
            raise ValueError(f"val[{name!r}] has {val_dims[name]} dimensions, train[{name!r}] {dim}")
    pending = {0: first} if callable(train) else {}
    del first

    def epoch_features(epoch: int) -> Features:
        if not callable(train):
            return train
        features = pending.pop(epoch, None)
        if features is None:
            features = train(epoch)
            epoch_dims = _check_features(features, n, f"train({epoch})")
            if epoch_dims != dims:
                raise ValueError(f"train({epoch}) gave feature sets {epoch_dims}, train(0) gave {dims}")
        return features

    device = torch.device(device) if device is not None else next(iter(val.values())).device
    dtype = torch.float64 if all(tensor.dtype == torch.float64 for tensor in val.values()) else torch.float32
    lr_scale = batch_size / 256
    settings = [{"features": name, "head": head, "lr": lr, "weight_decay": weight_decay}
                for name in dims for head in heads for lr in lrs for weight_decay in weight_decays]
    fit, heldout = holdout_split(train_labels, holdout, seed)
    train_settings = {"epochs": epochs, "batch_size": batch_size, "lars": optimizer == "lars", "seed": seed}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * epochs, desc="linear probe", unit="epoch", file=sys.stderr, disable=None)
    try:
        grid = _HeadGrid(settings, dims, num_classes, lr_scale, dtype, device)
        last = _train(grid, epoch_features, train_labels, fit, bar=bar, **train_settings)
        heldout_features = {name: last[name][heldout.to(last[name].device)] for name in dims}
        heldout_top1, heldout_loss = grid.scores(heldout_features, train_labels[heldout])
        val_top1 = grid.top1(val, val_labels)
        del grid, last, heldout_features

        # A held-out set of a few hundred images ties many heads on top-1: its cross-entropy breaks the ties, then the
        # smaller lr and weight decay; settings are in (features, head) order, so the first of what remains is deterministic.
        best = min(range(len(settings)), key=lambda i: (-heldout_top1[i], heldout_loss[i], settings[i]["lr"], settings[i]["weight_decay"], i))
        chosen = settings[best]
        refit = _HeadGrid([chosen], dims, num_classes, lr_scale, dtype, device)
        _train(refit, epoch_features, train_labels, torch.arange(n), bar=bar, **train_settings)
        top1 = refit.top1(val, val_labels)[0]
    finally:
        if bar is not None:
            bar.close()

    protocol = {
        "features": dims,
        "head_types": list(heads),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "momentum": MOMENTUM,
        **({"lars_trust_coefficient": LARS_TRUST} if optimizer == "lars" else {}),
        "lr_scaling": f"lr_effective = lr * batch_size / 256 = lr * {lr_scale:g}, cosine to 0 over all steps",
        "weight_decay": "coupled L2 on the linear weights only (biases and BN affine not decayed)",
        "init": "zeros (BN affine 1, 0)",
        "dtype": str(dtype).removeprefix("torch."),
        "augmented": callable(train),
        "holdout": holdout,
        "seed": seed,
        "n_fit": len(fit),
        "n_heldout": len(heldout),
        "selection": "best held-out top-1, ties to the lower held-out cross-entropy, then the smaller lr and weight decay; val is never used to choose",
        "refit": f"the chosen head retrained alone on all {n} train images; top1 is its val top-1",
    }
    return ProbeResult(
        method="linear",
        top1=top1,
        chosen={**chosen, "heldout_top1": heldout_top1[best], "heldout_loss": heldout_loss[best]},
        heads=[{**setting, "heldout_top1": h, "val_top1": v} for setting, h, v in zip(settings, heldout_top1, val_top1)],
        n_train=n,
        n_val=len(val_labels),
        classes=num_classes,
        protocol=protocol,
    )
