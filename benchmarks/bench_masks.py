"""Multi-block mask sampling time per batch, on one CPU thread (and CUDA when present).

    python benchmarks/bench_masks.py                        # fastjepa's sampler
    python benchmarks/bench_masks.py --reference-src DIR    # also the reference collator,
                                                            # imported from your own checkout

Defaults: B=128, 224 px, patch 14 and the published ViT-H/14 mask settings. Rows are
appended to benchmarks/results/bench_masks.jsonl.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import RESULTS, hardware, host_times_ms, write_rows

from fastjepa.masks.multiblock import MultiBlockMaskSampler

REFERENCE_MASKS = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10, allow_overlap=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--reference-src", metavar="DIR", help="a checkout of facebookresearch/ijepa to time its MaskCollator too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dict(input_size=args.input_size, patch_size=args.patch_size, **REFERENCE_MASKS)
    shape = f"B={args.batch_size} {args.input_size}px/{args.patch_size}"
    sampler = MultiBlockMaskSampler(**config)
    generator = torch.Generator().manual_seed(0)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        timing = host_times_ms(lambda: sampler.sample(args.batch_size, generator=generator, device=device), args.iters, warmup=20)
        rows.append({"bench": "masks", "provider": "fastjepa", "device": device.type, "hardware": hardware(device), "shape": shape, "threads": 1, **timing})
    if args.reference_src:
        sys.path.insert(0, args.reference_src)
        from src.masks.multiblock import MaskCollator  # the user's own checkout, never vendored

        torch.manual_seed(0)
        collator = MaskCollator(**config)
        batch = [(torch.zeros(1), 0)] * args.batch_size
        timing = host_times_ms(lambda: collator(batch), max(args.iters // 10, 20), warmup=3)
        rows.append({"bench": "masks", "provider": "reference", "device": "cpu", "hardware": hardware(torch.device("cpu")), "shape": shape,
                     "threads": 1, **timing})

    print(f"{'provider':<10} {'device':<6} {'median ms':>10} {'p20':>8} {'p80':>8}   {shape}, one CPU thread")
    for row in rows:
        print(f"{row['provider']:<10} {row['device']:<6} {row['median_ms']:>10.3f} {row['p20_ms']:>8.3f} {row['p80_ms']:>8.3f}")
    print(f"appended {len(rows)} rows to {write_rows(RESULTS / 'bench_masks.jsonl', rows)}")


if __name__ == "__main__":
    main()
