"""Masked-token gather fused with the position-embedding add.

``gather_tokens(x, idx, pos=None, cu_seqlens=None)``
    Token ``idx[r, k]`` of sample ``r % B`` of ``x`` (B, N, D), plus ``pos[idx[r, k]]``:
    dense (R, K) indices give (R, K, D); R may be a multiple of B (several masks over one
    batch, stacked mask-major as the reference's ``apply_masks`` concatenates them).
    Packed: flat (T,) indices with int32 ``cu_seqlens`` (R + 1,) give (T, D) for ragged
    lengths. The result's dtype is that of ``x + pos`` (type promotion).
``pos_tokens(base, idx, pos)``
    ``base + pos[idx]`` in ``base``'s dtype, with ``base`` shaped like the result or a
    single (D,) row: the predictor's ``x + pos[idx]`` and ``mask_token + pos[idx]``.

Inputs may have any strides (the patch embedding's output is a transposed view).
Indices are int32 or int64 and unique within each (sample, mask): the gather backward
writes every gradient row of ``x`` once with stores (the reference's masks are unique by
construction; the triton and cuda backwards check it). Bad shapes, dtypes, devices and strides
raise ``ValueError``/``TypeError`` here; index values are checked inside the op (an
``IndexError`` on the CPU; on CUDA an asynchronous device assert, so no host sync).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastjepa.ops.backend import CUDA_DTYPE_NAMES, cuda_launch, device_check, forced_backend, select

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
GATHER, SAME_ROW, ONE_ROW = 0, 1, 2  # where the kernels read a token's source row (kernels/gather.py)


# ---------------------------------------------------------------------- validation


def _check_float(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_index(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def _check_same_device(op: str, **tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def _pos_table(pos: Tensor | None, D: int, op: str, width_of: str) -> Tensor | None:
    """(N, D) view of a (N, D) or (1, N, D) position table; ``width_of`` names the tensor D comes from."""
    if pos is None:
        return None
    _check_float("pos", pos, op)
    table = pos[0] if pos.dim() == 3 and pos.shape[0] == 1 else pos
    if table.dim() != 2 or table.shape[1] != D:
        raise ValueError(f"{op}: pos must be (N, {D}) or (1, N, {D}) (D = {width_of}.shape[-1]), got {tuple(pos.shape)}")
    return table


def _assert_indices_in_range(op: str, idx: Tensor, n: int) -> None:
    """Every index in [0, n): IndexError on the CPU, a device assert (no sync) on CUDA."""
    if idx.numel() == 0:
        return
    message = f"{op}: indices must lie in [0, {n})"
    if idx.device.type == "cpu":
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= n:
            raise IndexError(f"{message}, got values from {low} to {high}")
    else:
        torch._assert_async(((idx >= 0) & (idx < n)).all(), message)


def _assert_valid_cu_seqlens(op: str, cu_seqlens: Tensor, total: int) -> None:
    message = f"{op}: cu_seqlens must start at 0, never decrease and end at the number of tokens ({total})"
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    if cu_seqlens.device.type == "cpu" and not bool(valid):
        message += f", got {cu_seqlens.tolist()[:8]}{' ...' if len(cu_seqlens) > 8 else ''}"
    device_check(valid, message)


# ------------------------------------------------------------------ index helpers


def _token_rows(idx: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """(T,) int64: the row r (sequence) each token belongs to."""
    if cu_seqlens is None:
        R, K = idx.shape
        return torch.arange(R, device=idx.device).repeat_interleave(K)
    positions = torch.arange(idx.numel(), device=idx.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _num_rows(idx: Tensor, cu_seqlens: Tensor | None) -> int:
    return idx.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ----------------------------------------------------------------- gather_tokens


def _gather_problem(x: Tensor, pos: Tensor | None) -> dict:
    def dtype_problem(kernel):
        dtypes = {x.dtype} | ({pos.dtype} if pos is not None else set())
        if not dtypes <= set(KERNEL_DTYPES):
            return f"the {kernel} kernel takes float16, bfloat16 and float32 tensors, got {sorted(map(str, dtypes))}"
        return None

    return {"torch": lambda: None, "triton": lambda: dtype_problem("Triton"), "cuda": lambda: dtype_problem("CUDA")}


def _forward_kernel(backend: str):
    """The forward launcher of a kernel backend, with ``kernels.gather.gather_add_fwd``'s contract."""
    if backend == "cuda":
        return _cuda_gather_forward
    from fastjepa.kernels.gather import gather_add_fwd

    return gather_add_fwd


