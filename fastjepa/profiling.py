"""Profiling a training run over a range of steps.

``--profile-steps A:B`` brackets global steps A..B-1 with cudaProfilerStart/Stop, so that
``nsys profile --capture-range=cudaProfilerApi -t cuda,nvtx fastjepa train ...`` records just
those steps; every step is an NVTX range "step N" (the ``nvtx`` package when installed, else
torch's, on CUDA). ``--torch-profiler DIR`` runs ``torch.profiler`` over the same steps
(2:5 when no range is given), writes a Chrome trace to DIR and prints the top kernels.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

DEFAULT_TORCH_PROFILER_STEPS = (2, 5)


def parse_profile_steps(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B."""
    try:
        first, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps takes A:B (global steps, A < B), got {text!r}") from None
    if not 0 <= first < end:
        raise ValueError(f"--profile-steps takes A:B with 0 <= A < B, got {text!r}")
    return first, end


def nvtx_range(device: torch.device):
    """name -> a context manager marking an NVTX range: the ``nvtx`` package's when installed,
    else torch's on CUDA; None on the CPU without the package."""
    try:
        import nvtx

        return nvtx.annotate
    except ImportError:
        return torch.cuda.nvtx.range if device.type == "cuda" else None


class StepProfiler:
    """``with profiler.step(n): ...`` around every training step; ``close()`` at the end."""

    def __init__(self, device: torch.device, steps: tuple[int, int] | None = None, torch_profiler: str | Path | None = None):
        self.device = device
        self.cuda_range = steps if device.type == "cuda" else None
        self.torch_dir = Path(torch_profiler) if torch_profiler is not None else None
        self.torch_range = (steps or DEFAULT_TORCH_PROFILER_STEPS) if self.torch_dir is not None else None
        self.ranges = {name: r for name, r in (("cuda", self.cuda_range), ("torch", self.torch_range)) if r is not None}
        self.nvtx = nvtx_range(device) if steps is not None else None
        self.profile = None
        self.ranges_seen = set()
        if steps is not None and device.type != "cuda":
            print("--profile-steps: no CUDA device, so no cudaProfilerStart/Stop (the torch profiler still works)")

    @contextlib.contextmanager
    def step(self, n: int):
        for name, (first, _) in self.ranges.items():
            if n == first:
                self._start(name)
        with self.nvtx(f"step {n}") if self.nvtx else contextlib.nullcontext():
            yield
        for name, (_, end) in self.ranges.items():
            if n + 1 == end:
                self._stop(name)

    def _start(self, name: str) -> None:
        self.ranges_seen.add(name)
        if name == "cuda":
            torch.cuda.profiler.start()
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()

    def _stop(self, name: str) -> None:
        if name not in self.ranges_seen:
            return
        self.ranges_seen.discard(name)
        if name == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            return
        self.profile.stop()
        self.torch_dir.mkdir(parents=True, exist_ok=True)
        first, end = self.torch_range
        trace = self.torch_dir / f"trace-steps-{first}-{end}.json"
        self.profile.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        print(self.profile.key_averages().table(sort_by=sort, row_limit=15))
        print(f"torch profiler: steps {first}..{end - 1}, Chrome trace {trace} (open in chrome://tracing or ui.perfetto.dev)")
        self.profile = None

    def close(self, last_step: int) -> None:
        """Stop a range the run ended inside; say when a range was never reached."""
        for name in sorted(self.ranges_seen):
            self._stop(name)
        for name, bounds in (("--profile-steps", self.cuda_range), ("--torch-profiler", self.torch_range)):
            if bounds is not None and last_step < bounds[0]:
                print(f"{name}: the run ended at step {last_step}, before step {bounds[0]}: nothing was profiled")


HOST_READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero)


class HostReads(TorchFunctionMode):
    """Counts, while active, the calls that bring a tensor's values to the host (``HOST_READS``):
    on a GPU each is a sync. ``device_type``: count only reads of tensors there (None: every
    read). A read of a meta tensor (a stand-in for a device's, in ``benchmarks/bench_host.py``)
    has no values to return: it is counted and answers zeros of the right shape."""

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type, self.seen = device_type, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            tensor = args[0]
            if self.device_type is None or tensor.device.type == self.device_type:
                self.seen.append(func.__name__)
            if tensor.is_meta:
                with torch.device("cpu"):
                    return func(torch.zeros(tensor.shape, dtype=tensor.dtype), *args[1:], **kwargs)
        return func(*args, **kwargs)
