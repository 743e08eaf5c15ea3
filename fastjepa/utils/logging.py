"""Run logging helpers with the reference's names (``src/utils/logging.py``): ``gpu_timer``,
``CSVLogger``, ``AverageMeter`` and ``grad_logger``.

``grad_logger`` reads every gradient norm back in one host transfer per device, where the
reference synchronizes once per tensor; the values are the same.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def gpu_timer(closure: Callable, log_timings: bool = True) -> tuple:
    """``(closure(), elapsed_ms)``: the GPU time between CUDA events recorded around the call
    (then a device synchronize), or -1. when timings are off or CUDA is unavailable."""
    log_timings = log_timings and torch.cuda.is_available()
    elapsed_ms = -1.0
    if log_timings:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    result = closure()
    if log_timings:
        end.record()
        torch.cuda.synchronize()
        elapsed_ms = start.elapsed_time(end)
    return result, elapsed_ms


class CSVLogger:
    """Appends rows to the CSV file ``fname``; each argument after it is a
    ``(printf_format, column_name)`` pair.

    The constructor appends the header line (so a resumed run's file gets a second header,
    as the reference's does); ``log(*values)`` appends one line, value i formatted with
    ``printf_format_i % value``, comma-separated.
    """

    def __init__(self, fname, *argv):
        self.fname = fname
        self.types = [fmt for fmt, _ in argv]
        with open(self.fname, "a") as f:
            if argv:
                f.write(",".join(str(name) for _, name in argv) + "\n")

    def log(self, *argv) -> None:
        if len(argv) != len(self.types):
            raise ValueError(f"CSVLogger.log: {len(argv)} values for {len(self.types)} columns of {self.fname}")
        with open(self.fname, "a") as f:
            if argv:
                f.write(",".join(fmt % value for fmt, value in zip(self.types, argv)) + "\n")


class AverageMeter:
    """The last value (``val``), running mean (``avg``), ``sum``, ``count``, ``max`` and ``min``
    of a stream of values; a value that does not compare with numbers leaves max and min as they are."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.val = 0
        self.avg = 0
        self.max = float("-inf")
        self.min = float("inf")
        self.sum = 0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        self.val = val
        try:
            self.max = max(val, self.max)
            self.min = min(val, self.min)
        except Exception:
            pass
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def _norms(grads: list[torch.Tensor]) -> list[float]:
    """``float(torch.norm(g))`` for every g (the reference's call, so the same values on every
    device), with one device-to-host copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    norms = [0.0] * len(grads)
    for indices in by_device.values():
        values = torch.stack([torch.norm(grads[i]) for i in indices]).tolist()
        for i, value in zip(indices, values):
            norms[i] = value
    return norms


def grad_logger(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> AverageMeter:
    """An ``AverageMeter`` over the 2-norms of the gradients of the weights (parameters with a
    gradient, not 1-D and not named ``*.bias``), with ``first_layer`` / ``last_layer`` the norms
    of the first and last such parameter whose name contains 'qkv' (both 0. when none does).

    The norms are computed on the device and read back together: one synchronization,
    instead of one per tensor.
    """
    names, grads = [], []
    for name, param in named_params:
        if param.grad is not None and not (name.endswith(".bias") or len(param.shape) == 1):
            names.append(name)
            grads.append(param.grad.detach())
    stats = AverageMeter()
    stats.first_layer = stats.last_layer = None
    for name, norm in zip(names, _norms(grads)):
        stats.update(norm)
        if "qkv" in name:
            stats.last_layer = norm
            if stats.first_layer is None:
                stats.first_layer = norm
    if stats.first_layer is None or stats.last_layer is None:
        stats.first_layer = stats.last_layer = 0.0
    return stats
