"""Frozen-encoder features for the probes, extracted once and cached.

``features(encoder, split, layers, ...)`` returns a dict of tensors, one per requested set:

* ``last``: the last block's tokens after the encoder's final LayerNorm, average-pooled (N, D),
  as the paper evaluates (App. A.1);
* ``last4``: each of the last 4 blocks' tokens through that final LayerNorm, average-pooled and
  concatenated (N, 4 D; 5,120 for ViT-H), as DINOv2's linear evaluation takes them;
* ``tokens``: the final LayerNorm's tokens (N, T, D), for the attentive probe.

The encoder runs in bf16 autocast on a GPU and in fp32 on the CPU; pooled features are kept
in float32, tokens in the compute dtype. Under ``torch.distributed`` each rank encodes every
world_size-th image and the rows are gathered, so every rank holds the whole set.

With ``cache`` (a folder) un-augmented features are written there as safetensors, keyed by a
digest of the weights, the images, the image size, the layers and the compute dtype: a second
probe re-reads them instead of encoding again. A cache file is written whole or not at all
(``fastjepa.files``); a full disk raises ``DiskFullError``. Augmented features (``augmentation`` with an
``epoch``) are drawn afresh for each epoch and never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from fastjepa.data.images import load_rgb, make_eval_transform, make_transforms, mix_seed
from fastjepa.data.normalize import normalize
from fastjepa.errors import DiskFullError
from fastjepa.eval.datasets import Split
from fastjepa.files import replaced_atomically, space_needed

LAYERS = ("last", "last4", "tokens")
AUGMENTATIONS = ("none", "rrc-flip", "center-flip")  # center-flip: Clevr's (a crop would cut objects out)
CACHE_FORMAT = 1  # bump when what a cache file holds changes


def weights_digest(encoder: torch.nn.Module) -> str:
    """sha256 of the encoder's state: parameter names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_digest(split: Split) -> str:
    """sha256 of a split's images: the pixels of an in-memory split; the names, sizes and
    modification times of a folder's files (an edited file changes it)."""
    digest = hashlib.sha256("\n".join(split.ids).encode())
    if split.images is not None:
        digest.update(split.images.contiguous().numpy().tobytes())
    else:
        for i in range(len(split.listing)):
            ref = split.listing.ref(i)
            stat = os.stat(ref.file)
            digest.update(f"{ref.offset}:{ref.size}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _transform(augmentation: str, image_size: int):
    """``transform(pil_image, generator) -> (3, S, S) uint8`` for an augmentation."""
    if augmentation == "none":
        return make_eval_transform(image_size)
    if augmentation == "rrc-flip":
        return make_transforms(image_size, crop_scale=(0.08, 1.0), use_horizontal_flip=True)
    centre = make_eval_transform(image_size)

    def centre_flip(img: Image.Image, g: torch.Generator) -> torch.Tensor:
        image = centre(img)
        return image.flip(-1) if torch.rand((), generator=g).item() < 0.5 else image

    return centre_flip


class _Images(torch.utils.data.Dataset):
    """A split's images at ``indices``, transformed; item i draws from a generator seeded by
    (seed, epoch, its index in the split). An unreadable file is an error that names it."""

    def __init__(self, split: Split, indices: list[int], augmentation: str, image_size: int, seed: int, epoch: int):
        self.split, self.indices, self.seed, self.epoch = split, indices, seed, epoch
        self.transform = _transform(augmentation, image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor:
        index = self.indices[item]
        if self.split.images is not None:
            img = Image.fromarray(self.split.images[index].permute(1, 2, 0).numpy())
        else:
            try:
                img = load_rgb(self.split.listing.ref(index))
            except Exception as e:
                raise OSError(f"cannot read image {self.split.ids[index]}: {type(e).__name__}: {e}") from None
        return self.transform(img, torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index)))


def image_batches(split: Split, indices: list[int], augmentation: str, image_size: int, batch_size: int, seed: int, epoch: int,
             num_workers: int):
    """uint8 (B, 3, S, S) batches of the images at ``indices``, in order."""
    if split.images is not None and augmentation == "none":  # in memory, no transform: slice (resizing when asked to)
        for start in range(0, len(indices), batch_size):
            batch = split.images[indices[start : start + batch_size]]
            if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
                batch = torch.nn.functional.interpolate(batch.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
                batch = batch.round().clamp(0, 255).to(torch.uint8)
            yield batch
        return
    images = _Images(split, indices, augmentation, image_size, seed, epoch)
    yield from torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers)