def _cuda_gather_forward(out: Tensor, src: Tensor, pos: Tensor | None, idx: Tensor, token_row: Tensor | None, mode: int, K: int, B: int) -> None:
    """``kernels.gather.gather_add_fwd``'s contract, run by csrc/gather.cu."""
    from fastjepa import _C

    T, D = out.shape
    if src.dim() == 3:
        src_strides = src.stride()
    elif src.dim() == 2:
        src_strides = (0, *src.stride())
    else:
        src_strides = (0, 0, src.stride(0))
    with cuda_launch(out.device) as stream:
        _C.gather_forward(
            out.data_ptr(), src.data_ptr(), pos.data_ptr() if pos is not None else 0, idx.data_ptr(),
            token_row.data_ptr() if token_row is not None else 0,
            out_dtype=CUDA_DTYPE_NAMES[out.dtype], src_dtype=CUDA_DTYPE_NAMES[src.dtype],
            pos_dtype=CUDA_DTYPE_NAMES[pos.dtype] if pos is not None else None, idx_dtype=CUDA_DTYPE_NAMES[idx.dtype],
            mode=mode, tokens=T, dim=D, k=K, batch=B, src_strides=src_strides,
            pos_strides=pos.stride() if pos is not None else (0, 0), stream=stream,
        )


def _inverse_map(idx: Tensor, rows: Tensor, groups: int, B: int, N: int) -> Tensor:
    """(groups * B * N,) int32: the token that read each source row under each group (several
    masks over one batch), -1 where none did. Refuses indices repeated within a sample and mask
    (the store-based backward would drop their sums): ValueError on the CPU, a device assert on CUDA."""
    slots = rows * N + idx.reshape(-1)  # slot g * B * N + b * N + n  ==  r * N + n
    tokens = torch.arange(slots.numel(), device=idx.device, dtype=torch.int32)
    inv = torch.full((groups * B * N,), -1, device=idx.device, dtype=torch.int32).scatter_(0, slots, tokens)
    device_check((inv.gather(0, slots) == tokens).all(), "gather_tokens backward: indices must be unique within each sample and mask")
    return inv


