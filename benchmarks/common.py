"""Timing and result rows shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def host_times_ms(fn, iters: int, warmup: int) -> dict[str, float]:
    """Median, p20 and p80 of ``fn()``'s wall time on the host, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def write_rows(path: Path, rows: list[dict], argv: list[str] | None = None) -> Path:
    """Append rows (with date, command, python and torch versions) to the JSONL file ``path``.
    ``argv`` is the command line, script first (default ``sys.argv``)."""
    argv = sys.argv if argv is None else argv
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in ["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, **common}) + "\n")
    return path
