"""I-JEPA's ViT encoder and narrow ViT predictor.

Module names, constructor arguments, forward signatures, parameter order and
state_dict keys follow the reference trainer (facebookresearch/ijepa) so that its
checkpoints load unchanged. Written from the paper and the documented behaviour;
attention goes through ``F.scaled_dot_product_attention`` for dense (B, N, D) tokens.

Packed tokens (fastjepa's opt-in modes, see the README's "Opt-in modes"): with
``PackedMasks`` contexts (``mask.ragged``) the encoder and the predictor run on packed
(total_tokens, D) tokens and attend through ``fastjepa.ops.varlen_attention``; the
predictor's ``shared_context=True`` (``meta.shared_context_predictor``) runs one sequence
per sample through ``fastjepa.ops.shared_context_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastjepa.ops import gather_tokens, pos_tokens, shared_context_attention, varlen_attention
from fastjepa.utils.masking import PackedMasks, _as_list, concat_packed, is_packed, stack_masks
from fastjepa.utils.tensors import repeat_interleave_batch, trunc_normal_

__all__ = [
    "VIT_EMBED_DIMS",
    "VIT_SHAPES",
    "get_1d_sincos_pos_embed",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "get_2d_sincos_pos_embed_from_grid",
    "drop_path",
    "DropPath",
    "PatchEmbed",
    "ConvEmbed",
    "MLP",
    "Attention",
    "Block",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "compile_blocks",
    "vit_predictor",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_huge",
    "vit_giant",
]


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos) -> np.ndarray:
    """(M, embed_dim) float64 for the M positions in ``pos`` (any shape, read flat):
    [sin(p * w_i), cos(p * w_i)] with w_i = 10000 ** (-i / (embed_dim / 2))."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
    angle = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)


def get_1d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """(grid_size, embed_dim) float64 table of positions 0 .. grid_size - 1; a zero row first with ``cls_token``."""
    return _with_cls_row(get_1d_sincos_pos_embed_from_grid(embed_dim, np.arange(grid_size, dtype=np.float64)), cls_token)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid) -> np.ndarray:
    """(M, embed_dim) float64 for a (2, ...) grid of M token coordinates: the first half of the
    channels encodes ``grid[0]``, the second half ``grid[1]``."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    half = embed_dim // 2
    return np.concatenate([get_1d_sincos_pos_embed_from_grid(half, grid[0]), get_1d_sincos_pos_embed_from_grid(half, grid[1])], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos table (grid_size**2, embed_dim), float64 (the models store it as
    float32); a zero row first with ``cls_token``. Token n sits at row n // grid_size, column
    n % grid_size; the first half of the channels encodes the column, the second the row."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    return _with_cls_row(get_2d_sincos_pos_embed_from_grid(embed_dim, np.stack([cols, rows])), cls_token)


def _with_cls_row(table: np.ndarray, cls_token: bool) -> np.ndarray:
    return np.concatenate([np.zeros((1, table.shape[1])), table], axis=0) if cls_token else table


def _pos_embed_parameter(embed_dim: int, grid_size: int) -> nn.Parameter:
    """The frozen (1, grid_size**2, embed_dim) float32 position table of a model."""
    table = torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float()
    return nn.Parameter(table.unsqueeze(0), requires_grad=False)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability ``drop_prob`` and scale the rest
    by 1 / (1 - drop_prob); identity when ``drop_prob`` is 0 or outside training. The keep
    decision is floor(keep + U[0, 1)) with one ``torch.rand`` per sample, as the reference draws it."""
    if not drop_prob or not training:
        return x
    keep = 1.0 - drop_prob
    kept = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * kept


