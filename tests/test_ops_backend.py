"""fastjepa.ops.backend: automatic choice, FASTJEPA_BACKEND, use_backend, one-line reasons."""

import pytest
import torch

from fastjepa.ops import BackendError, ema_update_, forced_backend, gather_tokens, use_backend
from fastjepa.ops import backend as backend_module


def test_automatic_choice_on_the_cpu_is_the_torch_reference(monkeypatch):
    monkeypatch.delenv("FASTJEPA_BACKEND", raising=False)
    problems = {"torch": lambda: None, "triton": lambda: None}
    assert backend_module.select("op", torch.device("cpu"), problems) == "torch"


def test_automatic_choice_on_cuda_skips_backends_that_cannot_serve_the_call(monkeypatch):
    monkeypatch.delenv("FASTJEPA_BACKEND", raising=False)
    monkeypatch.setattr(backend_module, "device_problem", lambda name, device: None)
    cuda = torch.device("cuda")
    assert backend_module.select("op", cuda, {"torch": lambda: None, "triton": lambda: None}) == "triton"
    assert backend_module.select("op", cuda, {"torch": lambda: None, "triton": lambda: "no fp64"}) == "torch"
    assert backend_module.select("op", cuda, {"torch": lambda: None, "triton": lambda: None, "cuda": lambda: None}) == "cuda"


def test_environment_variable_and_use_backend(monkeypatch):
    monkeypatch.setenv("FASTJEPA_BACKEND", "torch")
    assert forced_backend() == "torch"
    with use_backend("triton"):
        assert forced_backend() == "triton"  # use_backend wins over the environment
        with use_backend(None):
            assert forced_backend() == "torch"
    assert forced_backend() == "torch"
    monkeypatch.setenv("FASTJEPA_BACKEND", "fast")
    with pytest.raises(BackendError, match="FASTJEPA_BACKEND='fast' is not a backend: choose one of torch, triton, cuda"):
        forced_backend()


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        use_backend("cudnn")


def test_forced_backend_that_cannot_run_says_why_in_one_line(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_interpreting", lambda: False)
    x, idx = torch.randn(1, 3, 4), torch.tensor([[0, 2]])
    with use_backend("cuda"), pytest.raises(BackendError) as cuda_error:
        gather_tokens(x, idx)
    assert "gather_tokens: backend 'cuda' cannot run this call" in str(cuda_error.value)
    assert "\n" not in str(cuda_error.value)
    if backend_module.import_problem("triton") is None:
        with use_backend("triton"), pytest.raises(BackendError, match="set TRITON_INTERPRET=1"):
            ema_update_([torch.zeros(2)], [torch.ones(2)], 0.5)
