"""The fine-tuned model: the encoder, the average of its last layer's tokens (after its final
LayerNorm), optionally a BatchNorm without affine, then a linear head: what transformers'
``IJepaForImageClassification`` computes (``fastjepa export`` folds the BatchNorm into the head,
``fastjepa.weights.fold_head``)."""

from __future__ import annotations

import torch
from torch import nn

from fastjepa.models import vision_transformer as vit
from fastjepa.utils.tensors import trunc_normal_

HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init (trunc-normal), bias 0
BN_EPS = 1e-6  # MAE's linear-probe BatchNorm


class Classifier(nn.Module):
    def __init__(self, encoder: vit.VisionTransformer, num_classes: int, head_norm: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.head_norm = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=BN_EPS) if head_norm else None
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D): the last layer's tokens, averaged."""
        return self.encoder(images).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images)
        if self.head_norm is not None:
            pooled = self.head_norm(pooled)
        return self.head(pooled)