class DropPath(nn.Module):
    """``drop_path`` as a module (``drop_prob`` None or 0: identity)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class MLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, cu_seqlens=None, max_seqlen=None, offsets=None):
        """Dense x (B, N, C): SDPA over each sample's N tokens. Packed x (T, C): sequences
        given by int32 ``cu_seqlens`` (R + 1,) (``varlen_attention``) or by the predictor's
        shared-context ``offsets`` (B, M + 2) (``shared_context_attention``), with
        ``max_seqlen`` the longest sequence (or context / block) as a Python int."""
        if cu_seqlens is None and offsets is None:
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        if x.dim() != 2:
            raise ValueError(f"Attention: packed tokens must be (total_tokens, dim), got shape {tuple(x.shape)}")
        if self.training and self.attn_drop.p > 0:
            raise ValueError("Attention: attention dropout (attn_drop_rate > 0) is not supported on packed tokens")
        T, C = x.shape
        q, k, v = self.qkv(x).reshape(T, 3, self.num_heads, C // self.num_heads).unbind(1)
        if offsets is not None:
            x = shared_context_attention(q, k, v, offsets, max_seqlen, softmax_scale=self.scale)
        else:
            x = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=self.scale)
        return self.proj_drop(self.proj(x.reshape(T, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, cu_seqlens=None, max_seqlen=None, offsets=None):
        """Dense (B, N, D), or packed (T, D) with ``cu_seqlens`` or ``offsets`` (see ``Attention``)."""
        if cu_seqlens is None and offsets is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if self.training and isinstance(self.drop_path, DropPath) and self.drop_path.drop_prob > 0:
            raise ValueError("Block: stochastic depth (drop_path_rate > 0) drops whole samples and is not supported on packed tokens")
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, offsets)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, N, D) with a strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvEmbed(nn.Module):
    """A convolutional stem instead of patches (Xiao et al., "Early convolutions help
    transformers see better"): 3x3 convolutions with the given output ``channels`` and
    ``strides`` (each followed by BatchNorm when ``batch_norm``, without a conv bias then,
    and ReLU), and a final 1x1 convolution to ``channels[-1]`` -> (B, N, channels[-1]).
    ``strides`` has one entry per convolution, the 1x1 one last. No model here builds it."""

    def __init__(self, channels, strides, img_size=224, in_chans=3, batch_norm=True):
        super().__init__()
        if len(channels) < 1 or len(strides) != len(channels):
            raise ValueError(f"ConvEmbed needs one stride per output channel count, got channels={channels!r}, strides={strides!r}")
        widths = [in_chans, *channels]
        layers = []
        for c_in, c_out, stride in zip(widths[:-2], widths[1:-1], strides[:-1]):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(widths[-2], widths[-1], kernel_size=1, stride=strides[-1]))
        self.stem = nn.Sequential(*layers)
        self.num_patches = (_image_side(img_size) // math.prod(strides)) ** 2

    def forward(self, x):
        return self.stem(x).flatten(2).transpose(1, 2)


def _image_side(img_size) -> int:
    side = img_size[0] if isinstance(img_size, Sequence) else img_size
    if not isinstance(side, int) or side <= 0:
        raise ValueError(f"img_size must be a positive int (or a list holding one), got {img_size!r}")
    return side


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, recompute: bool, *args) -> torch.Tensor:
    """``x`` through each block in turn. ``recompute`` (activation checkpointing, when gradients
    are on): each block keeps only its input and runs again in the backward (non-reentrant)."""
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False) if recompute and torch.is_grad_enabled() else block(x, *args)
    return x


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """An encoder's ``blocks``, a predictor's ``predictor_blocks``: what FSDP2 shards one by one
    and ``compile_blocks`` compiles."""
    return [block for name in ("blocks", "predictor_blocks") if hasattr(model, name) for block in getattr(model, name)]


def compile_blocks(model: nn.Module, mode: bool | str, backend: str = "inductor") -> None:
    """``torch.compile`` each transformer block of ``model`` (an encoder's ``blocks``, a
    predictor's ``predictor_blocks``) in place (``meta.compile``): ``mode`` True is torch's
    default mode, or a mode name such as "max-autotune" (inductor only). Dynamic shapes
    (``dynamic=True``): the token dimension, whose length the masks change every step, is
    symbolic from the first compile, so a new length reuses the graph. The blocks share one
    graph per shape of their weights and grad mode; the rest of the model runs eagerly, so the
    mask gathers and the Python-side mask lengths never reach the compiler."""
    options = {"mode": "default" if mode is True else mode} if backend == "inductor" else {}
    for block in transformer_blocks(model):
        block.compile(backend=backend, dynamic=True, **options)


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _rescale_residual_projections(blocks: nn.ModuleList) -> None:
    """Constructor init of the reference: divide block l's output projections by sqrt(2 l).

    ``fastjepa.helper.init_model`` re-initialises every Linear afterwards, as the
    reference trainer does, so trained models never see this rescale.
    """
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block, linear from 0 to ``rate``."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {value!r}")


class VisionTransformer(nn.Module):
    """ViT encoder without a [cls] token. ``forward(x, masks=None)`` returns
    (B, N, D) for the full image or (len(masks) * B, K, D) for the masked tokens.

    With ``PackedMasks`` (one, or a list of them, each over the B images: ``mask.ragged``)
    the result is packed (T, D): the tokens of every mask row in the order of
    ``concat_packed(masks)``, computed with variable-length attention, each row attending
    to its own tokens only."""

    def __init__(
        self,
        img_size=(224,),
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        predictor_embed_dim=384,
        depth=12,
        predictor_depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=nn.LayerNorm,
        init_std=0.02,
        **kwargs,
    ):
        super().__init__()
        for name, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            _check_positive(name, value)
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.init_std = init_std
        self.patch_embed = PatchEmbed(_image_side(img_size), patch_size, in_chans, embed_dim)
        grid = int(math.isqrt(self.patch_embed.num_patches))
        self.pos_embed = _pos_embed_parameter(embed_dim, grid)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False  # meta.activation_checkpointing: see run_blocks
        self.apply(partial(_init_weights, std=init_std))
        self.fix_init_weight()

    def fix_init_weight(self) -> None:
        _rescale_residual_projections(self.blocks)

    def interpolate_pos_encoding(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """The table for x's token count: unchanged at the training resolution,
        bicubically resized as a 2-D grid at any other (square) resolution."""
        n_tokens, n_table = x.shape[1], pos_embed.shape[1]
        if n_tokens == n_table:
            return pos_embed
        side, table_side = math.isqrt(n_tokens), math.isqrt(n_table)
        if side * side != n_tokens:
            raise ValueError(f"cannot interpolate position embeddings to a non-square grid of {n_tokens} tokens")
        grid = pos_embed.reshape(1, table_side, table_side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, n_tokens, -1)

    def forward(self, x, masks=None):
        x = self.patch_embed(x)
        pos = self.interpolate_pos_encoding(x, self.pos_embed)
        if masks is not None and is_packed(masks):
            packed = concat_packed(masks, len(x)).to(x.device)
            x = gather_tokens(x, packed.index, pos, packed.cu_seqlens)  # (T, D)
            return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, packed.cu_seqlens, packed.max_len))
        if masks is None:
            x = x + pos
        else:  # the reference adds pos to every token, then gathers: the same values, fused
            x = gather_tokens(x, stack_masks(masks, len(x)).to(x.device), pos)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))


class VisionTransformerPredictor(nn.Module):
    """Narrow ViT that predicts target-block representations from the context.

    ``forward(x, masks_x, masks, shared_context=False)``: x is the context encoder's output
    (len(masks_x) * B, K_ctx, embed_dim); the result is
    (len(masks) * len(masks_x) * B, K_tgt, embed_dim), mask-major. Every row runs
    over [its context ; one target block's mask tokens], so the context is repeated
    once per target block, as in the reference.

    Ragged contexts (``mask.ragged``): ``masks_x`` is a ``PackedMasks`` (or a list of
    them) and x the encoder's packed (T, embed_dim) output. Row i * R + c (R context
    rows, block i) is the packed sequence [context c ; block i's mask tokens of sample
    c % B], attended with ``varlen_attention``; the result is the same dense, mask-major
    (len(masks) * R, K_tgt, embed_dim).

    ``shared_context=True`` (``meta.shared_context_predictor``): one sequence per context
    row, [context | block 0 | ... | block M-1], attended with ``shared_context_attention``:
    context tokens attend to the context only, block i's tokens to the context and block
    i. Dense or ragged contexts; same output shape and order. This CHANGES THE MODEL: in
    the reference the context tokens also attend to the mask tokens of their row's block,
    and so carry a different value into every row; here they see no target at all. It
    must be shown to learn as well as the reference before it is relied on.
    """

    def __init__(
        self,
        num_patches,
        embed_dim=768,
        predictor_embed_dim=384,
        depth=6,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=nn.LayerNorm,
        init_std=0.02,
        **kwargs,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("predictor_embed_dim", predictor_embed_dim), ("depth", depth), ("num_heads", num_heads)):
            _check_positive(name, value)
        grid = math.isqrt(num_patches) if isinstance(num_patches, int) and num_patches > 0 else 0
        if grid * grid != num_patches:
            raise ValueError(f"num_patches must be a positive square number, got {num_patches!r}")
        self.init_std = init_std
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = _pos_embed_parameter(predictor_embed_dim, grid)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        )
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.grad_checkpointing = False  # meta.activation_checkpointing: see run_blocks
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        trunc_normal_(self.mask_token, std=init_std)
        self.apply(partial(_init_weights, std=init_std))
        self.fix_init_weight()

    def fix_init_weight(self) -> None:
        _rescale_residual_projections(self.predictor_blocks)

    def forward(self, x, masks_x, masks, shared_context: bool = False):
        if masks_x is None or masks is None:
            raise ValueError("VisionTransformerPredictor needs both the context masks and the target masks")
        if shared_context or is_packed(masks_x):
            return self._forward_packed(x, masks_x, masks, shared_context)
        masks_x, masks = _as_list(masks_x), _as_list(masks)
        B = len(x) // len(masks_x)
        pos_table = self.predictor_pos_embed[0]  # (N, D'): rows looked up by token index

        x = self.predictor_embed(x)
        x = pos_tokens(x, stack_masks(masks_x, B).to(x.device), pos_table)  # x's dtype, as the reference's in-place add
        n_context = x.shape[1]

        target_index = repeat_interleave_batch(stack_masks(masks, B).to(x.device), B, repeat=len(masks_x))
        pred_tokens = pos_tokens(self.mask_token.view(-1), target_index, pos_table)

        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
        x = self.predictor_norm(run_blocks(self.predictor_blocks, x, self.grad_checkpointing))
        return self.predictor_proj(x[:, n_context:])

    def _forward_packed(self, x, masks_x, masks, shared_context: bool):
        """Ragged contexts and/or the shared-context layout: see the class docstring."""
        masks_x, masks = _as_list(masks_x), _as_list(masks)
        nenc = len(masks_x)
        pos_table = self.predictor_pos_embed[0]
        x = self.predictor_embed(x)
        if is_packed(masks_x):
            context = concat_packed(masks_x).to(x.device)
            if x.dim() != 2 or x.shape[0] != context.total:
                raise ValueError(f"VisionTransformerPredictor: with PackedMasks contexts x must be packed ({context.total}, D), "
                                 f"got shape {tuple(x.shape)}")
            x = pos_tokens(x, context.index, pos_table)
        else:  # dense contexts (shared_context only): (R, K, D') viewed as R packed rows of K tokens
            index = stack_masks(masks_x, len(x) // nenc).to(x.device)
            x = pos_tokens(x, index, pos_table).flatten(0, 1)
            context = PackedMasks.from_dense(index)
        R = context.rows
        B = R // nenc
        if B * nenc != R:
            raise ValueError(f"VisionTransformerPredictor: {R} context rows is not a multiple of the {nenc} context masks")
        target_index = repeat_interleave_batch(stack_masks(masks, B).to(x.device), B, repeat=nenc)  # (M * R, K)
        M, K = len(masks), target_index.shape[1]
        pred_tokens = pos_tokens(self.mask_token.view(-1), target_index, pos_table)  # (M * R, K, D')

        layout = _predictor_layout(context, M, K, shared_context)
        tokens = torch.cat([x, pred_tokens.flatten(0, 1)])[layout.source]  # the packed sequences
        tokens = run_blocks(self.predictor_blocks, tokens, self.grad_checkpointing, layout.cu_seqlens, layout.max_seqlen, layout.offsets)
        out = tokens[layout.targets]  # (M * R, K, D'): the mask tokens, mask-major
        return self.predictor_proj(self.predictor_norm(out))


@dataclass(frozen=True)
class _Layout:
    source: torch.Tensor  # (T,) int64: each packed token's row in cat([context tokens, mask tokens])
    targets: torch.Tensor  # (M * R, K) int64: where the mask tokens of row i * R + c sit in the packed sequences
    max_seqlen: int
    cu_seqlens: torch.Tensor | None = None  # per-row layout: (M * R + 1,) int32
    offsets: torch.Tensor | None = None  # shared-context layout: (R, M + 2) int32


def _predictor_layout(context: PackedMasks, M: int, K: int, shared: bool) -> _Layout:
    """Index tensors that lay the predictor's packed sequences out, from the contexts'
    offsets with device ops only: every size is known on the host, nothing waits.

    Inputs are ``cat([context tokens (T_ctx), mask tokens (M * R * K)])``, the mask tokens
    of row j = i * R + c at T_ctx + j * K. Per-row layout: sequence j = [context c ;
    mask tokens of j]. Shared layout: sequence c = [context c | j = 0 * R + c | ... |
    j = (M - 1) * R + c]."""
    cu = context.cu_seqlens.long()
    device, R, T_ctx = cu.device, context.rows, context.total
    L = cu[1:] - cu[:-1]  # (R,) context lengths
    n_seq = R if shared else M * R
    seq_L = L if shared else L.repeat(M)  # each sequence's context length
    seq_len = seq_L + (M * K if shared else K)
    seq_cu = F.pad(torch.cumsum(seq_len, 0), (1, 0))
    total = T_ctx + M * R * K if shared else M * (T_ctx + R * K)
    seq = torch.repeat_interleave(torch.arange(n_seq, device=device), seq_len, output_size=total)
    offset = torch.arange(total, device=device) - seq_cu[seq]  # position within the sequence
    c = seq % R
    past_context = offset - seq_L[seq]  # >= 0 on mask tokens
    if shared:
        block, k = torch.div(past_context, K, rounding_mode="floor"), past_context % K
        mask_row = (block * R + c) * K + k
    else:
        mask_row = seq * K + past_context
    source = torch.where(past_context < 0, cu[c] + offset, T_ctx + mask_row)
    if shared:
        start = seq_cu[:-1] + L  # (R,): where block 0 starts
        targets = (start[None, :, None] + (torch.arange(M, device=device) * K)[:, None, None]
                   + torch.arange(K, device=device)).reshape(M * R, K)
        offsets = torch.cat([seq_cu[:-1, None], start[:, None] + torch.arange(M + 1, device=device) * K], 1).to(torch.int32)
        return _Layout(source, targets, max(context.max_len, K), offsets=offsets)
    targets = (seq_cu[:-1] + seq_L)[:, None] + torch.arange(K, device=device)
    return _Layout(source, targets, context.max_len + K, cu_seqlens=seq_cu.to(torch.int32))


def vit_predictor(**kwargs) -> VisionTransformerPredictor:
    return VisionTransformerPredictor(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# name -> (embed_dim, depth, num_heads, mlp_ratio)
VIT_SHAPES = {
    "vit_tiny": (192, 12, 3, 4),
    "vit_small": (384, 12, 6, 4),
    "vit_base": (768, 12, 12, 4),
    "vit_large": (1024, 24, 16, 4),
    "vit_huge": (1280, 32, 16, 4),
    "vit_giant": (1408, 40, 16, 48 / 11),
}
VIT_EMBED_DIMS = {name: shape[0] for name, shape in VIT_SHAPES.items()}


def _vit(name, patch_size, kwargs) -> VisionTransformer:
    """A named ViT shape; keyword arguments override any of its settings."""
    embed_dim, depth, num_heads, mlp_ratio = VIT_SHAPES[name]
    settings = dict(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return VisionTransformer(**{**settings, **kwargs})


def vit_tiny(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_tiny", patch_size, kwargs)


def vit_small(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_small", patch_size, kwargs)


def vit_base(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_base", patch_size, kwargs)


def vit_large(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_large", patch_size, kwargs)


def vit_huge(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_huge", patch_size, kwargs)


def vit_giant(patch_size=16, **kwargs) -> VisionTransformer:
    return _vit("vit_giant", patch_size, kwargs)
