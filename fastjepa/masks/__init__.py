from fastjepa.masks.multiblock import MaskCollator, MultiBlockMaskSampler
from fastjepa.masks.utils import PackedMasks, apply_masks

__all__ = ["MaskCollator", "MultiBlockMaskSampler", "PackedMasks", "apply_masks"]
