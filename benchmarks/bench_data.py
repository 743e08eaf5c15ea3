"""Data pipeline throughput: images/s per backend and worker count, against a reference-style pipeline.

    python benchmarks/bench_data.py                              # 200 JPEGs, crop 224, batch 32, 1 and 2 workers
    python benchmarks/bench_data.py --images 1000 --batch-size 128 --workers 8,16    # a GPU machine
    python benchmarks/bench_data.py --quick                      # a few small images: checks every pipeline runs
    python benchmarks/bench_data.py --shards                     # fastjepa's pipelines read webdataset tar shards

Every pipeline delivers one training step's input: (B, 3, crop, crop) float32 images normalised
with the ImageNet statistics and the step's multi-block masks (ViT-H/14 settings), on the device.

  reference-style  the reference's data path: a DataLoader with N workers, each decoding with PIL
                   and running RandomResizedCrop (scale 0.3-1, ratio 3/4-4/3, bilinear), ToTensor and
                   Normalize; masks drawn in the collate function (fastjepa's MaskCollator, the
                   reference's interface; it is faster than the reference's collator, so this
                   baseline is a favourable one). torchvision's transforms when torchvision imports,
                   else the same operations with PIL and torch ("transforms" in the row says which).
                   Persistent workers (the reference re-spawns them every epoch).
  pil              fastjepa's pil backend, the trainer's default off the GPU: N workers.
  dali             fastjepa's dali backend on the CPU (dali-cpu, N DALI threads, device_id=None) or
                   the GPU (dali-gpu, mixed decoder), when NVIDIA DALI imports.
  dali-random-crop the dali graph with fn.decoders.image_random_crop (DALI draws the crop window)
                   instead of host-drawn windows and decoders.image_slice: for comparison only.
  torchvision      fastjepa's torchvision backend (batched decode_jpeg on the device), when it imports.

Images: generated once into a temporary folder (kept for later runs): random crops of the
photographs shipped in fastjepa/data/photos, resized to ImageNet-like sizes (500x375, 375x500,
500x333, 500x400, 400x300) with sensor-like noise, saved as quality-90 JPEGs. An epoch is
--repeat passes over them. For each worker count, every pipeline runs one warm-up epoch,
then the pipelines take turns for --epochs timed epochs each (so a change in the load of a
shared machine falls on all of them alike). An epoch's rate is its images after the first
batch over the time from the first batch to the last: the steady rate, without the start
and end of the epoch (worker start, DALI graph build and teardown), which an ImageNet-size
epoch amortises. img/s is the median epoch's rate. Rows go to
benchmarks/results/bench_data.jsonl, with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, hardware, write_rows  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from fastjepa.config import build_loader, loader_settings, mask_sampler, validate  # noqa: E402
from fastjepa.data import IMAGENET_MEAN, IMAGENET_STD, default_photos_dir, list_images  # noqa: E402
from fastjepa.data.images import random_resized_crop_box, to_uint8_chw  # noqa: E402
from fastjepa.data.loader import backend_problem  # noqa: E402
from fastjepa.masks import MaskCollator  # noqa: E402

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300)]
QUICK_SIZES = [(160, 120), (120, 160)]
NOISE = 12.0  # std of the added noise, in 0..255 units: JPEG sizes near ImageNet's
GENERATOR_VERSION = 1  # bump when the generated images change


def generate_images(folder: Path, count: int, sizes) -> Path:
    """``count`` JPEGs in folder (made once; a complete folder is reused)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos_dir = default_photos_dir()
    photos = [Image.open(p).convert("RGB") for p in list_images(photos_dir).paths]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo, (width, height) = photos[i % len(photos)], sizes[i % len(sizes)]
        s = rng.uniform(0.5, 1.0)
        w, h = int(photo.width * s), int(photo.height * s)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = np.asarray(photo.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        image = np.clip(image + rng.normal(0.0, NOISE, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    done.touch()
    return folder


def generated_images(count: int, quick: bool, folder: Path | None = None) -> Path:
    """The folder of ``count`` generated JPEGs (small ones with ``quick``), made once: ``folder``
    or one named after the generator version, count and sizes in the temp directory."""
    sizes = QUICK_SIZES if quick else SIZES
    folder = folder or Path(tempfile.gettempdir()) / f"fastjepa-bench-data-v{GENERATOR_VERSION}-{count}-{sizes[0][0]}"
    return generate_images(folder, count, sizes)


def packed_in_shards(folder: Path, per_shard: int = 64) -> Path:
    """The JPEGs of ``folder`` as webdataset tar shards of ``per_shard`` samples (``<key>.jpg``
    and a ``<key>.cls`` label member), made once in ``<folder>-shards``."""
    import tarfile

    shards = folder.with_name(folder.name + "-shards")
    if shards.is_dir():
        return shards
    partial = folder.with_name(folder.name + "-shards.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    files = list_images(folder).paths
    for s in range(0, len(files), per_shard):
        with tarfile.open(partial / f"train-{s // per_shard:06d}.tar", "w") as tar:
            for path in files[s : s + per_shard]:
                key = Path(path).stem
                tar.add(path, arcname=f"{key}.jpg")
                label = tarfile.TarInfo(f"{key}.cls")
                label.size = 1
                tar.addfile(label, io.BytesIO(b"0"))
    partial.rename(shards)
    return shards


# ---------------------------------------------------------------------------- reference-style


def reference_transform(crop: int):
    """PIL image -> normalised float tensor, as the reference's make_transforms (augmentations off)."""
    try:
        from torchvision import transforms
    except ImportError:
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

        def transform(img):
            left, top, w, h = random_resized_crop_box(img.width, img.height, torch.default_generator, (0.3, 1.0))
            img = img.crop((left, top, left + w, top + h)).resize((crop, crop), Image.Resampling.BILINEAR)
            x = to_uint8_chw(img).float().div(255)  # ToTensor
            return x.sub_(mean).div_(std)  # Normalize

        return transform, "pil-equivalent"
    return transforms.Compose([transforms.RandomResizedCrop(crop, scale=(0.3, 1.0)), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), "torchvision"


class ReferenceStyleImages(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:  # the reference's ImageFolder loader
            img = Image.open(f).convert("RGB")
        return self.transform(img), 0


def reference_style_epochs(config, folder: Path, device, workers: int):
    """``epoch(e)``: the reference-style pipeline's batches of an epoch, on the device."""
    data, mask = config["data"], config["mask"]
    transform, kind = reference_transform(data["crop_size"])
    collator = MaskCollator(input_size=data["crop_size"], patch_size=mask["patch_size"], enc_mask_scale=tuple(mask["enc_mask_scale"]),
                            pred_mask_scale=tuple(mask["pred_mask_scale"]), aspect_ratio=tuple(mask["aspect_ratio"]),
                            nenc=mask["num_enc_masks"], npred=mask["num_pred_masks"], min_keep=mask["min_keep"])
    paths = list_images(folder).paths * data["repeat"]
    loader = DataLoader(ReferenceStyleImages(paths, transform), batch_size=data["batch_size"], shuffle=True, num_workers=workers,
                        collate_fn=collator, drop_last=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def epoch(_):
        for (images, _), masks_enc, masks_pred in loader:
            images = images.to(device, non_blocking=True)
            masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]
            yield images

    return epoch, kind


def backend_epochs(config, folder: Path, device, loader_class=None):
    """``epoch(e)``: a fastjepa backend's batches of an epoch, on the device."""
    if loader_class is None:
        loader = build_loader(config, device, seed=0, root=str(folder))
    else:
        loader = loader_class(loader_settings(config), mask_sampler(config), str(folder), device, 0)
    steps = loader.steps_per_epoch

    def epoch(e):
        return (batch.images for batch in loader.epoch(e, 0, e * steps))

    return epoch


def dali_random_crop_class():
    """The dali backend with fn.decoders.image_random_crop: DALI draws the windows (and the
    flips); the source's windows are not used."""
    from fastjepa.data.dali import DEVICE_MEMORY_PADDING, HOST_MEMORY_PADDING, DaliLoader

    class DaliRandomCrop(DaliLoader):
        def _iterator(self):
            from nvidia.dali import fn, pipeline_def, types
            from nvidia.dali.plugin.pytorch import DALIGenericIterator

            gpu = self.device_id is not None
            decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING) if gpu else dict(device="cpu")

            @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=2, seed=0)
            def graph():
                source = self.weak_source()
                encoded = fn.external_source(source=lambda info: source(info)[:1], num_outputs=1, batch=True, batch_info=True)[0]
                images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, adjust_orientation=False,
                                                       random_area=list(self.crop_scale), random_aspect_ratio=[3 / 4, 4 / 3], **decoder)
                images = fn.resize(images, resize_x=self.crop_size, resize_y=self.crop_size, interp_type=types.INTERP_LINEAR, antialias=True)
                return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5 if self.flip else 0.0),
                                                dtype=types.UINT8, output_layout="CHW")

            pipe = graph()
            pipe.build()
            return DALIGenericIterator([pipe], ["images"])

    return DaliRandomCrop


def timed_epoch(batches, device) -> tuple[int, float]:
    """(images after the first batch, seconds from the first batch to the last) of one epoch:
    the steady rate, without the epoch's start and end (worker start, DALI graph build and
    teardown), which a long epoch amortises."""
    first = last = None
    count = 0
    for images in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        last = time.perf_counter()
        if first is None:
            first = last
        else:
            count += len(images)
    return count, last - first


def measure(runners: dict, epochs: int, device) -> dict[str, tuple[float, int]]:
    """name -> (images/s of the median timed epoch, images per timed epoch) of each
    ``epoch(e)`` in runners, after one warm-up epoch each. The pipelines take turns epoch by
    epoch, so a change in the load of a shared machine falls on all of them alike."""
    for epoch in runners.values():
        timed_epoch(epoch(0), device)
    rates = {name: [] for name in runners}
    counts = {}
    for e in range(1, epochs + 1):
        for name, epoch in runners.items():
            counts[name], seconds = timed_epoch(epoch(e), device)
            rates[name].append(counts[name] / seconds)
    return {name: (statistics.median(rates[name]), counts[name]) for name in runners}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 small images, batch 4, 1 worker, 1 timed epoch: checks the script, measures nothing")
    parser.add_argument("--images", type=int, default=200, help="generated JPEGs (default 200)")
    parser.add_argument("--images-dir", type=Path, help="where the generated JPEGs are kept (default: a folder in the temp directory)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (DataLoader workers, DALI threads)")
    parser.add_argument("--repeat", type=int, default=2, help="passes over the images per epoch")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of each pipeline, taking turns (the median is reported)")
    parser.add_argument("--shards", action="store_true",
                        help="fastjepa's pipelines read the JPEGs packed in webdataset tar shards (64 per shard); reference-style reads the files")
    parser.add_argument("--pipelines", default="reference-style,pil,dali,dali-random-crop,torchvision",
                        help="comma-separated subset (the ones that cannot run here are skipped with a note)")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench_data.jsonl", help="JSONL file the rows are appended to")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.workers, args.repeat, args.epochs = 12, 4, "1", 1, 1
    workers = [int(w) for w in args.workers.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = generated_images(args.images, args.quick, args.images_dir)
    files = list_images(folder).paths
    mean_kb = sum(os.path.getsize(p) for p in files) / len(files) / 1024
    print(f"{len(files)} JPEGs in {folder}, {mean_kb:.0f} KB on average; crop {args.crop}, batch {args.batch_size}, "
          f"{args.repeat} passes per epoch, {hardware(device)}")

    pipelines = []
    for name in args.pipelines.split(","):
        problem = backend_problem(name.removesuffix("-random-crop"), device) if name != "reference-style" else None
        if problem:
            print(f"{name}: skipped ({problem})")
        else:
            pipelines.append(name)
    rows = []
    for n in workers:
        runners, extra = {}, {}
        for name in pipelines:
            root = packed_in_shards(folder) if args.shards and name != "reference-style" else folder
            config = validate({"data": {"backend": name.removesuffix("-random-crop") if name != "reference-style" else "pil",
                                        "batch_size": args.batch_size, "crop_size": args.crop, "num_workers": n, "pin_mem": True,
                                        "repeat": args.repeat, "root_path": str(root), "image_folder": ""}})
            label = f"{name}-{device.type}" if name.startswith("dali") or name == "torchvision" else name
            if name == "reference-style":
                runners[label], extra["transforms"] = reference_style_epochs(config, folder, device, n)
            elif name == "dali-random-crop":
                runners[label] = backend_epochs(config, root, device, dali_random_crop_class())
            else:
                runners[label] = backend_epochs(config, root, device)
        load = os.getloadavg()[0]  # other processes on a shared machine slow every pipeline: recorded with the rows
        for label, (img_s, count) in measure(runners, args.epochs, device).items():
            rows.append({"bench": "bench_data", "pipeline": label, "device": device.type, "hardware": hardware(device), "workers": n,
                         "batch_size": args.batch_size, "crop": args.crop, "images": len(files), "timed_images": count,
                         "mean_kb": round(mean_kb, 1), "img_s": round(img_s, 1), "cpus": os.cpu_count(), "load_avg_1m": round(load, 2),
                         "layout": "shards" if args.shards and label != "reference-style" else "files",
                         "quick": args.quick, **(extra if label == "reference-style" else {})})
            print(f"{label:<24} {n:>2} workers {img_s:>9.1f} img/s")
    for row in rows:
        base = next((r for r in rows if r["pipeline"] == "reference-style" and r["workers"] == row["workers"]), None)
        if base is not None:
            row["vs_reference"] = round(row["img_s"] / base["img_s"], 2)
        row.update(versions())
    write_rows(args.results, rows, [__file__, *argv])
    print(f"appended {len(rows)} rows to {args.results}")
    return rows


def versions() -> dict:
    import importlib.metadata

    found = {}
    for name, dist in (("pillow", "pillow"), ("torchvision", "torchvision"), ("dali", "nvidia-dali-cuda130"), ("dali", "nvidia-dali-cuda120")):
        try:
            found.setdefault(name, importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
