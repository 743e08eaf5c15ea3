"""Timing and result rows shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import platform
import re
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


def device_times_ms(fn, device: torch.device, iters: int = 100, warmup: int = 10) -> dict[str, float]:
    """Median, p20 and p80 of ``fn()`` in ms: CUDA events through ``triton.testing.do_bench``
    (which flushes the L2 cache before every run) on a GPU, host wall time on the CPU."""
    if device.type != "cuda":
        return host_times_ms(fn, iters=iters, warmup=warmup)
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read and written:
    the ceiling bandwidth-bound kernels are reported against."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = device_times_ms(lambda: dst.copy_(src), device, iters=20, warmup=3)
    return 2 * nbytes / times["median_ms"] / 1e6


def rewrite_block(readme: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the marker lines ``begin`` and ``end`` of ``readme`` with ``body``."""
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no block between {begin!r} and {end!r} to rewrite")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n\n{body.strip()}\n\n{end}", text, count=1))
