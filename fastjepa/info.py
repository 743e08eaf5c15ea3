"""What this machine offers fastjepa: library versions, devices and usable backends."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

import fastjepa
from fastjepa.data.loader import backend_problem, resolve_backend
from fastjepa.ops.backend import device_problem


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends() -> dict[str, str]:
    """Each backend -> 'usable ...' or 'not usable: <why>'."""
    has_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if has_gpu else "cpu")
    found = {"torch": "usable (the reference implementation, every device)"}

    triton_problem = device_problem("triton", device)
    if triton_problem:
        found["triton"] = f"not usable: {triton_problem}"
    else:
        found["triton"] = "usable (GPU)" if has_gpu else "usable through the interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"

    cuda_problem = device_problem("cuda", torch.device("cuda"))
    if cuda_problem:
        found["cuda"] = f"not usable: {cuda_problem}"
    else:
        found["cuda"] = "usable" if has_gpu else "not usable: fastjepa._C is built but there is no GPU"

    dali_problem = backend_problem("dali", device)
    if dali_problem:
        found["dali"] = f"not usable: {dali_problem}"
    else:
        found["dali"] = "usable (GPU pipelines)" if has_gpu else "usable (CPU pipelines only: no GPU)"

    torchvision_problem = backend_problem("torchvision", device)
    if torchvision_problem:
        found["torchvision"] = f"not usable: {torchvision_problem}"
    else:
        found["torchvision"] = "usable (decode_jpeg on the GPU)" if has_gpu else "usable (decode_jpeg on the CPU)"
    found["data.backend auto"] = resolve_backend("auto", device)
    return found


def collect() -> dict[str, dict[str, str]]:
    versions = {
        "fastjepa": fastjepa.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "numpy": _version("numpy") or "not installed",
        "triton": _version("triton") or "not installed",
        "torchvision": _version("torchvision") or "not installed",
        "nvidia-dali": next(filter(None, (_version(d) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120"))), "not installed"),
    }
    if torch.cuda.is_available():
        devices = {f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    else:
        devices = {"cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"}
    return {"versions": versions, "devices": devices, "backends": backends()}


def format_info(info: dict[str, dict[str, str]]) -> str:
    lines = []
    for section, entries in info.items():
        lines.append(f"{section}:")
        width = max(map(len, entries))
        lines += [f"  {name:<{width}}  {value}" for name, value in entries.items()]
    return "\n".join(lines)
