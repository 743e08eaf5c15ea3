"""Kernel microbenchmarks: the masked-token gather, the EMA, the fused AdamW + EMA step and
attention against their peers.

    python benchmarks/bench_kernels.py              # ViT-B/16, ViT-L/16, ViT-H/14, B=128, bf16 tokens (a GPU)
    python benchmarks/bench_kernels.py --ops ema,adamw_ema
    python benchmarks/bench_kernels.py --ops attention
    python benchmarks/bench_kernels.py --quick      # tiny shapes, a few runs: checks the script (CPU: torch
                                                    # backend and, with TRITON_INTERPRET=1, the interpreter)

gather: the context tokens of one mask, K = 36% of the N patches per sample (92 of 256 for
ViT-H/14), forward, backward and both. Peers: the reference's ``apply_masks`` idiom (an
int64 index repeated to (B, K, D), ``torch.gather``, ``torch.cat``) and ``torch.gather``
with an expanded index. Bytes: forward reads and writes B*K*D values; backward reads
B*K*D and writes all B*N*D gradient values (zeros included).

ema: every fp32 parameter of the encoder (389 tensors, 630 M values for ViT-H/14).
Peers: the reference's per-parameter ``mul_``/``add_`` loop, ``torch._foreach_lerp_`` and,
when NVIDIA apex is installed, its ``multi_tensor_axpby``. Bytes: 12 per parameter (read
target and online, write target), 14 with a bf16 shadow.

adamw_ema: one optimizer step of the encoder's parameters followed by the target EMA.
fastjepa's ``adamw_ema_`` (one pass; the torch backend is a per-tensor loop, timed with
--quick only) against ``torch.optim.AdamW(fused=True)`` then ``torch._foreach_lerp_`` and,
with apex, ``FusedAdam`` then ``multi_tensor_axpby``. Bytes: 36 per parameter (read grad,
param, both moments and target, write param, moments and target), 38 with a bf16 shadow.

attention: packed ragged sequences at I-JEPA shapes, forward, backward and both, in TFLOP/s
with FlashAttention's convention (forward 4 * S^2 * H * D per sequence, backward 2.5x):
the ViT-H/14 encoder (16 heads of 80, contexts of 40..200 of 256 patches, B=128), its
predictor (16 heads of 24, rows [context ; 45 targets], 4 blocks), the same predictor in
the shared-context layout, the ViT-B/16 encoder and the 448-px ViT-H/16 encoder. Peers
(benchmarks/attention_peers.py): torch's varlen_attn, SDPA on padded batches (flash,
efficient, cuDNN), FlexAttention with a BlockMask under torch.compile, the two-call
log-sum-exp merge for the shared context, and flash-attn / xformers when installed.

Every provider's result is first checked against the reference idiom; then times are
medians (p20, p80) from ``triton.testing.do_bench`` on a GPU (L2 flushed before each run),
host wall time on the CPU. "% copy" compares the achieved bandwidth with a device-to-device
copy measured in the same run. Rows are appended to benchmarks/results/bench_kernels.jsonl
(or --results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from attention_peers import PEERS, AttentionCase, Unavailable  # noqa: E402
from common import RESULTS, copy_bandwidth_gbs, device_times_ms, hardware, write_rows  # noqa: E402
from report import REFERENCES  # noqa: E402

from fastjepa.models import vision_transformer as vit  # noqa: E402
from fastjepa.ops import adamw_ema_, ema_update_, gather_tokens, use_backend  # noqa: E402
from fastjepa.ops.backend import device_problem  # noqa: E402

# model -> (patch size, image size)
MODELS = {"vit_base": (16, 224), "vit_large": (16, 224), "vit_huge": (14, 224)}
QUICK_MODELS = {"vit_tiny": (16, 64)}
CONTEXT_FRACTION = 0.36
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ gather


def reference_apply_masks(x, idx):
    """The reference's idiom: an int64 index repeated to (B, K, D), gather, cat."""
    return torch.cat([torch.gather(x, dim=1, index=idx.unsqueeze(-1).repeat(1, 1, x.size(-1)))], dim=0)


