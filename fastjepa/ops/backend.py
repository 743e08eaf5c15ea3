"""Which implementation runs an op: ``torch`` (the reference, every device), ``triton``
(``fastjepa.kernels``) or ``cuda`` (``fastjepa._C``).

The automatic choice is the fastest backend that can serve the call: on CUDA tensors
``cuda``, then ``triton``, then ``torch``; on the CPU ``torch`` (the Triton interpreter is a
test tool, never chosen automatically). ``FASTJEPA_BACKEND=torch|triton|cuda`` or
``use_backend(name)`` forces one; a forced backend that cannot serve a call raises
``BackendError`` saying why, in one line.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "FASTJEPA_BACKEND"

_forced: str | None = None


class BackendError(RuntimeError):
    """A forced backend cannot run an op on the tensors it was given."""


class use_backend:
    """Force a backend: ``use_backend("triton")`` for the rest of the process, or
    ``with use_backend("torch"): ...`` for a block. ``use_backend(None)`` restores the
    automatic choice. Takes precedence over ``FASTJEPA_BACKEND``."""

    def __init__(self, name: str | None):
        global _forced
        if name is not None and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} (or None for automatic)")
        self.previous, _forced = _forced, name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _forced
        _forced = self.previous


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``FASTJEPA_BACKEND``, or None (automatic)."""
    if _forced is not None:
        return _forced
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return None
    if name not in BACKENDS:
        raise BackendError(f"{ENV_VAR}={name!r} is not a backend: choose one of {', '.join(BACKENDS)}")
    return name


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install fails at import in many ways; report any of them
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def device_problem(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all (None when it can)."""
    if name == "torch":
        return None
    if name == "triton":
        problem = import_problem("triton")
        if problem:
            return f"triton is not importable ({problem}); pip install triton"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        if device.type == "cpu":
            return "Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 before importing fastjepa to run them in the CPU interpreter"
        return f"Triton kernels do not run on {device.type} tensors"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        problem = import_problem("fastjepa._C")
        if problem:
            return f"the CUDA extension fastjepa._C is not built ({problem})"
        return None
    raise ValueError(f"unknown backend {name!r}")


CUDA_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int32: "int32", torch.int64: "int64"}


@contextlib.contextmanager
def cuda_launch(device: torch.device) -> Iterator[int]:
    """For a ``fastjepa._C`` call: makes ``device`` current (the kernels launch on the current
    device) and yields the integer handle of its current stream."""
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def select(op: str, device: torch.device, call_problem: dict[str, Callable[[], str | None]], forced: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``.

    ``call_problem`` maps each backend that implements ``op`` to a function returning why it
    cannot serve this particular call (dtype, layout, ...) or None. ``forced`` (a backward
    pass: the backend forced when its forward ran) overrides ``forced_backend()``.
    """
    forced = forced or forced_backend()
    candidates = [forced] if forced else (["cuda", "triton", "torch"] if device.type == "cuda" else ["torch"])
    for name in candidates:
        if name not in call_problem:
            problem = f"{op} has no {name} implementation (it has: {', '.join(call_problem)})"
        else:
            problem = device_problem(name, device) or call_problem[name]()
        if problem is None:
            return name
        if forced:
            raise BackendError(f"{op}: backend {name!r} cannot run this call: {problem}")
    return "torch"


def device_check(ok: torch.Tensor, message: str) -> None:
    """A check of tensor values: ValueError on the CPU; on CUDA an asynchronous device assert
    (no host sync)."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_number(op: str, name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    """A host number (Python or NumPy, not a bool) in [low, high] and finite, as a float; else
    TypeError/ValueError naming ``name``. (A tensor's value is not checked here: that would
    cost a host sync.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__}")
    if not (low <= value <= high and math.isfinite(value)):
        allowed = f"in [{low:g}, {high:g}]" if high < math.inf else f"finite and >= {low:g}"
        raise ValueError(f"{op}: {name} must be {allowed}, got {value!r}")
    return float(value)


def tensor_list(op: str, name: str, tensors) -> list:
    """A sequence of tensors (a list, a tuple, ``model.parameters()``) as a list; a single
    tensor or a non-iterable raises TypeError naming ``name``."""
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, "__iter__"):
        got = "a single tensor (wrap it in a list)" if isinstance(tensors, torch.Tensor) else type(tensors).__name__
        raise TypeError(f"{op}: {name} must be a sequence of tensors, got {got}")
    return list(tensors)


def check_tensor_lists(op: str, lists: dict[str, list], device: torch.device | None, device_owner: str) -> None:
    """Validate parallel lists of tensors (one entry per parameter): every entry a float tensor
    on ``device`` (whose owner ``device_owner`` names; None: the first list's first tensor's),
    shaped like the same entry of the first list. Raises TypeError/ValueError naming the list
    and the index."""
    first_name, first = next(iter(lists.items()))
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name}[{i}] must be a float tensor, got {t.dtype}")
            device = t.device if device is None else device
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {device_owner} is on {device}: all tensors must share one device")
            if t.shape != first[i].shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but {first_name}[{i}] has {tuple(first[i].shape)}")
