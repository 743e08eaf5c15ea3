"""Host time per training step without a GPU: Python, dispatch and launches.

    python benchmarks/bench_host.py                  # ViT-B/16 at batch 256 and ViT-H/14 at batch 128, both modes
    python benchmarks/bench_host.py --quick          # ViT-tiny/8 at 64 px: checks the script
    python benchmarks/bench_host.py --device cuda    # on a GPU: the same, plus the GPU time per step

How, without a GPU: every tensor lives on PyTorch's ``meta`` device. Each op goes through
Python and the dispatcher and makes its outputs' shapes, but no kernel runs, so a step's wall
time is the host's share of a GPU step: Python, dispatch, and in place of each kernel launch
the meta kernel's shape work. What this leaves out: the CUDA launch calls themselves (a few
µs each on a GPU, about in proportion to ``ops_per_step``), and autocast (the meta device has
none): both steps run fp32 here, so the reference's per-forward bf16 weight casts are not
counted, and fastjepa runs without its bf16 target shadow. fastjepa's own ops (gather,
attention, ``adamw_ema_``, ``ema_update_``) run their fake implementations: one op each, as
one launch of their CUDA or Triton kernels would be. And what this adds: many ops' meta
implementations are Python (``torch._refs`` and prims decompositions, the custom ops' fake
functions), 0.1 to 0.3 ms each on this machine's CPU, far more than a CUDA launch, so
``host_ms_per_step`` here over-states a GPU's host time many times over and weighs op kinds
differently from a GPU; ``ops_per_step`` and ``syncs_per_step`` are the figures that carry
over, and ``--device cuda`` gives the real host time.

Modes, one run, the published ViT mask settings, predictor depth 12 and width 384:
  reference-eager  ``benchmarks/bench_step.py``'s re-creation of the reference's step
                   (``Step.reference_step``): schedules, forward, loss, backward, AdamW
                   (foreach, as on a GPU), ``zero_grad``, the per-parameter EMA loop and the
                   reference's ``loss.item()`` (a sync on a GPU);
  fastjepa         ``fastjepa.step.train_step``, the trainer's step, with what the trainer
                   builds once per run: a ``FusedUpdate`` (AdamW and the EMA in one
                   ``adamw_ema_`` pass: the GPU's default with the CUDA extension) and a
                   ``NonfiniteGuard``; its results read one step late, outside the timing, as
                   the trainer reads them.
Masks are drawn before the timed steps (a loader's work, in both). Per step:
  host_ms_per_step  median wall time of one step call over ``--steps`` steps after ``--warmup``;
  syncs_per_step    reads of device tensors' values (``fastjepa.profiling.HostReads``, the
                    counter of tests/test_step_sync.py), counted over the timed steps' count;
  ops_per_step      aten ops dispatched (a ``TorchDispatchMode``), in one more step.
On a GPU (``--device cuda``, bf16 autocast there) the row also holds gpu_ms_per_step (CUDA
events around the same steps). Rows are appended to benchmarks/results/bench_host.jsonl
(or --results).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_step import MASKS, QUICK_MIN_KEEP, Step  # noqa: E402
from common import RESULTS, hardware, write_rows  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastjepa.data.normalize import normalize  # noqa: E402
from fastjepa.profiling import HostReads  # noqa: E402
from fastjepa.step import train_step, untimed  # noqa: E402

# name -> (model, patch, crop, batch)
MODELS = {"vit_base/16": ("vit_base", 16, 224, 256), "vit_huge/14": ("vit_huge", 14, 224, 128)}
QUICK_MODELS = {"vit_tiny/8-64": ("vit_tiny", 8, 64, 4)}
MODES = ("reference-eager", "fastjepa")


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class HostSteps:
    """One mode's steps on pre-drawn masks, through bench_step's ``Step`` (its models, optimizer,
    schedules and, for fastjepa, the trainer's per-run ``FusedUpdate`` and ``NonfiniteGuard``)."""

    def __init__(self, mode, spec, device, pred_depth, pred_emb_dim, min_keep, batches: int):
        model, patch, crop, batch = spec
        self.step = Step(mode, model, patch, crop, batch, device, pred_depth, pred_emb_dim, None, min_keep, fused_optimizer_ema=True)
        g = torch.Generator().manual_seed(0)
        self.masks = [self.step.sampler.sample(batch, generator=g, device=device) for _ in range(batches)]
        self.images = normalize(self.step.images[0])
        self.index, self.queued = 0, []

    def __call__(self) -> None:
        s, (masks_enc, masks_pred) = self.step, self.masks[self.index % len(self.masks)]
        self.index += 1
        if s.reference:
            s.reference_step(untimed, self.images, masks_enc, masks_pred)
        else:
            self.queued.append(train_step(s.model, s.target, s.optimizer, s.lr_schedule, s.wd_schedule, s.momentum, self.images,
                                          masks_enc, masks_pred, use_bfloat16=s.bf16, target_shadow=s.shadow,
                                          fused_optimizer_ema=s.update, guard=s.guard))

    def check(self) -> None:
        """The queued steps' guard, read after the timing (on meta there is nothing to read)."""
        for result in self.queued:
            if result.loss.device.type != "meta" and result.nonfinite:
                raise FloatingPointError(f"{self.step.mode}: {result.nonfinite}")
        self.queued = []


@contextlib.contextmanager
def meta_reads(device: torch.device):
    """On the meta device, a read of a tensor's values (the reference's ``loss.item()``) answers
    zeros instead of failing; the timing pass's only stand-in (``HostReads`` counts reads the same
    way, in its own pass, since a TorchFunctionMode slows every op)."""
    if device.type != "meta":
        yield
        return
    real = torch.Tensor.item
    torch.Tensor.item = lambda t: real(torch.zeros((), dtype=t.dtype)) if t.is_meta else real(t)
    try:
        yield
    finally:
        torch.Tensor.item = real


def bench(name, spec, mode, device, args) -> dict:
    pred_depth, pred_emb_dim = (2, 96) if args.quick else (12, 384)
    min_keep = QUICK_MIN_KEEP if args.quick else MASKS["min_keep"]
    steps = HostSteps(mode, spec, device, pred_depth, pred_emb_dim, min_keep, batches=4)
    cuda = device.type == "cuda"
    times, events = [], []
    with meta_reads(device):
        for _ in range(args.warmup):
            steps()
        steps.check()
        if cuda:
            torch.cuda.synchronize()
        for _ in range(args.steps):
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            started = time.perf_counter()
            steps()
            times.append((time.perf_counter() - started) * 1e3)
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
            torch.cuda.synchronize()
        steps.check()
        counter = OpCount()
        with counter:
            steps()
    reads = HostReads(device.type)
    with reads:
        for _ in range(args.steps):
            steps()
    steps.check()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    host_ms = statistics.median(times)
    gpu_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])] if cuda else None
    return {
        "bench": "bench_host", "model": name, "mode": mode, "batch": spec[3], "quick": args.quick,
        "host_ms_per_step": round(host_ms, 3), "host_p20_ms": round(q[1], 3), "host_p80_ms": round(q[7], 3),
        "syncs_per_step": len(reads.seen) / args.steps, "sync_calls": sorted(set(reads.seen)), "ops_per_step": counter.ops,
        "gpu_ms_per_step": round(statistics.median(gpu_ms), 3) if gpu_ms else None,
        "how": "meta device: no kernel runs, fp32 (no autocast)" if device.type == "meta" else f"{device.type}, real kernels",
        "device": device.type, "hardware": hardware(device) if cuda else hardware(torch.device("cpu")),
        "steps": args.steps, "warmup": args.warmup,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help=f"comma-separated among {', '.join(MODELS)} (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated among {', '.join(MODES)}")
    parser.add_argument("--device", default="meta", help="meta (default: no GPU needed) or cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="ViT-tiny/8 at 64 px, 2 steps: checks the script")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench_host.jsonl")
    args = parser.parse_args(argv)
    models = QUICK_MODELS if args.quick else MODELS
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    names = list(models) if args.models is None else args.models.split(",")
    modes = args.modes.split(",")
    unknown = [n for n in names if n not in models] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown models or modes: {unknown}")
    device = torch.device(args.device)
    rows = []
    print(f"{'model':<16}{'mode':<18}{'host ms/step':>14}{'syncs/step':>12}{'ops/step':>10}{'GPU ms/step':>13}")
    for name in names:
        for mode in modes:
            row = bench(name, models[name], mode, device, args)
            rows.append(row)
            gpu = f"{row['gpu_ms_per_step']:.2f}" if row["gpu_ms_per_step"] is not None else "-"
            print(f"{name:<16}{mode:<18}{row['host_ms_per_step']:>14.2f}{row['syncs_per_step']:>12g}{row['ops_per_step']:>10}{gpu:>13}")
        reference, fast = (next((r for r in rows if r["model"] == name and r["mode"] == m), None) for m in MODES)
        if reference and fast:
            print(f"{name}: fastjepa host time = {fast['host_ms_per_step'] / reference['host_ms_per_step']:.2f}x reference-eager's")
    write_rows(args.results, rows, argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return rows


if __name__ == "__main__":
    main()
