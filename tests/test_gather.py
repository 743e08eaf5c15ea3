"""fastjepa.ops.gather (gather_tokens, pos_tokens) on every usable backend against a
per-row fp64 reference written here. On the CPU the triton backend runs in the interpreter
(fp32 and fp16); bf16 runs on the GPU only.

Tolerances: the forward is one rounding of ``x + pos`` into the output dtype, so every
backend must match the fp64 reference rounded to that dtype exactly. The backward sums one
gradient row per mask: exact for one mask, fp32-accumulated then rounded once for several
(atol/rtol = the output dtype's epsilon).
"""

import pytest
import torch
from conftest import DEVICE

from fastjepa.ops import BackendError, gather_tokens, pos_tokens, use_backend

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])

# (B, N, D, K, masks): D around and above the 256-wide block, K = 1, K = N, B = 1
DENSE_SHAPES = [(1, 1, 1, 1, 1), (2, 7, 37, 7, 1), (3, 16, 300, 5, 2), (4, 9, 5, 1, 3), (1, 12, 64, 12, 4)]


def random_masks(B, N, K, masks, generator):
    """(masks * B, K) int32: each row distinct token ids, rows mask-major."""
    return torch.stack([torch.randperm(N, generator=generator)[:K] for _ in range(masks * B)]).to(torch.int32)


