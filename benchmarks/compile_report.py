"""Compile every kernel for sm_80 and sm_90 on any machine, with no GPU, and report what decides
its speed: registers, spills, shared memory, tensor-core instructions and occupancy.

    python benchmarks/compile_report.py                  # every kernel, config, shape, dtype and target
    python benchmarks/compile_report.py --production     # what the autotuner can pick at the production shapes (bf16)
    python benchmarks/compile_report.py --readme README.md --results benchmarks/results/compile_report.jsonl
    python benchmarks/compile_report.py --kernels attention --head-dims 80 --configs 64,64,8,2 64,128,8,2 --targets 90
    python benchmarks/compile_report.py --production --targets 90 --warm-cache .triton-cache   # for a GPU run

Triton kernels (``kernels/``) are compiled by Triton's own compiler and bundled ptxas, through the
same ``JITFunction.run`` that a GPU launch takes, on CPU tensors shaped as in training: the
kernels' Python launchers (``attention_fwd``, ``gather_add_fwd``, ...) run with their kernels
swapped for recorders, and every recorded launch is compiled for each target with each autotune
config. So the signature, the specialization of each argument and the options are exactly those a
GPU run would use, and ``--warm-cache`` fills a Triton cache (TRITON_CACHE_DIR) that a GPU machine
with the same Python, Triton and ptxas reads instead of compiling. The CUDA kernels (``csrc/``)
are compiled by nvcc to cubins. ``cuobjdump`` (from Triton's wheel) reads every cubin:

  regs, stack        registers per thread; stack bytes (ptxas's spill stores land there)
  local_ld, local_st LDL / STL instructions in the SASS: spill traffic
  shared             shared memory per block: Triton's dynamic allocation plus the static part
  hmma, hgmma        tensor-core instructions: mma.sync (HMMA) and Hopper's wgmma (HGMMA)
  occupancy          resident warps per SM / 64, from registers, shared memory and the block size

A row is clean when it compiled, spills nothing (no stack, no LDL/STL) and, for a kernel with
``tl.dot``, runs every dot on tensor cores: HMMA on sm_80, only HGMMA on sm_90. ``--production``
exits 1 listing every config the autotuner can pick that is not clean.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_BEGIN = "<!-- compile-report:begin (benchmarks/compile_report.py --readme) -->"
README_END = "<!-- compile-report:end -->"

HEAD_DIMS = (24, 32, 64, 80, 88, 128)
WIDTHS = (384, 768, 1024, 1280, 1408)
DTYPES = ("bfloat16", "float16", "float32")
TARGETS = (90, 80)
HEADS = 16  # ViT-L, ViT-H and ViT-g, their predictors too: the autotune key and the strides' specialization depend on it
DOT_KERNELS = {"_attn_fwd", "_bwd_dkdv", "_bwd_dq"}  # the kernels with tl.dot
CSRC = ("ema.cu", "adamw_ema.cu", "gather.cu")
# Every csrc/ kernel launches blocks of 256 threads (kThreads in multi_tensor.cuh, kRowThreads in
# gather.cu); a cubin does not record it without __launch_bounds__, which made ptxas cap the gather
# kernels at 32 registers and spill.
CSRC_THREADS = 256

# Per-SM limits for the occupancy (CUDA C Programming Guide, "Compute capabilities"): registers,
# resident warps, resident blocks, shared memory per SM (bytes); 1 KiB of each block's shared
# memory is reserved by the system on sm_80 and later.
SM_LIMITS = {80: (65536, 64, 32, 167936), 90: (65536, 64, 32, 233472)}
SHARED_RESERVED = 1024


def occupancy(arch: int, regs: int, threads: int, shared: int) -> float:
    """Resident warps per SM / the maximum, for blocks of ``threads`` threads using ``regs``
    registers each and ``shared`` bytes of shared memory."""
    sm_regs, max_warps, max_blocks, sm_shared = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    warp_regs = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    by_regs = (sm_regs // warp_regs) // warps
    by_shared = sm_shared // (math.ceil((shared + SHARED_RESERVED) / 128) * 128)
    blocks = min(by_regs, by_shared, max_blocks, max_warps // warps)
    return blocks * warps / max_warps


# ------------------------------------------------------------------------ reading a cubin


def cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _sass_counts(sass: str) -> dict[str, int]:
    counts = {}
    for field, opcode in (("hmma", "HMMA"), ("hgmma", "HGMMA"), ("local_ld", "LDL"), ("local_st", "STL")):
        counts[field] = len(re.findall(rf"\s{opcode}[.\s]", sass))
    return counts


def read_cubin(cubin: bytes) -> dict[str, dict]:
    """Per function of the cubin: regs, stack, static shared bytes, local bytes and the SASS counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    functions = {}
    for name, line in re.findall(r"Function (\S+):\n\s*(REG:.*)", usage):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
        functions[name] = {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "static_shared": int(fields["SHARED"]),
                           "local": int(fields["LOCAL"])}
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S):
        if name in functions:
            functions[name].update(_sass_counts(body))
    return functions


