"""Attention over packed, ragged sequences.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, return_lse=False)``
    q, k, v are packed (total_tokens, heads, head_dim); sequence s is tokens
    ``cu_seqlens[s]:cu_seqlens[s + 1]`` (int32) and attends to itself only (no causal mask).
``shared_context_attention(q, k, v, offsets, max_seqlen, softmax_scale=None, return_lse=False)``
    One sequence per sample laid out [context | block 0 | ... | block M-1]; ``offsets`` (B, M + 2)
    int32 holds, per sample, the start of its context, the start of each block and its end.
    Context queries attend to the context; queries of block i attend to the context and to
    block i (the I-JEPA predictor with its context computed once per sample).

Both return the output (total_tokens, heads, head_dim) in q's dtype, and with
``return_lse=True`` also the log-sum-exp of each query's scores, (heads, total_tokens) fp32
(natural log; not differentiable). Scores, softmax and accumulation are fp32 (fp64 for fp64
inputs on the torch backend). ``max_seqlen`` bounds the query and key ranges' lengths
(the longest sequence; for shared_context the longest context or block); it sizes the
kernels' grid, so it is a Python int.

Backends: ``triton`` (forward and backward kernels in ``kernels/attention.py``) and
``torch``, a per-sequence fp32 reference.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastjepa.ops.backend import device_check, forced_backend, select

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 128


# ---------------------------------------------------------------------- segment tables
#
# Both ops reduce to "segments": a run of query tokens that attends to up to two key ranges.
# The torch reference walks them as a q_table (S, 6): q_start, q_end, kv0_start, kv0_end,
# kv1_start, kv1_end; the Triton kernels decode the same segments from cu_seqlens / offsets.


def _q_table(index: Tensor, shared: bool) -> Tensor:
    if not shared:  # cu_seqlens: one segment per sequence
        starts, ends = index[:-1], index[1:]
        empty = torch.zeros_like(starts)
        return torch.stack([starts, ends, starts, ends, empty, empty], 1)
    B, M = index.shape[0], index.shape[1] - 2  # offsets: the contexts, then every sample's blocks
    ctx_start, ctx_end = index[:, 0], index[:, 1]
    block_start, block_end = index[:, 1:-1], index[:, 2:]  # (B, M)
    empty = torch.zeros_like(ctx_start)
    context_rows = torch.stack([ctx_start, ctx_end, ctx_start, ctx_end, empty, empty], 1)
    ctx_b, ctx_e = ctx_start[:, None].expand(B, M), ctx_end[:, None].expand(B, M)
    block_rows = torch.stack([block_start, block_end, ctx_b, ctx_e, block_start, block_end], 2).reshape(B * M, 6)
    return torch.cat([context_rows, block_rows])


# ---------------------------------------------------------------------- torch reference


def _reference_forward(q, k, v, q_table, scale):
    """Per segment, in fp32: softmax(q k^T * scale) v over the segment's key ranges."""
    T, H, D = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(T, H, D, dtype=compute, device=q.device)
    lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    for qs, qe, a0, b0, a1, b1 in q_table.tolist():
        if qe == qs:
            continue
        keys = torch.cat([torch.arange(a0, b0), torch.arange(a1, b1)]).to(q.device)
        if len(keys) == 0:
            continue
        qf = q[qs:qe].to(compute).transpose(0, 1)  # (H, Lq, D)
        kf, vf = k[keys].to(compute).transpose(0, 1), v[keys].to(compute).transpose(0, 1)
        scores = qf @ kf.transpose(1, 2) * scale
        seg_lse = torch.logsumexp(scores, dim=-1)  # (H, Lq)
        out[qs:qe] = (torch.exp(scores - seg_lse[..., None]) @ vf).transpose(0, 1)
        lse[:, qs:qe] = seg_lse.float()
    return out.to(q.dtype), lse


def _reference_backward(grad_out, q, k, v, q_table, scale):
    """Per segment, in fp32: with P = softmax(S), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = dS K * scale, dK = dS^T Q * scale; keys read by several segments sum their gradients."""
    compute = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(t.shape, dtype=compute, device=t.device) for t in (q, k, v))
    for qs, qe, a0, b0, a1, b1 in q_table.tolist():
        keys = torch.cat([torch.arange(a0, b0), torch.arange(a1, b1)]).to(q.device)
        if qe == qs or len(keys) == 0:
            continue
        qf, do = q[qs:qe].to(compute).transpose(0, 1), grad_out[qs:qe].to(compute).transpose(0, 1)  # (H, Lq, D)
        kf, vf = k[keys].to(compute).transpose(0, 1), v[keys].to(compute).transpose(0, 1)
        p = torch.softmax(qf @ kf.transpose(1, 2) * scale, dim=-1)  # (H, Lq, Lk)
        o = p @ vf
        ds = p * (do @ vf.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[qs:qe] += (ds @ kf * scale).transpose(0, 1)
        dk.index_add_(0, keys, (ds.transpose(1, 2) @ qf * scale).transpose(0, 1))
        dv.index_add_(0, keys, (p.transpose(1, 2) @ do).transpose(0, 1))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------ dispatch


def _problems(q: Tensor) -> dict:
    def triton_problem():
        if q.dtype not in TRITON_DTYPES:
            return f"the Triton attention takes float16, bfloat16 and float32, got {q.dtype}"
        if q.shape[-1] > MAX_TRITON_HEAD_DIM:
            return f"the Triton attention takes head_dim <= {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}"
        return None

    return {"torch": lambda: None, "triton": triton_problem}


def _forward(q, k, v, index, max_len, scale, shared):
    backend = select("attention", q.device, _problems(q))
    if backend == "triton":
        from fastjepa.kernels.attention import attention_fwd

        return attention_fwd(q, k, v, index, max_len, scale, shared)
    return _reference_forward(q, k, v, _q_table(index, shared), scale)


def _backward(grad_out, q, k, v, out, lse, index, max_len, scale, shared, forced):
    backend = select("attention", q.device, _problems(q), forced=forced or None)
    if backend == "triton":
        from fastjepa.kernels.attention import attention_bwd

        return attention_bwd(grad_out, q, k, v, out, lse, index, max_len, scale, shared)
    return _reference_backward(grad_out, q, k, v, _q_table(index, shared), scale)


# ------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastjepa::varlen_attention", mutates_args=())
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> tuple[Tensor, Tensor]:
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    return _forward(q, k, v, cu_seqlens, max_seqlen, scale, shared=False)


@torch.library.custom_op("fastjepa::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, forced_backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, False, forced_backend)


@torch.library.custom_op("fastjepa::shared_context_attention", mutates_args=())
def _shared_context_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seqlen: int, scale: float) -> tuple[Tensor, Tensor]:
    _check_offsets(offsets, q.shape[0], max_seqlen)
    return _forward(q, k, v, offsets, max_seqlen, scale, shared=True)


@torch.library.custom_op("fastjepa::shared_context_attention_backward", mutates_args=())
def _shared_context_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, offsets: Tensor, max_seqlen: int, scale: float, forced_backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, offsets, max_seqlen, scale, True, forced_backend)