def reference_gather(x, idx, pos, cu_seqlens):
    """fp64, one row at a time: token k of row r is x[r % B, idx] (+ pos[idx])."""
    B = x.shape[0]
    x64 = x.double()
    rows = idx.long().unsqueeze(-1) if cu_seqlens is None else [idx[s:e].long() for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    out = []
    for r, tokens in enumerate(idx.long() if cu_seqlens is None else rows):
        piece = x64[r % B, tokens]
        if pos is not None:
            piece = piece + pos.double()[tokens]
        out.append(piece)
    return torch.stack(out) if cu_seqlens is None else torch.cat(out)


def assert_exact(actual, expected_fp64, dtype):
    assert actual.dtype == dtype
    assert not actual.isnan().any(), "an output element was not written"
    torch.testing.assert_close(actual, expected_fp64.to(dtype), rtol=0, atol=0)


def out_dtype(x_dtype, pos_dtype):
    return torch.promote_types(x_dtype, pos_dtype) if pos_dtype is not None else x_dtype


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "B{}N{}D{}K{}M{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_dense_forward_and_backward_match_the_fp64_reference(backend, shape, dtype, with_pos, poisoned_empty):
    B, N, D, K, masks = shape
    g = torch.Generator().manual_seed(torch.seed())
    x = torch.randn(B, N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    pos = torch.randn(N, D, generator=g).to(DEVICE, torch.float32) if with_pos else None
    idx = random_masks(B, N, K, masks, g).to(DEVICE)

    with use_backend(backend):
        out = gather_tokens(x, idx, pos)
        grad_out = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
        (grad_x,) = torch.autograd.grad(out, x, grad_out)

    assert out.shape == (masks * B, K, D)
    assert_exact(out, reference_gather(x.detach(), idx, pos, None), out_dtype(dtype, pos.dtype if with_pos else None))
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference_gather(x64, idx, None, None), x64, grad_out.double())
    assert grad_x.dtype == dtype and not grad_x.isnan().any()
    tol = 2 * masks * torch.finfo(dtype).eps  # fp32 sum of `masks` rows, then one rounding to dtype
    torch.testing.assert_close(grad_x.double(), expected.to(dtype).double(), rtol=tol, atol=tol * grad_out.abs().max().item())


@pytest.mark.parametrize("lengths", [[1], [7, 0, 3], [1] * 9, [97], [5, 16, 2, 11]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_ragged_forward_and_backward_match_the_fp64_reference(backend, lengths, dtype, poisoned_empty):
    g = torch.Generator().manual_seed(torch.seed())
    B = 1 if len(lengths) == 1 else (len(lengths) // 2 if len(lengths) % 2 == 0 else len(lengths))
    N, D = max(lengths) + 3, 24
    x = torch.randn(B, N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    pos = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    idx = torch.cat([torch.randperm(N, generator=g)[:n] for n in lengths]).to(DEVICE)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)

    with use_backend(backend):
        out = gather_tokens(x, idx, pos, cu_seqlens)
        grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
        (grad_x,) = torch.autograd.grad(out, x, grad_out)

    assert out.shape == (sum(lengths), D)
    assert_exact(out, reference_gather(x.detach().cpu(), idx.cpu(), pos.cpu(), cu_seqlens.cpu()).to(DEVICE), dtype)
    x64 = x.detach().cpu().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference_gather(x64, idx.cpu(), None, cu_seqlens.cpu()), x64, grad_out.cpu().double())
    eps = torch.finfo(dtype).eps
    assert not grad_x.isnan().any()
    torch.testing.assert_close(grad_x.cpu().double(), expected.to(dtype).double(), rtol=eps, atol=eps)


@pytest.mark.parametrize("transposed", [False, True], ids=["unit-d-stride", "transposed"])
def test_strided_x_and_a_strided_1_n_d_pos_table(backend, transposed):
    g = torch.Generator().manual_seed(torch.seed())
    big = torch.randn(6, 40, 40, generator=g).to(DEVICE)
    x = big[::2, ::4, 3:36]  # (3, 10, 33), strides in B and N
    if transposed:  # the patch embedding's output: a (B, D, N) tensor seen as (B, N, D)
        x = big[::2, 3:36, ::4].transpose(1, 2)
    pos = torch.randn(1, 33, 10, generator=g).to(DEVICE).transpose(1, 2)
    idx = random_masks(3, 10, 4, 1, g).to(DEVICE).long()
    with use_backend(backend):
        out = gather_tokens(x, idx, pos)
    assert_exact(out, reference_gather(x, idx, pos[0], None), torch.float32)


def test_empty_masks_give_empty_tokens_and_zero_gradients(backend):
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    idx = torch.empty(2, 0, dtype=torch.int32, device=DEVICE)
    with use_backend(backend):
        out = gather_tokens(x, idx, torch.randn(5, 8, device=DEVICE))
        assert out.shape == (2, 0, 8)
        (grad_x,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad_x, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_row", [True, False], ids=["mask_token", "same_shape"])
def test_pos_tokens_forward_and_backward(backend, dtype, one_row, poisoned_empty):
    g = torch.Generator().manual_seed(torch.seed())
    N, D, R, K = 11, 45, 6, 5
    pos = torch.randn(1, N, D, generator=g).to(DEVICE)  # fp32 table, as the models keep it
    idx = random_masks(R, N, K, 1, g).to(DEVICE)
    base = torch.randn((D,) if one_row else (R, K, D), generator=g).to(DEVICE, dtype).requires_grad_()
    with use_backend(backend):
        out = pos_tokens(base, idx, pos)
        grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
        (grad_base,) = torch.autograd.grad(out, base, grad_out)

    expected = base.detach().double() + pos[0].double()[idx.long()]
    assert out.shape == (R, K, D)
    assert_exact(out, expected, dtype)  # base's dtype: the in-place ``x += pos[idx]`` of the reference
    expected_grad = grad_out.double().reshape(-1, D).sum(0) if one_row else grad_out.double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad_base.double(), expected_grad.to(dtype).double(), rtol=4 * eps, atol=4 * eps * R * K)


def test_trainable_pos_table_gets_its_gradient(backend):
    g = torch.Generator().manual_seed(torch.seed())
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64 if backend == "torch" else torch.float32).to(DEVICE)
    pos = torch.randn(6, 4, generator=g, dtype=x.dtype).to(DEVICE).requires_grad_()
    idx = random_masks(2, 6, 3, 2, g).to(DEVICE)
    with use_backend(backend):
        (grad_pos,) = torch.autograd.grad(gather_tokens(x, idx, pos).square().sum(), pos)
    pos_ref = pos.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference_gather(x, idx, pos_ref, None).square().sum(), pos_ref)
    torch.testing.assert_close(grad_pos.double(), expected, rtol=1e-5, atol=1e-5)


def test_duplicate_indices_in_one_sample_are_refused_by_the_store_based_backward():
    backend = "triton"
    from conftest import backend_or_skip

    backend_or_skip(backend)
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA the check is an asynchronous device assert, which would poison the test process")
    x = torch.randn(1, 4, 8, requires_grad=True)
    idx = torch.tensor([[1, 1]], dtype=torch.int32)
    with use_backend(backend):
        out = gather_tokens(x, idx)
        with pytest.raises(ValueError, match="unique within each sample"):
            out.sum().backward()


def test_duplicate_indices_sum_their_gradients_on_the_torch_backend():
    x = torch.randn(1, 4, 3, requires_grad=True)
    with use_backend("torch"):
        gather_tokens(x, torch.tensor([[2, 2, 0]])).sum().backward()
    assert x.grad[0, :, 0].tolist() == [1.0, 0.0, 2.0, 0.0]


# ---------------------------------------------------------------------------- bad input


def _good():
    return torch.randn(2, 5, 8), torch.tensor([[0, 4], [1, 2]], dtype=torch.int32), torch.randn(5, 8)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, i, p: (x.long(), i, p), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (lambda x, i, p: (x, i.float(), p), TypeError, "idx must be int32 or int64"),
        (lambda x, i, p: (x[0], i, p), ValueError, r"x must be \(B, N, D\)"),
        (lambda x, i, p: (x, i[0], p), ValueError, r"idx must be \(R, K\)"),
        (lambda x, i, p: (x, i[:1], p), ValueError, "positive multiple of the batch size"),
        (lambda x, i, p: (x, i, p[:, :3]), ValueError, r"pos must be \(N, 8\)"),
        (lambda x, i, p: (x, i, p[:3]), ValueError, "pos has 3 rows but x has 5 tokens"),
        (lambda x, i, p: (x, i.to("meta"), p), ValueError, "different devices"),
        (lambda x, i, p: (x, i + 4, p), IndexError, r"indices must lie in \[0, 5\), got values from 4 to 8"),
        (lambda x, i, p: (x, i - 1, p), IndexError, "got values from -1"),
    ],
    ids=["x-int", "idx-float", "x-2d", "idx-1d", "rows", "pos-width", "pos-rows", "devices", "idx-high", "idx-neg"],
)
def test_bad_input_gets_a_clear_error(backend, change, error, match):
    x, idx, pos = change(*_good())
    with use_backend(backend), pytest.raises(error, match=match):
        gather_tokens(x, idx, pos)


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([0, 2, 4], dtype=torch.int64), "cu_seqlens must be int32"),
        (torch.tensor([0, 3, 2], dtype=torch.int32), "never decrease"),
        (torch.tensor([1, 2, 4], dtype=torch.int32), "start at 0"),
        (torch.tensor([0, 2, 3], dtype=torch.int32), "end at the number of tokens"),
    ],
    ids=["int64", "decreasing", "start", "end"],
)
def test_bad_cu_seqlens_gets_a_clear_error(backend, cu, match):
    x = torch.randn(2, 5, 8)
    with use_backend(backend), pytest.raises(ValueError, match=match):
        gather_tokens(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32), None, cu)