# ------------------------------------------------------------------------ Triton: launches


@dataclasses.dataclass
class Launch:
    kernel: object  # the Autotuner or JITFunction the launcher called
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.jit.fn.__name__

    @property
    def jit(self):
        """The JITFunction (an Autotuner wraps one as ``.fn``)."""
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    def configs(self, arch: int) -> tuple[list, list]:
        """(every config of the autotune space, the ones the autotuner can pick for this launch on
        a GPU of ``arch``); [None] for a kernel that is not autotuned."""
        if self.jit is self.kernel:
            return [None], [None]
        tuner = self.kernel
        tuner.nargs = dict(zip(tuner.arg_names, self.args))
        try:
            with compile_only(arch):  # the pruning may ask the driver for the target
                pickable = tuner.prune_configs(dict(self.kwargs))
        finally:
            tuner.nargs = None
        return list(tuner.configs), list(pickable)


@contextlib.contextmanager
def recorded_launches(module):
    """Run ``module``'s launchers without launching: its kernels are swapped for recorders that
    keep (kernel, args, kwargs) of every ``kernel[grid](...)``."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, (JITFunction, Autotuner))}
    for name, kernel in kernels.items():
        setattr(module, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


class CompileOnlyDriver:
    """The driver Triton's JIT asks for its device, stream and target: here a GPU target with no
    GPU, so ``JITFunction.run(warmup=True)`` compiles and never launches. The device number is the
    target's arch, so the JIT's per-device caches keep one entry per target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int):
    from triton.runtime.driver import driver

    previous = driver._active  # None until a GPU driver is first used; reset_active() would create one, and fails without a GPU
    driver.set_active(CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver.set_active(previous)


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of an op's kernel launchers at one shape and dtype."""

    op: str  # attention, gather, ema
    dtype: str
    variant: str  # attention: varlen | shared; gather: dense+pos, dense, packed+pos, same-row+pos, one-row+pos, bwd-groups-N; ema: no-shadow | bf16-shadow
    size: int  # attention: head dim; gather: width; ema: 0

    @property
    def label(self) -> str:
        size = {"attention": f"head dim {self.size}", "gather": f"width {self.size}", "ema": "ViT-H/14 tensors"}[self.op]
        return f"{self.variant}, {size}"

    def launches(self) -> list[Launch]:
        import torch

        return {"attention": _attention_launches, "gather": _gather_launches, "ema": _ema_launches}[self.op](self, getattr(torch, self.dtype))


def _attention_launches(case: Case, dtype) -> list[Launch]:
    """The forward and backward of one attention layer as the models call it: q, k, v are views of
    one (T, 3, H, D) qkv projection, the output gradient is contiguous."""
    import torch

    from fastjepa.kernels import attention

    T, D = 301, case.size
    q, k, v = torch.randn(T, 3, HEADS, D, dtype=dtype).unbind(1)
    grad_out = torch.randn(T, HEADS, D, dtype=dtype)
    if case.variant == "shared":  # 2 samples, [context | 4 blocks] each
        index = torch.tensor([[0, 60, 80, 100, 120, 140], [140, 221, 241, 261, 281, 301]], dtype=torch.int32)
    else:
        index = torch.tensor([0, 100, 301], dtype=torch.int32)
    with recorded_launches(attention) as launches:
        out, lse = attention.attention_fwd(q, k, v, index, 201, D**-0.5, case.variant == "shared")
        attention.attention_bwd(grad_out, q, k, v, out, lse, index, 201, D**-0.5, case.variant == "shared")
    return launches


def _gather_launches(case: Case, dtype) -> list[Launch]:
    """The gather launches of one variant: ViT-H/14's 256 patches, a batch of 4."""
    import torch

    from fastjepa.kernels import gather

    B, N, K, D = 4, 256, 91, case.size
    pos = torch.randn(N, D, dtype=dtype)
    idx = torch.randint(0, N, (B * K,), dtype=torch.int64)
    out = torch.empty(B * K, D, dtype=dtype)
    with recorded_launches(gather) as launches:
        if case.variant.startswith("bwd-groups-"):
            groups = int(case.variant.rsplit("-", 1)[1])
            inv = torch.full((groups * B * N,), -1, dtype=torch.int32)
            gather.gather_bwd(torch.empty(B * N, D, dtype=dtype), torch.randn(groups * B * K, D, dtype=dtype), inv, groups)
        else:
            mode, with_pos = case.variant.split("+")[0], case.variant.endswith("+pos")
            src = {"dense": torch.randn(B, N, D, dtype=dtype), "packed": torch.randn(B, N, D, dtype=dtype),
                   "same-row": torch.randn(B * K, D, dtype=dtype), "one-row": torch.randn(D, dtype=dtype)}[mode]
            src_mode = {"dense": gather.GATHER, "packed": gather.GATHER, "same-row": gather.SAME_ROW, "one-row": gather.ONE_ROW}[mode]
            token_row = torch.arange(B * K, dtype=torch.int32) // K if mode == "packed" else None
            gather.gather_add_fwd(out, src, pos if with_pos else None, idx, token_row, src_mode, K, B)
    return launches


def _ema_launches(case: Case, dtype) -> list[Launch]:
    import torch

    from fastjepa.kernels import ema

    sizes = [1280 * 3840, 3840, 1280 * 1280, 1280]  # one ViT-H/14 block's kinds of tensors
    targets = [torch.zeros(n) for n in sizes]
    onlines = [torch.zeros(n, dtype=dtype) for n in sizes]
    shadows = [torch.zeros(n, dtype=torch.bfloat16) for n in sizes] if case.variant == "bf16-shadow" else []
    with recorded_launches(ema) as launches:
        ema.ema_update(targets, onlines, shadows, torch.tensor(0.996))
    return launches


def cases(ops, head_dims, widths, dtypes) -> list[Case]:
    out = []
    for dtype in dtypes:
        if "attention" in ops:
            out += [Case("attention", dtype, variant, hd) for hd in head_dims for variant in ("varlen", "shared")]
        if "gather" in ops:
            variants = ("dense+pos", "dense", "packed+pos", "same-row+pos", "one-row+pos", "bwd-groups-1", "bwd-groups-4")
            out += [Case("gather", dtype, variant, width) for width in widths for variant in variants]
        if "ema" in ops:
            out += [Case("ema", dtype, variant, 0) for variant in ("no-shadow", "bf16-shadow")]
    return out


def config_label(config) -> str:
    if config is None:
        return "(not autotuned)"
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} warps={config.num_warps} stages={config.num_stages}"


