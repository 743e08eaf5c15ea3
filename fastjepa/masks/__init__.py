from fastjepa.masks.multiblock import MaskCollator, MultiBlockMaskSampler
from fastjepa.masks.utils import apply_masks
from fastjepa.utils.masking import PackedMasks

__all__ = ["MaskCollator", "MultiBlockMaskSampler", "PackedMasks", "apply_masks"]
