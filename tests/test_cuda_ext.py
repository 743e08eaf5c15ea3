"""fastjepa._C, the CUDA extension (csrc/).

Any machine where it is built (CI builds it without a GPU): it imports, reports its device
count, and every binding refuses bad arguments with TypeError/ValueError before any CUDA call
(on a machine without a GPU, a call that passes the checks reaches the launch and fails with
a RuntimeError naming the kernel, which proves the order). On a GPU: each kernel through its
op against the torch backend, at the sizes and layouts that take its vector and scalar paths
(odd sizes, misaligned views, one tensor and more tensors than one launch holds). The ops'
own tests (test_ema.py, test_gather.py, test_optim.py) also run the cuda backend there.
"""

import pytest
import torch
from conftest import DEVICE

from fastjepa.ops import ema_update_, gather_tokens, pos_tokens, use_backend

_C = pytest.importorskip(
    "fastjepa._C", reason="fastjepa._C is not built (install with nvcc on PATH, or FASTJEPA_BUILD_CUDA=1, to build it)"
)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to run the CUDA kernels")
A, B, C, D, E, F = (0x10000 * (i + 1) for i in range(6))  # addresses, 64 KiB-aligned; never dereferenced here


def test_device_count_is_zero_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert _C.device_count() == 0


@needs_gpu
def test_device_count_matches_torch():
    assert _C.device_count() == torch.cuda.device_count()


# --------------------------------------------------------------- bad input, no GPU needed


def ema_args(**change):
    args = dict(targets=[A, B], onlines=[C, D], shadows=[], numels=[3, 5], online_dtype="float32", shadow_dtype=None,
                momentum=E, stream=0)
    return {**args, **change}


def adamw_args(**change):
    args = dict(params=[A], grads=[B], exp_avgs=[C], exp_avg_sqs=[D], targets=[E], shadows=[], numels=[7], groups=[0],
                lr=F, weight_decay=F + 4, num_groups=1, step=F + 8, momentum=F + 12, beta1=0.9, beta2=0.999, eps=1e-8,
                shadow_dtype=None, skip=0, stream=0)
    return {**args, **change}


def gather_args(**change):
    args = dict(out=A, src=B, pos=C, idx=D, token_row=0, out_dtype="bfloat16", src_dtype="bfloat16", pos_dtype="bfloat16",
                idx_dtype="int32", mode=0, tokens=6, dim=8, k=3, batch=2, src_strides=(40, 8, 1), pos_strides=(8, 1), stream=0)
    return {**args, **change}


def gather_backward_args(**change):
    args = dict(grad_x=A, grad=B, inv=C, grad_x_dtype="bfloat16", grad_dtype="float32", rows=10, dim=8, groups=2, stream=0)
    return {**args, **change}