def parse_config(text: str):
    import triton

    try:
        m, n, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a config is BLOCK_M,BLOCK_N,num_warps,num_stages, got {text!r}") from None
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class Job:
    case: Case
    kernel: str
    config_index: int | None  # into the kernel's autotune space, or into --configs when given
    arch: int


def run_job(job: Job, configs=None) -> dict:
    """Compile one launch of ``job.case`` for one config and target; its row."""
    launch = next(item for item in job.case.launches() if item.name == job.kernel)
    space, pickable = launch.configs(job.arch)
    config = None if job.config_index is None else (configs if configs is not None else space)[job.config_index]
    row = {"kernel": job.kernel, "op": job.case.op, "case": job.case.label, "dtype": job.case.dtype,
           "target": f"sm_{job.arch}", "config": config_label(config),
           "pickable": configs is None and config in pickable}
    threads = 32 * (config.num_warps if config is not None else launch.kwargs.get("num_warps", 4))
    try:
        with compile_only(job.arch):
            compiled = launch.jit.warmup(*launch.args, grid=(1,), **launch.kwargs, **(config.all_kwargs() if config else {}))
    except Exception as e:  # a compile error is a finding: the row says it
        return {**row, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]}
    (function,) = read_cubin(compiled.asm["cubin"]).values()
    shared = compiled.metadata.shared + function["static_shared"]
    return {**row, "error": None, "regs": function["regs"], "stack": function["stack"], "local_ld": function["local_ld"],
            "local_st": function["local_st"], "shared": shared, "hmma": function["hmma"], "hgmma": function["hgmma"],
            "threads": threads, "occupancy": round(occupancy(job.arch, function["regs"], threads, shared), 3)}


