from fastjepa.models.vision_transformer import (
    VIT_EMBED_DIMS,
    VisionTransformer,
    VisionTransformerPredictor,
    compile_blocks,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_predictor,
    vit_small,
    vit_tiny,
)

__all__ = [
    "VIT_EMBED_DIMS",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "compile_blocks",
    "vit_base",
    "vit_giant",
    "vit_huge",
    "vit_large",
    "vit_predictor",
    "vit_small",
    "vit_tiny",
]
