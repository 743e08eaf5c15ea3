"""How far meta.compile moves the numbers: the trainer's step (``fastjepa.step.train_step``) run
eagerly and with its blocks compiled by inductor (``fastjepa.models.compile_blocks``), fp32, from
the same weights on the same batches. Inductor fuses and reorders float sums, so the two drift
apart by rounding; this measures by how much (the losses, and every weight after the steps).

    python benchmarks/compile_numerics.py                 # ViT-tiny/8 at 64 px, batch 8, 5 steps
    python benchmarks/compile_numerics.py --steps 20

Rows are appended to benchmarks/results/compile_numerics.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import RESULTS, hardware, write_rows  # noqa: E402

from fastjepa.helper import init_model, init_opt  # noqa: E402
from fastjepa.masks.multiblock import MultiBlockMaskSampler  # noqa: E402
from fastjepa.models.vision_transformer import compile_blocks  # noqa: E402
from fastjepa.step import ContextPredictor, train_step  # noqa: E402


def run(compiled: bool, steps: int, crop: int, patch: int, batch: int, device: torch.device, backend: str = "inductor"):
    torch.manual_seed(0)
    encoder, predictor = init_model(device, patch, "vit_tiny", crop, 2, 96)
    target = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr, wd = init_opt(encoder, predictor, 100, 1e-3, 1e-3, 0, 1, 0.04, 0.04)
    if compiled:
        for module in (encoder, predictor, target):
            compile_blocks(module, True, backend)
    sampler = MultiBlockMaskSampler(input_size=crop, patch_size=patch, min_keep=4)
    generator = torch.Generator().manual_seed(0)
    momentum = iter([0.996] * steps)
    losses = []
    for _ in range(steps):
        masks_enc, masks_pred = sampler.sample(batch, generator=generator)
        images = torch.randn(batch, 3, crop, crop, generator=generator).to(device)
        result = train_step(ContextPredictor(encoder, predictor), target, optimizer, lr, wd, momentum, images,
                            [m.to(device) for m in masks_enc], [m.to(device) for m in masks_pred])
        losses.append(result.loss.item())
    return losses, {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **{f"target.{k}": v for k, v in target.state_dict().items()}}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (the tests check the script with aot_eager)")
    parser.add_argument("--results", type=Path, default=RESULTS / "compile_numerics.jsonl")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eager_losses, eager = run(False, args.steps, args.crop, args.patch, args.batch, device)
    compiled_losses, compiled = run(True, args.steps, args.crop, args.patch, args.batch, device, args.backend)
    loss_error = max(abs(a - b) / abs(a) for a, b in zip(compiled_losses, eager_losses))
    weight_error = max(((compiled[k] - eager[k]).norm() / eager[k].norm().clamp_min(1e-30)).item() for k in eager)
    row = {"bench": "compile_numerics", "model": f"vit_tiny/{args.patch}-{args.crop}", "batch": args.batch, "steps": args.steps,
           "dtype": "float32", "backend": args.backend, "max_loss_relative_error": loss_error, "max_weight_relative_error": weight_error,
           "device": device.type, "hardware": hardware(device)}
    print(f"{row['model']}, batch {args.batch}, {args.steps} steps, fp32 on {row['hardware']}: inductor vs eager, "
          f"loss relative error up to {loss_error:.2e}, weights (per tensor, relative norm) up to {weight_error:.2e}")
    write_rows(args.results, [row], [__file__, *argv])
    return row


if __name__ == "__main__":
    main()
