"""Data-parallel (DDP) scaling of I-JEPA pretraining, and what a per-GPU throughput means for
the reference's 300-epoch ViT-H/14 run.

    python benchmarks/scaling.py                                   # ViT-H/14, 8 to 128 GPUs, A100/H100/H200
    python benchmarks/scaling.py --img-per-s 600 --rate-gpu H200   # a rate of your own (images/s on one GPU)
    python benchmarks/scaling.py --plot benchmarks/results/figures/scaling.png

A model, not a measurement. Per step and per GPU, at a fixed global batch (2048, the
reference's; the maintainer says it matters, ijepa#41), so each GPU gets 2048/N images:
  gradient bytes  trainable parameters of the context encoder and the predictor (the target
                  encoder has no gradients), counted from our models, x 4 (fp32 all-reduce, the
                  reference's) or x 2 (``meta.grad_reduce_dtype: bfloat16``).
  all-reduce      ring: each GPU sends and receives 2(n-1)/n x bytes, plus one latency per ring
                  step. Hierarchical over 8-GPU nodes: reduce-scatter over NVLink, all-reduce of
                  each GPU's 1/8 shard across nodes over its own InfiniBand rail, all-gather over
                  NVLink. Link rates are the public per-direction rates x ACHIEVABLE (table GPUS).
  overlap         DDP all-reduces gradient buckets while backward runs; what does not fit in the
                  backward, plus the last bucket (ready only when backward ends), is exposed.
  compute         (2048/N) / images-per-s of one GPU, where the rate comes from (first found):
                  --img-per-s; the latest bench_step row for the model and --mode in
                  benchmarks/results/*.jsonl; else the reference's own figure derived from the
                  paper (16 A100, under 72 h), labelled as such. The backward's share of the step
                  is the measured backward phase when a bench_step row is used, else its share
                  of the step's FLOPs (fastjepa.flops).
  efficiency      compute / (compute + exposed communication); projection: 300 epochs of
                  floor(1,281,167 / 2048) steps at that step time.
Not modelled: data loading, stragglers, NCCL's tree/NVLS/SHARP algorithms, communication
slowing the overlapped kernels, per-GPU speed changing with the per-GPU batch.
Rows are appended to benchmarks/results/scaling.jsonl (or DIR/scaling.jsonl with --results-dir).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import RESULTS, write_rows  # noqa: E402
from report import read_rows  # noqa: E402

from fastjepa.flops import step_flops_per_image  # noqa: E402
from fastjepa.helper import init_model  # noqa: E402
from fastjepa.masks.multiblock import MultiBlockMaskSampler  # noqa: E402

# name -> (model, patch, crop); predictor depth 12 and width 384 as in the ViT-H configs (and bench_step)
MODELS = {"vit_base/16": ("vit_base", 16, 224), "vit_large/16": ("vit_large", 16, 224), "vit_huge/14": ("vit_huge", 14, 224)}
PRED_DEPTH, PRED_EMB_DIM = 12, 384
MASKS = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
             min_keep=10, allow_overlap=False)  # the published configs' mask settings

IMAGENET_TRAIN_IMAGES = 1_281_167
GLOBAL_BATCH, EPOCHS = 2048, 300
# The paper (arXiv:2301.08243 v3, abstract): ViT-H/14 on ImageNet "using 16 A100 GPUs in under 72 hours".
PAPER = {"model": "vit_huge/14", "gpu": "A100", "gpus": 16, "hours": 72.0}
PAPER_SOURCE = "reference paper (arXiv:2301.08243 v3: ViT-H/14, 300 epochs, 16 A100, under 72 h)"

ACHIEVABLE = 0.8  # assumed fraction of a link's rate an NCCL all-reduce reaches (bus bandwidth)
LATENCY_NVLINK_S, LATENCY_IB_S = 1e-6, 5e-6  # assumed latency per ring step (not sourced)
GPUS_PER_NODE = 8
BUCKET_MB = 100  # fastjepa's meta.ddp_bucket_mb (the reference keeps DDP's 25)
GRAD_DTYPES = {"fp32": 4, "bf16": 2}


class Gpu(NamedTuple):  # (a NamedTuple: the tests import this file by path, outside sys.modules)
    name: str
    bf16_tflops: float  # dense peak: only to carry a rate measured on one GPU type to another
    nvlink_gb_s: float  # per GPU, both directions together (as datasheets state it)
    ib_gbit_s: float  # per GPU: the DGX nodes have one InfiniBand rail (NIC) per GPU
    sources: dict  # where each of the three numbers comes from

    @property
    def nvlink_bus_gb_s(self) -> float:
        return self.nvlink_gb_s / 2 * ACHIEVABLE  # one direction

    @property
    def ib_bus_gb_s(self) -> float:
        return self.ib_gbit_s / 8 * ACHIEVABLE


HOPPER_DGX = "NVIDIA DGX BasePOD reference architecture, DGX H200/H100: eight single-port ConnectX-7, up to 400 Gb/s InfiniBand NDR"
GPUS = {
    "A100": Gpu("A100 SXM4 80GB in a DGX A100", 312, 600, 200, {
        "bf16_tflops": "NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity)",
        "nvlink_gb_s": "NVIDIA A100 datasheet, NVLink 3: 600 GB/s; NVIDIA blog 'Introducing NVIDIA HGX A100': 600 GB/s bidirectional per GPU through NVSwitch",
        "ib_gbit_s": "NVIDIA blog 'Defining AI Innovation with DGX A100': eight single-port ConnectX-6 HDR 200 Gb/s InfiniBand"}),
    "H100": Gpu("H100 SXM5 80GB in a DGX H100", 989, 900, 400, {
        "bf16_tflops": "NVIDIA H100 datasheet, SXM: BF16 1,979 TFLOPS with sparsity, 989 dense",
        "nvlink_gb_s": "NVIDIA H100 datasheet / Hopper architecture page, NVLink 4: 900 GB/s bidirectional per GPU",
        "ib_gbit_s": HOPPER_DGX}),
    "H200": Gpu("H200 SXM 141GB in a DGX H200", 989, 900, 400, {
        "bf16_tflops": "NVIDIA H200 datasheet, SXM: BF16 1,979 TFLOPS with sparsity, 989 dense (the H100's compute; more HBM bandwidth)",
        "nvlink_gb_s": "NVIDIA H200 datasheet, NVLink 4: 900 GB/s",
        "ib_gbit_s": HOPPER_DGX}),
}


# ------------------------------------------------------------------------ gradient bytes


@functools.lru_cache(maxsize=None)
def trainable_params(model: str) -> tuple[int, int]:
    """(encoder, predictor) parameters that get gradients, from our models built on the meta device."""
    name, patch, crop = MODELS[model]
    with torch.device("meta"):
        encoder, predictor = init_model("meta", patch, name, crop, PRED_DEPTH, PRED_EMB_DIM)
    return tuple(sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (encoder, predictor))


def gradient_bytes(model: str, bytes_per_element: int = 4) -> int:
    return sum(trainable_params(model)) * bytes_per_element


# ----------------------------------------------------------------------------- all-reduce


def ring_allreduce_s(nbytes: float, n: int, bus_gb_s: float, latency_s: float) -> float:
    """A ring all-reduce over ``n`` ranks: 2(n-1)/n x nbytes through each rank's link, 2(n-1) steps."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bus_gb_s * 1e9) + 2 * (n - 1) * latency_s


