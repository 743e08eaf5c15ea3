"""The device's measured ceilings, which the other benchmarks are reported against.

    python benchmarks/bench_ceilings.py

copy: device-to-device copy of 1 GiB, GB/s counting bytes read and written (bandwidth-bound
kernels report a % of it). matmul: a dense bf16 8192^3 matrix product, TFLOP/s (MFU's
denominator). Rows are appended to benchmarks/results/bench_ceilings.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import RESULTS, copy_bandwidth_gbs, device_times_ms, hardware, write_rows


def matmul_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = device_times_ms(lambda: a @ b, device, iters=20, warmup=3)
    return 2 * n**3 / times["median_ms"] / 1e9


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script, measures nothing")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench_ceilings.jsonl")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 256 if args.quick else 8192
    rows = [
        {"op": "copy", "gb_s": round(copy_bandwidth_gbs(device, nbytes=(1 << 22) if args.quick else (1 << 30)), 1)},
        {"op": "matmul", "dtype": "bfloat16" if device.type == "cuda" else "float32", "n": n,
         "tflop_s": round(matmul_tflops(device, n), 1)},
    ]
    for r in rows:
        r.update(bench="bench_ceilings", quick=args.quick, device=device.type, hardware=hardware(device))
    print(f"{hardware(device)}: copy {rows[0]['gb_s']:.0f} GB/s, {rows[1]['dtype']} matmul {rows[1]['tflop_s']:.1f} TFLOP/s (n={n})")
    write_rows(args.results, rows, [__file__, *argv])
    return rows


if __name__ == "__main__":
    main()
