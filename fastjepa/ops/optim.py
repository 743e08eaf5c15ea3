"""Fused AdamW step and target EMA: ``adamw_ema_``.

``adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups=None, *,
betas=(0.9, 0.999), eps=1e-8, targets=(), momentum=None, shadows=(), skip=None)`` does, in place:

0. with ``skip`` (a 0-d bool on the device) true: nothing at all. Every tensor, ``step`` included,
   keeps its bits; the flag is read on the device (no host sync), so a step whose gradients
   are not finite can be left out without the host knowing yet;
1. ``step += 1``, then ``torch.optim.AdamW``'s step on every parameter with that step count:
   decoupled weight decay ``p *= 1 - lr * wd``, ``exp_avg.lerp_(grad, 1 - beta1)``,
   ``exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad**2``, and
   ``p -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)``;
2. with ``targets``, the EMA of the new parameters: ``target = m * target + (1 - m) * p``
   (``ema_update_``), and with ``shadows`` the new targets in the shadows' dtype.

``step`` is a 0-d float32 tensor (``AdamW``'s ``state["step"]``); ``lr`` and ``weight_decay``
are floats >= 0 or tensors of 1 or G values (one per group) and ``groups[i]`` is the group of
``params[i]`` (default 0); ``momentum`` a float in [0, 1] or a 0-d tensor. Tensors on the device
cost no host sync (their values are not checked), so schedules can change every step.
``skip`` is 0-d bool, on the parameters' device.

The torch backend is that math, operation by operation as ``torch.optim.AdamW`` (the
single-tensor implementation) does it, so on the CPU it equals ``AdamW`` then ``ema_update_``
bit for bit; with ``skip`` it computes the new values aside and keeps the old ones where the flag
says so (``torch.where``: exact both ways, one tensor's temporaries at a time). The cuda backend (csrc/adamw_ema.cu) does it in one pass over memory: it reads
grad, param, both moments and target once and writes param, moments, target (and shadow)
once (nothing when ``skip`` is set); the GPU's fused multiply-adds move some results by an ulp.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastjepa.ops.backend import CUDA_DTYPE_NAMES, check_number, check_tensor_lists, cuda_launch, select, tensor_list
from fastjepa.ops.ema import KERNEL_ONLINE_DTYPES, torch_ema_


def _cuda_problem(params, grads, exp_avgs, exp_avg_sqs, step, targets, shadows):
    if step.dtype != torch.float32:
        return f"the CUDA AdamW+EMA needs a float32 step tensor, got {step.dtype}"
    if any(t.dtype != torch.float32 for group in (params, grads, exp_avgs, exp_avg_sqs, targets) for t in group):
        return "the CUDA AdamW+EMA needs float32 parameters, gradients, moments and targets"
    if len({s.dtype for s in shadows}) > 1 or (shadows and shadows[0].dtype not in KERNEL_ONLINE_DTYPES):
        return "the CUDA AdamW+EMA writes shadows of one dtype among float32, bfloat16, float16"
    if not all(t.is_contiguous() for group in (params, grads, exp_avgs, exp_avg_sqs, targets, shadows) for t in group):
        return "the CUDA AdamW+EMA needs contiguous tensors"
    return None


def _torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups, beta1, beta2, eps, skip) -> None:
    """torch.optim.AdamW's single-tensor step, with the Python-float scalars as fp64 tensors.
    Each tensor's new values are computed aside (the same kernels as AdamW's in-place ones,
    so the same bits), then written, or kept old where ``skip`` is set."""
    s = step.double()
    bias_correction1 = 1 - beta1**s
    bias_correction2_sqrt = (1 - beta2**s).sqrt()
    lr, weight_decay = lr.double(), weight_decay.double()
    for p, g, exp_avg, exp_avg_sq, k in zip(params, grads, exp_avgs, exp_avg_sqs, groups):
        new_p = p.mul(1 - lr[k] * weight_decay[k])
        new_avg = exp_avg.lerp(g, 1 - beta1)
        new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (new_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        new_p.add_(new_avg * (-lr[k] / bias_correction1) / denom)  # addcdiv_ with value = -lr / bias_correction1
        for old, new in ((p, new_p), (exp_avg, new_avg), (exp_avg_sq, new_avg_sq)):
            old.copy_(new if skip is None else torch.where(skip, old, new))


def _cuda_adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups, beta1, beta2, eps, targets, momentum, shadows,
                     skip):
    from fastjepa import _C

    lr, weight_decay = lr.to(torch.float32).contiguous(), weight_decay.to(torch.float32).contiguous()
    momentum = momentum.to(torch.float32) if momentum is not None else None

    def addresses(tensors):
        return [t.data_ptr() for t in tensors]

    with cuda_launch(params[0].device) as stream:
        _C.adamw_ema(
            addresses(params), addresses(grads), addresses(exp_avgs), addresses(exp_avg_sqs), addresses(targets), addresses(shadows),
            [p.numel() for p in params], list(groups),
            lr=lr.data_ptr(), weight_decay=weight_decay.data_ptr(), num_groups=lr.numel(), step=step.data_ptr(),
            momentum=momentum.data_ptr() if momentum is not None else 0, beta1=beta1, beta2=beta2, eps=eps,
            shadow_dtype=CUDA_DTYPE_NAMES[shadows[0].dtype] if shadows else None, skip=skip.data_ptr() if skip is not None else 0,
            stream=stream,
        )


@torch.library.custom_op("fastjepa::adamw_ema_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "step", "targets", "shadows"))
def _adamw_ema_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: Tensor, lr: Tensor,
    weight_decay: Tensor, groups: list[int], beta1: float, beta2: float, eps: float, targets: list[Tensor],
    momentum: Optional[Tensor], shadows: list[Tensor], skip: Optional[Tensor] = None,
) -> None:
    with torch.no_grad():
        step.add_(1 if skip is None else skip.logical_not())
        if not params:
            return
        problems = {"torch": lambda: None, "cuda": lambda: _cuda_problem(params, grads, exp_avgs, exp_avg_sqs, step, targets, shadows)}
        if select("adamw_ema_", params[0].device, problems) == "cuda":
            _cuda_adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups, beta1, beta2, eps, targets, momentum, shadows,
                             skip)
            return
        _torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups, beta1, beta2, eps, skip)
        if targets:
            torch_ema_(targets, params, momentum, shadows, skip)


@_adamw_ema_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, groups, beta1, beta2, eps, targets, momentum, shadows, skip=None):
    return None


def _device_scalars(op: str, name: str, value: float | Tensor, device: torch.device, allow_vector: bool, high: float = math.inf) -> Tensor:
    """A float in [0, high], a 0-d or (allow_vector) 1-D float tensor on ``device`` as a 1-D tensor."""
    if not isinstance(value, Tensor):
        return torch.full((1,), check_number(op, name, value, 0.0, high), device=device, dtype=torch.float32)
    if not value.is_floating_point() or value.dim() > (1 if allow_vector else 0) or value.numel() == 0:
        shape = "a 0-d or 1-D" if allow_vector else "a 0-d"
        raise ValueError(f"{op}: {name} must be a float or {shape} float tensor, got {value.dtype} of shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but the parameters are on {device}")
    return value.reshape(-1)


# Long by its validation: eight argument lists and four numbers, each checked with its own message before any kernel runs.
def adamw_ema_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step: Tensor,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    groups: Sequence[int] | None = None,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    targets: Sequence[Tensor] = (),
    momentum: float | Tensor | None = None,
    shadows: Sequence[Tensor] = (),
    skip: Tensor | None = None,
) -> None:
    """AdamW step of ``params`` then EMA into ``targets`` (and ``shadows``): see the module docstring."""
    op = "adamw_ema_"
    params, grads = tensor_list(op, "params", params), tensor_list(op, "grads", grads)
    exp_avgs, exp_avg_sqs = tensor_list(op, "exp_avgs", exp_avgs), tensor_list(op, "exp_avg_sqs", exp_avg_sqs)
    targets, shadows = tensor_list(op, "targets", targets), tensor_list(op, "shadows", shadows)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if targets:
        lists["targets"] = targets
    if shadows:
        lists["shadows"] = shadows
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {len(tensors)} {name} for {len(params)} params (give one per parameter)")
    if shadows and not targets:
        raise ValueError(f"{op}: shadows need targets (a shadow holds the new target in its dtype)")
    if not isinstance(step, Tensor) or step.dim() != 0 or not step.is_floating_point():
        got = f"{step.dtype} of shape {tuple(step.shape)}" if isinstance(step, Tensor) else type(step).__name__
        raise ValueError(f"{op}: step must be a 0-d float tensor (AdamW's state['step']), got {got}")
    device = step.device
    check_tensor_lists(op, {"params": params, **lists}, device, "step")
    for name in ("grads", "exp_avgs", "exp_avg_sqs"):
        for i, (t, p) in enumerate(zip(lists[name], params)):
            if t.dtype != p.dtype:
                raise TypeError(f"{op}: {name}[{i}] is {t.dtype} but params[{i}] is {p.dtype}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(isinstance(b, numbers.Real) for b in betas):
        raise ValueError(f"{op}: betas must be a pair of numbers (beta1, beta2), got {betas!r}")
    beta1, beta2 = float(betas[0]), float(betas[1])
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{op}: betas must lie in [0, 1), got {betas}")
    eps = check_number(op, "eps", eps)
    lr = _device_scalars(op, "lr", lr, device, allow_vector=True)
    weight_decay = _device_scalars(op, "weight_decay", weight_decay, device, allow_vector=True)
    num_groups = max(lr.numel(), weight_decay.numel())
    if lr.numel() not in (1, num_groups) or weight_decay.numel() not in (1, num_groups):
        raise ValueError(f"{op}: lr has {lr.numel()} values and weight_decay {weight_decay.numel()}: give each 1 value or one per group")
    if groups is None:
        groups = [0] * len(params)
    else:
        not_ints = [g for g in groups if not isinstance(g, numbers.Integral)]
        if not_ints:
            raise TypeError(f"{op}: groups must hold int group indices, got {not_ints[0]!r} ({type(not_ints[0]).__name__})")
        groups = [int(g) for g in groups]
    if len(groups) != len(params):
        raise ValueError(f"{op}: {len(groups)} groups for {len(params)} params (give one group index per parameter)")
    if any(not 0 <= g < num_groups for g in groups):
        raise ValueError(f"{op}: group indices must lie in [0, {num_groups}) (the number of lr / weight_decay values), got {sorted(set(groups))}")
    if targets and momentum is None:
        raise ValueError(f"{op}: targets need a momentum")
    if momentum is not None:
        momentum = _device_scalars(op, "momentum", momentum, device, allow_vector=False, high=1.0).reshape(())
    if skip is not None and (not isinstance(skip, Tensor) or skip.dtype != torch.bool or skip.dim() != 0 or skip.device != device):
        got = f"{skip.dtype} of shape {tuple(skip.shape)} on {skip.device}" if isinstance(skip, Tensor) else type(skip).__name__
        raise ValueError(f"{op}: skip must be a 0-d bool tensor on {device}, got {got}")
    _adamw_ema_(
        params, grads, exp_avgs, exp_avg_sqs, step, lr.expand(num_groups), weight_decay.expand(num_groups), groups,
        beta1, beta2, eps, targets, momentum, shadows, skip,
    )