def triton_jobs(case_list, targets, configs=None, pickable_only=False) -> list[Job]:
    jobs = []
    for case in case_list:
        for launch in case.launches():
            for arch in targets:
                space, pickable = launch.configs(arch)
                if space == [None]:
                    indices = [None]
                elif configs is not None:
                    indices = range(len(configs))
                else:
                    indices = [i for i, c in enumerate(space) if not pickable_only or c in pickable]
                jobs += [Job(case, launch.name, i, arch) for i in indices]
    return jobs


# ------------------------------------------------------------------------ CUDA (csrc/)


def cuda_rows(targets) -> list[dict]:
    """Every kernel of csrc/, compiled by nvcc to a cubin per target."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        return [{"op": "csrc", "kernel": source, "target": "", "error": "nvcc not found ($CUDACXX or PATH)"} for source in CSRC]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, arch in itertools.product(CSRC, targets):
            cubin = Path(tmp) / f"{source}.{arch}.cubin"
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / source), "-o", str(cubin)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"op": "csrc", "kernel": source, "target": f"sm_{arch}", "error": done.stderr.strip()[-300:]})
                continue
            for name, f in sorted(read_cubin(cubin.read_bytes()).items()):
                threads = CSRC_THREADS
                rows.append({"op": "csrc", "kernel": demangle(name), "case": source, "dtype": "", "target": f"sm_{arch}",
                             "config": f"{threads} threads", "pickable": True, "error": None,
                             "regs": f["regs"], "stack": f["stack"], "local_ld": f["local_ld"], "local_st": f["local_st"],
                             "shared": f["static_shared"], "hmma": f["hmma"], "hgmma": f["hgmma"], "threads": threads,
                             "occupancy": round(occupancy(arch, f["regs"], threads, f["static_shared"]), 3)})
    return rows


def demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


# ------------------------------------------------------------------------ verdicts and tables


def problems(row: dict) -> list[str]:
    """Why a row is not clean (empty when it is)."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    found = []
    if row["stack"] or row["local_ld"] or row["local_st"]:
        found.append(f"spills: {row['stack']} B stack, {row['local_ld']} LDL / {row['local_st']} STL")
    if row["occupancy"] == 0:
        found.append(f"does not fit on an SM: {row['shared']} B of shared memory, {row['regs']} registers x {row['threads']} threads")
    if row["kernel"] in DOT_KERNELS:
        if row["target"] == "sm_90" and (row["hmma"] or not row["hgmma"]):
            found.append(f"dots not all on wgmma: {row['hgmma']} HGMMA, {row['hmma']} HMMA")
        if row["target"] == "sm_80" and not row["hmma"]:
            found.append("no tensor-core instruction (HMMA)")
    return found


