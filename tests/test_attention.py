"""fastjepa.ops.varlen_attention and shared_context_attention on every usable backend against a
per-sequence fp64 reference written here. On the CPU the triton backend runs in the
interpreter (fp32, fp16); on a GPU it runs in bf16 and fp16.

Tolerance (the project's rule for low-precision kernels): the error against the fp64 reference may be at most 3 times the error
of the same attention computed by PyTorch in the inputs' dtype (scores and the weighted sum
in that dtype, softmax in fp32), plus ROUNDINGS roundings of the largest value (16 in fp32,
1 in fp16/bf16). The log-sum-exp is compared with the fp64 one directly.
"""

import pytest
import torch
from conftest import DEVICE, backend_or_skip

from fastjepa.ops import BackendError, shared_context_attention, use_backend, varlen_attention

DTYPES = [torch.float32, torch.float16] if DEVICE.type == "cpu" else [torch.bfloat16, torch.float16]
HEAD_DIMS = [24, 32, 64, 80, 88, 128]
# roundings of the largest value allowed on top of 3 x PyTorch's error: in fp32 the backward's
# delta = rowsum(dO * O) form cancels a few ulps more than autograd's softmax backward
ROUNDINGS = {torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}


def segments_varlen(lengths):
    """[(query range, [key ranges])] for independent sequences."""
    out, start = [], 0
    for n in lengths:
        out.append(((start, start + n), [(start, start + n)]))
        start += n
    return out


def segments_shared(layout):
    """layout: per sample (context length, [block lengths])."""
    out, start = [], 0
    for ctx, blocks in layout:
        context = (start, start + ctx)
        out.append((context, [context]))
        position = start + ctx
        for n in blocks:
            out.append(((position, position + n), [context, (position, position + n)]))
            position += n
        start = position
    return out


def offsets_for(layout):
    rows, start = [], 0
    for ctx, blocks in layout:
        row = [start, start + ctx]
        for n in blocks:
            row.append(row[-1] + n)
        rows.append(row)
        start = row[-1]
    return torch.tensor(rows, dtype=torch.int32)


def attention(q, k, v, segments, scale, dtype):
    """Per segment: scores and weighted sum in ``dtype``, softmax in fp32 (fp64 for fp64)."""
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for (qs, qe), ranges in segments:
        keys = torch.cat([torch.arange(a, b) for a, b in ranges]).to(q.device)
        if qe == qs or len(keys) == 0:
            continue
        qq, kk, vv = (t.to(dtype).transpose(0, 1) for t in (q[qs:qe], k[keys], v[keys]))
        scores = (qq @ kk.transpose(1, 2)) * scale
        soft = torch.promote_types(dtype, torch.float32)
        p = torch.softmax(scores.to(soft), dim=-1).to(dtype)
        out[qs:qe] = (p @ vv).transpose(0, 1)
        lse[:, qs:qe] = torch.logsumexp(scores.double(), dim=-1)
    return out, lse


def check_against_reference(op_call, q, k, v, segments, dtype):
    D = q.shape[-1]
    scale = D**-0.5
    g = torch.Generator().manual_seed(torch.seed())
    grad_out = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    out, lse = op_call(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention(*leaves64, segments, scale, torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    base, _ = attention(*low, segments, scale, dtype)
    base_grads = torch.autograd.grad(base, low, grad_out)

    eps = torch.finfo(dtype).eps
    for name, got, want, same_dtype in [("out", out, ref, base)] + [
        (f"d{n}", a, b, c) for n, a, b, c in zip("qkv", grads, ref_grads, base_grads)
    ]:
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not got.isnan().any(), f"{name}: NaN (an element not written?)"
        err = (got.double() - want).abs().max().item()
        base_err = (same_dtype.double() - want).abs().max().item()
        slack = ROUNDINGS[dtype] * eps * max(1.0, want.abs().max().item())
        assert err <= 3 * base_err + slack, f"{name}: error {err:.3g} > 3 x PyTorch {dtype} error {base_err:.3g} + {slack:.3g}"
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    lse_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=lse_tol, atol=lse_tol)


def packed(total, heads, head_dim, dtype, seed=None):
    g = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    return [torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_odd_lengths_every_head_dim(backend, head_dim, dtype, poisoned_empty):
    lengths = [1, 7, 97]
    q, k, v = packed(sum(lengths), 2, head_dim, dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    with use_backend(backend):
        check_against_reference(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), return_lse=True),
                                q, k, v, segments_varlen(lengths), dtype)


@pytest.mark.parametrize("lengths", [[257], [1] * 20 + [3] * 5, [2, 0, 65, 64, 1]], ids=["one-long", "many-short", "with-empty"])
@pytest.mark.parametrize("head_dim", [24, 80])
def test_varlen_long_short_and_empty_sequences(backend, lengths, head_dim, poisoned_empty):
    dtype = DTYPES[0]
    q, k, v = packed(sum(lengths), 3, head_dim, dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    with use_backend(backend):
        check_against_reference(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), return_lse=True),
                                q, k, v, segments_varlen(lengths), dtype)


