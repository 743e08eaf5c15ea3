"""Fused EMA of the target encoder: ``target <- m * target + (1 - m) * online``.

``ema_update_(targets, onlines, momentum, shadows=())`` updates every target tensor in place
(one launch for the whole list on CUDA, by csrc/ema.cu or the Triton kernel), and when
``shadows`` are given also writes the new target into them in their dtype (a bf16 copy for
the next forward) in the same pass.
``momentum`` is a float in [0, 1] or a 0-d tensor on the tensors' device; a device tensor
costs no host sync (its value is not checked), and a changing value never recompiles anything.

The torch backend is the reference trainer's update, ``t.mul_(m).add_((1 - m) * o)``,
done in the target's dtype; the kernels compute ``m * t + (1 - m) * o`` in fp32 (within
an ulp or two of the reference: the GPU may fuse it into one multiply-add).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastjepa.ops.backend import CUDA_DTYPE_NAMES, check_number, check_tensor_lists, cuda_launch, select, tensor_list

KERNEL_ONLINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_problem(kernel, targets, onlines, shadows):
    """Why the ``kernel`` ("Triton" or "CUDA") EMA cannot take these tensors (None if it can)."""
    if any(t.dtype != torch.float32 for t in targets):
        return f"the {kernel} EMA needs float32 targets"
    online_dtypes = {o.dtype for o in onlines}
    if len(online_dtypes) > 1 or not online_dtypes <= set(KERNEL_ONLINE_DTYPES):
        return f"the {kernel} EMA needs one online dtype among float32, bfloat16, float16; got {sorted(map(str, online_dtypes))}"
    if len({s.dtype for s in shadows}) > 1:
        return f"the {kernel} EMA needs one shadow dtype"
    if shadows and shadows[0].dtype not in KERNEL_ONLINE_DTYPES:
        return f"the {kernel} EMA writes float32, bfloat16 or float16 shadows, got {shadows[0].dtype}"
    if not all(t.is_contiguous() for group in (targets, onlines, shadows) for t in group):
        return f"the {kernel} EMA needs contiguous tensors"
    return None


def _cuda_ema(targets, onlines, shadows, momentum) -> None:
    from fastjepa import _C

    momentum = momentum.to(torch.float32)
    with cuda_launch(targets[0].device) as stream:
        _C.ema_update(
            [t.data_ptr() for t in targets], [o.data_ptr() for o in onlines], [s.data_ptr() for s in shadows],
            [t.numel() for t in targets],
            online_dtype=CUDA_DTYPE_NAMES[onlines[0].dtype],
            shadow_dtype=CUDA_DTYPE_NAMES[shadows[0].dtype] if shadows else None,
            momentum=momentum.data_ptr(), stream=stream,
        )


def torch_ema_(targets: list[Tensor], onlines: list[Tensor], momentum: Tensor, shadows: list[Tensor], skip: Tensor | None = None) -> None:
    """The torch backend: the reference trainer's update (also the EMA of ``adamw_ema_``, which
    passes its ``skip``: a 0-d bool on the device, true keeps every target and shadow as it was)."""
    with torch.no_grad():
        for t, o in zip(targets, onlines):
            m = momentum.to(t.dtype)
            if skip is None:
                t.mul_(m).add_((1 - m) * o.to(t.dtype))
            else:
                t.copy_(torch.where(skip, t, t.mul(m).add_((1 - m) * o.to(t.dtype))))
        if shadows:
            torch._foreach_copy_(shadows, targets)


@torch.library.custom_op("fastjepa::ema_update_", mutates_args=("targets", "shadows"))
def _ema_update_(targets: list[Tensor], onlines: list[Tensor], momentum: Tensor, shadows: list[Tensor]) -> None:
    if not targets:
        return
    problems = {
        "torch": lambda: None,
        "triton": lambda: _kernel_problem("Triton", targets, onlines, shadows),
        "cuda": lambda: _kernel_problem("CUDA", targets, onlines, shadows),
    }
    backend = select("ema_update_", targets[0].device, problems)
    if backend == "cuda":
        _cuda_ema(targets, onlines, shadows, momentum)
        return
    if backend == "triton":
        from fastjepa.kernels.ema import ema_update

        ema_update(targets, onlines, shadows, momentum.to(torch.float32))
        return
    torch_ema_(targets, onlines, momentum, shadows)


@_ema_update_.register_fake
def _(targets, onlines, momentum, shadows):
    return None


def ema_update_(targets: Sequence[Tensor], onlines: Sequence[Tensor], momentum: float | Tensor, shadows: Sequence[Tensor] = ()) -> None:
    """EMA of ``onlines`` into ``targets`` (and ``shadows``): see the module docstring."""
    op = "ema_update_"
    targets, onlines, shadows = tensor_list(op, "targets", targets), tensor_list(op, "onlines", onlines), tensor_list(op, "shadows", shadows)
    if len(targets) != len(onlines):
        raise ValueError(f"{op}: {len(targets)} target tensors but {len(onlines)} online tensors")
    if shadows and len(shadows) != len(targets):
        raise ValueError(f"{op}: {len(shadows)} shadow tensors for {len(targets)} targets (give one per target, or none)")
    if not targets:
        return
    check_tensor_lists(op, {"targets": targets, "onlines": onlines, "shadows": shadows}, None, "targets[0]")
    device = targets[0].device
    if isinstance(momentum, Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(f"{op}: momentum must be a float or a 0-d float tensor, got {momentum.dtype} of shape {tuple(momentum.shape)}")
        if momentum.device != device:
            raise ValueError(f"{op}: momentum is on {momentum.device} but the tensors are on {device}")
    else:
        dtype = torch.float64 if targets[0].dtype == torch.float64 else torch.float32
        momentum = torch.full((), check_number(op, "momentum", momentum, 0.0, 1.0), device=device, dtype=dtype)
    _ema_update_(targets, onlines, momentum, shadows)
