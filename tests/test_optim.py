"""fastjepa.ops.adamw_ema_: the torch backend against ``torch.optim.AdamW`` followed by
``ema_update_`` (bit for bit on the CPU, over several steps with changing schedules and two
parameter groups), and the cuda backend against the torch backend on a GPU.

Tolerance for the cuda backend: the GPU fuses multiply-adds, so each update may move by an
ulp or two: rtol = atol = 1e-6 on values of order 1 (parameters, targets, moments).
"""

import pytest
import torch
from conftest import DEVICE, backend_or_skip

from fastjepa.ops import BackendError, adamw_ema_, ema_update_, use_backend

SHAPES = [(5, 3), (17,), (4, 4, 3), (1,), (0,), (16384 + 9,)]
GROUPS = [0, 0, 1, 1, 0, 0]  # group 0 decayed, group 1 not (biases and 1-D parameters)


def fp32(value: float) -> float:
    """``value`` rounded to float32, so that the fp32 device tensors hold exactly AdamW's hyper-parameters."""
    return float(torch.tensor(value, dtype=torch.float32))


def state(shapes, g, device=DEVICE):
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    targets = [p + 0.1 * torch.randn(s, generator=g).to(device) for p, s in zip(params, shapes)]
    return params, targets


def schedule(step):
    """(lr, weight decay, momentum) at a step, as the trainer's schedules move them."""
    return fp32(1e-3 * (1 + step)), fp32(0.04 + 0.002 * step), fp32(0.99 + 0.001 * step)


@pytest.fixture(params=["torch", "cuda"])
def optim_backend(request):
    return backend_or_skip(request.param)


def test_torch_backend_equals_adamw_then_ema_bit_for_bit():
    g = torch.Generator().manual_seed(torch.seed())
    params, targets = state(SHAPES, g, "cpu")
    ref_params = [p.clone().requires_grad_() for p in params]
    ref_targets = [t.clone() for t in targets]
    decayed = [p for p, k in zip(ref_params, GROUPS) if k == 0]
    not_decayed = [p for p, k in zip(ref_params, GROUPS) if k == 1]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}], betas=(0.9, 0.95), eps=1e-6)
    exp_avgs, exp_avg_sqs = [torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES]
    step, lr, weight_decay = torch.zeros(()), torch.zeros(()), torch.zeros(2)

    for i in range(6):
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        lr_i, wd_i, m = schedule(i)
        optimizer.param_groups[0].update(lr=lr_i, weight_decay=wd_i)
        optimizer.param_groups[1].update(lr=lr_i)
        for p, grad in zip(ref_params, grads):
            p.grad = grad.clone()
        optimizer.step()
        with use_backend("torch"):
            ema_update_(ref_targets, [p.detach() for p in ref_params], m)
            lr.fill_(lr_i)
            weight_decay[0] = wd_i
            adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, GROUPS, betas=(0.9, 0.95), eps=1e-6,
                       targets=targets, momentum=torch.tensor(m))

    assert step.item() == 6
    for i, p in enumerate(ref_params):
        assert torch.equal(params[i], p.detach()), f"params[{i}]"
        assert torch.equal(targets[i], ref_targets[i]), f"targets[{i}]"
        if p.numel():
            assert torch.equal(exp_avgs[i], optimizer.state[p]["exp_avg"]), f"exp_avgs[{i}]"
            assert torch.equal(exp_avg_sqs[i], optimizer.state[p]["exp_avg_sq"]), f"exp_avg_sqs[{i}]"


def run_steps(backend, shapes, groups, steps, with_targets, shadow_dtype=None, misaligned=False, seed=0):
    """``steps`` adamw_ema_ steps on ``backend`` from a seeded state; returns every tensor."""
    g = torch.Generator().manual_seed(seed)
    params, targets = state(shapes, g)
    if misaligned:  # views one element into a buffer: addresses 4 bytes past 16-byte alignment
        params = [torch.cat([torch.zeros(1, device=DEVICE), p.reshape(-1)])[1:].view(p.shape) for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros(s, device=DEVICE) for s in shapes], [torch.zeros(s, device=DEVICE) for s in shapes]
    shadows = [torch.empty(s, device=DEVICE, dtype=shadow_dtype) for s in shapes] if shadow_dtype else []
    step = torch.zeros((), device=DEVICE)
    num_groups = max(groups) + 1
    with use_backend(backend):
        for i in range(steps):
            grads = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
            lr, wd, m = schedule(i)
            adamw_ema_(params, grads, exp_avgs, exp_avg_sqs, step, torch.full((num_groups,), lr, device=DEVICE),
                       torch.linspace(wd, 0, num_groups, device=DEVICE), groups, targets=targets if with_targets else (),
                       momentum=torch.tensor(m, device=DEVICE) if with_targets else None, shadows=shadows)
    return {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "targets": targets, "shadows": shadows, "step": [step]}


