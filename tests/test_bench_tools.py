"""benchmarks/bench_ceilings.py, benchmarks/report.py and benchmarks/gpu_check.sh (which
needs a GPU: here its syntax and its refusal to run without one)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import BENCHMARKS, load_benchmark




def test_ceilings_and_kernel_rows_become_markdown_tables(tmp_path):
    results = tmp_path / "rows.jsonl"
    load_benchmark("bench_ceilings").main(["--quick", "--results", str(results)])
    kernel_row = {"bench": "bench_kernels", "op": "gather", "mode": "fwd", "model": "vit_huge", "shape": "B=128 N=256 K=92 D=1280",
                  "dtype": "bfloat16", "median_ms": 0.02, "p20_ms": 0.019, "p80_ms": 0.021, "gb_s": 3000.0, "pct_copy": 70.0,
                  "hardware": "GPU", "torch": "2.11", "triton": "3.6.0", "date": "d", "command": "c"}
    rows = [kernel_row, {**kernel_row, "provider": "reference apply_masks", "median_ms": 0.1}]
    rows[0]["provider"] = "fastjepa triton"
    with results.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = load_benchmark("report").main([str(results)])
    assert "| hardware | copy GB/s | matmul TFLOP/s |" in text
    assert "| gather | fwd | vit_huge | B=128 N=256 K=92 D=1280 bfloat16 | fastjepa triton | 0.0200 (0.0190-0.0210) | 3000 GB/s | 70.0 | 5.00x |" in text


def test_report_names_a_corrupt_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": 1}\n{not json\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: not a JSON row"):
        load_benchmark("report").main([str(bad)])


def test_gpu_check_script_parses_and_refuses_to_run_without_a_gpu():
    script = BENCHMARKS / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu_check.sh would really run")
    done = subprocess.run([str(script)], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_plot_draws_kernel_and_step_figures_and_ignores_quick_rows(tmp_path):
    kernel = {"bench": "bench_kernels", "op": "gather", "mode": "fwd", "model": "vit_huge", "hardware": "GPU", "date": "d",
              "median_ms": 0.02, "pct_copy": 70.0, "quick": False}
    rows = [{**kernel, "provider": "reference apply_masks", "median_ms": 0.1}, {**kernel, "provider": "fastjepa triton"},
            {"bench": "bench_step", "model": "vit_huge/14", "mode": "fastjepa", "compile": False, "hardware": "GPU", "date": "d",
             "images_per_s": 300.0, "mfu": 0.4, "phase_ms": {"backward": 200.0, "ema": 1.0}, "quick": False}]
    results = tmp_path / "rows.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = load_benchmark("plot").main([str(results), "--out", str(tmp_path / "figures")])
    assert [p.name for p in written] == ["kernels.png", "step.png", "phases.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    quick = tmp_path / "quick.jsonl"
    quick.write_text("".join(json.dumps({**r, "quick": True}) + "\n" for r in rows))
    assert load_benchmark("plot").main([str(quick), "--out", str(tmp_path / "none")]) == []
