"""DINOv2's weighted k-nearest-neighbour probe on frozen pooled features.

Features are L2-normalised, so a query's neighbours are the bank samples of highest cosine
similarity. Each of a query's ``k`` nearest neighbours votes for its label with weight
``exp(similarity / temperature)`` and the class with the largest total wins. Every ``k`` is
read from one top-``max(k)`` per chunk of queries, so trying several costs about one.

``k`` is chosen on held-out train (``holdout_split``): the fit part is the bank, the held-out
part the queries. The chosen ``k`` is then reported on val with the whole train set as the bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastjepa.eval.checks import check_labels
from fastjepa.eval.results import ProbeResult
from fastjepa.eval.subsets import holdout_split

KS = (10, 20, 100, 200)  # DINOv2's
CHUNK_ELEMENTS = 2**24  # similarities (or votes) held at once: 64 MB in float32


def _check_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` sorted without repeats; each must be an int >= 1."""
    if isinstance(ks, int) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k in ks must be an int >= 1, got {k!r}")
    return sorted(set(ks))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """(N, D) features with N integer labels in [0, num_classes), N >= 1."""
    if features.dim() != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if len(features) == 0:
        raise ValueError(f"{name} set is empty")
    check_labels(name, labels, len(features), num_classes, "feature row")


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, num_classes: int, ks: Sequence[int] = KS,
                temperature: float = 0.07) -> dict[int, torch.Tensor]:
    """Each query's predicted label for every ``k`` in ``ks``: ``{k: (Q,) int64}`` on the bank's device.

    Queries go through in chunks (``CHUNK_ELEMENTS`` similarities at a time) so memory stays
    bounded for any bank; a ``k`` larger than the bank uses all of it. Subtracting each row's best
    similarity before ``exp`` rescales the row's votes by one factor, which leaves the winner
    unchanged and keeps ``exp`` finite at small temperatures.
    """
    ks = _check_ks(ks)
    _check_temperature(temperature)
    _check_num_classes(num_classes)
    _check_split("bank", bank, bank_labels, num_classes)
    if queries.dim() != 2 or queries.shape[1] != bank.shape[1] or len(queries) == 0:
        raise ValueError(f"queries must be 2-D (Q >= 1, {bank.shape[1]}) like the bank, got shape {tuple(queries.shape)}")

    device = bank.device
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(device, torch.int64)
    deepest = min(ks[-1], len(bank))
    chunk = max(1, CHUNK_ELEMENTS // max(len(bank), num_classes))
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(queries), chunk):
        rows = F.normalize(queries[start : start + chunk].to(device, torch.float32), dim=1)
        similarity, neighbours = (rows @ bank.T).topk(deepest, dim=1)  # sorted, nearest first
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        labels = bank_labels[neighbours]
        for k in ks:
            depth = min(k, len(bank))
            votes = torch.zeros(len(rows), num_classes, device=device)
            votes.scatter_add_(1, labels[:, :depth], weights[:, :depth])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}


def _top1(predictions: dict[int, torch.Tensor], labels: torch.Tensor) -> dict[int, float]:
    return {k: float((predicted.cpu() == labels).float().mean()) for k, predicted in predictions.items()}


def knn_probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor, *, num_classes: int,
              ks: Sequence[int] = KS, temperature: float = 0.07, holdout: float = 0.1, seed: int = 0, device=None) -> ProbeResult:
    """Weighted kNN with ``k`` chosen on held-out train, reported on val with all of train as the bank.

    The held-out ``holdout`` fraction of each class (``holdout_split(seed)``) queries a bank of the
    rest; the ``k`` with the best held-out top-1 wins (ties: the smaller ``k``). Val is never used
    to choose. ``device`` (default: the train features') holds the bank and computes the votes.
    Defaults are DINOv2's: ks 10, 20, 100, 200 and temperature 0.07.
    """
    ks = _check_ks(ks)
    _check_temperature(temperature)
    _check_num_classes(num_classes)
    _check_split("train", train, train_labels, num_classes)
    _check_split("val", val, val_labels, num_classes)
    if val.shape[1] != train.shape[1]:
        raise ValueError(f"train features have {train.shape[1]} dimensions, val features {val.shape[1]}")

    device = torch.device(device) if device is not None else train.device
    train_labels, val_labels = train_labels.to("cpu", torch.int64), val_labels.to("cpu", torch.int64)
    fit, heldout = holdout_split(train_labels, holdout, seed)
    bank = train.to(device)
    settings = dict(num_classes=num_classes, ks=ks, temperature=temperature)
    heldout_top1 = _top1(knn_predict(bank[fit.to(device)], train_labels[fit], train[heldout], **settings), train_labels[heldout])
    val_top1 = _top1(knn_predict(bank, train_labels, val, **settings), val_labels)

    best = max(ks, key=lambda k: (heldout_top1[k], -k))
    heads = [{"k": k, "heldout_top1": heldout_top1[k], "val_top1": val_top1[k]} for k in ks]
    return ProbeResult(
        method="knn",
        top1=val_top1[best],
        chosen={"k": best, "heldout_top1": heldout_top1[best], "val_top1": val_top1[best]},
        heads=heads,
        n_train=len(train),
        n_val=len(val),
        classes=num_classes,
        protocol={"temperature": temperature, "holdout": holdout, "seed": seed, "bank": len(train), "fit_bank": len(fit), "heldout": len(heldout),
                  "features": "L2-normalised", "vote": "sum of exp(cosine / temperature) over the k nearest"},
    )
