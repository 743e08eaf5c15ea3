"""The collator without masks, with the reference's name (``src/masks/default.py``)."""

from __future__ import annotations

from torch.utils.data import default_collate


class DefaultCollator:
    """``(default_collate(batch), None, None)``: a batch with no context or target masks."""

    def __call__(self, batch):
        return default_collate(batch), None, None
