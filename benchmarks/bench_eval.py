"""The evaluation's two costs: the grid of 52 linear heads against one head on the same cached
features (goal: at most 2x the time of one head), and images/s of frozen-feature extraction.

    python benchmarks/bench_eval.py                 # CPU shapes: 8,192 features of 384-d, 100 classes; ViT-tiny/8 at 32 px
    python benchmarks/bench_eval.py --device cuda   # ImageNet shapes: 65,536 of 1,280-d, 1,000 classes; ViT-H/14 at 224 px, bf16
    python benchmarks/bench_eval.py --quick         # a few seconds: checks the script, not the numbers

Both time the code ``fastjepa eval`` runs: ``fastjepa.eval.linear.linear_probe`` (selection and
refit included, so the one-head run also fits twice) and ``fastjepa.eval.features.extract``.
Features and images are random (the time does not depend on their values). Rows are appended
to benchmarks/results/bench_eval.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import RESULTS, hardware, write_rows

from fastjepa.eval.datasets import Split
from fastjepa.eval.features import extract
from fastjepa.eval.linear import LR_GRID, linear_probe
from fastjepa.models import vision_transformer as vit

SHAPES = {  # (features, dim, classes, epochs, batch) and (model, patch, image size, images, batch)
    "cpu": ((8192, 384, 100, 4, 256), ("vit_tiny", 8, 32, 1024, 256)),
    "cuda": ((65536, 1280, 1000, 4, 1024), ("vit_huge", 14, 224, 2048, 128)),
    "quick": ((1024, 64, 10, 2, 256), ("vit_tiny", 8, 32, 128, 64)),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_grid(n: int, dim: int, classes: int, epochs: int, batch: int, device: torch.device, heads: dict) -> float:
    generator = torch.Generator().manual_seed(0)
    train = {"last": torch.randn(n, dim, generator=generator).to(device)}
    val = {"last": torch.randn(n // 8, dim, generator=generator).to(device)}
    labels, val_labels = torch.randint(0, classes, (n,), generator=generator), torch.randint(0, classes, (n // 8,), generator=generator)
    synchronize(device)
    start = time.perf_counter()
    linear_probe(train, labels, val, val_labels, num_classes=classes, epochs=epochs, batch_size=batch, device=device, **heads)
    synchronize(device)
    return time.perf_counter() - start


def time_extraction(model: str, patch: int, size: int, count: int, batch: int, device: torch.device) -> float:
    encoder = getattr(vit, model)(img_size=[size], patch_size=patch).to(device).eval().requires_grad_(False)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split("random", torch.zeros(count, dtype=torch.int64), ["x"], [str(i) for i in range(count)], images=images)
    extract(encoder, split.take(torch.arange(min(batch, count))), ("last",), size, batch_size=batch, progress=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    extract(encoder, split, ("last",), size, batch_size=batch, progress=False)
    synchronize(device)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", default=RESULTS / "bench_eval.jsonl")
    args = parser.parse_args()
    device = torch.device(args.device)
    (n, dim, classes, epochs, batch), (model, patch, size, count, image_batch) = SHAPES["quick" if args.quick else device.type]
    grid = {"lrs": LR_GRID, "weight_decays": (0.0, 5e-4), "heads": ("linear", "bn")}
    one = {"lrs": (1e-3,), "weight_decays": (0.0,), "heads": ("linear",)}
    grid_seconds = time_grid(n, dim, classes, epochs, batch, device, grid)
    one_seconds = time_grid(n, dim, classes, epochs, batch, device, one)
    images_per_s = time_extraction(model, patch, size, count, image_batch, device)
    common = {"bench": "bench_eval", "device": device.type, "hardware": hardware(device), "quick": args.quick,
              "threads": torch.get_num_threads()}
    rows = [
        {**common, "what": "linear_grid", "heads": 52, "features": n, "dim": dim, "classes": classes, "epochs": epochs, "batch": batch,
         "grid_seconds": round(grid_seconds, 3), "one_head_seconds": round(one_seconds, 3), "ratio": round(grid_seconds / one_seconds, 2)},
        {**common, "what": "extraction", "model": f"{model}/{patch}", "image_size": size, "images": count, "batch": image_batch,
         "dtype": "bf16" if device.type == "cuda" else "fp32", "images_per_s": round(images_per_s, 1)},
    ]
    print(f"linear grid, {n} x {dim} features, {classes} classes, {epochs} epochs at batch {batch} on {common['hardware']}:")
    print(f"  52 heads {grid_seconds:.2f} s, one head {one_seconds:.2f} s: {grid_seconds / one_seconds:.2f}x (goal <= 2x)")
    print(f"feature extraction, {model}/{patch} at {size} px: {images_per_s:,.0f} images/s")
    write_rows(args.results, rows)
    print(f"appended {len(rows)} rows to {args.results}")


if __name__ == "__main__":
    main()
