"""What this machine offers fastjepa: library versions, devices and usable backends."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

import torch

import fastjepa


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else the reason in one line."""
    try:
        importlib.import_module(module)
    except Exception as e:  # an install can fail at import in many ways; report any of them
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def backends() -> dict[str, str]:
    """Each backend -> 'usable ...' or 'not usable: <why>'."""
    has_gpu = torch.cuda.is_available()
    found = {"torch": "usable (the reference implementation, every device)"}

    triton_problem = _importable("triton")
    if triton_problem:
        found["triton"] = f"not usable: {triton_problem}"
    elif has_gpu:
        found["triton"] = "usable (GPU)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        found["triton"] = "usable through the interpreter (TRITON_INTERPRET=1, CPU tensors, slow)"
    else:
        found["triton"] = "not usable: no GPU (set TRITON_INTERPRET=1 to run kernels in the interpreter)"

    ext_problem = _importable("fastjepa._C")
    if ext_problem:
        found["cuda"] = f"not usable: the CUDA extension fastjepa._C is not built ({ext_problem})"
    elif has_gpu:
        found["cuda"] = "usable"
    else:
        found["cuda"] = "not usable: fastjepa._C is built but there is no GPU"

    dali_problem = _importable("nvidia.dali")
    if dali_problem:
        found["dali"] = f"not usable: NVIDIA DALI is not installed ({dali_problem})"
    else:
        found["dali"] = "usable (GPU pipelines)" if has_gpu else "usable (CPU pipelines only: no GPU)"
    return found


def collect() -> dict[str, dict[str, str]]:
    versions = {
        "fastjepa": fastjepa.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "numpy": _version("numpy") or "not installed",
        "triton": _version("triton") or "not installed",
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
