"""Trainable fusion heads (PyTorch): each maps (text, image) embeddings of shape (n, d) to (n, d).

Both start out computing the plain average, so training begins from the `mean` strategy and
can only be judged by how far it moves from there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConcatProjectionHead(nn.Module):
    """f = normalise(W · [f_txt; f_img]) with W of shape (d, 2d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.projection = nn.Linear(2 * dim, dim, bias=False)
        with torch.no_grad():  # W = [I/2, I/2]: the untrained head is the mean
            eye = torch.eye(dim)
            self.projection.weight.copy_(torch.cat([eye, eye], dim=1) * 0.5)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(torch.cat([text, image], dim=-1)), dim=-1)


class GatedHead(nn.Module):
    """f = normalise(g ⊙ f_img + (1 - g) ⊙ f_txt), g = sigmoid(A · [f_txt; f_img] + b) per dimension."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.gate.weight)  # g = 0.5 everywhere: the untrained head is the mean
        nn.init.zeros_(self.gate.bias)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([text, image], dim=-1)))
        return F.normalize(g * image + (1 - g) * text, dim=-1)


HEADS = {"concat-projection": ConcatProjectionHead, "gated": GatedHead}