def assert_same_state(actual, expected):
    for name in expected:
        for i, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.dtype == e.dtype and not a.isnan().any(), f"{name}[{i}]"
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}[{i}]: {m}")


@pytest.mark.parametrize("with_targets", [True, False], ids=["with-targets", "adamw-only"])
def test_backend_matches_the_torch_backend(optim_backend, with_targets):
    expected = run_steps("torch", SHAPES, GROUPS, 3, with_targets)
    assert_same_state(run_steps(optim_backend, SHAPES, GROUPS, 3, with_targets), expected)


@pytest.mark.parametrize("shadow_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_shadow_holds_the_new_target_in_its_dtype(optim_backend, shadow_dtype):
    result = run_steps(optim_backend, SHAPES, GROUPS, 2, True, shadow_dtype)
    for t, s in zip(result["targets"], result["shadows"]):
        assert torch.equal(s, t.to(shadow_dtype))


def test_many_tensors_and_misaligned_addresses(optim_backend):
    """More tensors than one CUDA launch takes (255), odd sizes, views off 16-byte alignment."""
    shapes = [(n % 37 + 1,) for n in range(300)] + [(4096 + 3,)]
    groups = [n % 3 for n in range(len(shapes))]
    expected = run_steps("torch", shapes, groups, 2, True, torch.bfloat16, misaligned=True, seed=1)
    assert_same_state(run_steps(optim_backend, shapes, groups, 2, True, torch.bfloat16, misaligned=True, seed=1), expected)


def test_empty_lists_only_count_the_step(optim_backend):
    step = torch.zeros((), device=DEVICE)
    with use_backend(optim_backend):
        adamw_ema_([], [], [], [], step, 1e-3, 0.05)
    assert step.item() == 1


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (NaN equals NaN, -0.0 differs from +0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def test_skip_leaves_every_tensor_bit_for_bit_and_false_changes_nothing(optim_backend):
    """``skip`` true with NaN and inf gradients: every tensor (step, moments, params, targets,
    shadows) keeps its bits; ``skip`` false: the same bits as no ``skip`` at all."""
    state = run_steps(optim_backend, SHAPES, GROUPS, 2, True, torch.bfloat16)
    tensors = {name: [t.clone() for t in ts] for name, ts in state.items()}
    g = torch.Generator().manual_seed(5)

    def step(skip, grads):
        adamw_ema_(tensors["params"], grads, tensors["exp_avgs"], tensors["exp_avg_sqs"], tensors["step"][0],
                   torch.full((2,), 1e-3, device=DEVICE), torch.tensor([0.05, 0.0], device=DEVICE), GROUPS, targets=tensors["targets"],
                   momentum=torch.tensor(0.99, device=DEVICE), shadows=tensors["shadows"], skip=skip)

    with use_backend(optim_backend):
        bad = [torch.full(s, float("nan") if i % 2 else float("inf"), device=DEVICE) for i, s in enumerate(SHAPES)]
        step(torch.ones((), dtype=torch.bool, device=DEVICE), bad)
        for name, ts in state.items():
            assert all(torch.equal(bits(a), bits(b)) for a, b in zip(tensors[name], ts)), name
        grads = [torch.randn(s, generator=g).to(DEVICE) for s in SHAPES]
        step(torch.zeros((), dtype=torch.bool, device=DEVICE), grads)
        with_false = {name: [t.clone() for t in ts] for name, ts in tensors.items()}
        tensors = {name: [t.clone() for t in ts] for name, ts in state.items()}
        step(None, grads)
    for name, ts in with_false.items():
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(tensors[name], ts)), name
    assert tensors["step"][0].item() == 3


def test_skip_must_be_a_0d_bool_on_the_device():
    with pytest.raises(ValueError, match=r"skip must be a 0-d bool tensor on cpu, got torch.float32 of shape \(\) on cpu"):
        adamw_ema_(**_args(), skip=torch.zeros(()))


# ---------------------------------------------------------------------------- bad input


def _args():
    g = torch.Generator().manual_seed(0)
    params, grads = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)], [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    return dict(params=params, grads=grads, exp_avgs=[torch.zeros(3), torch.zeros(2, 2)],
                exp_avg_sqs=[torch.zeros(3), torch.zeros(2, 2)], step=torch.zeros(()), lr=1e-3, weight_decay=0.05)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(grads=a["grads"][:1]), ValueError, "1 grads for 2 params"),
        (lambda a: a.update(targets=[torch.zeros(3)]), ValueError, "1 targets for 2 params"),
        (lambda a: a.update(shadows=[torch.zeros(3), torch.zeros(2, 2)]), ValueError, "shadows need targets"),
        (lambda a: a.update(targets=[torch.zeros(3), torch.zeros(2, 2)]), ValueError, "targets need a momentum"),
        (lambda a: a.update(step=torch.zeros(1)), ValueError, "step must be a 0-d float tensor"),
        (lambda a: a.update(exp_avgs=[torch.zeros(3), torch.zeros(4)]), ValueError, r"exp_avgs\[1\] has shape \(4,\)"),
        (lambda a: a.update(grads=[torch.randn(3).double(), torch.randn(2, 2)]), TypeError, r"grads\[0\] is torch.float64"),
        (lambda a: a.update(grads=[torch.randn(3).to("meta"), torch.randn(2, 2)]), ValueError, "all tensors must share one device"),
        (lambda a: a.update(params=[torch.ones(3, dtype=torch.int64), torch.randn(2, 2)]), TypeError, r"params\[0\] must be a float"),
        (lambda a: a.update(lr=torch.ones(2, 2)), ValueError, "lr must be a float or a 0-d or 1-D float tensor"),
        (lambda a: a.update(lr=torch.ones(2), weight_decay=torch.ones(3)), ValueError, "lr has 2 values and weight_decay 3"),
        (lambda a: a.update(groups=[0, 1]), ValueError, r"group indices must lie in \[0, 1\)"),
        (lambda a: a.update(groups=[0]), ValueError, "1 groups for 2 params"),
        (lambda a: a.update(betas=(0.9, 1.0)), ValueError, "betas must lie in"),
    ],
    ids=["lengths", "targets", "shadows", "momentum", "step", "shape", "dtype", "device", "int", "lr-shape", "groups-sizes",
         "group-index", "groups-length", "betas"],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(change, error, match):
    args = _args()
    change(args)
    before = [p.clone() for p in args["params"]]
    with pytest.raises(error, match=match):
        adamw_ema_(**args)
    assert all(torch.equal(p, b) for p, b in zip(args["params"], before)) and args["step"].item() == 0


