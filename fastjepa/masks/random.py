"""Random (unstructured) patch masks with the reference's name and random stream
(``src/masks/random.py``).

Each batch draws one masking ratio from a generator seeded with the collator's step (a
counter shared with DataLoader workers), then one permutation of the patches per sample
from the global torch RNG: its first ``num_keep`` patches are the context, the rest the
target. The same seeds give the reference's masks, and leave the global RNG where the
reference leaves it.

Deliberate differences from the reference: the arguments are checked (the reference floors
an input size that ``patch_size`` does not divide, and can return empty masks), and a list
``input_size`` is read like a tuple.
"""

from __future__ import annotations

from multiprocessing import Value

import torch
from torch.utils.data import default_collate


class MaskCollator:
    """Collates a batch and draws its masks: ``(collated_batch, [masks_enc], [masks_pred])``,
    masks_enc (B, num_keep) and masks_pred (B, num_patches - num_keep) int64 patch indices,
    num_keep = int(num_patches * (1 - ratio)), ratio uniform in ``ratio`` once per batch."""

    def __init__(self, ratio=(0.4, 0.6), input_size=(224, 224), patch_size=16):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        if (
            not isinstance(input_size, (tuple, list))
            or len(input_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in input_size)
            or any(s % patch_size for s in input_size)
        ):
            raise ValueError(f"input_size must be an int or a pair of positive ints divisible by patch_size {patch_size}, got {input_size!r}")
        if not isinstance(ratio, (tuple, list)) or len(ratio) != 2 or not all(isinstance(r, (int, float)) for r in ratio):
            raise ValueError(f"ratio must be a pair (min, max) of numbers, got {ratio!r}")
        if not 0.0 <= ratio[0] <= ratio[1] < 1.0:
            raise ValueError(f"ratio must satisfy 0 <= min <= max < 1, got {ratio!r}")
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.ratio = ratio
        num_patches = self.height * self.width
        # The ratio drawn is monotone in the uniform draw u in [0, 1 - 2**-24] (torch.rand's float32
        # range): the context is largest at u = 0 and smallest at the largest u.
        fewest, most = self.num_keep(self._ratio(1.0 - 2.0**-24)), self.num_keep(self._ratio(0.0))
        if fewest < 1 or most >= num_patches:
            raise ValueError(
                f"ratio {ratio!r} on {num_patches} patches keeps {fewest} to {most} context patches; "
                f"both masks must be non-empty (1 <= num_keep < {num_patches})"
            )
        self._itr_counter = Value("i", -1)  # shared with DataLoader workers

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def _ratio(self, uniform: float) -> float:
        """The masking ratio for a uniform draw, computed as the reference does."""
        return self.ratio[0] + uniform * (self.ratio[1] - self.ratio[0])

    def num_keep(self, ratio: float) -> int:
        """The context length for a masking ratio, as the reference rounds it."""
        return int(self.num_patches * (1.0 - ratio))

    def step(self) -> int:
        """The next batch's index (0, 1, ...), across every process sharing this collator."""
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            return self._itr_counter.value

    def __call__(self, batch):
        collated_batch = default_collate(batch)
        generator = torch.Generator().manual_seed(self.step())
        num_keep = self.num_keep(self._ratio(torch.rand(1, generator=generator).item()))
        masks_enc, masks_pred = [], []
        for _ in range(len(batch)):
            perm = torch.randperm(self.num_patches)  # the global RNG, as the reference
            masks_enc.append(perm[:num_keep])
            masks_pred.append(perm[num_keep:])
        return collated_batch, [default_collate(masks_enc)], [default_collate(masks_pred)]
