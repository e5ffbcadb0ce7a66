"""Contrastive losses. Both take normalised features and compute logits in fp32."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .distributed import DistInfo, gather_features


class InfoNCELoss(nn.Module):
    """CLIP's symmetric cross-entropy over the batch's image-text similarity matrix."""

    def __init__(self, dist_info: DistInfo | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.dist_info = dist_info or DistInfo()
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        images = gather_features(image_features.float(), self.dist_info)
        texts = gather_features(text_features.float(), self.dist_info)
        logits = logit_scale.float() * images @ texts.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
                      + F.cross_entropy(logits.T, labels, label_smoothing=self.label_smoothing))


class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss, with its own learnable bias (init -10, as the paper)."""

    def __init__(self, dist_info: DistInfo | None = None, init_bias: float = -10.0):
        super().__init__()
        self.dist_info = dist_info or DistInfo()
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        images = gather_features(image_features.float(), self.dist_info)
        texts = gather_features(text_features.float(), self.dist_info)
        logits = logit_scale.float() * images @ texts.T + self.logit_bias.float()
        labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1  # +1 on pairs, -1 elsewhere
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
