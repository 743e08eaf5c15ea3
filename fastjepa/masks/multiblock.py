"""Multi-block masks of I-JEPA, sampled for a whole batch with tensor operations.

The distribution is the reference collator's (facebookresearch/ijepa,
``src/masks/multiblock.py``), quirks included:

* one uniform draw r per batch sets both the scale and the aspect ratio of the
  target blocks, and another one the context block's scale (aspect 1);
* every sample's blocks have the batch's block size; the top-left corner is
  uniform over [0, H - h) x [0, W - w), an exclusive bound that never masks the
  last patch row and column (``fix_position_range=True`` allows [0, H - h]);
* targets are unconstrained rectangles; the context is its rectangle minus every
  target block of its sample (unless ``allow_overlap``), redrawn while it keeps no
  more than ``min_keep`` patches; after 20 failed draws the last remaining target
  stops constraining it (the reference's retry-and-relax rule);
* every mask is truncated to the batch minimum, keeping its lowest indices
  (``sample(..., ragged=True)``, fastjepa's ``mask.ragged``, keeps every sampled
  context token instead: the contexts come back packed, as ``PackedMasks``).

The RNG stream differs from the reference's (which mixes a seeded generator with
the global RNG); the distribution is the same.

Output shapes depend on the draws (the context length is a batch minimum), so
the masks are drawn on the host (random numbers from a torch generator, the
geometry in batched numpy operations) and reach a CUDA device in one
asynchronous copy from pinned memory: ``sample`` never waits
for the device, and a given seed gives the same masks on every device.
"""

from __future__ import annotations

import logging
import math
from multiprocessing import Value
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from fastjepa.utils.masking import PackedMasks

logger = logging.getLogger(__name__)

_DRAWS_PER_RELAXATION = 20  # failed context draws before one target stops constraining it
_SIZE_CHECK_POINTS = 20001  # grid over r on which the smallest possible block is checked


def _pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo <= hi:
        raise ValueError(f"{name} must have min <= max, got {value!r}")
    return lo, hi