def ptxas_version() -> str:
    """``ptxas --version`` of Triton's sm_90 ptxas (its build, the last line, is part of every cache key)."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    return get_ptxas_version(90).strip()


def _release(version_text: str | None) -> str | None:
    found = re.search(r"release ([\d.]+)", version_text or "")
    return found.group(1) if found else version_text


def versions() -> dict:
    import triton

    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    nvcc_text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else None
    return {"triton": triton.__version__, "ptxas": _release(ptxas_version()), "nvcc": _release(nvcc_text)}


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | case | dtype | target | config | pickable | regs | stack | LDL/STL | shared KiB | HMMA | HGMMA | occupancy | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r.get('case', '')} | {r.get('dtype', '')} | {r['target']} | {r.get('config', '')} "
                         f"| | | | | | | | | compile error: {r['error']} |")
            continue
        verdict = "; ".join(problems(r)) or "clean"
        occ = f"{r['occupancy']:.0%}" if r["occupancy"] is not None else ""
        lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['target']} | {r['config']} | {'yes' if r['pickable'] else 'no'} | "
                     f"{r['regs']} | {r['stack']} | {r['local_ld']}/{r['local_st']} | {r['shared'] / 1024:.1f} | {r['hmma']} | {r['hgmma']} "
                     f"| {occ} | {verdict} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """Per kernel and target: configs compiled, and per dtype how many of the configs the
    autotuner can pick are clean; the worst spill and the lowest occupancy among those."""
    meta = rows[0] if rows else {}
    lines = [f"Compiled on {meta.get('date', '?')} with Triton {meta.get('triton')} (ptxas {meta.get('ptxas')}) and nvcc {meta.get('nvcc')}, "
             f"no GPU: `{meta.get('command')}`; every row in `benchmarks/results/compile_report.jsonl`.", "",
             "| kernel | target | compiled | pickable by the autotuner and clean: bf16 · fp16 · fp32 (csrc: all instances) "
             "| worst spill of a pickable config (B) | lowest occupancy of a pickable config |",
             "|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in rows:  # a CUDA kernel's template instances count as one kernel
        kernel = re.search(r"(\w+)[<(]", r["kernel"].replace("(anonymous namespace)", "")).group(1) if r["op"] == "csrc" else r["kernel"]
        groups.setdefault((r["op"] == "csrc", kernel, r["target"]), []).append(r)
    for (is_csrc, kernel, target), group in sorted(groups.items()):
        pick = [r for r in group if r.get("pickable")]
        dtypes = [""] if is_csrc else [d for d in DTYPES if any(r["dtype"] == d for r in pick)]
        clean = " · ".join(f"{sum(not problems(r) for r in pick if r['dtype'] == d)}/{sum(r['dtype'] == d for r in pick)}" for d in dtypes)
        worst = max((r.get("stack") or 0 for r in pick), default=0)
        occ = [r["occupancy"] for r in pick if r.get("occupancy") is not None]
        lines.append(f"| {kernel} | {target} | {len(group)} | {clean} | {worst} | {f'{min(occ):.0%}' if occ else ''} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ the warm cache


def fingerprint() -> dict:
    """What a Triton cache entry's key depends on besides the kernel: Triton's own build (its
    sources and libtriton, which differs per Python version) and the ptxas that compiles."""
    import platform

    import triton
    from triton.runtime.cache import triton_key

    return {"triton": triton.__version__, "python": ".".join(platform.python_version_tuple()[:2]),
            "triton_key": hashlib.sha256(triton_key().encode()).hexdigest()[:16], "ptxas": ptxas_version().splitlines()[-1]}


def check_cache(cache_dir: Path) -> int:
    """Print whether ``cache_dir`` was warmed for this machine's Triton; 0 when it was."""
    stamp = cache_dir / "fastjepa-warm.json"
    if not stamp.exists():
        print(f"{cache_dir}: not warmed (no {stamp.name}); Triton compiles every kernel on first use")
        return 1
    warmed, here = json.loads(stamp.read_text()), fingerprint()
    differ = [f"{k} {warmed['fingerprint'].get(k)} there, {v} here" for k, v in here.items() if warmed["fingerprint"].get(k) != v]
    if differ:
        print(f"{cache_dir}: warmed for another Triton build ({'; '.join(differ)}): its entries cannot match, "
              "so Triton ignores them and compiles every kernel on first use (slower start, same results)")
        return 1
    print(f"{cache_dir}: warmed on {warmed['date']} for {', '.join(warmed['targets'])} with this Triton build: {warmed['kernels']} kernels ready")
    return 0


# ------------------------------------------------------------------------ main


def _init_worker(cache_dir):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # the cubin and its metadata only: a warm cache small enough to carry (not part of the key)
    sys.path.insert(0, str(ROOT))