def gather_expand(x, idx):
    return torch.gather(x, dim=1, index=idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def fastjepa_gather(backend):
    def run(x, idx):
        with use_backend(backend):
            return gather_tokens(x, idx)

    return run


def gather_providers(device):
    providers = {"reference apply_masks": (reference_apply_masks, torch.int64), "torch.gather+expand": (gather_expand, torch.int64)}
    for backend in ("cuda", "triton", "torch"):
        if device_problem(backend, device) is None:
            providers[f"fastjepa {backend}"] = (fastjepa_gather(backend), torch.int32)
    return providers


def bench_gather(model, B, dtype, device, quick):
    patch, size = (QUICK_MODELS if quick else MODELS)[model]
    N, D = (size // patch) ** 2, vit.VIT_SHAPES[model][0]
    K = round(CONTEXT_FRACTION * N)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, D, device=device, generator=g).to(dtype).requires_grad_()
    idx = torch.rand(B, N, device=device, generator=g).argsort(dim=1)[:, :K]
    grad = torch.randn(B, K, D, device=device, generator=g).to(dtype)
    itemsize = x.element_size()
    moved = {"fwd": 2 * B * K * D * itemsize, "bwd": (B * K * D + B * N * D) * itemsize}
    moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]

    expected_out = reference_apply_masks(x, idx)
    (expected_grad,) = torch.autograd.grad(expected_out, x, grad)
    rows = []
    for provider, (fn, index_dtype) in gather_providers(device).items():
        index = idx.to(index_dtype)
        out = fn(x, index)
        (grad_x,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        if not (torch.equal(out, expected_out) and torch.equal(grad_x, expected_grad)):
            raise AssertionError(f"gather: {provider} disagrees with the reference idiom on {model}")
        modes = {
            "fwd": lambda: fn(x, index),
            "bwd": lambda: torch.autograd.grad(out, x, grad, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(x, index), x, grad),
        }
        for mode, run in modes.items():
            rows.append({"op": "gather", "mode": mode, "model": model, "provider": provider,
                         "shape": f"B={B} N={N} K={K} D={D}", "dtype": str(dtype).replace("torch.", ""),
                         "bytes": moved[mode], **timed(run, device, quick)})
    return rows


# --------------------------------------------------------------------------------- ema


def encoder_shapes(model, quick):
    patch, size = (QUICK_MODELS if quick else MODELS)[model]
    with torch.device("meta"):
        encoder = vit.__dict__[model](img_size=[size], patch_size=patch, **({"depth": 1} if quick else {}))
    return [p.shape for p in encoder.parameters()]


def ema_loop(targets, onlines, m):
    for t, o in zip(targets, onlines):
        t.mul_(m).add_((1.0 - m) * o)


def apex_peers(device):
    """NVIDIA apex's ``amp_C`` (multi_tensor_axpby) and ``FusedAdam`` when installed on a GPU
    machine, else None: optional peers, never required."""
    if device.type != "cuda":
        return None
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
        from apex.optimizers import FusedAdam
    except Exception:  # not installed, or built without its CUDA extensions
        return None

    def axpby_ema(targets, onlines, m):
        """target = m * target + (1 - m) * online with multi_tensor_axpby (out = a * x + b * y)."""
        flag = torch.zeros(1, dtype=torch.int, device=device)
        return lambda: multi_tensor_applier(amp_C.multi_tensor_axpby, flag, [targets, onlines, targets], m, 1.0 - m, -1)

    return axpby_ema, FusedAdam


def fastjepa_ema(backend, targets, onlines, momentum, shadows):
    def run():
        with use_backend(backend):
            ema_update_(targets, onlines, momentum, shadows)

    return run


def bench_ema(model, device, quick):
    shapes = encoder_shapes(model, quick)
    params = sum(s.numel() for s in shapes)
    g = torch.Generator(device=device).manual_seed(0)
    targets = [torch.randn(s, device=device, generator=g) for s in shapes]
    onlines = [torch.randn(s, device=device, generator=g) for s in shapes]
    shadows = [torch.empty(s, device=device, dtype=torch.bfloat16) for s in shapes]
    m = 0.996
    momentum = torch.tensor(m, device=device)
    providers = {
        "reference loop": (lambda: ema_loop(targets, onlines, m), 12),
        "torch._foreach_lerp_": (lambda: torch._foreach_lerp_(targets, onlines, 1.0 - m), 12),
    }
    for backend in ("cuda", "triton"):
        if device_problem(backend, device) is None:
            providers[f"fastjepa {backend}"] = (fastjepa_ema(backend, targets, onlines, momentum, ()), 12)
            providers[f"fastjepa {backend} +bf16 shadow"] = (fastjepa_ema(backend, targets, onlines, momentum, shadows), 14)
    apex = apex_peers(device)
    if apex:
        providers["apex multi_tensor_axpby"] = (apex[0](targets, onlines, m), 12)

    start = [t.clone() for t in targets[:3]]
    expected = [m * t.double() + (1 - m) * o.double() for t, o in zip(start, onlines)]
    rows = []
    for provider, (run, bytes_per_param) in providers.items():
        for t, s in zip(targets, start):
            t.copy_(s)
        run()
        for t, e in zip(targets, expected):
            torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-6, msg=lambda msg: f"ema: {provider} is wrong: {msg}")
        rows.append({"op": "ema", "mode": "update", "model": model, "provider": provider,
                     "shape": f"{len(shapes)} tensors, {params / 1e6:.1f} M params", "dtype": "float32",
                     "bytes": bytes_per_param * params, **timed(run, device, quick)})
    return rows


