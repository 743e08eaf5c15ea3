"""Flash attention over segments of packed tokens (varlen and shared-context), forward and backward.

A segment is a run of query tokens that attends to up to two key ranges of the same packed
tensors. The kernels read the segments straight from the op's index (``SHARED`` picks which):
  varlen, ``cu_seqlens`` (S + 1,) int32: segment s is sequence s, its own only key range;
  shared context, ``offsets`` (B, M + 2) int32: segments 0..B-1 are the samples' contexts
  (key range: the context), segment B + b * M + i is block i of sample b (key ranges: the
  context and block i), so a query tile visits exactly its key ranges and nothing else.
The backward's key tiles use the same segments: a context's keys are read by every query of
its sample, a block's keys by the block.

Forward: online softmax in base 2 (scores scaled by scale * log2(e)), fp32 accumulation;
the log-sum-exp is stored (natural log) for the backward, which computes rowsum(dO * O) in
one pass, then recomputes the probabilities: one kernel per key tile accumulates dK and dV
over the queries that read it, one per query tile accumulates dQ over its key ranges (no
atomics). Head dims that are not a power of two are padded in registers only (masked
loads), never in memory. Inputs may have any strides; outputs are contiguous (T, H, D).
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DELTA_BLOCK_M = 64  # query rows per program of the backward's rowsum(dO * O)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _tile_configs(tiles_by_arch: dict) -> list:
    """The autotuner's configs: every (BLOCK_M, BLOCK_N, num_warps, num_stages) tile of any target;
    one fixed config in the interpreter, which cannot autotune (it has no GPU to time on)."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
    tiles = dict.fromkeys(tile for tiles in tiles_by_arch.values() for tile in tiles)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _tiles_of_target(tiles_by_arch: dict):
    """The autotuner's pruning: only the tiles of the GPU it runs on (sm_80 to sm_89 take the
    sm_80 tiles; sm_90 and newer the sm_90 tiles, checked for sm_90 only)."""

    def prune(configs, named_args, **kwargs):
        arch = triton.runtime.driver.active.get_current_target().arch
        tiles = tiles_by_arch[90 if arch >= 90 else 80]
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles]

    return prune


def _autotune(tiles_by_arch: dict):
    return triton.autotune(configs=_tile_configs(tiles_by_arch), key=["HEAD_DIM", "H"],
                           prune_configs_by={"early_config_prune": _tiles_of_target(tiles_by_arch)})


# Each kernel's tiles per target: only tiles that compile at every head dim up to 128, varlen and
# shared, without spilling registers and with every tl.dot on tensor cores (on sm_90 wgmma, which
# needs 64 rows per warpgroup). benchmarks/compile_report.py reads this from the real compiler;
# tests/test_kernel_compile.py keeps it so. The dK/dV kernel holds two fp32 (BLOCK_N, BLOCK_D)
# accumulators plus K and V: it needs 8 warps to stay in registers. On sm_80, whose mma.sync keeps
# its operands in registers too, the tiles are smaller.
FWD_TILES = {90: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
             80: [(64, 64, 8, 3), (64, 64, 8, 2), (32, 32, 4, 3)]}
DKDV_TILES = {90: [(64, 64, 8, 2), (64, 64, 8, 3)],
              80: [(32, 64, 8, 2), (32, 64, 8, 3), (64, 32, 8, 3)]}
DQ_TILES = {90: [(64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)],
            80: [(64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2)]}
# T, B and M change with the masks every step: not specializing on them (divisibility by 16)
# keeps one compiled variant per config, which a cache warmed ahead of a GPU run then holds.
_VARYING = ["T", "B", "M"]


