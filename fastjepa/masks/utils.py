"""The twin of the reference's ``src/masks/utils.py``: ``apply_masks``. Its implementation, with
``PackedMasks`` and the other mask-index helpers the models use, is ``fastjepa.utils.masking``."""

from fastjepa.utils.masking import apply_masks

__all__ = ["apply_masks"]
