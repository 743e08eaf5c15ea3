"""V-JEPA's attentive probe on frozen patch tokens, with K probes trained in one pass.

One probe reads an image's frozen tokens ``x`` (T, D), taken after the encoder's final LayerNorm,
and pools them with one learnable query ``q`` (1, D), as V-JEPA's ``AttentiveClassifier``
(``src/models/attentive_pooler.py``, depth 1: one ``CrossAttentionBlock``, no self-attention
blocks), whose linear head reads the pooled token::

    x' = LayerNorm1(x)                               the tokens only: the query is not normalised, as in V-JEPA
    a  = Proj(Attention(Wq q, Wk x', Wv x'))         num_heads heads of D / num_heads (the encoder's), softmax scale 1/sqrt(D / num_heads)
    h  = q + a
    h  = h + Fc2(GELU(Fc1(LayerNorm2(h))))           hidden width 4 D, exact GELU
    logits = Head(h)

Every Linear has a bias (V-JEPA's ``qkv_bias=True``); LayerNorms have eps 1e-5 and start at
weight 1, bias 0; Linear weights and the query are drawn from a normal of std 0.02 truncated
to [-2, 2], biases start at 0 (V-JEPA's further division of Fc2's weight by sqrt(2) is not
applied). Attention is ``F.scaled_dot_product_attention``.

``AttentiveProbes`` holds K such probes as parameters with a leading probe dimension, so one
forward and one backward serve all K: the tokens are normalised once, each Linear is one
batched matmul over the probes and one attention call covers K x batch queries. Each probe
has its own AdamW (betas 0.9, 0.999, eps 1e-8; decoupled weight decay on the query and Linear
weights, none on biases and LayerNorms) with its (lr, weight decay); the lr follows one
schedule for all, linear warmup from 0 then cosine to 0, stepped before every update as in
the reference trainer. Weight decay stays constant.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastjepa.eval.checks import check_labels
from fastjepa.eval.results import ProbeResult
from fastjepa.eval.subsets import holdout_split
from fastjepa.utils.schedulers import WarmupCosineSchedule

VJEPA_SETTING = (1e-3, 1e-3)  # V-JEPA's attentive probe on ImageNet: lr 1e-3, weight decay 1e-3
LR_STEP = 10**0.5  # probe_grid's learning rates are half a decade apart
WEIGHT_DECAY_STEP = 10.0  # and its weight decays a decade apart
INIT_STD = 0.02
MLP_RATIO = 4
BETAS = (0.9, 0.999)
EPS = 1e-8


def _centred_offsets(n: int) -> list[int]:
    """0, +1, -1, +2, -2, ...: the first ``n`` steps away from a centre, upward first."""
    return [(i + 1) // 2 * (1 if i % 2 else -1) for i in range(n)]


def probe_grid(k: int) -> list[tuple[float, float]]:
    """``k`` (lr, weight_decay) settings around V-JEPA's (1e-3, 1e-3), nearest first.

    ``ceil(sqrt(k))`` learning rates half a decade apart and ``ceil(k / that)`` weight decays a
    decade apart, each taken centre, one step up, one step down, two up, ...; of their product
    the ``k`` pairs fewest steps from the centre are kept (ties: lr-major order). ``k = 1`` is
    V-JEPA's setting alone; ``k = 9`` is lr {3.16e-4, 1e-3, 3.16e-3} x wd {1e-4, 1e-3, 1e-2};
    ``k = 20`` is lr 1e-4 to 1e-2 (5 values) x wd 1e-4 to 1e-1 (4 values), like V-JEPA 2's
    20 heads. Values are rounded to 3 significant digits so tables read cleanly.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of probes) must be an int >= 1, got {k!r}")
    lr_count = math.ceil(math.sqrt(k))
    steps = [(i, j) for i in _centred_offsets(lr_count) for j in _centred_offsets(math.ceil(k / lr_count))]
    nearest = sorted(steps, key=lambda step: abs(step[0]) + abs(step[1]))[:k]
    lr, weight_decay = VJEPA_SETTING
    return [(float(f"{lr * LR_STEP**i:.3g}"), float(f"{weight_decay * WEIGHT_DECAY_STEP**j:.3g}")) for i, j in nearest]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Probe-batched Linear: x (K, M, in), weight (K, out, in), bias (K, out) -> (K, M, out)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Probe-batched LayerNorm: x (K, M, D) with each probe's weight and bias (K, D)."""
    return F.layer_norm(x, x.shape[-1:]) * weight.unsqueeze(1) + bias.unsqueeze(1)