def allreduce_s(nbytes: float, gpus: int, gpu: Gpu) -> float:
    """Hierarchical: reduce-scatter then all-gather within a node over NVLink (together one ring
    all-reduce's traffic), and between them a ring all-reduce across nodes of each GPU's 1/8
    shard, the 8 rails in parallel."""
    local = min(gpus, GPUS_PER_NODE)
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    within = ring_allreduce_s(nbytes, local, gpu.nvlink_bus_gb_s, LATENCY_NVLINK_S)
    across = ring_allreduce_s(nbytes / local, nodes, gpu.ib_bus_gb_s, LATENCY_IB_S)
    return within + across


def exposed_s(backward_s: float, comm_s: float, last_bucket_s: float) -> float:
    """Communication time the step waits for: the buckets before the last overlap the backward
    (whatever does not fit is exposed), the last bucket's all-reduce starts when backward ends."""
    return max(0.0, comm_s - last_bucket_s - backward_s) + last_bucket_s


def efficiency(compute_s: float, exposed: float) -> float:
    return compute_s / (compute_s + exposed)


def step_model(model: str, gpus: int, gpu: Gpu, img_per_s: float, backward_fraction: float, bytes_per_element: int,
               global_batch: int = GLOBAL_BATCH, bucket_mb: float = BUCKET_MB) -> dict:
    """Times of one step on ``gpus`` GPUs of type ``gpu``, each running at ``img_per_s``."""
    grad = gradient_bytes(model, bytes_per_element)
    bucket = bucket_mb * 2**20 * bytes_per_element / 4  # DDP fills buckets of bucket_cap_mb MiB of fp32 gradients
    buckets = math.ceil(grad / bucket)
    compute = global_batch / gpus / img_per_s
    backward = backward_fraction * compute
    per_call = allreduce_s(0, gpus, gpu)  # the latency of one bucket's all-reduce
    comm = allreduce_s(grad, gpus, gpu) + (buckets - 1) * per_call
    last = allreduce_s(min(grad, bucket), gpus, gpu)  # one full bucket, conservatively
    exposed = exposed_s(backward, comm, last)
    # the fastest per-GPU rate whose backward still covers every bucket but the last
    hidden_up_to = backward_fraction * global_batch / gpus / (comm - last) if comm > last else None
    return {"per_gpu_batch": global_batch // gpus, "grad_bytes": grad, "buckets": buckets, "compute_ms": 1e3 * compute,
            "backward_ms": 1e3 * backward, "comm_ms": 1e3 * comm, "exposed_ms": 1e3 * exposed,
            "efficiency": efficiency(compute, exposed), "hidden_up_to_img_per_s": hidden_up_to}