# ---------------------------------------------------------------------------- adamw_ema

ADAMW = dict(lr=2.0**-13, weight_decay=0.04, betas=(0.9, 0.999), eps=1e-8)  # lr and wd as fp32 holds them


def bench_adamw_ema(model, device, quick):
    shapes = encoder_shapes(model, quick)
    params_count = sum(s.numel() for s in shapes)
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=g).requires_grad_() for s in shapes]
    for p in params:
        p.grad = 1e-2 * torch.randn(p.shape, device=device, generator=g)
    grads = [p.grad for p in params]
    targets = [torch.randn(s, device=device, generator=g) for s in shapes]
    shadows = [torch.empty(s, device=device, dtype=torch.bfloat16) for s in shapes]
    weights = [p.detach() for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    step = torch.zeros((), device=device)
    lr, weight_decay = torch.tensor(ADAMW["lr"], device=device), torch.tensor(ADAMW["weight_decay"], device=device)
    m = 0.996
    momentum = torch.tensor(m, device=device)

    def fastjepa(backend, with_shadow):
        def run():
            with use_backend(backend):
                adamw_ema_(weights, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, betas=ADAMW["betas"], eps=ADAMW["eps"],
                           targets=targets, momentum=momentum, shadows=shadows if with_shadow else ())
        return run, lambda: (torch._foreach_zero_(exp_avgs), torch._foreach_zero_(exp_avg_sqs), step.zero_())

    def optimizer_then_lerp(optimizer, ema):
        def run():
            optimizer.step()
            ema()
        return run, optimizer.state.clear

    torch_fused = torch.optim.AdamW(params, fused=True, **ADAMW)
    providers = {"torch AdamW(fused)+_foreach_lerp_": (
        optimizer_then_lerp(torch_fused, lambda: torch._foreach_lerp_(targets, weights, 1.0 - m)), 36)}
    if device_problem("cuda", device) is None:
        providers["fastjepa cuda"] = (fastjepa("cuda", False), 36)
        providers["fastjepa cuda +bf16 shadow"] = (fastjepa("cuda", True), 38)
    if quick:
        providers["fastjepa torch"] = (fastjepa("torch", False), 36)
    apex = apex_peers(device)
    if apex:
        axpby_ema, FusedAdam = apex
        apex_adam = FusedAdam(params, adam_w_mode=True, **ADAMW)
        providers["apex FusedAdam+multi_tensor_axpby"] = (optimizer_then_lerp(apex_adam, axpby_ema(targets, weights, m)), 36)

    # One step from zero moments, checked against the torch backend on copies of the first tensors.
    start = [(w.clone(), t.clone()) for w, t in zip(weights[:3], targets[:3])]
    expected_w, expected_t = [w.clone() for w, _ in start], [t.clone() for _, t in start]
    with use_backend("torch"):
        adamw_ema_(expected_w, grads[:3], [torch.zeros_like(w) for w in expected_w], [torch.zeros_like(w) for w in expected_w],
                   torch.zeros((), device=device), lr, weight_decay, betas=ADAMW["betas"], eps=ADAMW["eps"], targets=expected_t,
                   momentum=momentum)
    rows = []
    for provider, ((run, reset), bytes_per_param) in providers.items():
        with torch.no_grad():
            for (w0, t0), w, t in zip(start, weights, targets):
                w.copy_(w0)
                t.copy_(t0)
        reset()
        run()
        for actual, wanted in zip(weights[:3] + targets[:3], expected_w + expected_t):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6, msg=lambda msg: f"adamw_ema: {provider} is wrong: {msg}")
        rows.append({"op": "adamw_ema", "mode": "step", "model": model, "provider": provider,
                     "shape": f"{len(shapes)} tensors, {params_count / 1e6:.1f} M params", "dtype": "float32",
                     "bytes": bytes_per_param * params_count, **timed(run, device, quick)})
    return rows