def run_jobs(jobs, n_procs, cache_dir, configs=None, progress=True) -> list[dict]:
    from tqdm import tqdm

    # spawn, not fork: a forked child of a process that has imported torch can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_procs, mp_context=context, initializer=_init_worker, initargs=(cache_dir,)) as pool:
        futures = [pool.submit(run_job, job, configs) for job in jobs]
        return [f.result() for f in tqdm(futures, desc="compiling", unit="kernel", disable=not progress)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--production", action="store_true",
                        help="only the configs the autotuner can pick, bf16, the production head dims and widths; exit 1 on any unclean row")
    parser.add_argument("--kernels", default="attention,gather,ema,csrc", help="comma-separated: attention, gather, ema, csrc")
    parser.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=list(HEAD_DIMS))
    parser.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=list(WIDTHS))
    parser.add_argument("--dtypes", type=lambda s: s.split(","), help="comma-separated (default: all three; bfloat16 with --production)")
    parser.add_argument("--targets", type=lambda s: [int(x.removeprefix("sm_")) for x in s.split(",")], default=list(TARGETS))
    parser.add_argument("--configs", type=parse_config, nargs="+",
                        help="try these BLOCK_M,BLOCK_N,num_warps,num_stages configs instead of the attention kernels' autotune space")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes (default: the CPU count)")
    parser.add_argument("--results", type=Path, help="append the rows to this JSONL file")
    parser.add_argument("--markdown", type=Path, help="write the full table and the summary to this markdown file")
    parser.add_argument("--readme", type=Path, help="rewrite this README's compile-report block with the summary")
    parser.add_argument("--json", type=Path, help="write the rows as one JSON list (for tests)")
    parser.add_argument("--warm-cache", type=Path, metavar="DIR", help="compile into this Triton cache folder and stamp it for --check-cache")
    parser.add_argument("--check-cache", type=Path, metavar="DIR", help="only say whether DIR was warmed for this machine's Triton")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.check_cache:
        return check_cache(args.check_cache)
    ops = set(args.kernels.split(","))
    if not ops <= {"attention", "gather", "ema", "csrc"}:
        parser.error(f"--kernels takes attention, gather, ema and csrc, got {args.kernels}")
    if not set(args.targets) <= set(SM_LIMITS):
        parser.error(f"--targets takes sm_80 and sm_90, got {args.targets}")
    dtypes = args.dtypes or (["bfloat16"] if args.production else list(DTYPES))
    if not set(dtypes) <= set(DTYPES):
        parser.error(f"--dtypes takes {', '.join(DTYPES)}, got {dtypes}")
    with tempfile.TemporaryDirectory(prefix="fastjepa-triton-") as scratch:  # without --warm-cache, every kernel is compiled anew
        _init_worker(str(args.warm_cache.resolve()) if args.warm_cache else scratch)
        jobs = triton_jobs(cases(ops, args.head_dims, args.widths, dtypes), args.targets, args.configs, pickable_only=args.production)
        rows = run_jobs(jobs, args.jobs, os.environ["TRITON_CACHE_DIR"], args.configs, progress=not args.quiet)
    if "csrc" in ops and not args.warm_cache:
        rows += cuda_rows(args.targets)
    common = {**versions(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["python", "benchmarks/compile_report.py", *(argv if argv is not None else sys.argv[1:])])}
    rows = [{**row, **common} for row in rows]

    if args.warm_cache:
        stamp = {"fingerprint": fingerprint(), "date": common["date"], "targets": [f"sm_{a}" for a in args.targets],
                 "kernels": sum(not r.get("error") for r in rows)}
        (args.warm_cache / "fastjepa-warm.json").write_text(json.dumps(stamp, indent=1) + "\n")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    if args.json:
        args.json.write_text(json.dumps(rows))
    if args.markdown:
        args.markdown.write_text("# Kernel compile report\n\n" + summary(rows) + "\n" + markdown(rows))
    if args.readme:
        from common import rewrite_block

        rewrite_block(args.readme, README_BEGIN, README_END, summary(rows))
    print(summary(rows))
    bad = [r for r in rows if (r.get("pickable") or r.get("op") == "csrc") and problems(r)]
    for r in bad:
        print(f"NOT CLEAN: {r['kernel']} {r.get('case', '')} {r.get('dtype', '')} {r['target']} {r.get('config', '')}: {'; '.join(problems(r))}")
    return 1 if bad and args.production else 0


if __name__ == "__main__":
    sys.exit(main())
