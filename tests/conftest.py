"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET
must be set before any kernel module is imported, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fastjepa.ops.backend import device_problem  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_or_skip(name: str) -> str:
    """``name``, or skip the test with the reason the backend cannot run on DEVICE here."""
    problem = device_problem(name, DEVICE)
    if problem:
        pytest.skip(f"backend {name} unavailable: {problem}")
    return name


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request):
    return backend_or_skip(request.param)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every float ``torch.empty`` / ``empty_like`` NaN-filled, so an output element a
    kernel forgets to write fails the comparison instead of passing as leftover zeros."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py imported by path (benchmarks/ is scripts, not a package), with
    benchmarks/ on sys.path for their shared ``common`` module."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_as_ranks(world_size: int, fn) -> list:
    """``fn(rank, gather)`` in world_size threads, ``gather`` an all_gather_object between
    them (every rank's object, in rank order); the results in rank order."""
    barrier, box, results = threading.Barrier(world_size, timeout=60), [None] * world_size, [None] * world_size

    def rank(r):
        def gather(obj):
            box[r] = obj
            barrier.wait()
            parts = list(box)
            barrier.wait()
            return parts

        results[r] = fn(r, gather)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world_size)]  # a stuck rank cannot hold the exit
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def tensors(state, prefix=""):
    """(name, tensor) for every tensor of a nested state dict (dicts, lists and tuples)."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensors(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from tensors(value, f"{prefix}/{i}")