# --------------------------------------------------------------------------- attention

# name -> (heads, head_dim, patches, batch, target blocks in the shared layout, target length)
ATTENTION_CASES = {
    "vit_huge encoder": (16, 80, 256, 128, 0, 0),
    "vit_huge predictor": (16, 24, 256, 128, 0, 45),
    "vit_huge shared-context predictor": (16, 24, 256, 128, 4, 45),
    "vit_base encoder": (12, 64, 196, 128, 0, 0),
    "vit_huge 448px encoder": (16, 80, 784, 32, 0, 0),
}
QUICK_ATTENTION_CASES = {"tiny encoder": (2, 24, 16, 3, 0, 0), "tiny shared-context predictor": (2, 24, 16, 3, 2, 3)}
PREDICTOR_BLOCKS = 4
CONTEXT_RANGE = (0.16, 0.78)  # sampled context lengths as a fraction of the patches (40..200 of 256)


def attention_case(name, spec, dtype, device) -> AttentionCase:
    heads, head_dim, patches, batch, blocks, target = spec
    g = torch.Generator().manual_seed(0)
    low, high = (round(f * patches) for f in CONTEXT_RANGE)
    contexts = torch.randint(low, high + 1, (batch,), generator=g).tolist()
    if blocks:  # one sequence per sample: [context | block 0 | ... ]
        lengths = [n for c in contexts for n in [c] + [target] * blocks]
    elif target:  # one sequence per (block, sample): [context ; block]
        lengths = [c + target for _ in range(PREDICTOR_BLOCKS) for c in contexts]
    else:
        lengths = contexts
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    return AttentionCase(name, q, k, v, lengths, blocks)


def bench_attention(name, spec, dtype, device, quick):
    case = attention_case(name, spec, dtype, device)
    with use_backend("torch"):
        expected = PEERS["fastjepa torch"](case)()
    grad = torch.randn_like(expected)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    flops = {"fwd": case.flops(), "bwd": 2.5 * case.flops(), "fwd+bwd": 3.5 * case.flops()}
    shape = f"{len(case.lengths)} seqs, {case.q.shape[0]} tokens, {case.q.shape[1]}x{case.q.shape[2]}"
    rows = []
    for provider, make in PEERS.items():
        if provider == "fastjepa torch" and not quick:
            continue  # a per-sequence Python loop: the correctness oracle here, not a contender
        try:
            if provider.startswith("fastjepa"):
                problem = device_problem(provider.split()[1], device)
                if problem:
                    raise Unavailable(problem)
            run = make(case)
        except Unavailable as e:
            print(f"  {name}: {provider} skipped: {e}")
            continue
        leaves = getattr(run, "leaves", (case.q, case.k, case.v))
        out = run()
        if not getattr(run, "padded", False):
            torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol,
                                       msg=lambda m: f"attention: {provider} disagrees with the reference on {name}: {m}")
        g = grad if not getattr(run, "padded", False) else torch.randn_like(out)
        modes = {
            "fwd": run,
            "bwd": lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(run(), leaves, g),
        }
        for mode, fn in modes.items():
            try:
                times = timed(fn, device, quick)
            except RuntimeError as e:
                print(f"  {name}: {provider} {mode} failed: {str(e).splitlines()[0]}")
                continue
            rows.append({"op": "attention", "mode": mode, "model": name, "provider": provider, "shape": shape,
                         "dtype": str(dtype).replace("torch.", ""), "flops": flops[mode], **times})
    return rows


