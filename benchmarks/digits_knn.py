"""Does pretraining help? kNN and linear-probe top-1 on scikit-learn's digits, I-JEPA vs random init.

    python benchmarks/digits_knn.py                  # one seed, a few CPU minutes
    python benchmarks/digits_knn.py --seed 1
    python benchmarks/digits_knn.py --quick          # a few steps: checks the pipeline, not the learning
    python benchmarks/digits_knn.py --mode ragged    # or shared-context: the opt-in modes, same steps

The digits' train split (load_digits: 1,258 images, 8x8 upsampled to IMAGE_SIZE px) is written
as PNG files (one folder per class; training ignores the labels) to a temporary folder, and
ViT-tiny is pretrained on it with ``fastjepa.train.fit`` and SETTINGS below. Then the trained
target encoder (the paper's choice), the trained context encoder and the same architecture at
random init -- ``torch.manual_seed(seed); init_model(...)``, exactly the weights the run started
from -- are frozen, their average-pooled tokens extracted for both splits, and the test split
classified with a k=20 weighted kNN and the logreg probe (fastjepa.eval.logreg). A raw-pixel kNN (8x8) is printed as a
reference point. One row is appended to benchmarks/results/digits_knn.jsonl (or --results).

What it shows (2 CPU cores, ~2 minutes of training, seeds 0/1/2): the target encoder stays level
with random init -- kNN -4.1 / -0.2 / +0.7 points, linear -0.2 / +0.0 / +0.6 -- so this is NOT
yet evidence that pretraining improves the representation. No setting tried (patch 4 or 8,
crop_scale 0.3..1, lr 1e-4..3e-3, ema from [0.9, 1] to [0.999, 1], predictor 1x12..6x192,
1 to 4 target blocks of several scales, batch 16..64, up to 1,560 steps) beat random init on
kNN by more than ~2 points; most runs at lr 1e-3 lose 6 to 26 points (kNN 25-45 %,
features dominated by one direction that tracks the amount of ink). SETTINGS are the ones
that stayed closest to random init.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import RESULTS, cpu_name, write_rows  # noqa: E402
from PIL import Image  # noqa: E402

from fastjepa.eval.datasets import Split, load_digits  # noqa: E402
from fastjepa.eval.features import extract  # noqa: E402
from fastjepa.eval.knn import knn_predict  # noqa: E402
from fastjepa.eval.logreg import logreg_probe  # noqa: E402
from fastjepa.eval.runner import load_frozen_encoder  # noqa: E402
from fastjepa.helper import init_model  # noqa: E402
from fastjepa.train import fit  # noqa: E402

IMAGE_SIZE = 32
K = 20
QUICK_STEPS = 6
QUICK_EVAL_STRIDE = 3  # --quick evaluates every 3rd image of each split (420 train / 180 test)

# Config keys passed to fit (the tiny preset with these overridden).
SETTINGS = dict(
    model_name="vit_tiny",
    crop_size=IMAGE_SIZE,
    patch_size=8,
    crop_scale=[0.8, 1.0],
    batch_size=64,
    repeat=2,
    epochs=6,
    warmup=1,
    lr=2.0e-4,
    start_lr=5.0e-5,
    final_lr=1.0e-6,
    ema=[0.996, 1.0],
    pred_depth=4,
    pred_emb_dim=96,
    enc_mask_scale=[0.85, 1.0],
    pred_mask_scale=[0.1, 0.15],
    num_pred_masks=2,
    min_keep=0,
    fix_position_range=True,
)


# --mode -> the fit keys it sets (the opt-in modes of the README)
MODES = {
    "reference": {},
    "ragged": {"ragged": True},
    "shared-context": {"shared_context_predictor": True},
    "ragged+shared-context": {"ragged": True, "shared_context_predictor": True},
}


def write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 (N, 3, S, S) images as folder/<label>/<index>.png."""
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(target / f"{index:04d}.png")


def knn_top1(train, train_labels, test, test_labels) -> float:
    predicted = knn_predict(train, train_labels, test, num_classes=10, ks=(K,))[K]
    return float((predicted == test_labels).float().mean())


def probe(encoder, train_images, train_labels, test_images, test_labels) -> dict[str, float]:
    """kNN (k=K) and logistic-regression (the logreg probe) top-1 on average-pooled features."""
    classes = [str(d) for d in range(10)]
    train, test = (extract(encoder, Split("digits", labels, classes, [f"{i}" for i in range(len(labels))], images=images), ("last",), IMAGE_SIZE,
                           progress=False)["last"] for images, labels in ((train_images, train_labels), (test_images, test_labels)))
    return {"knn": knn_top1(train, train_labels, test, test_labels),
            "linear": logreg_probe(train, train_labels, test, test_labels, num_classes=10).top1}


