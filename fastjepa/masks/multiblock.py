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

The random numbers are the reference's too: the block sizes from two float32
draws of one generator (the collator's, seeded with the batch counter), the positions
from another (the collator's global RNG) in the reference's order, sample by sample,
redraws included. ``MaskCollator`` therefore returns the reference collator's masks and
leaves the global RNG where the reference leaves it.

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
_MAX_GRID_SIDE = 255  # patches per side; the positions' common modulus (at most side**4) then fits ATen's 32-bit draws


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
        if not (2 <= self.height <= _MAX_GRID_SIDE and 2 <= self.width <= _MAX_GRID_SIDE):
            raise ValueError(f"the patch grid must be from 2x2 to {_MAX_GRID_SIDE}x{_MAX_GRID_SIDE}, got {self.height}x{self.width}")
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

    def _spans(self, start: np.ndarray, length: int, extent: int) -> np.ndarray:
        """Boolean (..., extent): the rows (or columns) that [start, start + length) covers."""
        offset = np.arange(extent) - start[..., None]
        return offset.view(np.uint64) < length  # 0 <= offset < length

    def _free(self, target_rows: np.ndarray, target_cols: np.ndarray, active: int) -> np.ndarray:
        """(..., H, W) bool: the patches none of the first ``active`` targets covers (all
        patches when ``active`` is 0). ``target_rows`` (..., M, H), ``target_cols`` (..., M, W)."""
        if active == 0:
            return np.ones((*target_rows.shape[:-2], self.height, self.width), dtype=bool)
        rows, cols = target_rows[..., :active, :].astype(np.float32), target_cols[..., :active, :].astype(np.float32)
        return np.matmul(np.swapaxes(rows, -1, -2), cols) == 0

    def _context(self, free: np.ndarray, top: np.ndarray, left: np.ndarray, e_size) -> np.ndarray:
        """(..., H, W) bool: the context rectangles at (top, left) within ``free``."""
        rect = self._spans(top, e_size[0], self.height)[..., :, None] & self._spans(left, e_size[1], self.width)[..., None, :]
        return rect & free

    def _draw_positions(self, batch_size: int, p_size, e_size, generator: torch.Generator | None):
        """The reference's position draws, in its order: for each sample, a (top, left) per
        target block, then per context block (top, left) pairs until one keeps more than
        ``min_keep`` patches. Returns the targets' (top, left), each (B, M), and the context
        rasters (nenc * B, H * W) bool (slot e * B + b) with their patch counts.

        Vectorized over samples: a round takes the draws of every remaining sample as if no
        context were redrawn and keeps the samples before the first rejected context; that
        sample's redraws are read one by one, and the next round starts after it."""
        B, M, E = batch_size, self.npred, self.nenc
        extra = 1 if self.fix_position_range else 0
        moduli = np.array([self.height - p_size[0], self.width - p_size[1], self.height - e_size[0], self.width - e_size[1]]) + extra
        stream = _PositionStream(generator, moduli)
        constraining = 0 if self.allow_overlap else M
        top, left = np.empty((B, M), dtype=np.int64), np.empty((B, M), dtype=np.int64)
        context = np.empty((E, B, self.height, self.width), dtype=bool)
        per_sample = 2 * (M + E)  # draws of a sample whose contexts are all accepted at once
        b = 0
        while b < B:
            draws = stream.peek((B - b) * per_sample).reshape(B - b, per_sample)
            tops, lefts = draws[:, 0 : 2 * M : 2] % moduli[0], draws[:, 1 : 2 * M : 2] % moduli[1]
            rows, cols = self._spans(tops, p_size[0], self.height), self._spans(lefts, p_size[1], self.width)
            free = self._free(rows, cols, constraining)
            first = self._context(free[:, None], draws[:, 2 * M :: 2] % moduli[2], draws[:, 2 * M + 1 :: 2] % moduli[3], e_size)
            accepted = first.sum(axis=(2, 3)) > self.min_keep  # (B - b, E)
            if accepted.all():
                top[b:], left[b:], context[:, b:] = tops, lefts, first.transpose(1, 0, 2, 3)
                stream.advance((B - b) * per_sample)
                break
            i, e = divmod(int(np.argmin(accepted.ravel())), E)  # the first rejected context, in draw order
            s = b + i
            top[b : s + 1], left[b : s + 1] = tops[: i + 1], lefts[: i + 1]
            context[:, b:s] = first[:i].transpose(1, 0, 2, 3)
            context[:e, s] = first[i, :e]
            stream.advance(i * per_sample + 2 * M + 2 * (e + 1))
            for slot in range(e, E):
                context[slot, s] = self._redraw_context(stream, rows[i], cols[i], e_size, constraining, rejected=int(slot == e))
            b = s + 1
        counts = context.sum(axis=(2, 3)).reshape(E * B)
        return top, left, context.reshape(E * B, -1), counts

    def _redraw_context(self, stream: "_PositionStream", rows: np.ndarray, cols: np.ndarray, e_size, constraining: int, rejected: int):
        """One sample's context, drawn (top, left) by (top, left) after ``rejected`` failed
        draws; after every 20 failures one more target (the last first) stops constraining it."""
        while True:
            active = max(constraining - rejected // _DRAWS_PER_RELAXATION, 0)
            top, left = stream.take(2)
            candidate = self._context(self._free(rows, cols, active), top % stream.moduli[2], left % stream.moduli[3], e_size)
            if candidate.sum() > self.min_keep:
                return candidate
            rejected += 1
            if rejected % _DRAWS_PER_RELAXATION == 0:
                logger.warning("a context mask kept <= %d patches in %d draws; ignoring one more target block", self.min_keep, rejected)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device=None, ragged: bool = False,
               position_generator: torch.Generator | None = None):
        """Masks for one batch: ``(masks_enc, masks_pred)``, lists of (batch_size, K) int64
        tensors on ``device`` (default CPU).

        The random numbers are the reference collator's: two float32 draws from ``generator``
        set the target and context block sizes, then the block positions come from
        ``position_generator`` (default: ``generator``) in the reference's order. Both are
        CPU torch.Generators (None: the global one); a given seed gives the same masks on
        every device. The reference collator is ``generator`` seeded with the batch counter
        and ``position_generator`` the global RNG (``MaskCollator``).

        ``ragged=True`` keeps every sampled context token: ``masks_enc`` is then a list of
        ``nenc`` ``PackedMasks`` (batch_size rows each, ascending indices, lengths known on
        the host), the same draws as ``ragged=False`` before its truncation to the batch
        minimum. The target masks are the same dense, truncated tensors either way."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for name, g in (("generator", generator), ("position_generator", position_generator)):
            if g is not None and g.device.type != "cpu":
                raise ValueError(f"{name} must be a CPU torch.Generator (masks are drawn on the host), got one on {g.device}")
        device = torch.device("cpu") if device is None else torch.device(device)
        B, M, W = batch_size, self.npred, self.width
        r_pred = torch.rand(1, generator=generator).item()
        r_enc = torch.rand(1, generator=generator).item()
        (h, w) = p_size = self.block_size(r_pred, self.pred_mask_scale, self.aspect_ratio)
        e_size = self.block_size(r_enc, self.enc_mask_scale, (1.0, 1.0))

        top, left, context, counts = self._draw_positions(B, p_size, e_size, generator if position_generator is None else position_generator)
        cells = np.arange(h * w)
        masks_pred = (top * W + left).T[..., None] + (cells // w) * W + cells % w  # (M, B, h * w)
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


class _PositionStream:
    """The reference's block positions, ``torch.randint(0, m, (1,))`` one at a time for moduli m,
    read from vectorized draws. ATen's CPU ``randint`` takes each element as a 32-bit draw mod
    its range, element after element, so a draw mod L, with L a multiple of every m, reduced mod
    m is the one-at-a-time value. ``peek`` draws only values the reference will also consume."""

    def __init__(self, generator: torch.Generator | None, moduli: np.ndarray):
        self.generator, self.moduli = generator, moduli
        self.modulus = math.lcm(*(int(m) for m in moduli))
        assert self.modulus < 2**32, "the constructor keeps grid sides <= 255, so that ATen draws 32 bits per value"
        self.drawn = np.empty(0, dtype=np.int64)  # drawn, not consumed yet

    def peek(self, n: int) -> np.ndarray:
        """The next n values (drawing the ones not drawn yet), left unconsumed."""
        if len(self.drawn) < n:
            more = torch.randint(0, self.modulus, (n - len(self.drawn),), generator=self.generator).numpy()
            self.drawn = np.concatenate([self.drawn, more])
        return self.drawn[:n]

    def advance(self, n: int) -> None:
        self.drawn = self.drawn[n:]

    def take(self, n: int) -> np.ndarray:
        values = self.peek(n)
        self.advance(n)
        return values


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
    the reference collator's interface and random numbers: batch i (counted by the shared
    ``step()`` counter) draws its block sizes from a generator seeded with i and the
    positions from the global torch RNG."""

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
        masks_enc, masks_pred = self.sampler.sample(len(batch), generator=generator, position_generator=torch.default_generator)
        return collated_batch, masks_enc, masks_pred
