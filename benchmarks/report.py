"""Markdown tables from benchmark result rows (JSONL files written by the benchmarks).

    python benchmarks/report.py benchmarks/results/2026-11-28-NVIDIA-H200.jsonl > table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCES = {"gather": "reference apply_masks", "ema": "reference loop", "adamw_ema": "torch AdamW(fused)+_foreach_lerp_",
              "attention": "varlen_attn"}


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{number}: not a JSON row ({e.msg})") from None
    return rows


def ceilings_table(rows) -> list[str]:
    lines = ["| hardware | copy GB/s | matmul TFLOP/s | date | command |", "|---|---|---|---|---|"]
    copies = {r["date"]: r for r in rows if r.get("bench") == "bench_ceilings" and r["op"] == "copy"}
    for r in rows:
        if r.get("bench") == "bench_ceilings" and r["op"] == "matmul":
            copy = copies.get(r["date"], {})
            lines.append(f"| {r['hardware']} | {copy.get('gb_s', '')} | {r['tflop_s']} ({r['dtype']}) | {r['date']} | `{r['command']}` |")
    return lines if len(lines) > 2 else []


def kernels_table(rows) -> list[str]:
    kernel_rows = [r for r in rows if r.get("bench") == "bench_kernels"]
    if not kernel_rows:
        return []
    reference = {(r["date"], r["op"], r["mode"], r["model"]): r["median_ms"] for r in kernel_rows if r["provider"] == REFERENCES[r["op"]]}
    lines = ["| op | mode | case | shape | provider | median ms (p20-p80) | rate | % copy | vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
        ref = reference.get((r["date"], r["op"], r["mode"], r["model"]))
        speedup = f"{ref / r['median_ms']:.2f}x" if ref else ""
        rate = f"{r['tflop_s']:.1f} TFLOP/s" if "tflop_s" in r else f"{r['gb_s']:.0f} GB/s"
        pct = f"{r['pct_copy']:.1f}" if "pct_copy" in r else ""
        lines.append(f"| {r['op']} | {r['mode']} | {r['model']} | {r['shape']} {r['dtype']} | {r['provider']} | "
                     f"{r['median_ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) | {rate} | {pct} | {speedup} |")
    first = kernel_rows[0]
    lines.append("")
    lines.append(f"{first['hardware']}, torch {first['torch']}, triton {first.get('triton')}, {first['date']}: `{first['command']}`")
    return lines


def step_options(row: dict) -> str:
    """What sets a bench_step row apart from its plain mode: CUDA graphs or compile, a loader."""
    options = " +cuda-graphs" if row.get("cuda_graphs") else (" +compile" if row.get("compile") else "")
    return options + (f" +{row['data']} data" if row.get("data", "synthetic") != "synthetic" else "")


def step_table(rows) -> list[str]:
    step_rows = [r for r in rows if r.get("bench") == "bench_step"]
    if not step_rows:
        return []
    phases = list(step_rows[0]["phase_ms"])
    lines = ["| model | mode | batch | step ms | img/s | MFU | context tokens | peak GiB | " + " | ".join(phases) + " |",
             "|" + "---|" * (8 + len(phases))]
    for r in step_rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append(f"| {r['model']} | {r['mode']}{step_options(r)} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {mfu} | "
                     f"{r['mean_context_tokens']} | {r.get('peak_memory_gib') or ''} | "
                     + " | ".join(f"{r['phase_ms'][p]:.1f}" for p in phases) + " |")
    first = step_rows[0]
    lines += ["", f"{first['hardware']}, torch {first['torch']}, {first['date']}: `{first['command']}` (phases in ms)"]
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = read_rows(args.files)
    sections = [lines for lines in (ceilings_table(rows), kernels_table(rows), step_table(rows)) if lines]
    text = "\n\n".join("\n".join(lines) for lines in sections) + "\n"
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