class AttentiveProbes(nn.Module):
    """K independent attentive probes (see the module docstring) whose parameters carry a
    leading probe dimension: ``forward(tokens (B, T, D))`` returns logits (K, B, num_classes)."""

    def __init__(self, num_probes: int, embed_dim: int, num_heads: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} (the tokens' last dimension) is not divisible by num_heads {num_heads}")
        self.num_probes, self.num_heads = num_probes, num_heads
        hidden = MLP_RATIO * embed_dim

        def drawn(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.trunc_normal_(torch.empty(num_probes, *shape), std=INIT_STD, generator=generator))

        def filled(value: float, size: int) -> nn.Parameter:
            return nn.Parameter(torch.full((num_probes, size), value))

        self.query = drawn(1, embed_dim)
        self.norm1_weight, self.norm1_bias = filled(1.0, embed_dim), filled(0.0, embed_dim)
        self.q_weight, self.q_bias = drawn(embed_dim, embed_dim), filled(0.0, embed_dim)
        self.kv_weight, self.kv_bias = drawn(2 * embed_dim, embed_dim), filled(0.0, 2 * embed_dim)
        self.proj_weight, self.proj_bias = drawn(embed_dim, embed_dim), filled(0.0, embed_dim)
        self.norm2_weight, self.norm2_bias = filled(1.0, embed_dim), filled(0.0, embed_dim)
        self.fc1_weight, self.fc1_bias = drawn(hidden, embed_dim), filled(0.0, hidden)
        self.fc2_weight, self.fc2_bias = drawn(embed_dim, hidden), filled(0.0, embed_dim)
        self.head_weight, self.head_bias = drawn(num_classes, embed_dim), filled(0.0, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        probes, heads = self.num_probes, self.num_heads
        batch, length, dim = tokens.shape
        # LayerNorm1's normalisation is shared by the probes; only its affine is per probe.
        normed = F.layer_norm(tokens, (dim,)).reshape(1, batch * length, dim) * self.norm1_weight.unsqueeze(1) + self.norm1_bias.unsqueeze(1)
        keys, values = _linear(normed, self.kv_weight, self.kv_bias).view(probes * batch, length, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        query = _linear(self.query, self.q_weight, self.q_bias).view(probes, 1, heads, 1, dim // heads)  # the same for every image
        query = query.expand(probes, batch, heads, 1, dim // heads).reshape(probes * batch, heads, 1, dim // heads)
        attended = F.scaled_dot_product_attention(query, keys, values).reshape(probes, batch, dim)
        pooled = self.query + _linear(attended, self.proj_weight, self.proj_bias)
        hidden = F.gelu(_linear(_layer_norm(pooled, self.norm2_weight, self.norm2_bias), self.fc1_weight, self.fc1_bias))
        pooled = pooled + _linear(hidden, self.fc2_weight, self.fc2_bias)
        return _linear(pooled, self.head_weight, self.head_bias)


def _rows_of(tokens: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokens of ``rows`` as float32 on ``device`` (the whole set may stay on the host, in any dtype)."""
    return tokens[rows.to(tokens.device)].to(device, torch.float32, non_blocking=True)


def fit_probes(probes: AttentiveProbes, tokens: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, grid: Sequence[tuple[float, float]], *,
               epochs: int, batch_size: int, warmup_epochs: int, seed: int, progress: bool = False, desc: str = "attentive probes") -> None:
    """Train the K ``probes`` in place on ``tokens[rows]``, probe i with AdamW at ``grid[i]``.

    Every epoch visits ``rows`` in a fresh order drawn from ``torch.Generator(seed)``, in batches
    of ``batch_size`` (the last may be smaller). Each step's loss is the sum over probes of each
    probe's mean cross-entropy, so each probe's gradient is its own.
    """
    if len(grid) != probes.num_probes:
        raise ValueError(f"grid has {len(grid)} settings for {probes.num_probes} probes")
    device = probes.query.device
    lr = torch.tensor([setting[0] for setting in grid], device=device)
    weight_decay = torch.tensor([setting[1] for setting in grid], device=device)
    parameters = list(probes.parameters())
    decayed = [p.dim() > 2 for p in parameters]  # the query and Linear weights: 2-D per probe
    first_moments = [torch.zeros_like(p) for p in parameters]
    second_moments = [torch.zeros_like(p) for p in parameters]
    labels = labels.to(device, torch.int64)
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    schedule = WarmupCosineSchedule(None, warmup_epochs * steps_per_epoch, start_lr=0.0, ref_lr=1.0, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr, disable=None if progress else True)
    for _ in bar:
        order = rows[torch.randperm(len(rows), generator=generator)]
        total_loss = torch.zeros((), device=device)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            targets = labels[batch.to(device)]
            logits = probes(_rows_of(tokens, batch, device))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.repeat(probes.num_probes)) * probes.num_probes
            for p in parameters:
                p.grad = None
            loss.backward()
            total_loss += loss.detach() * len(batch)
            step += 1
            _adamw_step(parameters, first_moments, second_moments, decayed, lr * schedule.value(step), weight_decay, step)
        if progress:  # reading the loss waits for the device: only for the bar
            bar.set_postfix(loss=f"{float(total_loss) / len(rows) / probes.num_probes:.4f}")  # mean over probes and images


@torch.no_grad()
def _adamw_step(parameters: list[torch.Tensor], first_moments: list[torch.Tensor], second_moments: list[torch.Tensor], decayed: list[bool],
                lr: torch.Tensor, weight_decay: torch.Tensor, step: int) -> None:
    """One AdamW update (torch.optim.AdamW's arithmetic) of probe-stacked parameters, with
    each probe's lr and weight decay (K,) broadcast along its slice."""
    correction1, correction2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
    for p, m, v, decay in zip(parameters, first_moments, second_moments, decayed):
        per_probe = (-1,) + (1,) * (p.dim() - 1)
        if decay:
            p.mul_(1 - (lr * weight_decay).view(per_probe))
        m.lerp_(p.grad, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(p.grad, p.grad, value=1 - BETAS[1])
        denominator = (v.sqrt() / math.sqrt(correction2)).add_(EPS)
        p.sub_(m / denominator * (lr / correction1).view(per_probe))


@torch.no_grad()
def predict(probes: AttentiveProbes, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Every probe's predicted labels for every image: (K, N) int64 on the host."""
    device = probes.query.device
    rows = torch.arange(len(tokens))
    return torch.cat([probes(_rows_of(tokens, rows[start : start + batch_size], device)).argmax(dim=-1).cpu()
                      for start in range(0, len(tokens), batch_size)], dim=1)


def _check_tokens(name: str, tokens: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """(N, T, D) tokens with N integer labels in [0, num_classes), N >= 1."""
    if tokens.dim() != 3:
        raise ValueError(f"{name} tokens must be 3-D (N, T, D), got shape {tuple(tokens.shape)}")
    if len(tokens) == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} tokens are empty: shape {tuple(tokens.shape)}")
    check_labels(name, labels, len(tokens), num_classes, "image")


def _check_grid(grid: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(grid) == 0:
        raise ValueError("grid is empty: give at least one (lr, weight_decay) pair, e.g. probe_grid(1)")
    settings = []
    for setting in grid:
        if len(setting) != 2:
            raise ValueError(f"every grid entry must be an (lr, weight_decay) pair, got {setting!r}")
        lr, weight_decay = float(setting[0]), float(setting[1])
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"grid lr must be finite and > 0, got {setting[0]!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"grid weight_decay must be finite and >= 0, got {setting[1]!r}")
        settings.append((lr, weight_decay))
    return settings


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def attentive_probe(train_tokens: torch.Tensor, train_labels: torch.Tensor, val_tokens: torch.Tensor, val_labels: torch.Tensor, *, num_classes: int,
                    num_heads: int, grid: Sequence[tuple[float, float]] = (VJEPA_SETTING,), epochs: int = 20, batch_size: int = 64,
                    warmup_epochs: int = 1, holdout: float = 0.1, seed: int = 0, device=None, progress: bool = False) -> ProbeResult:
    """Attentive probes at every ``grid`` setting, chosen on held-out train, the choice refit on all of train.

    The K probes train together on the fit part of ``holdout_split(train_labels, holdout, seed)``
    and each is scored on the held-out part and on val (``heads``); the best held-out top-1 wins
    (ties: the earlier in ``grid``; val never chooses). That setting is then trained alone, from
    a fresh initialisation, on the whole train set; its val top-1 is ``top1``. Initialisation and
    batch order come from ``torch.Generator(seed)``, so a seed gives the same result.

    ``epochs`` 20 and the (1e-3, 1e-3) default are V-JEPA's; ``batch_size`` 64 gives a thousand-image
    set about 300 steps in 20 epochs (at 256 a probe of 192-d tokens stopped well short of where 64
    took it); one warmup epoch keeps Adam's first steps small.
    Tokens may stay on the host in any float dtype: each batch goes to ``device`` (default: the
    train tokens') as float32.
    """
    _check_count("num_classes", num_classes, 1)
    _check_count("num_heads", num_heads, 1)
    _check_count("epochs", epochs, 1)
    _check_count("batch_size", batch_size, 1)
    _check_count("warmup_epochs", warmup_epochs, 0)
    _check_tokens("train", train_tokens, train_labels, num_classes)
    _check_tokens("val", val_tokens, val_labels, num_classes)
    grid = _check_grid(grid)
    if val_tokens.shape[2] != train_tokens.shape[2]:
        raise ValueError(f"train tokens have {train_tokens.shape[2]} dimensions, val tokens {val_tokens.shape[2]}")
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must not exceed epochs ({epochs})")

    device = torch.device(device) if device is not None else train_tokens.device
    embed_dim = train_tokens.shape[2]
    train_labels, val_labels = train_labels.to("cpu", torch.int64), val_labels.to("cpu", torch.int64)
    fit, heldout = holdout_split(train_labels, holdout, seed)
    training = dict(epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs, seed=seed, progress=progress)

    def trained(settings: list[tuple[float, float]], rows: torch.Tensor, desc: str) -> AttentiveProbes:
        probes = AttentiveProbes(len(settings), embed_dim, num_heads, num_classes, generator=torch.Generator().manual_seed(seed)).to(device)
        fit_probes(probes, train_tokens, train_labels, rows, settings, desc=desc, **training)
        return probes

    probes = trained(grid, fit, f"attentive, {len(grid)} probe{'s' * (len(grid) > 1)}")
    heldout_top1 = (predict(probes, train_tokens[heldout], batch_size) == train_labels[heldout]).float().mean(dim=1).tolist()
    val_top1 = (predict(probes, val_tokens, batch_size) == val_labels).float().mean(dim=1).tolist()
    best = max(range(len(grid)), key=lambda i: (heldout_top1[i], -i))

    refit = trained([grid[best]], torch.arange(len(train_tokens)), "attentive, refit")
    top1 = float((predict(refit, val_tokens, batch_size)[0] == val_labels).float().mean())
    heads = [{"lr": lr, "weight_decay": wd, "heldout_top1": heldout_top1[i], "val_top1": val_top1[i]} for i, (lr, wd) in enumerate(grid)]
    return ProbeResult(
        method="attentive",
        top1=top1,
        chosen={"lr": grid[best][0], "weight_decay": grid[best][1], "heldout_top1": heldout_top1[best], "val_top1": top1},
        heads=heads,
        n_train=len(train_tokens),
        n_val=len(val_tokens),
        classes=num_classes,
        protocol={"epochs": epochs, "batch_size": batch_size, "warmup_epochs": warmup_epochs, "holdout": holdout, "seed": seed, "num_heads": num_heads,
                  "tokens": train_tokens.shape[1], "embed_dim": embed_dim, "fit": len(fit), "heldout": len(heldout),
                  "probe": "V-JEPA AttentiveClassifier (one cross-attention block)",
                  "optimizer": "AdamW (0.9, 0.999), eps 1e-8, no decay on biases and LayerNorms",
                  "schedule": "per step: linear warmup from 0, cosine to 0", "heads_val_top1": "probes trained on the fit part",
                  "top1": "the chosen setting refit on all of train"},
    )