def _encode(encoder: torch.nn.Module, batch: torch.Tensor, layers: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    x = normalize(batch.to(device, non_blocking=True))
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda module, args, out: captured.append(out)) for block in encoder.blocks[-4:]] if "last4" in layers else []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        try:
            tokens = encoder(x)
        finally:
            for hook in hooks:
                hook.remove()
        out = {}
        if "last" in layers:
            out["last"] = tokens.float().mean(dim=1)
        if "last4" in layers:
            out["last4"] = torch.cat([encoder.norm(t).float().mean(dim=1) for t in captured], dim=1)
        if "tokens" in layers:
            out["tokens"] = tokens
    return out


def _gather_rows(rows: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Every rank's rows (rank r holds images r, r + W, ...) as the whole set, in order, on every rank."""
    world = dist.get_world_size()
    per_rank = -(-n // world)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = {}
    for name, local in rows.items():
        padded = local.new_zeros((per_rank, *local.shape[1:]), device=device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered[name] = torch.stack(parts, dim=1).flatten(0, 1)[:n].cpu()
    return gathered


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def extract(encoder: torch.nn.Module, split: Split, layers: tuple[str, ...], image_size: int, batch_size: int = 256,
            augmentation: str = "none", seed: int = 0, epoch: int = 0, num_workers: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """The requested feature sets of every image of ``split``, on the CPU (see the module docstring)."""
    device = next(encoder.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    indices = list(range(rank, len(split), world))
    batches = image_batches(split, indices, augmentation, image_size, batch_size, seed, epoch, num_workers)
    steps = -(-len(indices) // batch_size)
    if progress and steps > 8:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, desc=f"features {split.name}", unit="batch", disable=None if rank == 0 else True, file=sys.stderr)
    was_training = encoder.training
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        for batch in batches:
            for name, value in _encode(encoder, batch, layers, device).items():
                parts[name].append(value if _distributed() else value.cpu())
    finally:
        encoder.train(was_training)
    rows = {name: torch.cat(values) for name, values in parts.items()}
    return _gather_rows(rows, len(split)) if world > 1 else rows


def _cache_path(cache: Path, encoder: torch.nn.Module, split: Split, layers: tuple[str, ...], image_size: int, device: torch.device) -> Path:
    key = {"format": CACHE_FORMAT, "weights": weights_digest(encoder), "images": split_digest(split), "image_size": image_size,
           "layers": sorted(layers), "compute": "bf16" if device.type == "cuda" else "fp32"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in split.name.strip("/"))[-60:]
    return cache / f"{name}-{digest}.safetensors"


def features(encoder: torch.nn.Module, split: Split, layers: tuple[str, ...], image_size: int, *, batch_size: int = 256,
             augmentation: str = "none", seed: int = 0, epoch: int = 0, cache: str | os.PathLike | None = None, num_workers: int = 0,
             progress: bool = True) -> dict[str, torch.Tensor]:
    """``extract``'s features, read from and written to ``cache`` when it is given and nothing is augmented."""
    layers = tuple(layers)
    if not layers or any(name not in LAYERS for name in layers):
        raise ValueError(f"layers must be some of {', '.join(LAYERS)}, got {layers!r}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
    if "last4" in layers and len(encoder.blocks) < 4:
        raise ValueError(f"last4 features need an encoder of at least 4 blocks; this one has {len(encoder.blocks)}")
    trained_at = encoder.patch_embed.img_size
    if image_size != trained_at:
        raise ValueError(f"the encoder was trained at {trained_at} px; --image-size {image_size} would change its position table")
    if cache is None or augmentation != "none":
        return extract(encoder, split, layers, image_size, batch_size, augmentation, seed, epoch, num_workers, progress)
    device = next(encoder.parameters()).device
    path = _cache_path(Path(cache), encoder, split, layers, image_size, device)
    if path.exists():
        from safetensors.torch import load_file

        return load_file(path)
    rows = extract(encoder, split, layers, image_size, batch_size, augmentation, seed, epoch, num_workers, progress)
    if not _distributed() or dist.get_rank() == 0:
        from safetensors.torch import save_file

        try:
            with replaced_atomically(path, space_needed(rows)) as temporary:
                save_file({name: t.contiguous() for name, t in rows.items()}, temporary)
        except DiskFullError as e:
            raise DiskFullError(e.path, e.needed, e.free, "--no-cache (cache=None) evaluates without writing the cache") from e
    return rows
