"""Masked-token gather: ``out[t] = src[row(t)] + pos[idx[t]]`` and its store-based backward.

Forward, one program per (BLOCK_T tokens, BLOCK_D channels) tile. Where a token's source
row comes from (SRC):
  GATHER     sample b = r % B of row r (r = t // K dense, or from ``token_row`` packed), token
             idx[t]: the encoder's context tokens and the target tokens;
  SAME_ROW   row t of a src shaped like the output: the predictor's ``x + pos[idx]``;
  ONE_ROW    src is a single row: the predictor's ``mask_token + pos[idx]``.
Arithmetic is in fp32; the result is rounded once to the output's dtype.

Backward of GATHER: one program per tile of src rows; ``inv[g * B * N + row]`` holds the
token that read that row under group g (several masks read one sample) or -1, so every
gradient row is written exactly once, zeros included, with plain stores (no atomics, no
separate zero-fill).
"""

import triton
import triton.language as tl

GATHER, SAME_ROW, ONE_ROW = 0, 1, 2


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 256)


# T, K and B change with the masks every step: not specializing on them keeps one compiled variant
@triton.jit(do_not_specialize=["T", "K", "B"])
def _gather_add_fwd(
    out_ptr, src_ptr, pos_ptr, idx_ptr, token_row_ptr,
    T, K, B, D,
    stride_src_b, stride_src_n, stride_src_d, stride_pos_n, stride_pos_d,
    SRC: tl.constexpr, HAS_POS: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    mask = t_ok[:, None] & (d < D)[None, :]
    n = tl.load(idx_ptr + t, mask=t_ok, other=0).to(tl.int64)
    if SRC == 0:
        if PACKED:
            r = tl.load(token_row_ptr + t, mask=t_ok, other=0).to(tl.int64)
        else:
            r = t.to(tl.int64) // K
        src_off = (r % B) * stride_src_b + n * stride_src_n
    elif SRC == 1:
        src_off = t.to(tl.int64) * stride_src_n
    else:
        src_off = tl.zeros([BLOCK_T], dtype=tl.int64)
    value = tl.load(src_ptr + src_off[:, None] + d[None, :] * stride_src_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        pos_off = n[:, None] * stride_pos_n + d[None, :] * stride_pos_d
        value += tl.load(pos_ptr + pos_off, mask=mask, other=0.0).to(tl.float32)
    out_off = t.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(out_ptr + out_off, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["ROWS"])
def _gather_bwd(
    grad_src_ptr, grad_out_ptr, inv_ptr,
    ROWS, D,
    GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = row < ROWS
    d_ok = (d < D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        t = tl.load(inv_ptr + g * ROWS + row, mask=row_ok, other=-1).to(tl.int64)
        read = (t >= 0)[:, None] & d_ok
        acc += tl.load(grad_out_ptr + t[:, None] * D + d[None, :], mask=read, other=0.0).to(tl.float32)
    dst = row.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(grad_src_ptr + dst, acc.to(grad_src_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def gather_add_fwd(out, src, pos, idx, token_row, src_mode: int, K: int, B: int) -> None:
    """Fill ``out`` (T, D) contiguous. ``src`` is (B, N, D) for GATHER, (T, D) for SAME_ROW,
    (D,) for ONE_ROW, any strides; ``pos`` (N, D) any strides, or None; ``idx`` (T,);
    ``token_row`` (T,) for packed GATHER, else None."""
    T, D = out.shape
    if T == 0 or D == 0:
        return
    if src_mode == GATHER:
        stride_b, stride_n = src.stride(0), src.stride(1)
    elif src_mode == SAME_ROW:
        stride_b, stride_n = 0, src.stride(0)
    else:
        stride_b, stride_n = 0, 0
    BLOCK_D = _block_d(D)
    BLOCK_T = max(1, 4096 // BLOCK_D)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _gather_add_fwd[grid](
        out, src, pos if pos is not None else src, idx, token_row if token_row is not None else idx,
        T, K, B, D,
        stride_b, stride_n, src.stride(-1), *(pos.stride() if pos is not None else (0, 0)),
        SRC=src_mode, HAS_POS=pos is not None, PACKED=token_row is not None,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )


def gather_bwd(grad_src, grad_out, inv, groups: int) -> None:
    """Fill ``grad_src`` (ROWS, D) contiguous from ``grad_out`` (T, D) contiguous and
    ``inv`` (groups * ROWS,) int32."""
    ROWS, D = grad_src.shape
    if ROWS == 0 or D == 0:
        return
    BLOCK_D = _block_d(D)
    BLOCK_R = max(1, 4096 // BLOCK_D)
    grid = (triton.cdiv(ROWS, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _gather_bwd[grid](grad_src, grad_out, inv, ROWS, D, GROUPS=groups, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