def test_pos_tokens_bad_input():
    pos = torch.randn(5, 8)
    idx = torch.tensor([[0, 4]])
    with pytest.raises(ValueError, match=r"base must be \(D,\) or idx.shape"):
        pos_tokens(torch.randn(3, 8), idx, pos)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 5\)"):
        pos_tokens(torch.randn(8), idx + 1, pos)
    with pytest.raises(ValueError, match="must be contiguous"):
        pos_tokens(torch.randn(1, 4, 8)[:, ::2], torch.tensor([[0, 1]]), pos)


def test_forced_triton_refuses_float64_with_the_reason():
    backend_name = "triton"
    from conftest import backend_or_skip

    backend_or_skip(backend_name)
    with use_backend(backend_name), pytest.raises(BackendError, match="float16, bfloat16 and float32"):
        gather_tokens(torch.randn(1, 3, 4, dtype=torch.float64), torch.tensor([[0]]))


# ------------------------------------------------------------------- torch.library checks


def test_opcheck(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g).to(DEVICE).requires_grad_()
    pos = torch.randn(6, 5, generator=g).to(DEVICE)
    idx = random_masks(2, 6, 3, 2, g).to(DEVICE)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32, device=DEVICE)
    flat = torch.tensor([0, 5, 1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    base = torch.randn(4, 3, 5, generator=g).to(DEVICE).requires_grad_()
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastjepa.gather_tokens.default, (x, idx, pos, None))
        torch.library.opcheck(torch.ops.fastjepa.gather_tokens.default, (x, flat, pos, cu))
        torch.library.opcheck(torch.ops.fastjepa.pos_tokens.default, (base, idx, pos))
        torch.library.opcheck(torch.ops.fastjepa.pos_tokens.default, (base[0, 0].detach().requires_grad_(), idx, pos))


def test_compiles_without_graph_breaks():
    def tokens(x, idx, pos, mask_token):
        context = gather_tokens(x, idx, pos)
        return pos_tokens(context, idx, pos).sum() + pos_tokens(mask_token, idx, pos).sum()

    x = torch.randn(2, 6, 5, requires_grad=True)
    mask_token = torch.randn(5, requires_grad=True)
    idx = random_masks(2, 6, 3, 1, torch.Generator().manual_seed(0))
    pos = torch.randn(6, 5)
    compiled = torch.compile(tokens, backend="aot_eager", fullgraph=True)
    compiled(x, idx, pos, mask_token).backward()
    grads = x.grad.clone(), mask_token.grad.clone()
    x.grad = mask_token.grad = None
    tokens(x, idx, pos, mask_token).backward()
    assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], mask_token.grad)


def test_backward_runs_on_the_backend_forced_at_the_forward(monkeypatch):
    from fastjepa.ops import backend as backend_module

    chosen = []
    real_select = backend_module.select

    def spy(op, device, problems, forced=None):
        chosen.append(real_select(op, device, problems, forced))
        return chosen[-1]

    monkeypatch.setattr("fastjepa.ops.gather.select", spy)
    x = torch.randn(2, 5, 3, requires_grad=True)
    with use_backend("torch"):
        out = gather_tokens(x, torch.tensor([[0, 1], [2, 3]]))
    with use_backend("cuda"):  # would fail if the backward asked for the current choice
        out.sum().backward()
    assert chosen == ["torch", "torch"]