# ---------------------------------------------------------------------------- projection


def steps_per_run(epochs: int = EPOCHS, images: int = IMAGENET_TRAIN_IMAGES, global_batch: int = GLOBAL_BATCH) -> int:
    """The reference's iteration count: floor(images / global batch) steps per epoch (drop_last)."""
    return epochs * (images // global_batch)


def projection_hours(img_per_s_per_gpu: float, gpus: int, eff: float, epochs: int = EPOCHS,
                     images: int = IMAGENET_TRAIN_IMAGES, global_batch: int = GLOBAL_BATCH) -> tuple[float, float]:
    """(wall-clock hours, GPU-hours) of the run at ``eff`` x ``gpus`` x the per-GPU rate."""
    step_s = global_batch / (img_per_s_per_gpu * gpus * eff)
    hours = steps_per_run(epochs, images, global_batch) * step_s / 3600
    return hours, hours * gpus


def paper_img_per_s_per_gpu() -> float:
    """Per-A100 images/s the paper's 72 h implies: 2048 images per (72 h / 187,500 steps) on 16 GPUs."""
    step_s = PAPER["hours"] * 3600 / steps_per_run()
    return GLOBAL_BATCH / step_s / PAPER["gpus"]


# --------------------------------------------------------------------------------- inputs


def measured_rate(results_dir: Path, model: str, mode: str) -> dict | None:
    """The latest non-quick GPU bench_step row on synthetic images (the model's compute rate,
    not a loader's) for ``model`` and ``mode`` under ``results_dir`` whose hardware is one of
    GPUS, as {value, gpu, backward_fraction, source}."""
    found = None
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for row in read_rows([path]):
            if (row.get("bench") != "bench_step" or row.get("model") != model or row.get("mode") != mode
                    or row.get("quick") or row.get("device") != "cuda" or row.get("data", "synthetic") != "synthetic"):
                continue
            gpu = next((g for g in GPUS if g in str(row.get("hardware", ""))), None)
            if gpu is None:
                print(f"note: {path.name}: a bench_step row on {row.get('hardware')!r}, not one of {', '.join(GPUS)}: skipped")
                continue
            phases = row.get("phase_ms") or {}
            found = {"value": row["images_per_s"], "gpu": gpu, "kind": "measured", "batch": row.get("batch"),
                     "backward_fraction": phases["backward"] / sum(phases.values()) if phases.get("backward") else None,
                     "source": f"measured {path.name}: bench_step {mode} batch {row.get('batch')} on {row['hardware']}, {row.get('date')}"}
    return found


def flops_backward_fraction(model: str, batch: int = 128, draws: int = 20) -> tuple[float, dict]:
    """The backward's share of one step's FLOPs (backward = 2x forward of the context encoder and
    predictor; the target encoder's forward has none), at the mean token counts our sampler
    draws for ``batch`` images with the published mask settings."""
    name, patch, crop = MODELS[model]
    sampler = MultiBlockMaskSampler(input_size=crop, patch_size=patch, **MASKS)
    g = torch.Generator().manual_seed(0)
    shapes = [tuple(group[0].shape[1] for group in sampler.sample(batch, generator=g)) for _ in range(draws)]
    k_context, k_target = (statistics.mean(s[i] for s in shapes) for i in (0, 1))
    flops = step_flops_per_image(name, crop, patch, PRED_DEPTH, PRED_EMB_DIM, k_context, k_target, num_pred_masks=MASKS["npred"])
    fraction = 2 / 3 * (flops.context_forward_backward + flops.predictor_forward_backward) / flops.total
    return fraction, {"k_context": round(k_context, 1), "k_target": round(k_target, 1), "flops_per_image": flops.total}


def rates_by_gpu(rate: float, rate_gpu: str) -> dict[str, float]:
    """A rate on one GPU type carried to the others by their dense bf16 peaks (same MFU assumed)."""
    return {g: rate * GPUS[g].bf16_tflops / GPUS[rate_gpu].bf16_tflops for g in GPUS}


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_huge/14", choices=list(MODELS), help="the model of the efficiency tables")
    parser.add_argument("--mode", default="fastjepa", help="which bench_step mode's rate to read (default fastjepa)")
    parser.add_argument("--img-per-s", type=float, default=None, help="images/s of one GPU (overrides any measurement)")
    parser.add_argument("--rate-gpu", default="H200", choices=list(GPUS), help="the GPU --img-per-s was measured on")
    parser.add_argument("--gpus", default="8,16,32,64,128", help="comma-separated GPU counts")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--bucket-mb", type=float, default=BUCKET_MB, help="DDP bucket_cap_mb")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="reads bench_step rows from DIR/*.jsonl, appends to DIR/scaling.jsonl")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw efficiency against GPUs per cluster type")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.gpus.split(",")]
    if any(n < 1 or args.global_batch % n for n in counts):
        parser.error(f"every GPU count must divide the global batch {args.global_batch}")

    measured = None if args.img_per_s else measured_rate(args.results_dir, args.model, args.mode)
    if args.img_per_s:
        rate = {"value": args.img_per_s, "gpu": args.rate_gpu, "kind": "argument", "source": f"argument --img-per-s on {args.rate_gpu}"}
    elif measured:
        rate = measured
    elif args.model == PAPER["model"]:
        rate = {"value": paper_img_per_s_per_gpu(), "gpu": PAPER["gpu"], "kind": "reference paper",
                "source": f"{PAPER_SOURCE}, derived: 2048 images per {PAPER['hours'] * 3600 / steps_per_run():.4f} s "
                          f"over {PAPER['gpus']} GPUs, every overhead included; a lower bound ('under'), not a measurement"}
    else:
        parser.error(f"no rate for {args.model}: no bench_step row, no --img-per-s, and the paper gives one only for {PAPER['model']}")
    if measured and measured.get("backward_fraction"):
        backward = {"value": measured["backward_fraction"], "source": measured["source"] + " (backward phase / sum of phases)"}
    else:
        fraction, detail = flops_backward_fraction(args.model)
        backward = {"value": fraction, "source": "fastjepa.flops: 2/3 of the context encoder's and predictor's "
                    "forward+backward FLOPs over the step's (target forward has no backward)", **detail}
    rates = rates_by_gpu(rate["value"], rate["gpu"])

    rows = []
    for model in MODELS:
        enc, pred = trainable_params(model)
        rows.append({"bench": "scaling", "kind": "gradient_bytes", "model": model, "encoder_params": enc, "predictor_params": pred,
                     "pred_depth": PRED_DEPTH, "pred_emb_dim": PRED_EMB_DIM,
                     **{f"grad_bytes_{d}": gradient_bytes(model, b) for d, b in GRAD_DTYPES.items()},
                     "source": "requires_grad parameters of fastjepa.helper.init_model's encoder and predictor"})
    for gpu_name, gpu in GPUS.items():
        rate_source = rate["source"] if gpu_name == rate["gpu"] else (
            f"{rate['source']}; scaled {rate['gpu']}->{gpu_name} by dense bf16 peak {gpu.bf16_tflops:g}/{GPUS[rate['gpu']].bf16_tflops:g} (same MFU assumed)")
        inputs = {
            "img_per_s_per_gpu": {"value": round(rates[gpu_name], 2), "kind": rate["kind"], "source": rate_source},
            "backward_fraction": {**backward, "value": round(backward["value"], 4)},
            **{key: {"value": getattr(gpu, key), "source": gpu.sources[key]} for key in ("bf16_tflops", "nvlink_gb_s", "ib_gbit_s")},
            "achievable_fraction": {"value": ACHIEVABLE, "source": "assumption"},
            "latency_per_ring_step_s": {"value": {"nvlink": LATENCY_NVLINK_S, "ib": LATENCY_IB_S}, "source": "assumption"},
            "bucket_mb": {"value": args.bucket_mb, "source": "argument" if args.bucket_mb != BUCKET_MB else "fastjepa meta.ddp_bucket_mb default"},
            "global_batch": {"value": args.global_batch, "source": "reference configs (16 x 128)"},
            "epochs_images": {"value": [EPOCHS, IMAGENET_TRAIN_IMAGES], "source": "reference configs; ImageNet-1k train"},
        }
        for dtype, nbytes in GRAD_DTYPES.items():
            for n in counts:
                step = step_model(args.model, n, gpu, rates[gpu_name], backward["value"], nbytes, args.global_batch, args.bucket_mb)
                hours, gpu_hours = projection_hours(rates[gpu_name], n, step["efficiency"], global_batch=args.global_batch)
                rows.append({"bench": "scaling", "kind": "efficiency", "model": args.model, "gpu": gpu_name, "gpus": n,
                             "nodes": math.ceil(n / GPUS_PER_NODE), "grad_dtype": dtype,
                             **{k: round(v, 4) if isinstance(v, float) else v for k, v in step.items()},
                             "img_per_s_per_gpu": round(rates[gpu_name], 2), "hours_300_epochs": round(hours, 2),
                             "gpu_hours": round(gpu_hours, 1), "inputs": inputs})
    rows.append({"bench": "scaling", "kind": "reference", "model": PAPER["model"], "gpu": PAPER["gpu"], "gpus": PAPER["gpus"],
                 "hours_300_epochs": PAPER["hours"], "gpu_hours": PAPER["hours"] * PAPER["gpus"], "source": PAPER_SOURCE})

    print_tables(rows, rate, backward, counts)
    path = write_rows(Path(args.results_dir) / "scaling.jsonl", rows, [__file__, *argv])
    print(f"appended {len(rows)} rows to {path}")
    if args.plot:
        plot(rows, args.plot)
    return rows


def print_tables(rows, rate, backward, counts) -> None:
    print("gradient bytes per step (encoder + predictor; the target encoder has no gradients)")
    print(f"{'model':<14}{'encoder':>13}{'predictor':>12}{'fp32 GB':>9}{'bf16 GB':>9}")
    for r in (r for r in rows if r["kind"] == "gradient_bytes"):
        print(f"{r['model']:<14}{r['encoder_params']:>13,}{r['predictor_params']:>12,}"
              f"{r['grad_bytes_fp32'] / 1e9:>9.3f}{r['grad_bytes_bf16'] / 1e9:>9.3f}")
    eff = [r for r in rows if r["kind"] == "efficiency"]
    cell = {(r["gpu"], r["grad_dtype"], r["gpus"]): r for r in eff}
    print(f"\n{eff[0]['model']}: one-GPU rate {rate['value']:.1f} img/s on {rate['gpu']} ({rate['source']})")
    print(f"backward share of the step {backward['value']:.3f} ({backward['source']})")

    def grid(title, width, text):  # a row per (cluster, gradient dtype), a column per GPU count
        print(f"\n{title}")
        print(f"{'cluster':<8}{'grad':<6}" + "".join(f"{f'N={n}':>{width}}" for n in counts))
        for gpu in GPUS:
            for dtype in GRAD_DTYPES:
                print(f"{gpu:<8}{dtype:<6}" + "".join(text(cell[gpu, dtype, n]) for n in counts))

    grid("efficiency (exposed communication ms / compute ms per step), global batch 2048", 20,
         lambda c: f"{c['efficiency']:>8.3f} ({c['exposed_ms']:>4.1f}/{c['compute_ms']:<4.0f})")
    grid("fastest one-GPU rate (img/s) whose backward still hides the all-reduce (all buckets but the last)", 10,
         lambda c: f"{c['hidden_up_to_img_per_s'] or math.inf:>10.0f}")
    print("\n300 epochs at batch 2048, fp32 gradients: wall-clock hours (GPU-hours)")
    print(f"{'cluster':<8}{'img/s/GPU':>10}" + "".join(f"{f'N={n}':>17}" for n in counts))
    for gpu in GPUS:
        cells = [cell[gpu, "fp32", n] for n in counts]
        print(f"{gpu:<8}{cells[0]['img_per_s_per_gpu']:>10.1f}" + "".join(f"{c['hours_300_epochs']:>8.1f} ({c['gpu_hours']:>5.0f})" for c in cells))
    ref = next(r for r in rows if r["kind"] == "reference")
    print(f"reference: {ref['gpus']} {ref['gpu']}, under {ref['hours_300_epochs']:g} h ({ref['gpu_hours']:g} GPU-hours), {ref['source']}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eff = [r for r in rows if r["kind"] == "efficiency"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gpu, color in zip(GPUS, ("tab:blue", "tab:orange", "tab:green")):
        for dtype, style, marker in zip(GRAD_DTYPES, ("-", "--"), ("o", "s")):
            points = sorted((r["gpus"], r["efficiency"]) for r in eff if r["gpu"] == gpu and r["grad_dtype"] == dtype)
            ax.plot(*zip(*points), style, color=color, marker=marker, markersize=4, label=f"{gpu}, {dtype} all-reduce")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["gpus"] for r in eff}), [str(n) for n in sorted({r["gpus"] for r in eff})])
    ax.set_xlabel("GPUs (8 per node), global batch 2048")
    ax.set_ylabel("data-parallel efficiency")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{eff[0]['model']} DDP scaling, a model (one-GPU rate: {eff[0]['inputs']['img_per_s_per_gpu']['kind']})", fontsize=9)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
