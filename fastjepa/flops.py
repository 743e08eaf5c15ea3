"""Analytic FLOP count of one I-JEPA training step, per image (a multiply-add is 2 FLOPs).

Counted: every matrix product (patch embedding, qkv, attention scores and values,
projections, MLP, predictor embed/proj). Not counted: norms, activations, softmax,
the loss and the optimizer (all memory-bound, a few percent at most). Backward costs
twice the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastjepa.models.vision_transformer import VIT_SHAPES


def transformer_forward_flops(tokens: float, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks over one sequence of ``tokens``."""
    hidden = int(dim * mlp_ratio)
    projections = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim  # q k^T and attn @ v
    return depth * (projections + attention)


@dataclass(frozen=True)
class StepFlops:
    target_forward: float
    context_forward_backward: float
    predictor_forward_backward: float

    @property
    def total(self) -> float:
        return self.target_forward + self.context_forward_backward + self.predictor_forward_backward


def step_flops_per_image(model_name: str, crop_size: int, patch_size: int, pred_depth: int, pred_emb_dim: int,
                         k_context: float, k_target: float, num_enc_masks: int = 1, num_pred_masks: int = 4) -> StepFlops:
    """FLOPs per image of one step: the target encoder's forward over all patches, the
    context encoder's forward and backward over ``k_context`` tokens per context
    block, and the predictor's forward and backward over one row of
    ``k_context + k_target`` tokens per (context, target) pair, as the reference runs it."""
    dim, depth, _, mlp_ratio = VIT_SHAPES[model_name]
    patches = (crop_size // patch_size) ** 2
    patch_embed_per_token = 2 * 3 * patch_size * patch_size * dim
    target = patches * patch_embed_per_token + transformer_forward_flops(patches, dim, depth, mlp_ratio)
    context = patches * patch_embed_per_token + num_enc_masks * transformer_forward_flops(k_context, dim, depth, mlp_ratio)
    rows = num_enc_masks * num_pred_masks
    predictor = rows * (
        2 * k_context * dim * pred_emb_dim  # predictor_embed
        + transformer_forward_flops(k_context + k_target, pred_emb_dim, pred_depth, 4)
        + 2 * k_target * pred_emb_dim * dim  # predictor_proj
    )
    return StepFlops(target, 3 * context, 3 * predictor)
