from fastjepa.masks.multiblock import MaskCollator, MultiBlockMaskSampler
from fastjepa.masks.utils import apply_masks

__all__ = ["MaskCollator", "MultiBlockMaskSampler", "apply_masks"]