def settings_summary(settings: dict) -> str:
    s = settings
    return (f"{s['model_name']}/{s['patch_size']} at {s['crop_size']} px, crop_scale {s['crop_scale']}, "
            f"batch {s['batch_size']} x {s['epochs']} epochs x repeat {s['repeat']}, lr {s['lr']:g} "
            f"(warmup {s['warmup']:g} ep), ema {s['ema']}, predictor {s['pred_depth']}x{s['pred_emb_dim']}, "
            f"masks: {s['num_pred_masks']} targets {s['pred_mask_scale']}, context {s['enc_mask_scale']}, "
            f"min_keep {s['min_keep']}, fix_position_range {s['fix_position_range']}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="training seed (and the random-init baseline's)")
    parser.add_argument("--epochs", type=int, default=None, help=f"pretraining epochs (default {SETTINGS['epochs']})")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one, deleted)")
    parser.add_argument("--results", type=Path, default=RESULTS / "digits_knn.jsonl", help="JSONL file the row is appended to")
    parser.add_argument("--quick", action="store_true", help=f"train {QUICK_STEPS} steps only: checks the pipeline, not the learning")
    parser.add_argument("--device", default="cpu", help="training device (default cpu; evaluation runs on the CPU)")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument("--mode", choices=MODES, default="reference",
                        help="reference masks (default), ragged contexts (mask.ragged) or the shared-context predictor")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = {**SETTINGS, **MODES[args.mode]}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    train_images, train_labels, test_images, test_labels = load_digits(IMAGE_SIZE, test_fraction=0.3, seed=0)
    split = (train_images, train_labels, test_images, test_labels)

    with tempfile.TemporaryDirectory(prefix="fastjepa-digits-") as tmp:
        root = Path(tmp) / "digits-train"
        write_images(root, train_images, train_labels)
        out = args.out if args.out is not None else Path(tmp) / "run"
        started = time.perf_counter()
        result = fit(root_path=str(root), image_folder="", out=str(out), seed=args.seed, device=args.device,
                     max_steps=QUICK_STEPS if args.quick else None, progress=args.progress, **settings)
        train_seconds = time.perf_counter() - started
        if args.quick:
            split = tuple(tensor[::QUICK_EVAL_STRIDE] for tensor in split)
        scores = {which: probe(load_frozen_encoder(result.latest_checkpoint, encoder=encoder), *split)
                  for which, encoder in (("target_encoder", "target"), ("encoder", "context"))}

    torch.manual_seed(args.seed)  # fit seeds this way right before init_model: the run's initial weights
    random_encoder, _ = init_model("cpu", settings["patch_size"], settings["model_name"], settings["crop_size"],
                                   settings["pred_depth"], settings["pred_emb_dim"])
    scores["random"] = probe(random_encoder, *split)
    raw = load_digits(8, test_fraction=0.3, seed=0)
    knn_pixels = knn_top1(raw[0].flatten(1).float(), raw[1], raw[2].flatten(1).float(), raw[3])

    losses = result.losses
    row = {
        "bench": "digits_knn",
        "model": settings["model_name"],
        "seed": args.seed,
        "mode": args.mode,
        "quick": args.quick,
        "settings": settings_summary(settings),
        "config": settings,
        "image_size": IMAGE_SIZE,
        "train_images": len(train_labels),  # pretraining images
        "eval_train_images": len(split[1]),
        "eval_test_images": len(split[3]),
        "steps": result.steps,
        "train_seconds": round(train_seconds, 1),
        "loss_first10": sum(losses[:10]) / max(len(losses[:10]), 1),
        "loss_last10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "k": K,
        "knn_random": scores["random"]["knn"],
        "knn_trained": scores["target_encoder"]["knn"],
        "knn_context": scores["encoder"]["knn"],
        "linear_random": scores["random"]["linear"],
        "linear_trained": scores["target_encoder"]["linear"],
        "linear_context": scores["encoder"]["linear"],
        "knn_pixels": knn_pixels,
        "device": args.device,
        "hardware": cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
    }

    print(f"\ndigits: {row['eval_train_images']} train / {row['eval_test_images']} test images at {IMAGE_SIZE} px; "
          f"{row['steps']} steps in {train_seconds:.0f} s, seed {args.seed}{' (QUICK: pipeline check only)' if args.quick else ''}")
    print(f"{'encoder':<28} {'kNN top-1 (k=%d)' % K:>16} {'linear top-1':>13}")
    for name, key in (("random init (same seed)", "random"), ("I-JEPA target encoder", "target_encoder"),
                      ("I-JEPA context encoder", "encoder")):
        print(f"{name:<28} {100 * scores[key]['knn']:>15.1f}% {100 * scores[key]['linear']:>12.1f}%")
    print(f"{'raw 8x8 pixels':<28} {100 * knn_pixels:>15.1f}%")
    print(f"target - random: kNN {100 * (row['knn_trained'] - row['knn_random']):+.1f} points, "
          f"linear {100 * (row['linear_trained'] - row['linear_random']):+.1f} points")
    write_rows(args.results, [row], [__file__, *argv])
    print(f"appended 1 row to {args.results}")
    return row


if __name__ == "__main__":
    main()