@pytest.mark.parametrize(
    "layout",
    [[(9, [3, 4, 5])], [(0, [2, 3]), (40, [1, 70])], [(65, [1, 2]), (1, [7, 0])]],
    ids=["one-sample", "empty-context-and-long-block", "long-context"],
)
@pytest.mark.parametrize("head_dim", [24, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_context_matches_the_reference(backend, layout, head_dim, dtype, poisoned_empty):
    offsets = offsets_for(layout).to(DEVICE)
    total = int(offsets[-1, -1])
    max_len = max(max(c, *b) for c, b in layout)
    q, k, v = packed(total, 2, head_dim, dtype)
    with use_backend(backend):
        check_against_reference(lambda q, k, v: shared_context_attention(q, k, v, offsets, max_len, return_lse=True),
                                q, k, v, segments_shared(layout), dtype)


def test_shared_context_equals_varlen_on_context_plus_block_sequences(backend):
    """Block i's output equals varlen attention over [context ; block i] (context rows too, with no blocks)."""
    dtype = DTYPES[0]
    ctx, blocks = 11, [4, 6]
    q, k, v = (t.detach() for t in packed(ctx + sum(blocks), 2, 32, dtype, seed=3))
    offsets = torch.tensor([[0, ctx, ctx + 4, ctx + 10]], dtype=torch.int32, device=DEVICE)
    with use_backend(backend):
        shared = shared_context_attention(q, k, v, offsets, 11)
        for start, n in ((ctx, 4), (ctx + 4, 6)):
            rows = torch.cat([torch.arange(ctx), torch.arange(start, start + n)]).to(DEVICE)
            cu = torch.tensor([0, ctx + n], dtype=torch.int32, device=DEVICE)
            alone = varlen_attention(q[rows], k[rows], v[rows], cu, ctx + n)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(shared[start:start + n], alone[ctx:], rtol=tol, atol=tol)


def test_strided_inputs_from_a_fused_qkv_projection(backend):
    """q, k, v as views of one (T, 3, H, D) tensor, as the models produce them."""
    dtype = DTYPES[0]
    lengths = [5, 9]
    qkv = torch.randn(14, 3, 2, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
    with use_backend(backend):
        out = varlen_attention(q, k, v, cu, 9)
    ref, _ = attention(q.double(), k.double(), v.double(), segments_varlen(lengths), 24**-0.5, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- bad input


def _qkv(total=6, heads=2, head_dim=8):
    return [torch.randn(total, heads, head_dim) for _ in range(3)]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4), ValueError, "never decrease"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 4), ValueError, r"end at total_tokens \(6\)"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([1, 3, 6], dtype=torch.int32), 4), ValueError, "start at 0"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 1, 6], dtype=torch.int32), 4), ValueError, "max_seqlen 4 is smaller than a sequence"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 6]), 6), ValueError, "cu_seqlens must be a 1-D int32"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 6], dtype=torch.int32), 6.0), ValueError, "max_seqlen must be a non-negative Python int"),
        (lambda q, k, v: varlen_attention(q, k[:, :1], v, torch.tensor([0, 6], dtype=torch.int32), 6), ValueError, "one shape"),
        (lambda q, k, v: varlen_attention(q, k, v[..., :4], torch.tensor([0, 6], dtype=torch.int32), 6), ValueError, "one shape"),
        (lambda q, k, v: varlen_attention(q[0], k, v, torch.tensor([0, 6], dtype=torch.int32), 6), ValueError,
         r"q must be packed \(total_tokens, heads, head_dim\)"),
        (lambda q, k, v: varlen_attention(q, k.half(), v, torch.tensor([0, 6], dtype=torch.int32), 6), TypeError, "one dtype"),
        (lambda q, k, v: varlen_attention(q, k, v, torch.tensor([0, 6], dtype=torch.int32, device="meta"), 6), ValueError, "cu_seqlens is on meta"),
        (lambda q, k, v: shared_context_attention(q, k, v, torch.tensor([[0, 2, 1, 6]], dtype=torch.int32), 4), ValueError, "never decrease"),
        (lambda q, k, v: shared_context_attention(q, k, v, torch.tensor([[0, 2, 4], [3, 5, 6]], dtype=torch.int32), 4), ValueError, "chain the samples"),
        (lambda q, k, v: shared_context_attention(q, k, v, torch.tensor([[0, 2, 6]], dtype=torch.int32), 3), ValueError,
         "max_seqlen 3 is smaller than a context or block"),
        (lambda q, k, v: shared_context_attention(q, k, v, torch.tensor([[0, 6]], dtype=torch.int32), 6), ValueError, r"int32 \(B, M \+ 2\)"),
    ],
    ids=["cu-decreasing", "cu-end", "cu-start", "max-seqlen", "cu-int64", "max-seqlen-float", "heads", "head-dim", "q-2d",
         "dtypes", "devices", "offsets-decreasing", "offsets-chain", "offsets-max-seqlen", "offsets-shape"],
)
def test_bad_input_gets_a_clear_error(backend, call, error, match):
    with use_backend(backend), pytest.raises(error, match=match):
        call(*_qkv())


def test_forced_triton_names_an_unsupported_head_dim():
    backend_or_skip("triton")
    q, k, v = (torch.randn(4, 1, 160, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with use_backend("triton"), pytest.raises(BackendError, match="head_dim <= 128, got 160"):
        varlen_attention(q, k, v, cu, 4)
    with use_backend(None):  # automatic: falls back to the torch reference
        assert varlen_attention(q, k, v, cu, 4).shape == (4, 1, 160)


# ------------------------------------------------------------------- torch.library checks


def test_opcheck(backend):
    q, k, v = packed(9, 2, 16, torch.float32, seed=0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor([[0, 3, 5, 6], [6, 7, 8, 9]], dtype=torch.int32, device=DEVICE)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastjepa.varlen_attention.default, (q, k, v, cu, 5, 0.25))
        torch.library.opcheck(torch.ops.fastjepa.shared_context_attention.default, (q, k, v, offsets, 3, 0.25))


def test_compiles_without_graph_breaks():
    q, k, v = (t.detach().cpu().float().requires_grad_() for t in packed(9, 2, 16, torch.float32, seed=0))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, 5).square().sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v).backward()
    compiled = q.grad.clone()
    q.grad = None
    f(q, k, v).backward()
    assert torch.equal(compiled, q.grad)