@triton.jit
def _load_rows(ptr, offs, row_ok, h, stride_t, stride_h, stride_d, offs_d, HEAD_DIM: tl.constexpr):
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptr + offs[:, None].to(tl.int64) * stride_t + h * stride_h + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _q_segment(index, seg, B, M, SHARED: tl.constexpr):
    """Segment ``seg``'s query range and its key ranges (the second one empty for varlen and contexts)."""
    if SHARED:
        sample = tl.where(seg < B, seg, (seg - B) // M)
        row = index + sample * (M + 2)
        kv0_start = tl.load(row)
        kv0_end = tl.load(row + 1)
        if seg < B:  # a context: attends to itself
            q_start, q_end = kv0_start, kv0_end
            kv1_start, kv1_end = kv0_start, kv0_start
        else:  # block i: attends to the context and to itself
            i = (seg - B) % M
            q_start = tl.load(row + 1 + i)
            q_end = tl.load(row + 2 + i)
            kv1_start, kv1_end = q_start, q_end
    else:
        q_start = tl.load(index + seg)
        q_end = tl.load(index + seg + 1)
        kv0_start, kv0_end = q_start, q_end
        kv1_start, kv1_end = q_start, q_start
    return q_start, q_end, kv0_start, kv0_end, kv1_start, kv1_end


@triton.jit
def _kv_segment(index, seg, B, M, SHARED: tl.constexpr):
    """Segment ``seg``'s key range and the query range that reads it."""
    if SHARED:
        sample = tl.where(seg < B, seg, (seg - B) // M)
        row = index + sample * (M + 2)
        if seg < B:  # a context's keys: read by every query of the sample
            kv_start = tl.load(row)
            kv_end = tl.load(row + 1)
            q_start, q_end = kv_start, tl.load(row + M + 1)
        else:  # block i's keys: read by the block
            i = (seg - B) % M
            kv_start = tl.load(row + 1 + i)
            kv_end = tl.load(row + 2 + i)
            q_start, q_end = kv_start, kv_end
    else:
        kv_start = tl.load(index + seg)
        kv_end = tl.load(index + seg + 1)
        q_start, q_end = kv_start, kv_end
    return kv_start, kv_end, q_start, q_end


@triton.jit
def _fwd_range(acc, m_i, l_i, q, K, V, kv_start, kv_end, h, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
               qk_scale, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in tl.range(kv_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        k = _load_rows(K, offs_n, n_ok, h, stride_kt, stride_kh, stride_kd, offs_d, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, offs_n, n_ok, h, stride_vt, stride_vh, stride_vd, offs_d, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@_autotune(FWD_TILES)
@triton.jit(do_not_specialize=_VARYING)
def _attn_fwd(
    Q, K, V, O, LSE, index, B, M, T, H,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr,
):
    tile, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_end, kv0_start, kv0_end, kv1_start, kv1_end = _q_segment(index, seg, B, M, SHARED)
    if q_start + tile * BLOCK_M < q_end:
        offs_m = q_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_end
        q = _load_rows(Q, offs_m, m_ok, h, stride_qt, stride_qh, stride_qd, offs_d, HEAD_DIM)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K, V, kv0_start, kv0_end, h, stride_kt, stride_kh, stride_kd,
                                   stride_vt, stride_vh, stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_N)
        if SHARED:
            acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K, V, kv1_start, kv1_end, h, stride_kt, stride_kh, stride_kd,
                                       stride_vt, stride_vh, stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_N)
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        o_rows = offs_m[:, None].to(tl.int64) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
        tl.store(O + o_rows, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + h * T + offs_m, lse, mask=m_ok)


@_autotune(DKDV_TILES)
@triton.jit(do_not_specialize=_VARYING)
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, index, B, M, T, H,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr,
):
    tile, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_start, kv_end, q_start, q_end = _kv_segment(index, seg, B, M, SHARED)
    if kv_start + tile * BLOCK_N < kv_end:
        offs_n = kv_start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < kv_end
        k = _load_rows(K, offs_n, n_ok, h, stride_kt, stride_kh, stride_kd, offs_d, HEAD_DIM)
        v = _load_rows(V, offs_n, n_ok, h, stride_vt, stride_vh, stride_vd, offs_d, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in tl.range(q_start, q_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < q_end
            q = _load_rows(Q, offs_m, m_ok, h, stride_qt, stride_qh, stride_qd, offs_d, HEAD_DIM)
            do = _load_rows(DO, offs_m, m_ok, h, stride_dot, stride_doh, stride_dod, offs_d, HEAD_DIM)
            lse2 = tl.load(LSE + h * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + h * T + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dk *= sm_scale
        rows = offs_n[:, None].to(tl.int64) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
        mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + rows, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _bwd_delta(O, DO, DELTA, T, stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA (H, T) fp32 = rowsum(dO * O), read once in the inputs' dtype."""
    tile, h = tl.program_id(0), tl.program_id(1)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    o = _load_rows(O, offs_m, m_ok, h, stride_ot, stride_oh, stride_od, offs_d, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, offs_m, m_ok, h, stride_dot, stride_doh, stride_dod, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + h * T + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, K, V, kv_start, kv_end, h, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
              qk_scale, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in tl.range(kv_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        k = _load_rows(K, offs_n, n_ok, h, stride_kt, stride_kh, stride_kd, offs_d, HEAD_DIM)
        v = _load_rows(V, offs_n, n_ok, h, stride_vt, stride_vh, stride_vd, offs_d, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@_autotune(DQ_TILES)
@triton.jit(do_not_specialize=_VARYING)
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, index, B, M, T, H,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SHARED: tl.constexpr,
):
    tile, seg, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_end, kv0_start, kv0_end, kv1_start, kv1_end = _q_segment(index, seg, B, M, SHARED)
    if q_start + tile * BLOCK_M < q_end:
        offs_m = q_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_end
        q = _load_rows(Q, offs_m, m_ok, h, stride_qt, stride_qh, stride_qd, offs_d, HEAD_DIM)
        do = _load_rows(DO, offs_m, m_ok, h, stride_dot, stride_doh, stride_dod, offs_d, HEAD_DIM)
        lse2 = tl.load(LSE + h * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + h * T + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _dq_range(dq, q, do, lse2, delta, K, V, kv0_start, kv0_end, h, stride_kt, stride_kh, stride_kd,
                       stride_vt, stride_vh, stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_N)
        if SHARED:
            dq = _dq_range(dq, q, do, lse2, delta, K, V, kv1_start, kv1_end, h, stride_kt, stride_kh, stride_kd,
                           stride_vt, stride_vh, stride_vd, qk_scale, offs_d, HEAD_DIM, BLOCK_N)
        dq *= sm_scale
        rows = offs_m[:, None].to(tl.int64) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
        tl.store(DQ + rows, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


def _segments(index, shared: bool) -> tuple[int, int, int]:
    """(B, M, number of segments) of ``cu_seqlens`` (varlen) or ``offsets`` (B, M + 2) (shared)."""
    if shared:
        B, M = index.shape[0], index.shape[1] - 2
        return B, M, B * (M + 1)
    return 1, 1, index.shape[0] - 1


def attention_fwd(q, k, v, index, max_len: int, scale: float, shared: bool):
    """(out (T, H, D) contiguous, lse (H, T) fp32) for the segments of ``index``: ``cu_seqlens``
    (varlen) or, with ``shared``, the shared-context ``offsets``."""
    T, H, D = q.shape
    out = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    B, M, S = _segments(index, shared)
    if T == 0 or S == 0 or max_len == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    def grid(meta):
        return (triton.cdiv(max_len, meta["BLOCK_M"]), S, H)

    _attn_fwd[grid](
        q, k, v, out, lse, index.contiguous(), B, M, T, H, *q.stride(), *k.stride(), *v.stride(), scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), SHARED=shared,
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, index, max_len: int, scale: float, shared: bool):
    """(dq, dk, dv), each (T, H, D) contiguous in q's dtype. Every row is written: the segments
    cover every token (the op checks the offsets)."""
    T, H, D = q.shape
    dq, dk, dv = (torch.empty((T, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    if T == 0 or max_len == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((H, T), device=q.device, dtype=torch.float32)
    _bwd_delta[(triton.cdiv(T, DELTA_BLOCK_M), H)](
        out, grad_out, delta, T, *out.stride(), *grad_out.stride(), HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=_block_d(D),
    )
    B, M, S = _segments(index, shared)
    index = index.contiguous()
    common = (index, B, M, T, H, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), scale * LOG2E, scale)
    _bwd_dkdv[lambda meta: (triton.cdiv(max_len, meta["BLOCK_N"]), S, H)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, HEAD_DIM=D, BLOCK_D=_block_d(D), SHARED=shared,
    )
    _bwd_dq[lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), S, H)](
        q, k, v, grad_out, lse, delta, dq, *common, HEAD_DIM=D, BLOCK_D=_block_d(D), SHARED=shared,
    )
    return dq, dk, dv
