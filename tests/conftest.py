"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET
must be set before any kernel module is imported, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import errno  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
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


@pytest.fixture
def one_thread():
    """One intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``): for small
    problems, two OpenMP threads on two busy cores ran 30x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def enospc_torch_save(calls_before: int = 0, real_save=torch.save):
    """A torch.save that writes half the file, then fails as on a full disk (after calls_before good saves)."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= calls_before:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


@pytest.fixture(scope="session")
def tiny16_encoder(tmp_path_factory):
    """A ViT-tiny/8 at 16 px (4 tokens, random init) exported as fastjepa safetensors: what a
    pretraining run exports, small enough for fine-tuning runs of seconds."""
    from fastjepa.models import vision_transformer as vit
    from fastjepa.weights import export_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny16.safetensors"
    export_weights(vit.vit_tiny(img_size=[16], patch_size=8), "safetensors", path)
    return path


def tiny_jepa_models():
    """A ViT-tiny/8 at 32 px (12 blocks), its predictor (depth 1, width 48) and a target a little
    off the context encoder (+0.01 N(0, 1) on every parameter), from seed 0."""
    import copy

    from fastjepa.helper import init_model

    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=32, pred_depth=1, pred_emb_dim=48)
    target = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return encoder, predictor, target
