"""Markdown tables from benchmark result rows (JSONL files written by the benchmarks).

    python benchmarks/report.py benchmarks/results/2026-11-28-NVIDIA-H200.jsonl > table.md
    python benchmarks/report.py --readme README.md      # rewrite the README's targets block from
                                                        # every file in benchmarks/results/

The targets table checks the issues' performance targets against the latest rows: each
line names its measured value, pass or miss, and the row's hardware, date and command;
a target without rows says "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from common import rewrite_block

RESULTS = Path(__file__).resolve().parent / "results"
README_BEGIN, README_END = "<!-- targets:begin (benchmarks/report.py --readme) -->", "<!-- targets:end -->"

REFERENCES = {"gather": "reference apply_masks", "ema": "reference loop", "adamw_ema": "torch AdamW(fused)+_foreach_lerp_",
              "attention": "varlen_attn"}


def read_rows(paths) -> list[dict]:
    """The rows of the JSONL files, ordered by their date (stable: file order within a minute)."""
    rows = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{number}: not a JSON row ({e.msg})") from None
    return sorted(rows, key=lambda row: str(row.get("date", "")))


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


# ------------------------------------------------------------------------------ targets


def latest(rows: list[dict], **fields) -> dict | None:
    """The last non-quick row (rows are in file and write order) whose fields equal ``fields``."""
    found = None
    for row in rows:
        if not row.get("quick") and all(row.get(k) == v for k, v in fields.items()):
            found = row
    return found


REFERENCE_STEPS = ("reference-src", "reference-eager")  # the real reference step when timed, else its re-creation


class Target(NamedTuple):
    issue: int
    what: str
    unit: str  # "x" (a ratio) or "%"
    at_least: float | None  # the target is value >= at_least, or
    at_most: float | None  # value <= at_most
    measure: Callable[[list[dict]], tuple[float, dict] | None]  # (value, the row it rests on) or None


KERNEL_CASES: set[tuple[str, str, str, str]] = set()  # (op, mode, model, provider) the targets read (a test checks the names)


def kernel_ratio(op: str, mode: str, model: str, slower: str, faster: str):
    """median(slower) / median(faster) of one kernel case: how many times faster ``faster`` is."""
    KERNEL_CASES.update({(op, mode, model, slower), (op, mode, model, faster)})

    def measure(rows):
        a, b = (latest(rows, bench="bench_kernels", op=op, mode=mode, model=model, provider=p) for p in (slower, faster))
        return (a["median_ms"] / b["median_ms"], b) if a and b else None
    return measure


def kernel_copy_pct(op: str, mode: str, model: str, provider: str):
    KERNEL_CASES.add((op, mode, model, provider))

    def measure(rows):
        row = latest(rows, bench="bench_kernels", op=op, mode=mode, model=model, provider=provider)
        return (row["pct_copy"], row) if row and "pct_copy" in row else None
    return measure


def step_value(value: Callable[[dict, dict | None], float], mode: str, baselines: tuple[str, ...] = ()):
    """``value(row, base)`` from the ViT-H/14 bench_step rows (GPU, synthetic images) of
    ``mode`` and of the first of ``baselines`` that has one."""
    def step_row(rows, mode):
        return latest(rows, bench="bench_step", model="vit_huge/14", mode=mode, device="cuda", data="synthetic")

    def measure(rows):
        row = step_row(rows, mode)
        base = next(filter(None, (step_row(rows, b) for b in baselines)), None)
        if row is None or (baselines and base is None):
            return None
        return value(row, base), row
    return measure


def data_rate(pipeline: str, device: str, value: Callable[[dict], float]):
    def measure(rows):
        found = [r for r in rows if r.get("bench") == "bench_data" and r.get("pipeline") == pipeline and r.get("device") == device
                 and not r.get("quick") and r.get("crop") == 224 and r.get("layout", "files") == "files"]
        if not found:
            return None
        last_run = [r for r in found if r["date"] == found[-1]["date"]]
        worst = min(last_run, key=value)
        return value(worst), worst
    return measure


TARGETS = [
    Target(4, "gather fwd+bwd, ViT-H/14 shapes, bf16 (triton): % of copy bandwidth", "%", 80, None,
           kernel_copy_pct("gather", "fwd+bwd", "vit_huge", "fastjepa triton")),
    Target(4, "gather fwd+bwd, ViT-H/14 (triton) vs the reference apply_masks idiom", "x", 3, None,
           kernel_ratio("gather", "fwd+bwd", "vit_huge", "reference apply_masks", "fastjepa triton")),
    Target(4, "EMA over ViT-H/14's fp32 parameters (triton): % of copy bandwidth at 12 B/param", "%", 85, None,
           kernel_copy_pct("ema", "update", "vit_huge", "fastjepa triton")),
    Target(4, "EMA, ViT-H/14 (triton) vs torch._foreach_lerp_", "x", 1.3, None,
           kernel_ratio("ema", "update", "vit_huge", "torch._foreach_lerp_", "fastjepa triton")),
    Target(4, "EMA, ViT-H/14 (triton) vs the reference per-parameter loop", "x", 20, None,
           kernel_ratio("ema", "update", "vit_huge", "reference loop", "fastjepa triton")),
    Target(5, "varlen attention fwd+bwd, ViT-H/14 predictor shapes, vs varlen_attn", "x", 1.0, None,
           kernel_ratio("attention", "fwd+bwd", "vit_huge predictor", "varlen_attn", "fastjepa triton")),
    Target(5, "varlen attention fwd+bwd, ViT-H/14 encoder shapes, vs varlen_attn", "x", 0.9, None,
           kernel_ratio("attention", "fwd+bwd", "vit_huge encoder", "varlen_attn", "fastjepa triton")),
    Target(5, "varlen attention fwd+bwd, ViT-H/14 predictor, vs compiled FlexAttention", "x", 1.3, None,
           kernel_ratio("attention", "fwd+bwd", "vit_huge predictor", "flex_attention (compiled)", "fastjepa triton")),
    Target(5, "varlen attention fwd+bwd, ViT-H/14 encoder, vs compiled FlexAttention", "x", 1.3, None,
           kernel_ratio("attention", "fwd+bwd", "vit_huge encoder", "flex_attention (compiled)", "fastjepa triton")),
    Target(5, "shared-context attention fwd+bwd vs two varlen_attn calls merged by LSE", "x", 1.5, None,
           kernel_ratio("attention", "fwd+bwd", "vit_huge shared-context predictor", "two-call merge (varlen_attn)", "fastjepa triton")),
    Target(5, "ragged mode ViT-H/14 step time / truncated (fastjepa) step time", "x", None, 1.15,
           step_value(lambda row, base: row["step_ms"] / base["step_ms"], "ragged", ("fastjepa",))),
    Target(6, "EMA over ViT-H/14 (cuda): % of copy bandwidth at 12 B/param", "%", 90, None,
           kernel_copy_pct("ema", "update", "vit_huge", "fastjepa cuda")),
    Target(6, "fused AdamW+EMA, ViT-H/14 (cuda) vs AdamW(fused) + _foreach_lerp_", "x", 1.3, None,
           kernel_ratio("adamw_ema", "step", "vit_huge", "torch AdamW(fused)+_foreach_lerp_", "fastjepa cuda")),
    Target(6, "gather fwd+bwd, ViT-H/14 (cuda) vs triton", "x", 1.0, None,
           kernel_ratio("gather", "fwd+bwd", "vit_huge", "fastjepa triton", "fastjepa cuda")),
    Target(7, "data: torchvision on the GPU, decode + augment + masks at 224 px", "img/s", 5000, None,
           data_rate("torchvision-cuda", "cuda", lambda r: r["img_s"])),
    Target(7, "data: dali on 2 CPU cores vs the reference-style pipeline (the worse worker count)", "x", 1.3, None,
           data_rate("dali-cpu", "cpu", lambda r: r["vs_reference"])),
    Target(8, "ViT-H/14 step, batch 128: fastjepa images/s vs the reference step", "x", 3, None,
           step_value(lambda row, base: row["images_per_s"] / base["images_per_s"], "fastjepa", REFERENCE_STEPS)),
    Target(8, "ViT-H/14 step: fastjepa MFU against the measured bf16 matmul ceiling", "%", 55, None,
           step_value(lambda row, base: 100 * row["mfu"], "fastjepa")),
    Target(8, "ViT-H/14 step: fastjepa peak memory / the reference step's", "x", None, 0.6,
           step_value(lambda row, base: row["peak_memory_gib"] / base["peak_memory_gib"], "fastjepa", REFERENCE_STEPS)),
]


def targets_table(rows) -> list[str]:
    lines = ["| issue | target | measured | verdict | measured on |", "|---|---|---|---|---|"]
    for t in TARGETS:
        goal = f">= {t.at_least:g}" if t.at_least is not None else f"<= {t.at_most:g}"
        goal += "%" if t.unit == "%" else (" img/s" if t.unit == "img/s" else "x")
        try:
            found = t.measure(rows)
        except (KeyError, TypeError, ZeroDivisionError):  # a row without the field this target needs
            found = None
        if found is None:
            lines.append(f"| {t.issue} | {t.what}: {goal} | | not measured | |")
            continue
        value, row = found
        ok = value >= t.at_least if t.at_least is not None else value <= t.at_most
        shown = f"{value:.1f}%" if t.unit == "%" else (f"{value:.0f} img/s" if t.unit == "img/s" else f"{value:.2f}x")
        lines.append(f"| {t.issue} | {t.what}: {goal} | {shown} | {'pass' if ok else 'MISS'} | "
                     f"{row.get('hardware')}, torch {row.get('torch')}, {row.get('date')}: `{row.get('command')}` |")
    return lines


def readme_block(rows) -> str:
    """The README's targets table."""
    return "\n".join(targets_table(rows))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="JSONL result files (default with --readme: benchmarks/results/*.jsonl)")
    parser.add_argument("--readme", type=Path, help="rewrite the targets block of this README from the files")
    args = parser.parse_args(argv)
    if args.readme is not None:
        rows = read_rows(args.files or sorted(RESULTS.glob("*.jsonl")))
        rewrite_block(args.readme, README_BEGIN, README_END, readme_block(rows))
        return readme_block(rows)
    if not args.files:
        parser.error("give result files (or --readme README.md)")
    rows = read_rows(args.files)
    sections = [lines for lines in (ceilings_table(rows), kernels_table(rows), step_table(rows), targets_table(rows)) if lines]
    text = "\n\n".join("\n".join(lines) for lines in sections) + "\n"
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
