"""The drop-in check: the reference's own ``src/train.py``, with ``from src.`` rewritten to
``from fastjepa.`` and nothing else changed, against the unchanged reference, on the CPU.

    python benchmarks/reference_parity.py --reference PATH/TO/ijepa [--workers 0 2] [--runs 3]

PATH/TO/ijepa is a checkout of facebookresearch/ijepa (it is read there at run time; none of it
is copied into this project). Needs torchvision (the reference's transforms and ImageFolder).
Each run trains ViT-tiny at 64 px (the published ViT-H/14 config, cut down) for ``--epochs``
on the embedded photos in the reference's folder layout, in a one-process gloo group, and
writes the reference's CSV (epoch, itr, loss, mask-A, mask-B, time).

With loader workers the reference's mask collator reads its step counter, shared by the
workers, in the order the workers collate: which batch gets which block-size seed depends on
timing, so the reference can differ from itself. ``--runs`` runs the reference that many times
per setting: a row reports how many distinct loss sequences it gave and how far fastjepa's run
is from the nearest one. The "fixed-block-size" config (one target and one context size,
whatever the seed) takes that race out and must match the reference exactly.

Rows (JSONL, appended to ``--results``): {"bench": "reference_parity", "config", "workers",
"steps", "reference_runs", "reference_outcomes", "max_loss_diff", "mask_sizes_equal", ...}.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import RESULTS, cpu_name, write_rows

from fastjepa.data.images import default_photos_dir

DRIVER = """
import os, sys
import torch.distributed as dist
import yaml
if __name__ == "__main__":
    source, config, port = sys.argv[1:4]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", port
    dist.init_process_group("gloo", rank=0, world_size=1)
    sys.path.insert(0, source)
    from train import main
    with open(config) as f:
        main(yaml.load(f, Loader=yaml.FullLoader))
"""
CONFIGS = {
    "vith14-cut-down": {},
    "fixed-block-size": {"mask": {"pred_mask_scale": [0.1875, 0.1875], "aspect_ratio": [1.0, 1.0]}},  # 3x3 targets on the 8x8 grid
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def make_data(root: Path) -> None:
    """The 12 embedded photos, twice, in two classes: root/imagenet/train/n00{0,1}/."""
    for copy in range(2):
        for i, photo in enumerate(sorted(Path(default_photos_dir()).glob("*.jpg"))):
            folder = root / "imagenet" / "train" / f"n00{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, folder / f"{copy}_{photo.name}")


def make_config(reference: Path, data: Path, folder: Path, workers: int, epochs: int, overrides: dict) -> dict:
    config = yaml.safe_load((reference / "configs" / "in1k_vith14_ep300.yaml").read_text())
    config["data"].update(batch_size=4, crop_size=64, num_workers=workers, pin_mem=False, root_path=str(data), image_folder="imagenet")
    config["mask"].update(patch_size=8, min_keep=4, **overrides.get("mask", {}))
    config["meta"].update(model_name="vit_tiny", pred_depth=2, pred_emb_dim=48, use_bfloat16=False)
    config["optimization"].update(epochs=epochs, warmup=1)
    config["logging"]["folder"] = str(folder)
    return config


def run(source: Path, config: dict, work: Path, name: str) -> list[tuple[float, int, int]]:
    """(loss, mask-A, mask-B) per step of train.py in ``source`` under ``config``."""
    folder = work / name
    folder.mkdir()
    config = {**config, "logging": {**config["logging"], "folder": str(folder)}}
    (folder / "params.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, str(work / "driver.py"), str(source), str(folder / "params.yaml"), str(free_port())],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
    with open(folder / "jepa_r0.csv") as f:
        return [(float(r["loss"]), int(float(r["mask-A"])), int(float(r["mask-B"]))) for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of facebookresearch/ijepa")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--runs", type=int, default=3, help="reference runs per setting")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--results", type=Path, default=RESULTS / "reference_parity.jsonl")
    args = parser.parse_args()
    train_py = args.reference / "src" / "train.py"
    if not train_py.is_file():
        sys.exit(f"--reference {args.reference}: no src/train.py there (give a checkout of facebookresearch/ijepa)")
    import torchvision  # noqa: F401  (the reference needs it; fail here rather than in every run)

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastjepa-parity-") as tmp:
        work = Path(tmp)
        (work / "driver.py").write_text(DRIVER)
        reference_src, fork_src = work / "reference_src", work / "fork_src"
        shutil.copytree(args.reference / "src", reference_src / "src")
        shutil.copy(train_py, reference_src / "train.py")  # imported as `train`, its `src.` imports resolve beside it
        fork_src.mkdir()
        (fork_src / "train.py").write_text(train_py.read_text().replace("from src.", "from fastjepa."))
        make_data(work / "data")
        for config_name in args.configs:
            for workers in args.workers:
                config = make_config(args.reference, work / "data", work, workers, args.epochs, CONFIGS[config_name])
                tag = f"{config_name}-w{workers}"
                references = [run(reference_src, config, work, f"reference-{tag}-{i}") for i in range(args.runs)]
                fork = run(fork_src, config, work, f"fastjepa-{tag}")
                outcomes = {tuple(r) for r in references}
                nearest = min(references, key=lambda r: max(abs(a[0] - b[0]) for a, b in zip(r, fork)))
                row = {"bench": "reference_parity", "config": config_name, "workers": workers, "steps": len(fork), "reference_runs": args.runs,
                       "reference_outcomes": len(outcomes), "max_loss_diff": max(abs(a[0] - b[0]) for a, b in zip(nearest, fork)),
                       "mask_sizes_equal": [a[1:] for a in nearest] == [b[1:] for b in fork] and len(nearest) == len(fork),
                       "torchvision": torchvision.__version__, "machine": cpu_name(), "threads": os.cpu_count()}
                rows.append(row)
                print(f"{config_name:18s} workers={workers}  steps={row['steps']:3d}  reference outcomes {row['reference_outcomes']}/{args.runs}  "
                      f"max |loss - nearest reference| {row['max_loss_diff']:.2e}  mask sizes equal: {row['mask_sizes_equal']}")
    write_rows(args.results, rows)
    print(f"rows appended to {args.results}")


if __name__ == "__main__":
    main()