class MultiBlockMaskSampler:
    """Samples ``(masks_enc, masks_pred)`` for a batch: lists of ``nenc`` context and
    ``npred`` target index tensors, each (batch_size, K) int64, indices sorted."""

    def __init__(
        self,
        input_size=(224, 224),
        patch_size=16,
        enc_mask_scale=(0.2, 0.8),
        pred_mask_scale=(0.2, 0.8),
        aspect_ratio=(0.3, 3.0),
        nenc=1,
        npred=2,
        min_keep=4,
        allow_overlap=False,
        fix_position_range=False,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        if (
            len(input_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in input_size)
            or any(s % patch_size for s in input_size)
        ):
            raise ValueError(f"input_size must be positive ints divisible by patch_size {patch_size}, got {input_size!r}")
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        if self.height < 2 or self.width < 2:
            raise ValueError(f"the patch grid must be at least 2x2, got {self.height}x{self.width}")
        self.enc_mask_scale = _pair("enc_mask_scale", enc_mask_scale)
        self.pred_mask_scale = _pair("pred_mask_scale", pred_mask_scale)
        self.aspect_ratio = _pair("aspect_ratio", aspect_ratio)
        for name, (lo, hi) in (("enc_mask_scale", self.enc_mask_scale), ("pred_mask_scale", self.pred_mask_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        if not self.aspect_ratio[0] > 0.0:
            raise ValueError(f"aspect_ratio must be positive, got {self.aspect_ratio}")
        for name, value in (("nenc", nenc), ("npred", npred)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        num_patches = self.height * self.width
        if not isinstance(min_keep, int) or not 0 <= min_keep < num_patches:
            raise ValueError(f"min_keep must be an int in [0, {num_patches}) (the number of patches), got {min_keep!r}")
        self.nenc, self.npred, self.min_keep = nenc, npred, min_keep
        self.allow_overlap = bool(allow_overlap)
        self.fix_position_range = bool(fix_position_range)
        # A block that can never hold more than min_keep patches would make the
        # reference redraw forever; refuse the configuration instead.
        for name, scale, aspect in (
            ("pred_mask_scale", self.pred_mask_scale, self.aspect_ratio),
            ("enc_mask_scale", self.enc_mask_scale, (1.0, 1.0)),
        ):
            smallest = min(h * w for h, w in self.possible_block_sizes(scale, aspect))
            if smallest <= min_keep:
                raise ValueError(
                    f"{name} {scale} gives blocks of as few as {smallest} patches on a "
                    f"{self.height}x{self.width} grid; every block must hold more than min_keep={min_keep}"
                )

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def block_size(self, r: float, scale: tuple[float, float], aspect_ratio: tuple[float, float]) -> tuple[int, int]:
        """(h, w) in patches for the per-batch draw r in [0, 1): one r sets both the
        area fraction and the aspect ratio h / w; each side is at most grid - 1."""
        fraction = scale[0] + r * (scale[1] - scale[0])
        max_keep = int(self.height * self.width * fraction)
        aspect = aspect_ratio[0] + r * (aspect_ratio[1] - aspect_ratio[0])
        h = int(round(math.sqrt(max_keep * aspect)))
        w = int(round(math.sqrt(max_keep / aspect)))
        return min(h, self.height - 1), min(w, self.width - 1)

    def possible_block_sizes(self, scale, aspect_ratio) -> set[tuple[int, int]]:
        """The block sizes reachable for r on a fine grid over [0, 1]."""
        grid = torch.linspace(0.0, 1.0, _SIZE_CHECK_POINTS, dtype=torch.float64).tolist()
        return {self.block_size(r, scale, aspect_ratio) for r in grid}

    def _corners(self, shape, size: tuple[int, int], g: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        extra = 1 if self.fix_position_range else 0
        top = torch.randint(0, self.height - size[0] + extra, shape, generator=g)
        left = torch.randint(0, self.width - size[1] + extra, shape, generator=g)
        return top.numpy(), left.numpy()

    def _spans(self, start: np.ndarray, length: int, extent: int) -> np.ndarray:
        """Boolean (..., extent): the rows (or columns) that [start, start + length) covers."""
        offset = np.arange(extent) - start[..., None]
        return offset.view(np.uint64) < length  # 0 <= offset < length

    def _sample_context(self, target_rows, target_cols, batch_size: int, e_size, g):
        """Context rasters (nenc * B, H * W) bool, slot e * B + b, and their patch counts,
        by rejection in vectorized rounds: each round redraws every still-rejected slot.
        ``target_rows`` (B, M, H) and ``target_cols`` (B, M, W) span the target blocks."""
        B = batch_size
        slots = self.nenc * B
        context = counts = None
        free = {}  # number of constraining targets -> (B, H, W): patches none of them covers
        constraining = 0 if self.allow_overlap else self.npred
        pending = np.arange(slots)
        draws = 0
        while len(pending):
            if draws and draws % _DRAWS_PER_RELAXATION == 0:
                logger.warning("%d context masks kept <= min_keep patches in %d draws; ignoring one more target block", len(pending), draws)
            top, left = self._corners((len(pending),), e_size, g)
            candidate = self._spans(top, e_size[0], self.height)[:, :, None] & self._spans(left, e_size[1], self.width)[:, None, :]
            active = max(constraining - draws // _DRAWS_PER_RELAXATION, 0)  # targets that still constrain
            if active:
                if active not in free:
                    rows, cols = target_rows[:, :active].astype(np.float32), target_cols[:, :active].astype(np.float32)
                    free[active] = np.matmul(rows.transpose(0, 2, 1), cols) == 0
                candidate &= free[active] if len(pending) == slots == B else free[active][pending % B]
            candidate_counts = candidate.sum(axis=(1, 2))
            accepted = candidate_counts > self.min_keep
            if context is None:  # first round: every slot is pending
                context, counts = candidate, candidate_counts
            else:
                context[pending[accepted]], counts[pending[accepted]] = candidate[accepted], candidate_counts[accepted]
            pending = pending[~accepted]
            draws += 1
        return context.reshape(slots, -1), counts

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device=None, ragged: bool = False):
        """Masks for one batch: ``(masks_enc, masks_pred)``, lists of (batch_size, K) int64
        tensors on ``device`` (default CPU). ``generator`` is a CPU torch.Generator
        (default: the global one); a given seed gives the same masks on every device.

        ``ragged=True`` keeps every sampled context token: ``masks_enc`` is then a list of
        ``nenc`` ``PackedMasks`` (batch_size rows each, ascending indices, lengths known on
        the host), the same draws as ``ragged=False`` before its truncation to the batch
        minimum. The target masks are the same dense, truncated tensors either way."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (masks are drawn on the host), got one on {generator.device}")
        device = torch.device("cpu") if device is None else torch.device(device)
        B, M, W = batch_size, self.npred, self.width
        r_pred, r_enc = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        (h, w) = p_size = self.block_size(r_pred, self.pred_mask_scale, self.aspect_ratio)
        e_size = self.block_size(r_enc, self.enc_mask_scale, (1.0, 1.0))

        top, left = self._corners((B, M), p_size, generator)
        cells = np.arange(h * w)
        masks_pred = (top * W + left).T[..., None] + (cells // w) * W + cells % w  # (M, B, h * w)
        target_rows, target_cols = self._spans(top, h, self.height), self._spans(left, w, W)
        context, counts = self._sample_context(target_rows, target_cols, B, e_size, generator)
        if ragged:
            return self._ragged(masks_pred, context, counts, B, device)
        masks_enc = _first_indices(context, counts, int(counts.min()))  # (nenc * B, k)

        k = masks_enc.shape[1]
        packed = _to_device(torch.from_numpy(np.concatenate([masks_pred.ravel(), masks_enc.ravel()])), device)
        masks_pred, masks_enc = packed.split([M * B * h * w, self.nenc * B * k])
        return list(masks_enc.view(self.nenc, B, k).unbind(0)), list(masks_pred.view(M, B, h * w).unbind(0))

    def _ragged(self, masks_pred: np.ndarray, context: np.ndarray, counts: np.ndarray, B: int, device):
        """``sample(..., ragged=True)``'s result: the targets (M, B, K) and every context
        token, with the contexts' offsets, reach the device in one copy (int64; the offsets
        become int32 there, a device op)."""
        M, K = masks_pred.shape[0], masks_pred.shape[2]
        R, N = context.shape  # R = nenc * B rasters of N patches
        rows = np.repeat(np.arange(R), counts)
        index = np.flatnonzero(context) - rows * N  # ascending within each row, rows in order
        counts = counts.reshape(self.nenc, B)
        cu = np.zeros((self.nenc, B + 1), dtype=np.int64)
        cu[:, 1:] = np.cumsum(counts, axis=1)
        packed = _to_device(torch.from_numpy(np.concatenate([masks_pred.ravel(), index, cu.ravel()])), device)
        targets, index, cu = packed.split([M * B * K, index.size, cu.size])
        cu = cu.to(torch.int32).view(self.nenc, B + 1)
        masks_enc, start = [], 0
        for e in range(self.nenc):
            lengths = tuple(counts[e].tolist())
            masks_enc.append(PackedMasks(index[start : start + sum(lengths)], cu[e], max(lengths), lengths))
            start += sum(lengths)
        return masks_enc, list(targets.view(M, B, K).unbind(0))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()  # a pinned source keeps the copy asynchronous: no host sync
    return t.to(device, non_blocking=True)


def _first_indices(raster: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """The k lowest set positions of every row of a boolean (R, N) raster, (R, k) int64.
    ``counts`` holds each row's number of set positions, at least k."""
    R, N = raster.shape
    flat = np.flatnonzero(raster)  # ascending: row by row
    row_start = np.cumsum(counts) - counts
    return flat[row_start[:, None] + np.arange(k)] - np.arange(R)[:, None] * N


class MaskCollator:
    """DataLoader ``collate_fn`` returning ``(collated_batch, masks_enc, masks_pred)``,
    the reference collator's interface and distribution. Batch i (counted by the
    shared ``step()`` counter, as in the reference) draws its masks from a generator
    seeded with i."""

    def __init__(
        self,
        input_size=(224, 224),
        patch_size=16,
        enc_mask_scale=(0.2, 0.8),
        pred_mask_scale=(0.2, 0.8),
        aspect_ratio=(0.3, 3.0),
        nenc=1,
        npred=2,
        min_keep=4,
        allow_overlap=False,
        fix_position_range=False,
    ):
        self.sampler = MultiBlockMaskSampler(
            input_size, patch_size, enc_mask_scale, pred_mask_scale, aspect_ratio, nenc, npred, min_keep, allow_overlap, fix_position_range
        )
        self._itr_counter = Value("i", -1)  # shared with DataLoader workers

    def step(self) -> int:
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            return self._itr_counter.value

    def __call__(self, batch):
        collated_batch = default_collate(batch)
        generator = torch.Generator().manual_seed(self.step())
        masks_enc, masks_pred = self.sampler.sample(len(batch), generator=generator)
        return collated_batch, masks_enc, masks_pred
