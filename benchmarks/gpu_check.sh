#!/usr/bin/env bash
# The one command for a GPU machine without network (../shared/ENVIRONMENT.md, "The H200 test
# machine"): install the project from this checkout (compiling the CUDA extension), print the
# GPU and versions, measure the copy-bandwidth and bf16-matmul ceilings, run the GPU tests, the
# kernel benchmarks and the standalone CUDA benchmarks, and write everything to one dated
# results file plus a markdown table:
#
#     benchmarks/gpu_check.sh        # from anywhere; 5 to 8 minutes on an H200
#
#     benchmarks/results/<date>-<gpu>.jsonl   result rows (ceilings, kernels, test summary)
#     benchmarks/results/<date>-<gpu>.md      the same as tables, and the targets (pass / miss)
#     README.md                               its targets table, rewritten from every results file
#     benchmarks/results/<date>-<gpu>.log     everything printed
#     benchmarks/results/<date>-<gpu>-figures/ kernels.png, step.png, phases.png, scaling.png
#     benchmarks/results/scaling.jsonl        the 300-epoch projection from the measured step rate
#
# Every stage runs under its own time limit (8 minutes in all); a failing stage does not stop
# the others, and the exit code is non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PYTHON=${PYTHON:-python}

if ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
GPU=$($PYTHON -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
BASE=benchmarks/results/$(date -u +%Y-%m-%d)-$GPU
RESULTS=$BASE.jsonl
mkdir -p benchmarks/results
exec > >(tee -a "$BASE.log") 2>&1

# Triton's compile cache. Compiled on first use, the autotune configs would cost device minutes
# one after another inside the timed stages; the triton-warm stage below compiles them first, on
# every CPU core at once (benchmarks/compile_report.py --warm-cache: the launches' own signature,
# specialization and options, so the JIT finds them). It finds nothing to do when the cache was
# warmed before the run, on any machine with this machine's Python minor version and Triton (3.12
# and 3.6.0 on the H200: the cache key covers Triton's sources, its libtriton build for that
# Python, the target sm_90 and the bundled ptxas's version):
#     python benchmarks/compile_report.py --production --dtypes bfloat16,float16 --targets 90 \
#         --kernels attention,gather,ema --warm-cache .triton-cache
# with .triton-cache (git-ignored) carried along with the working tree. The line below says
# whether it was warmed for this machine's Triton build; when it was not, Triton ignores its
# entries and the stage compiles everything: a slower start, the same results.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
$PYTHON benchmarks/compile_report.py --check-cache "$TRITON_CACHE_DIR" || true

failed=()
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
}

stage install 60 env FASTJEPA_BUILD_CUDA=1 $PYTHON -m pip install --no-build-isolation --no-deps --quiet -e .
stage versions 10 $PYTHON -c "
import platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
stage triton-warm 30 $PYTHON benchmarks/compile_report.py --production --dtypes bfloat16,float16 --targets 90 \
    --kernels attention,gather,ema --warm-cache "$TRITON_CACHE_DIR" --quiet
stage ceilings 20 $PYTHON benchmarks/bench_ceilings.py --results "$RESULTS"
stage gpu-tests 100 $PYTHON -m pytest -q -p no:cacheprovider --junitxml="$BASE-tests.xml" \
    tests/test_gather.py tests/test_ema.py tests/test_optim.py tests/test_cuda_ext.py tests/test_attention.py tests/test_ops_backend.py tests/test_multiblock.py \
    tests/test_vision_transformer.py tests/test_train_step.py tests/test_ragged.py \
    tests/test_data_loader.py tests/test_data_torchvision.py tests/test_data_dali.py tests/test_data_color.py \
    tests/test_weights.py
stage tests-summary 5 $PYTHON - "$BASE-tests.xml" "$RESULTS" <<'PY'
import json, sys, datetime, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
row = {"bench": "gpu_tests", **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": "benchmarks/gpu_check.sh"}
open(sys.argv[2], "a").write(json.dumps(row) + "\n")
print(row)
PY
stage kernels 50 $PYTHON benchmarks/bench_kernels.py --ops gather,ema,adamw_ema --results "$RESULTS"
# The standalone CUDA benchmarks (csrc/bench/, no Python), one line each.
stage cuda-benches 30 bash -c 'cmake -S . -B build/cuda-benches -DFASTJEPA_BUILD_PYTHON_MODULE=OFF > /dev/null &&
    cmake --build build/cuda-benches --parallel "$(nproc)" &&
    for bench in bench_ema bench_adamw_ema bench_gather; do build/cuda-benches/$bench --iters 10 || exit 1; done'
stage attention 40 $PYTHON benchmarks/bench_kernels.py --ops attention --results "$RESULTS"
stage data 30 $PYTHON benchmarks/bench_data.py --images 400 --batch-size 128 --workers 8 --epochs 3 --results "$RESULTS"
stage step 40 $PYTHON benchmarks/bench_step.py --models vit_huge/14 --steps 8 --warmup 2 --results "$RESULTS"
# The trained step with the switches that need no compile: peak memory with accumulation and checkpointing (README
# "Smaller machines"), and the fused AdamW + EMA's optimizer phase (README "Trainer switches"; independent of the memory
# switches), against the step stage's plain fastjepa row.
stage step-switches 20 $PYTHON benchmarks/bench_step.py --models vit_huge/14 --modes fastjepa --steps 2 --warmup 1 --grad-accum 4 \
    --activation-checkpointing --fused-optimizer-ema --results "$RESULTS"
# The same step fed by the loader over generated JPEGs: the data wait per step (torchvision: the H200 has no DALI).
stage step-data 25 $PYTHON benchmarks/bench_step.py --models vit_huge/14 --modes fastjepa --data torchvision --images 384 \
    --steps 6 --warmup 2 --results "$RESULTS"
stage report 5 bash -c "$PYTHON benchmarks/report.py '$RESULTS' > '$BASE.md' && $PYTHON benchmarks/report.py --readme README.md"
stage figures 10 $PYTHON benchmarks/plot.py "$RESULTS" --out "$BASE-figures"
# What the measured one-GPU rate means for 300 epochs on 8 to 128 GPUs (a model; benchmarks/results/scaling.jsonl).
stage scaling 5 $PYTHON benchmarks/scaling.py --plot "$BASE-figures/scaling.png"
rm -f "$BASE-tests.xml"

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all stages passed; results in $BASE.{jsonl,md,log}"
else
    echo "gpu_check: FAILED stages: ${failed[*]}; results so far in $BASE.{jsonl,md,log}"
    exit 1
fi