BAD_CALLS = {
    "ema-dtype-name": (_C.ema_update, ema_args(online_dtype="int8"), TypeError, "online_dtype must be 'float32', 'bfloat16' or 'float16', got 'int8'"),
    "ema-lengths": (_C.ema_update, ema_args(onlines=[C]), ValueError, "1 onlines for 2 numels"),
    "ema-misaligned-fp32": (_C.ema_update, ema_args(targets=[A, B + 2]), ValueError, r"targets\[1\] \(address 0x20002\) is not aligned to its 4-byte elements"),
    "ema-misaligned-bf16": (_C.ema_update, ema_args(onlines=[C, D + 1], online_dtype="bfloat16"), ValueError, "not aligned to its 2-byte elements"),
    "ema-null": (_C.ema_update, ema_args(targets=[0, B]), ValueError, r"targets\[0\] is a null address"),
    "ema-numel": (_C.ema_update, ema_args(numels=[3, -1]), ValueError, r"numels\[1\] = -1 is outside"),
    "ema-shadow-dtype": (_C.ema_update, ema_args(shadows=[A, B]), TypeError, "shadows given without a shadow_dtype"),
    "ema-momentum": (_C.ema_update, ema_args(momentum=0), ValueError, "momentum is a null address"),
    "ema-float-address": (_C.ema_update, ema_args(momentum=1.5), TypeError, "incompatible function arguments"),
    "adamw-groups-range": (_C.adamw_ema, adamw_args(groups=[1]), ValueError, r"groups\[0\] = 1 is outside \[0, 1\)"),
    "adamw-groups-length": (_C.adamw_ema, adamw_args(groups=[0, 0]), ValueError, "2 groups for 1 tensors"),
    "adamw-num-groups": (_C.adamw_ema, adamw_args(num_groups=0), ValueError, "num_groups must be at least 1"),
    "adamw-betas": (_C.adamw_ema, adamw_args(beta2=1.0), ValueError, r"betas must lie in \[0, 1\)"),
    "adamw-shadows": (_C.adamw_ema, adamw_args(targets=[], shadows=[A], shadow_dtype="bfloat16"), ValueError, "shadows need targets"),
    "adamw-lr": (_C.adamw_ema, adamw_args(lr=0), ValueError, "lr is a null address"),
    "adamw-lengths": (_C.adamw_ema, adamw_args(grads=[B, C]), ValueError, "2 grads for 1 numels"),
    "gather-out-dtype": (_C.gather_forward, gather_args(pos_dtype="float16", out_dtype="float16"), TypeError,
                         r"out_dtype must be src_dtype \(bfloat16\) or its promotion with pos_dtype \(float32\)"),
    "gather-idx-dtype": (_C.gather_forward, gather_args(idx_dtype="int16"), TypeError, "idx_dtype must be 'int32' or 'int64'"),
    "gather-mode": (_C.gather_forward, gather_args(mode=3), ValueError, "mode must be 0"),
    "gather-stride": (_C.gather_forward, gather_args(src_strides=(40, -8, 1)), ValueError, "src_strides must be non-negative"),
    "gather-strides-length": (_C.gather_forward, gather_args(src_strides=(8, 1)), TypeError, "incompatible function arguments"),
    "gather-token-row": (_C.gather_forward, gather_args(mode=1, token_row=E), ValueError, "token_row is for mode 0"),
    "gather-pos": (_C.gather_forward, gather_args(pos=0), ValueError, "give both pos and pos_dtype, or neither"),
    "gather-k": (_C.gather_forward, gather_args(k=0), ValueError, "k and batch must be positive"),
    "gather-idx-misaligned": (_C.gather_forward, gather_args(idx_dtype="int64", idx=D + 4), ValueError, "idx .* is not aligned to its 8-byte elements"),
    "backward-grad-dtype": (_C.gather_backward, gather_backward_args(grad_dtype="float16"), TypeError,
                            r"grad_dtype must be grad_x_dtype \(bfloat16\) or float32"),
    "backward-groups": (_C.gather_backward, gather_backward_args(groups=0), ValueError, "groups must be at least 1"),
    "backward-rows": (_C.gather_backward, gather_backward_args(rows=-1), ValueError, "rows and dim must be non-negative"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_arguments_raise_before_any_cuda_call(name):
    fn, kwargs, error, match = BAD_CALLS[name]
    with pytest.raises(error, match=match):
        fn(**kwargs)


GOOD_CALLS = {
    "ema_kernel": (_C.ema_update, ema_args(shadows=[A, B], shadow_dtype="bfloat16")),
    "adamw_ema_kernel": (_C.adamw_ema, adamw_args()),
    "gather_forward_kernel": (_C.gather_forward, gather_args()),
    "gather_backward_kernel": (_C.gather_backward, gather_backward_args()),
}


@pytest.mark.parametrize("kernel", GOOD_CALLS)
def test_without_a_gpu_a_valid_call_fails_at_the_launch_naming_the_kernel(kernel):
    if _C.device_count() > 0:
        pytest.skip("a GPU is present: the addresses here are fake and must not reach it")
    fn, kwargs = GOOD_CALLS[kernel]
    with pytest.raises(RuntimeError, match=f"CUDA error launching {kernel}: cuda"):
        fn(**kwargs)


def test_empty_work_launches_nothing():
    _C.ema_update([0], [0], [], [0], online_dtype="float32", shadow_dtype=None, momentum=E, stream=0)
    _C.gather_forward(**gather_args(out=0, src=0, idx=0, tokens=0))
    _C.gather_backward(**gather_backward_args(rows=0))


# ------------------------------------------------------------------------ on a GPU


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` one element into a buffer: contiguous but off 16-byte alignment."""
    buffer = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


@needs_gpu
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shadow_dtype", [None, torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
@pytest.mark.parametrize("count", [1, 1000], ids=["one-tensor", "1000-tensors"])
def test_ema_kernel(online_dtype, shadow_dtype, layout, count):
    """Odd sizes around the 8-element vectors and the 16384-element chunks; 1000 tensors take
    three launches (409 per list)."""
    g = torch.Generator().manual_seed(count)
    sizes = [16384 * 2 + 9] if count == 1 else [(i * 37) % 300 + 1 for i in range(count - 1)] + [16384 + 8]
    targets = [torch.randn(n, generator=g).to(DEVICE) for n in sizes]
    onlines = [torch.randn(n, generator=g).to(DEVICE, online_dtype) for n in sizes]
    if layout == "misaligned":
        targets, onlines = [misaligned(t) for t in targets], [misaligned(o) for o in onlines]
    shadows = [torch.full((n,), float("nan"), device=DEVICE, dtype=shadow_dtype) for n in sizes] if shadow_dtype else []
    m = 0.9961
    expected = [m * t.double() + (1 - m) * o.double() for t, o in zip(targets, onlines)]
    with use_backend("cuda"):
        ema_update_(targets, onlines, torch.tensor(m, device=DEVICE), shadows)
    tol = 4 * torch.finfo(torch.float32).eps
    for t, e in zip(targets, expected):
        torch.testing.assert_close(t.double(), e, rtol=tol, atol=tol * 4)
    for t, s in zip(targets, shadows):
        assert torch.equal(s, t.to(shadow_dtype))


@needs_gpu
@pytest.mark.parametrize(
    "x_dtype, pos_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
     (torch.bfloat16, None)],
    ids=str,
)
@pytest.mark.parametrize("D", [1280, 64, 37], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("layout", ["contiguous", "misaligned", "transposed"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_gather_kernels_equal_the_torch_backend(x_dtype, pos_dtype, D, layout, index_dtype):
    """Forward (dense with 2 masks, packed) and backward against the torch backend, exactly:
    both add in fp32 and round once. D=1280 and 64 take the 16-byte path when aligned."""
    g = torch.Generator().manual_seed(D)
    B, N, K = 3, 50, 17
    x = torch.randn(B, N, D, generator=g).to(DEVICE, x_dtype)
    if layout == "misaligned":
        x = misaligned(x)
    elif layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    pos = torch.randn(N, D, generator=g).to(DEVICE, pos_dtype) if pos_dtype else None
    dense = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2 * B)]).to(DEVICE, index_dtype)
    lengths = [5, 0, 17]
    packed = torch.cat([torch.randperm(N, generator=g)[:n] for n in lengths]).to(DEVICE, index_dtype)
    cu_seqlens = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=DEVICE)
    for idx, cu in ((dense, None), (packed, cu_seqlens)):
        results = {}
        for backend in ("torch", "cuda"):
            leaf = x.detach().requires_grad_()
            with use_backend(backend):
                out = gather_tokens(leaf, idx, pos, cu)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
                (grad_x,) = torch.autograd.grad(out, leaf, grad)
            results[backend] = out, grad_x
        assert torch.equal(results["cuda"][0], results["torch"][0])
        torch.testing.assert_close(results["cuda"][1], results["torch"][1], rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("one_row", [True, False], ids=["mask_token", "same_shape"])
def test_pos_tokens_kernel_equals_the_torch_backend(base_dtype, one_row):
    g = torch.Generator().manual_seed(0)
    N, D, R, K = 40, 1280, 6, 9
    pos = torch.randn(N, D, generator=g).to(DEVICE)  # fp32, as the models keep it
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(R)]).to(DEVICE, torch.int32)
    base = torch.randn((D,) if one_row else (R, K, D), generator=g).to(DEVICE, base_dtype)
    with use_backend("torch"):
        expected = pos_tokens(base, idx, pos)
    with use_backend("cuda"):
        assert torch.equal(pos_tokens(base, idx, pos), expected)
