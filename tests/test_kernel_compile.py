"""The real GPU compiler on every kernel, with no GPU: the configs the autotuner can pick at the
production shapes compile for sm_90 and sm_80 (-m slow) without spills and with their dots on tensor
cores (benchmarks/compile_report.py --production). The compiles run in subprocesses without
TRITON_INTERPRET, which conftest.py sets for this process."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent
pytest.importorskip("triton")
report = load_benchmark("compile_report")


def compile_report(tmp_path, *args, timeout=900) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "compile_report.py"), "--quiet", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"compile_report wrote no rows (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, json.loads(out.read_text())


# sm_90 (the H100 and H200 that fastjepa is measured on) runs in the default suite; sm_80, the other
# half of the two minutes the sweep takes on 2 cores, runs with -m slow (and in gpu_check's triton-warm stage's target list).
@pytest.mark.parametrize("target", [90, pytest.param(80, marks=pytest.mark.slow)], ids=["sm_90", "sm_80"])
def test_production_configs_compile_clean(tmp_path, target):
    done, rows = compile_report(tmp_path, "--production", "--targets", str(target), "--jobs", str(max(2, os.cpu_count() or 1)))
    bad = [f"{r['kernel']} {r.get('case', '')} {r['target']} {r.get('config', '')}: {'; '.join(report.problems(r))}"
           for r in rows if report.problems(r)]
    assert not bad, "not clean:\n" + "\n".join(bad)
    assert done.returncode == 0, done.stdout[-3000:]
    # every kernel at every production shape was compiled for the target
    triton_rows = [r for r in rows if r["op"] != "csrc"]
    seen = {(r["kernel"], r["case"], r["target"]) for r in triton_rows}
    arch = f"sm_{target}"
    for hd in report.HEAD_DIMS:
        for mode in ("varlen", "shared"):
            for kernel in ("_attn_fwd", "_bwd_dkdv", "_bwd_dq", "_bwd_delta"):
                assert (kernel, f"{mode}, head dim {hd}", arch) in seen
    for width in report.WIDTHS:
        assert ("_gather_add_fwd", f"dense+pos, width {width}", arch) in seen
        assert ("_gather_bwd", f"bwd-groups-1, width {width}", arch) in seen
    assert ("_ema_chunks", "bf16-shadow, ViT-H/14 tensors", arch) in seen
    from fastjepa.kernels import attention

    for tiles in (attention.FWD_TILES, attention.DKDV_TILES, attention.DQ_TILES):
        assert set(tiles) == {80, 90} and all(len(tiles[a]) >= 2 for a in tiles)
    fwd = [r for r in triton_rows if r["kernel"] == "_attn_fwd" and r["case"] == "varlen, head dim 80"]
    assert len(fwd) == len(attention.FWD_TILES[target]) and all(r["pickable"] for r in fwd)
    if target == 90:
        assert all(r["hgmma"] > 0 and r["hmma"] == 0 for r in fwd)
    else:
        assert all(r["hmma"] > 0 for r in fwd)
    csrc = [r for r in rows if r["op"] == "csrc"]
    assert {r["case"] for r in csrc} == set(report.CSRC) and {r["target"] for r in csrc} == {arch}


def test_the_check_sees_spills_mma_sync_and_compile_errors(tmp_path):
    """The verdicts can fail: a tile too big for the registers spills, a 32-row tile runs its dots
    on mma.sync on sm_90, and an impossible config is a compile error, not a crash."""
    done, rows = compile_report(tmp_path, "--kernels", "attention", "--head-dims", "128", "--targets", "90", "--dtypes", "bfloat16",
                                "--configs", "128,128,4,2", "32,32,4,2", "48,64,4,2")
    by_config = {}
    for r in rows:
        if r["kernel"] == "_bwd_dkdv" and r["case"] == "varlen, head dim 128":
            by_config[r["config"]] = r
    spilling = by_config["BLOCK_M=128 BLOCK_N=128 warps=4 stages=2"]
    assert spilling["stack"] > 0 and any("spills" in p for p in report.problems(spilling))
    small = by_config["BLOCK_M=32 BLOCK_N=32 warps=4 stages=2"]
    assert small["hmma"] > 0 and any("wgmma" in p for p in report.problems(small))
    broken = by_config["BLOCK_M=48 BLOCK_N=64 warps=4 stages=2"]  # tl.arange needs a power of 2
    assert broken["error"] and report.problems(broken)[0].startswith("compile error")
    assert not any(r["pickable"] for r in rows if r["kernel"] != "_bwd_delta"), "--configs rows are outside the autotune space"
    assert done.returncode == 0  # a report, not a check, without --production


def test_occupancy_follows_the_register_and_shared_memory_limits():
    assert report.occupancy(90, 32, 128, 0) == 1.0  # 16 blocks of 4 warps
    assert report.occupancy(90, 255, 256, 0) == 8 / 64  # 255 registers: one 8-warp block
    assert report.occupancy(90, 128, 128, 0) == 16 / 64  # 4 blocks of 4 warps
    assert report.occupancy(80, 64, 256, 100_000) == 8 / 64  # shared memory: one block on sm_80
    assert report.occupancy(90, 64, 256, 100_000) == 16 / 64  # two on sm_90 (228 KiB per SM)


def test_csrc_block_size_is_what_the_report_assumes():
    assert re.search(r"constexpr int kThreads = (\d+);", (ROOT / "csrc" / "multi_tensor.cuh").read_text()).group(1) == str(report.CSRC_THREADS)
    gather = (ROOT / "csrc" / "gather.cu").read_text()
    assert "kRowThreads = 32 * kRowsPerBlock" in gather
    assert 32 * int(re.search(r"constexpr int kRowsPerBlock = (\d+);", gather).group(1)) == report.CSRC_THREADS


def test_a_warmed_cache_is_what_the_jit_reads(tmp_path):
    """Warm a cache, then compile the same launches again through the JIT with a compile listener:
    every kernel must come from the cache. A stamp from another Triton build is reported."""
    cache = tmp_path / "cache"
    args = ("--kernels", "gather,ema", "--widths", "1280", "--targets", "90", "--dtypes", "bfloat16")
    done, rows = compile_report(tmp_path, *args, "--warm-cache", str(cache))
    assert done.returncode == 0 and rows and not any(r["error"] for r in rows)
    assert (cache / "fastjepa-warm.json").exists()
    probe = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r}); sys.path.insert(0, {str(ROOT)!r})
import compile_report as report
from triton import knobs
hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
for case in report.cases({{"gather", "ema"}}, [], [1280], ["bfloat16"]):
    for launch in case.launches():
        with report.compile_only(90):
            launch.jit.warmup(*launch.args, grid=(1,), **launch.kwargs)
print(len(hits), all(hits))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == [str(len(rows)), "True"], out.stdout + out.stderr
    check = [sys.executable, str(BENCHMARKS / "compile_report.py"), "--check-cache", str(cache)]
    assert subprocess.run(check, env=env, capture_output=True, text=True).returncode == 0
    stamp = json.loads((cache / "fastjepa-warm.json").read_text())
    stamp["fingerprint"]["python"] = "2.7"
    (cache / "fastjepa-warm.json").write_text(json.dumps(stamp))
    other = subprocess.run(check, env=env, capture_output=True, text=True)
    assert other.returncode == 1 and "python 2.7 there" in other.stdout and "compiles every kernel on first use" in other.stdout
    assert subprocess.run([*check[:-1], str(tmp_path / "none")], env=env, capture_output=True, text=True).returncode == 1


def test_report_table_and_readme_block(tmp_path):
    rows = [{"op": "attention", "kernel": "_bwd_dkdv", "case": "varlen, head dim 80", "dtype": "bfloat16", "target": "sm_90",
             "config": "BLOCK_M=64 BLOCK_N=64 warps=8 stages=2", "pickable": True, "error": None, "regs": 252, "stack": 0,
             "local_ld": 0, "local_st": 0, "shared": 104 * 1024, "hmma": 0, "hgmma": 40, "threads": 256, "occupancy": 0.125,
             "triton": "3.6.0", "ptxas": "12.8", "nvcc": "13.0", "date": "2026-12-02 06:00 UTC", "command": "python benchmarks/compile_report.py"},
            {"op": "attention", "kernel": "_bwd_dkdv", "case": "varlen, head dim 80", "dtype": "bfloat16", "target": "sm_90",
             "config": "BLOCK_M=64 BLOCK_N=64 warps=4 stages=2", "pickable": False, "error": None, "regs": 255, "stack": 48,
             "local_ld": 5, "local_st": 6, "shared": 104 * 1024, "hmma": 0, "hgmma": 40, "threads": 128, "occupancy": 0.0625}]
    summary = report.summary(rows)
    assert "| _bwd_dkdv | sm_90 | 2 | 1/1 | 0 | 12% |" in summary and "Triton 3.6.0 (ptxas 12.8)" in summary
    table = report.markdown(rows)
    assert "| clean |" in table and "spills: 48 B stack, 5 LDL / 6 STL" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.README_BEGIN}\nold\n{report.README_END}\nb\n")
    sys.path.insert(0, str(BENCHMARKS))
    from common import rewrite_block

    rewrite_block(readme, report.README_BEGIN, report.README_END, summary)
    text = readme.read_text()
    assert text.startswith("a\n" + report.README_BEGIN) and text.endswith(report.README_END + "\nb\n") and "old" not in text
