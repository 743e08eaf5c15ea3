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


def test_targets_read_the_rows_benchmarks_write_and_judge_them():
    report = load_benchmark("report")
    kernels, peers = load_benchmark("bench_kernels"), load_benchmark("attention_peers")
    source = (BENCHMARKS / "bench_kernels.py").read_text()
    for op, mode, model, provider in report.KERNEL_CASES:  # names the benchmarks really write
        assert model in kernels.MODELS or model in kernels.ATTENTION_CASES, model
        assert mode in ("fwd", "bwd", "fwd+bwd", "update", "step"), mode
        known = provider in peers.PEERS or f'"{provider}"' in source
        known = known or (provider in ("fastjepa triton", "fastjepa cuda") and 'f"fastjepa {backend}"' in source)
        assert known, provider
    base = {"bench": "bench_kernels", "op": "gather", "mode": "fwd+bwd", "model": "vit_huge", "hardware": "NVIDIA H200",
            "torch": "2.11", "command": "python benchmarks/bench_kernels.py", "quick": False}
    rows = [{**base, "provider": "reference apply_masks", "median_ms": 3.0, "date": "2026-12-01 10:00 UTC"},
            {**base, "provider": "fastjepa triton", "median_ms": 1.0, "pct_copy": 85.0, "date": "2026-12-01 10:00 UTC"},
            {**base, "provider": "fastjepa triton", "median_ms": 1.5, "pct_copy": 70.0, "date": "2026-12-01 09:00 UTC"},  # older
            {**base, "provider": "fastjepa triton", "median_ms": 0.1, "pct_copy": 99.0, "date": "2026-12-02 10:00 UTC", "quick": True}]
    table = "\n".join(report.targets_table(sorted(rows, key=lambda r: r["date"])))
    assert "| 4 | gather fwd+bwd, ViT-H/14 shapes, bf16 (triton): % of copy bandwidth: >= 80% | 85.0% | pass | NVIDIA H200" in table
    assert "| 4 | gather fwd+bwd, ViT-H/14 (triton) vs the reference apply_masks idiom: >= 3x | 3.00x | pass |" in table
    assert "| 6 | gather fwd+bwd, ViT-H/14 (cuda) vs triton: >= 1x | | not measured | |" in table
    step = {"bench": "bench_step", "model": "vit_huge/14", "device": "cuda", "data": "synthetic", "quick": False, "date": "d"}
    rows = [{**step, "mode": "reference-eager", "images_per_s": 100.0, "peak_memory_gib": 100.0},
            {**step, "mode": "fastjepa", "images_per_s": 250.0, "peak_memory_gib": 50.0, "mfu": 0.6}]
    table = "\n".join(report.targets_table(rows))
    assert "fastjepa images/s vs the reference step: >= 3x | 2.50x | MISS |" in table
    assert "fastjepa MFU against the measured bf16 matmul ceiling: >= 55% | 60.0% | pass |" in table
    assert "fastjepa peak memory / the reference step's: <= 0.6x | 0.50x | pass |" in table
    rows.append({**step, "mode": "reference-src", "images_per_s": 50.0, "peak_memory_gib": 90.0})  # the real reference wins
    assert "vs the reference step: >= 3x | 5.00x | pass |" in "\n".join(report.targets_table(rows))
    data = {"bench": "bench_data", "pipeline": "dali-cpu", "device": "cpu", "crop": 224, "quick": False, "hardware": "AMD EPYC"}
    rows = [{**data, "workers": 1, "vs_reference": 1.4, "date": "2026-12-01 10:00 UTC"},
            {**data, "workers": 2, "vs_reference": 1.31, "date": "2026-12-01 10:00 UTC"},
            {**data, "workers": 2, "vs_reference": 1.1, "date": "2026-12-01 11:00 UTC", "layout": "shards"}]  # files only
    assert "(the worse worker count): >= 1.3x | 1.31x | pass |" in "\n".join(report.targets_table(rows))


def test_readme_block_is_rewritten_between_its_markers_only(tmp_path):
    report = load_benchmark("report")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report.main(["--readme", str(readme), str(empty)])
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n" + report.README_BEGIN) and text.endswith(report.README_END + "\nafter\n")
    assert "old table" not in text and text.count("not measured") == len(report.TARGETS)
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no block between"):
        report.main(["--readme", str(readme), str(empty)])