def test_forced_triton_says_there_is_no_triton_implementation():
    with use_backend("triton"), pytest.raises(BackendError, match="adamw_ema_ has no triton implementation"):
        adamw_ema_(**_args())


def test_opcheck(optim_backend):
    g = torch.Generator().manual_seed(0)
    params, targets = state([(5,), (2, 3)], g)
    zeros = [torch.zeros_like(p) for p in params]
    args = (params, [torch.randn_like(p) for p in params], zeros, [z.clone() for z in zeros], torch.zeros((), device=DEVICE),
            torch.full((2,), 1e-3, device=DEVICE), torch.tensor([0.05, 0.0], device=DEVICE), [0, 1], 0.9, 0.999, 1e-8, targets,
            torch.tensor(0.99, device=DEVICE), [torch.zeros_like(t, dtype=torch.bfloat16) for t in targets])
    with use_backend(optim_backend):
        torch.library.opcheck(torch.ops.fastjepa.adamw_ema_.default, args)
        for skip in (True, False):
            torch.library.opcheck(torch.ops.fastjepa.adamw_ema_.default, (*args, torch.tensor(skip, device=DEVICE)))


def test_compiles_without_graph_breaks():
    eager, compiled = _args(), _args()
    for args in (eager, compiled):
        args["targets"] = [p + 1 for p in args["params"]]
    with use_backend("torch"):
        adamw_ema_(**eager, momentum=0.9)
        torch.compile(lambda m: adamw_ema_(**compiled, momentum=m), backend="aot_eager", fullgraph=True)(torch.tensor(0.9))
    for name in ("params", "exp_avgs", "exp_avg_sqs", "targets"):
        assert all(torch.equal(a, e) for a, e in zip(compiled[name], eager[name])), name
    assert compiled["step"].item() == eager["step"].item() == 1
