"""fastjepa.ops.ema_update_ on every usable backend against the fp64 update
``m * t + (1 - m) * o`` computed here.

Tolerance: the fp32 target may differ from the fp64 value by a few fp32 roundings (the
torch backend rounds after the multiply and after the add, the kernel may fuse them):
rtol = atol = 4 * fp32 epsilon relative to the inputs' magnitude. A shadow must equal the
new fp32 target rounded to its dtype exactly (fp16 on the CPU, where the interpreter
rounds bf16 differently from the GPU; bf16 on the GPU).
"""

import pytest
import torch
from conftest import DEVICE

from fastjepa.ops import BackendError, ema_update_, use_backend

CHUNK = 16384  # kernels.ema.CHUNK: sizes below cross its boundary
SIZES = [(1,), (0,), (17,), (5, 3), (CHUNK + 3,), (2, 3, 7)]
SHADOW_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
ONLINE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def tensors(sizes, dtype, g):
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in sizes]


def expected(targets, onlines, m):
    return [m * t.double() + (1 - m) * o.double() for t, o in zip(targets, onlines)]


def assert_updated(actual, wanted, scale):
    for a, w in zip(actual, wanted):
        assert a.dtype == torch.float32 and not a.isnan().any()
        tol = 4 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(a.double(), w, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("online_dtype", ONLINE_DTYPES, ids=str)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_matches_the_fp64_update(backend, online_dtype, momentum_kind):
    g = torch.Generator().manual_seed(torch.seed())
    targets, onlines = tensors(SIZES, torch.float32, g), tensors(SIZES, online_dtype, g)
    m = 0.5 + 0.5 * torch.rand((), generator=g).item()
    wanted = expected(targets, onlines, m)
    momentum = m if momentum_kind == "float" else torch.tensor(m, device=DEVICE)
    with use_backend(backend):
        ema_update_(targets, onlines, momentum)
    assert_updated(targets, wanted, scale=4.0)


def test_shadow_holds_the_new_target_in_its_dtype(backend, poisoned_empty):
    g = torch.Generator().manual_seed(torch.seed())
    targets, onlines = tensors(SIZES, torch.float32, g), tensors(SIZES, torch.float32, g)
    shadows = [torch.empty(t.shape, device=DEVICE, dtype=SHADOW_DTYPE) for t in targets]  # NaN-poisoned
    with use_backend(backend):
        ema_update_(targets, onlines, torch.tensor(0.9, device=DEVICE), shadows)
    for t, s in zip(targets, shadows):
        assert s.dtype == SHADOW_DTYPE and torch.equal(s, t.to(SHADOW_DTYPE))


def test_a_new_momentum_value_and_new_tensors_are_used(backend):
    """The kernel caches address tables: a new momentum (same tensors) and new tensors
    (same sizes) must both take effect."""
    g = torch.Generator().manual_seed(torch.seed())
    momentum = torch.tensor(0.0, device=DEVICE)
    for m in (0.25, 0.75):
        targets, onlines = tensors([(33,), (4, 4)], torch.float32, g), tensors([(33,), (4, 4)], torch.float32, g)
        for step_m in (m, m / 2):
            wanted = expected(targets, onlines, step_m)
            momentum.fill_(step_m)
            with use_backend(backend):
                ema_update_(targets, onlines, momentum)
            assert_updated(targets, wanted, scale=4.0)


def test_momentum_one_keeps_the_target_and_zero_copies_the_online(backend):
    g = torch.Generator().manual_seed(torch.seed())
    targets, onlines = tensors(SIZES, torch.float32, g), tensors(SIZES, torch.float32, g)
    before = [t.clone() for t in targets]
    with use_backend(backend):
        ema_update_(targets, onlines, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(targets, before))
        ema_update_(targets, onlines, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(targets, onlines))


def test_empty_list_is_a_no_op(backend):
    with use_backend(backend):
        ema_update_([], [], 0.5)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, error, match",
    [
        (lambda t, o: ([t], [o, o], 0.9, ()), ValueError, "1 target tensors but 2 online tensors"),
        (lambda t, o: ([t], [o[:2]], 0.9, ()), ValueError, r"onlines\[0\] has shape \(2,\) but targets\[0\] has \(3,\)"),
        (lambda t, o: ([t], [o.to("meta")], 0.9, ()), ValueError, "all tensors must share one device"),
        (lambda t, o: ([t], [o.long()], 0.9, ()), TypeError, r"onlines\[0\] must be a float tensor"),
        (lambda t, o: ([t], [o], torch.tensor([0.9]), ()), ValueError, "momentum must be a float or a 0-d float tensor"),
        (lambda t, o: ([t], [o], torch.tensor(0.9, device="meta"), ()), ValueError, "momentum is on meta"),
        (lambda t, o: ([t], [o], 0.9, [t, t]), ValueError, "2 shadow tensors for 1 targets"),
        (lambda t, o: ([t], [3.0], 0.9, ()), TypeError, r"onlines\[0\] is a float, not a tensor"),
    ],
    ids=["lengths", "shape", "devices", "int", "momentum-shape", "momentum-device", "shadows", "not-tensor"],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(case, error, match):
    t, o = torch.randn(3), torch.randn(3)
    before = t.clone()
    with pytest.raises(error, match=match):
        ema_update_(*case(t, o))
    assert torch.equal(t, before)


def test_forced_triton_names_what_it_cannot_serve():
    from conftest import backend_or_skip

    backend_or_skip("triton")
    with use_backend("triton"), pytest.raises(BackendError, match="float32 targets"):
        ema_update_([torch.randn(3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)], 0.5)
    with use_backend("triton"), pytest.raises(BackendError, match="contiguous"):
        ema_update_([torch.randn(4, 2).t()], [torch.randn(2, 4)], 0.5)


def test_opcheck(backend):
    g = torch.Generator().manual_seed(0)
    targets, onlines = tensors([(5,), (2, 3)], torch.float32, g), tensors([(5,), (2, 3)], torch.float32, g)
    shadows = [torch.zeros(t.shape, device=DEVICE, dtype=SHADOW_DTYPE) for t in targets]
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastjepa.ema_update_.default, (targets, onlines, torch.tensor(0.9, device=DEVICE), shadows))


def test_compiles_without_graph_breaks():
    targets, onlines = [torch.randn(4), torch.randn(2, 2)], [torch.randn(4), torch.randn(2, 2)]
    wanted = expected(targets, onlines, 0.75)

    def step(momentum):
        ema_update_(targets, onlines, momentum)

    torch.compile(step, backend="aot_eager", fullgraph=True)(torch.tensor(0.75))
    assert_updated(targets, wanted, scale=4.0)