def _fake_forward(q, k, v, index, max_seqlen, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _fake_backward(grad_out, q, k, v, out, lse, index, max_seqlen, scale, forced_backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


for _op in (_varlen_attention, _shared_context_attention):
    _op.register_fake(_fake_forward)
for _op in (_varlen_attention_backward, _shared_context_attention_backward):
    _op.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    q, k, v, index, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.forced_backend = forced_backend() or ""  # the backward runs where the forward was forced to


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, index = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, index, ctx.max_seqlen, ctx.scale, ctx.forced_backend)
        return dq, dk, dv, None, None, None

    return backward


_varlen_attention.register_autograd(_make_backward(torch.ops.fastjepa.varlen_attention_backward), setup_context=_setup_context)
_shared_context_attention.register_autograd(
    _make_backward(torch.ops.fastjepa.shared_context_attention_backward), setup_context=_setup_context
)


# ---------------------------------------------------------------------- validation


def _check_qkv(op: str, q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be packed (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k and v must have one shape (total_tokens, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] == 0 or q.shape[1] == 0:
        raise ValueError(f"{op}: heads and head_dim must be positive, got shape {tuple(q.shape)}")


def _check_max_seqlen(op: str, max_seqlen) -> None:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")


def _check_cu_seqlens(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    device_check((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all(),
                 f"varlen_attention: cu_seqlens must start at 0, never decrease and end at total_tokens ({total})")
    device_check((lengths <= max_seqlen).all(), f"varlen_attention: max_seqlen {max_seqlen} is smaller than a sequence in cu_seqlens")


def _check_offsets(offsets: Tensor, total: int, max_seqlen: int) -> None:
    lengths = offsets[:, 1:] - offsets[:, :-1]
    in_order = (offsets[0, 0] == 0) & (offsets[-1, -1] == total) & (lengths >= 0).all() & (offsets[1:, 0] == offsets[:-1, -1]).all()
    device_check(in_order, f"shared_context_attention: offsets must start at 0, never decrease, chain the samples and end at total_tokens ({total})")
    device_check((lengths <= max_seqlen).all(), f"shared_context_attention: max_seqlen {max_seqlen} is smaller than a context or block in offsets")


def _scale(op: str, softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return float(head_dim**-0.5)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"{op}: softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
    if not abs(softmax_scale) < math.inf:  # not math.isfinite: a compiled block's scale can be a SymFloat, which it cannot trace
        raise ValueError(f"{op}: softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float | None = None, return_lse: bool = False):
    """Attention within each packed sequence: see the module docstring."""
    op = "varlen_attention"
    _check_qkv(op, q, k, v)
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D int32 tensor of at least 2 offsets, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    _check_max_seqlen(op, max_seqlen)
    out, lse = _varlen_attention(q, k, v, cu_seqlens, max_seqlen, _scale(op, softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def shared_context_attention(q, k, v, offsets, max_seqlen: int, softmax_scale: float | None = None, return_lse: bool = False):
    """[context | block 0 | ... | block M-1] per sample: see the module docstring."""
    op = "shared_context_attention"
    _check_qkv(op, q, k, v)
    if not isinstance(offsets, Tensor) or offsets.dtype != torch.int32 or offsets.dim() != 2 or offsets.shape[0] < 1 or offsets.shape[1] < 3:
        raise ValueError(f"{op}: offsets must be an int32 (B, M + 2) tensor with B >= 1 and M >= 1, got "
                         f"{getattr(offsets, 'dtype', type(offsets).__name__)} {tuple(getattr(offsets, 'shape', ()))}")
    if offsets.device != q.device:
        raise ValueError(f"{op}: offsets is on {offsets.device} but q is on {q.device}")
    _check_max_seqlen(op, max_seqlen)
    out, lse = _shared_context_attention(q, k, v, offsets, max_seqlen, _scale(op, softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out
