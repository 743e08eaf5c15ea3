"""Token selection by mask indices (``apply_masks``, the reference's ``src/masks/utils.py``,
re-exported there as ``fastjepa.masks.utils``), and ``PackedMasks``, the ragged (untruncated)
context masks of ``mask.ragged``. A utility of the models and the mask samplers alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastjepa.ops import gather_tokens


def _as_list(masks) -> list:
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


@dataclass(frozen=True, eq=False)
class PackedMasks:
    """Masks of different lengths over R rows (R = B samples, or several masks over one
    batch stacked mask-major), packed: row r holds the token ids
    ``index[cu_seqlens[r]:cu_seqlens[r + 1]]``, ascending.

    index: (T,) int64 token ids, on the device.
    cu_seqlens: (R + 1,) int32 offsets into ``index``, on the same device.
    max_len: the longest row (a Python int: it sizes the attention kernels' grid).
    lengths: every row's length (Python ints), so that shapes are known on the host and
        nothing that consumes the masks waits for the device.
    """

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    lengths: tuple[int, ...]

    def __post_init__(self):
        lengths = tuple(int(n) for n in self.lengths)
        object.__setattr__(self, "lengths", lengths)
        if not lengths or min(lengths) < 0:
            raise ValueError(f"PackedMasks: lengths must be one non-negative int per row (at least one row), got {lengths[:8]}")
        if not isinstance(self.index, torch.Tensor) or self.index.dim() != 1 or self.index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"PackedMasks: index must be a flat int64 (or int32) tensor, got {getattr(self.index, 'dtype', self.index)!r}")
        if self.index.shape[0] != sum(lengths):
            raise ValueError(f"PackedMasks: index has {self.index.shape[0]} tokens but the lengths sum to {sum(lengths)}")
        if (not isinstance(self.cu_seqlens, torch.Tensor) or self.cu_seqlens.dtype != torch.int32
                or tuple(self.cu_seqlens.shape) != (len(lengths) + 1,)):
            raise ValueError(f"PackedMasks: cu_seqlens must be int32 ({len(lengths) + 1},), got "
                             f"{getattr(self.cu_seqlens, 'dtype', self.cu_seqlens)} {tuple(getattr(self.cu_seqlens, 'shape', ()))}")
        if self.cu_seqlens.device != self.index.device:
            raise ValueError(f"PackedMasks: index is on {self.index.device} but cu_seqlens on {self.cu_seqlens.device}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len != max(lengths):
            raise ValueError(f"PackedMasks: max_len must be the longest row ({max(lengths)}), got {self.max_len!r}")

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return self.index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def to(self, device, non_blocking: bool = False) -> "PackedMasks":
        return PackedMasks(self.index.to(device, non_blocking=non_blocking), self.cu_seqlens.to(device, non_blocking=non_blocking),
                           self.max_len, self.lengths)

    def select_rows(self, start: int, stop: int) -> "PackedMasks":
        """Rows start .. stop - 1 (a slice of ``index``; offsets on the device, shifted by host-known totals)."""
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"PackedMasks.select_rows: need 0 <= start < stop <= {self.rows}, got {start}, {stop}")
        first, last = sum(self.lengths[:start]), sum(self.lengths[:stop])
        lengths = self.lengths[start:stop]
        return PackedMasks(self.index[first:last], self.cu_seqlens[start:stop + 1] - first, max(lengths), lengths)

    def split(self) -> list[torch.Tensor]:
        """Each row's token ids (views of ``index``)."""
        return list(self.index.split(self.lengths))

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], device=None) -> "PackedMasks":
        """From one 1-D index tensor per row (host-side concatenation)."""
        rows = [torch.as_tensor(r, dtype=torch.int64).reshape(-1) for r in rows]
        lengths = tuple(len(r) for r in rows)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        packed = cls(torch.cat(rows), cu, max(lengths), lengths)
        return packed if device is None else packed.to(device)

    @classmethod
    def from_dense(cls, masks: torch.Tensor) -> "PackedMasks":
        """From dense (R, K) masks, on their device, without reading them."""
        if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
            raise ValueError(f"PackedMasks.from_dense: masks must be (R, K), got {tuple(getattr(masks, 'shape', ()))}")
        R, K = masks.shape
        cu = torch.arange(R + 1, device=masks.device, dtype=torch.int32) * K
        return cls(masks.reshape(-1), cu, K, (K,) * R)


def is_packed(masks) -> bool:
    """Whether ``masks`` is a ``PackedMasks`` or a list of them (dense masks: tensors)."""
    masks = _as_list(masks)
    packed = [isinstance(m, PackedMasks) for m in masks]
    if any(packed) and not all(packed):
        raise ValueError("masks must be all PackedMasks or all dense (B, K) tensors, not a mix")
    return bool(masks) and all(packed)


def concat_packed(masks: PackedMasks | Sequence[PackedMasks], batch_size: int | None = None) -> PackedMasks:
    """Several PackedMasks of B rows each as one PackedMasks of len(masks) * B rows,
    mask-major (row i * B + b is sample b under mask i), as ``stack_masks`` stacks dense ones.
    Device ops only (the offsets are shifted by host-known totals)."""
    masks = _as_list(masks)
    if not masks or not all(isinstance(m, PackedMasks) for m in masks):
        raise ValueError("concat_packed takes one or more PackedMasks")
    B = masks[0].rows if batch_size is None else batch_size
    if any(m.rows != B for m in masks):
        raise ValueError(f"every PackedMasks must have B={B} rows, got {[m.rows for m in masks]}")
    if len(masks) == 1:
        return masks[0]
    cu, shift = [masks[0].cu_seqlens], masks[0].total
    for m in masks[1:]:
        cu.append(m.cu_seqlens[1:] + shift)
        shift += m.total
    lengths = sum((m.lengths for m in masks), ())
    return PackedMasks(torch.cat([m.index for m in masks]), torch.cat(cu), max(lengths), lengths)


def stack_masks(masks: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Masks (B, K) each, one K, stacked mask-major into one (len(masks) * B, K) index."""
    masks = _as_list(masks)
    if not masks or len({m.shape for m in masks}) != 1 or masks[0].dim() != 2 or masks[0].shape[0] != batch_size:
        shapes = [tuple(m.shape) for m in masks]
        raise ValueError(f"every mask must be (B={batch_size}, K) with one K, got {shapes}")
    if masks[0].dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masks must be int32 or int64, got {masks[0].dtype}")
    return masks[0] if len(masks) == 1 else torch.cat(masks)


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Gather the tokens of ``x`` (B, N, D) named by each mask (B, K) and stack the
    results mask-major: row ``i * B + b`` holds sample ``b`` under mask ``i``.

    Same result as the reference, which builds an int64 (B, K, D) index per mask and
    concatenates; here one ``fastjepa.ops.gather_tokens`` reads the (M * B, K) indices
    and writes the stacked result directly.
    """
    if x.dim() != 3:
        raise ValueError(f"apply_masks: x must be (B, N, D), got shape {tuple(x.shape)}")
    try:
        index = stack_masks(masks, x.shape[0])
    except ValueError as e:
        raise ValueError(f"apply_masks: {e}") from None
    return gather_tokens(x, index.to(x.device))