# ------------------------------------------------------------------------------ report


def timed(run, device, quick):
    times = device_times_ms(run, device, iters=3 if quick else 100, warmup=1 if quick else 10)
    return {k: round(v, 5) for k, v in times.items()}


def print_table(rows):
    header = (f"{'op':<10}{'mode':<9}{'case':<34}{'provider':<36}{'median ms':>11}{'p20':>9}{'p80':>9}"
              f"{'rate':>16}{'% copy':>8}{'vs ref':>8}")
    print(header)
    print("-" * len(header))
    reference = {(r["op"], r["mode"], r["model"]): r["median_ms"] for r in rows if r["provider"] == REFERENCES[r["op"]]}
    for r in rows:
        ref = reference.get((r["op"], r["mode"], r["model"]))
        speedup = f"{ref / r['median_ms']:7.2f}x" if ref else ""
        rate = f"{r['tflop_s']:.1f} TFLOP/s" if "tflop_s" in r else f"{r['gb_s']:.0f} GB/s"
        pct = f"{r['pct_copy']:8.1f}" if "pct_copy" in r else " " * 8
        print(f"{r['op']:<10}{r['mode']:<9}{r['model']:<34}{r['provider']:<36}{r['median_ms']:>11.4f}{r['p20_ms']:>9.4f}"
              f"{r['p80_ms']:>9.4f}{rate:>16}{pct}{speedup:>8}")


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 runs: checks the script, measures nothing")
    parser.add_argument("--batch-size", type=int, default=None, help="gather batch size (default 128, --quick 4)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="token dtype for the gather (default bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--ops", default="gather,ema,adamw_ema,attention", help="comma-separated: gather, ema, adamw_ema, attention")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench_kernels.jsonl", help="JSONL file the rows are appended to")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    B = args.batch_size or (4 if args.quick else 128)
    models = list(QUICK_MODELS if args.quick else MODELS)
    ops = set(args.ops.split(","))
    if not ops <= {"gather", "ema", "adamw_ema", "attention"}:
        parser.error(f"--ops takes gather, ema, adamw_ema and/or attention, got {args.ops}")

    copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 22) if args.quick else (1 << 30))
    print(f"{hardware(device)}: device-to-device copy {copy_gbs:.0f} GB/s (bytes read + written)")
    rows = []
    for model in models:
        if "gather" in ops:
            rows += bench_gather(model, B, dtype, device, args.quick)
        if "ema" in ops:
            rows += bench_ema(model, device, args.quick)
        if "adamw_ema" in ops:
            rows += bench_adamw_ema(model, device, args.quick)
    if "attention" in ops:
        attention_dtype = dtype if dtype != torch.float32 or device.type == "cpu" else torch.bfloat16
        for name, spec in (QUICK_ATTENTION_CASES if args.quick else ATTENTION_CASES).items():
            rows += bench_attention(name, spec, attention_dtype, device, args.quick)
    for r in rows:
        if "bytes" in r:
            r["gb_s"] = round(r["bytes"] / r["median_ms"] / 1e6, 1)
            r["pct_copy"] = round(100 * r["gb_s"] / copy_gbs, 1)
        else:
            r["tflop_s"] = round(r["flops"] / r["median_ms"] / 1e9, 2)
        r.update(bench="bench_kernels", quick=args.quick, device=device.type, hardware=hardware(device),
                 copy_gb_s=round(copy_gbs, 1), triton=_triton_version())
    print_table(rows)
    write_rows(args.results, rows, [__file__, *argv])
    print(f"appended {len(rows)} rows to {args.results}")
    return rows


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