@torch.library.custom_op("fastjepa::gather_tokens", mutates_args=())
def _gather_tokens(x: Tensor, idx: Tensor, pos: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tensor:
    B, N, D = x.shape
    _assert_indices_in_range("gather_tokens", idx, N)
    if cu_seqlens is not None:
        _assert_valid_cu_seqlens("gather_tokens", cu_seqlens, idx.numel())
    out_shape = (*idx.shape, D)
    dtype = torch.promote_types(x.dtype, pos.dtype) if pos is not None else x.dtype
    backend = select("gather_tokens", x.device, _gather_problem(x, pos))
    if backend in ("cuda", "triton"):
        out = torch.empty(out_shape, device=x.device, dtype=dtype)
        token_row = _token_rows(idx, cu_seqlens).to(torch.int32) if cu_seqlens is not None else None
        K = idx.shape[1] if cu_seqlens is None else 1
        _forward_kernel(backend)(out.view(-1, D), x, pos, idx.reshape(-1).contiguous(), token_row, GATHER, K, B)
        return out
    flat_idx = idx.reshape(-1).long()
    sample = _token_rows(idx, cu_seqlens) % B
    out = x[sample, flat_idx]
    if pos is not None:
        out = out + pos[flat_idx]
    return out.to(dtype).view(out_shape)


@_gather_tokens.register_fake
def _(x, idx, pos, cu_seqlens):
    dtype = torch.promote_types(x.dtype, pos.dtype) if pos is not None else x.dtype
    return x.new_empty((*idx.shape, x.shape[-1]), dtype=dtype)


@torch.library.custom_op("fastjepa::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward(
    grad: Tensor, idx: Tensor, cu_seqlens: Optional[Tensor], B: int, N: int, dtype: torch.dtype, forced_backend: str
) -> Tensor:
    """Gradient of gather_tokens for x; ``forced_backend`` is the one forced at the forward ("" if none)."""
    D = grad.shape[-1]
    R = _num_rows(idx, cu_seqlens)
    rows = _token_rows(idx, cu_seqlens)
    grad = grad.reshape(-1, D)
    backend = select("gather_tokens", grad.device, _gather_problem(grad, None), forced=forced_backend or None)
    if backend in ("cuda", "triton"):
        groups = R // B
        inv = _inverse_map(idx, rows, groups, B, N)
        grad_x = torch.empty((B * N, D), device=grad.device, dtype=dtype)
        grad = grad.contiguous()
        if backend == "cuda":
            from fastjepa import _C

            with cuda_launch(grad.device) as stream:
                _C.gather_backward(
                    grad_x.data_ptr(), grad.data_ptr(), inv.data_ptr(), grad_x_dtype=CUDA_DTYPE_NAMES[dtype],
                    grad_dtype=CUDA_DTYPE_NAMES[grad.dtype], rows=B * N, dim=D, groups=groups, stream=stream,
                )
        else:
            from fastjepa.kernels.gather import gather_bwd

            gather_bwd(grad_x, grad, inv, groups)
        return grad_x.view(B, N, D)
    flat_rows = (rows % B) * N + idx.reshape(-1)
    accumulate = _accumulation_dtype(grad.dtype)
    grad_x = torch.zeros((B * N, D), device=grad.device, dtype=accumulate)
    grad_x.index_add_(0, flat_rows, grad.to(accumulate))
    return grad_x.to(dtype).view(B, N, D)


@_gather_tokens_backward.register_fake
def _(grad, idx, cu_seqlens, B, N, dtype, forced_backend):
    return grad.new_empty((B, N, grad.shape[-1]), dtype=dtype)


def _index_add_pos_grad(grad: Tensor, idx: Tensor, pos: Tensor) -> Tensor:
    """Gradient of a (N, D) position table read at idx (only when it is trainable)."""
    D, accumulate = grad.shape[-1], _accumulation_dtype(grad.dtype)
    grad_pos = torch.zeros((pos.shape[0], D), device=grad.device, dtype=accumulate)
    return grad_pos.index_add_(0, idx.reshape(-1).long(), grad.reshape(-1, D).to(accumulate)).to(pos.dtype)


def _gather_setup_context(ctx, inputs, output):
    x, idx, pos, cu_seqlens = inputs
    ctx.save_for_backward(idx, cu_seqlens, pos)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.forced_backend = forced_backend() or ""  # the backward runs on the backend the forward was forced to


def _gather_backward(ctx, grad):
    idx, cu_seqlens, pos = ctx.saved_tensors
    B, N, _ = ctx.x_shape
    grad_x = grad_pos = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fastjepa.gather_tokens_backward(grad, idx, cu_seqlens, B, N, ctx.x_dtype, ctx.forced_backend)
    if ctx.needs_input_grad[2]:
        grad_pos = _index_add_pos_grad(grad, idx, pos)
    return grad_x, None, grad_pos, None


_gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def gather_tokens(x: Tensor, idx: Tensor, pos: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
    """``x[r % B, idx[r, k]] + pos[idx[r, k]]``: see the module docstring."""
    op = "gather_tokens"
    _check_float("x", x, op)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    _check_index("idx", idx, op)
    table = _pos_table(pos, D, op, "x")
    if table is not None and table.shape[0] < N:
        raise ValueError(f"{op}: pos has {table.shape[0]} rows but x has {N} tokens")
    if cu_seqlens is None:
        if idx.dim() != 2:
            raise ValueError(f"{op}: idx must be (R, K) (or flat (T,) with cu_seqlens), got shape {tuple(idx.shape)}")
    else:
        _check_index("cu_seqlens", cu_seqlens, op)
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"{op}: cu_seqlens must be int32 (R + 1,) with R >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if idx.dim() != 1:
            raise ValueError(f"{op}: with cu_seqlens, idx must be flat (T,), got shape {tuple(idx.shape)}")
    R = _num_rows(idx, cu_seqlens)
    if B == 0 or R % B != 0:
        raise ValueError(f"{op}: the number of rows ({R}) must be a positive multiple of the batch size ({B})")
    _check_same_device(op, x=x, idx=idx, pos=pos, cu_seqlens=cu_seqlens)
    return _gather_tokens(x, idx, table, cu_seqlens)


# -------------------------------------------------------------------- pos_tokens


@torch.library.custom_op("fastjepa::pos_tokens", mutates_args=())
def _pos_tokens(base: Tensor, idx: Tensor, pos: Tensor) -> Tensor:
    N, D = pos.shape
    _assert_indices_in_range("pos_tokens", idx, N)
    backend = select("pos_tokens", base.device, _gather_problem(base, pos))
    one_row = base.dim() == 1
    if backend in ("cuda", "triton"):
        out = torch.empty((*idx.shape, D), device=base.device, dtype=base.dtype)
        src = base if one_row else base.reshape(-1, D)
        _forward_kernel(backend)(out.view(-1, D), src, pos, idx.reshape(-1).contiguous(), None, ONE_ROW if one_row else SAME_ROW, 1, 1)
        return out
    return (base + pos[idx.long()]).to(base.dtype)


@_pos_tokens.register_fake
def _(base, idx, pos):
    return base.new_empty((*idx.shape, pos.shape[-1]))


def _pos_setup_context(ctx, inputs, output):
    base, idx, pos = inputs
    ctx.save_for_backward(idx, pos)
    ctx.base_shape, ctx.base_dtype = base.shape, base.dtype


def _pos_backward(ctx, grad):
    idx, pos = ctx.saved_tensors
    grad_base = grad_pos = None
    if ctx.needs_input_grad[0]:
        if len(ctx.base_shape) == 1:
            grad_base = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=_accumulation_dtype(grad.dtype)).to(ctx.base_dtype)
        else:
            grad_base = grad.to(ctx.base_dtype)
    if ctx.needs_input_grad[2]:
        grad_pos = _index_add_pos_grad(grad, idx, pos)
    return grad_base, None, grad_pos


_pos_tokens.register_autograd(_pos_backward, setup_context=_pos_setup_context)


def pos_tokens(base: Tensor, idx: Tensor, pos: Tensor) -> Tensor:
    """``base + pos[idx]`` in ``base``'s dtype; ``base`` is (D,) or ``idx.shape + (D,)``."""
    op = "pos_tokens"
    _check_float("base", base, op)
    _check_index("idx", idx, op)
    _check_float("pos", pos, op)
    if base.dim() == 0:
        raise ValueError(f"{op}: base must be (D,) or idx.shape + (D,), got a 0-d tensor")
    D = base.shape[-1]
    table = _pos_table(pos, D, op, "base")
    if base.dim() != 1 and tuple(base.shape) != (*idx.shape, D):
        raise ValueError(f"{op}: base must be (D,) or idx.shape + (D,) = {(*idx.shape, D)}, got {tuple(base.shape)}")
    if base.dim() > 1 and not base.is_contiguous():
        raise ValueError(f"{op}: base must be contiguous, got strides {base.stride()} (call .contiguous())")
    _check_same_device(op, base=base, idx=idx, pos=pos)
    return _pos_tokens(base, idx, table)
