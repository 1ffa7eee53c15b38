"""A small ViT written by hand, in the style of many research code bases (lucidrains' vit-pytorch).

Grayscale 28x28 inputs cut into 4x4 px patches (a 7x7 grid), a CLS token, a fixed learned position
table (so the model runs at 28x28 only), pre-norm blocks whose residual additions happen in the
transformer's loop rather than inside a block module, and an attention that runs PyTorch's fused
``scaled_dot_product_attention`` by default (no probabilities are ever materialised) or, with
``fused = False``, an explicit softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.attend = nn.Softmax(dim=-1)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.fused = True

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T, 3 * H * d]`` -> q, k, v ``[B, H, T, d]``."""
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.to_qkv(self.norm(x)))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.attend(q @ k.transpose(-1, -2) * self.scale) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x  # the residuals live here, not in a block module
            x = ff(x) + x
        return self.norm(x)


class TinyViT(nn.Module):
    """ViT for 28x28 grayscale images: 4 px patches, CLS token, fixed position table."""

    def __init__(self, image_size: int = 28, patch_size: int = 4, channels: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 4, heads: int = 4, dim_head: int = 16, mlp_dim: int = 128):
        super().__init__()
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        n = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Sequential(
            nn.LayerNorm(channels * patch_size**2), nn.Linear(channels * patch_size**2, dim), nn.LayerNorm(dim)
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.head = nn.Linear(dim, num_classes)

    def patches(self, img: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``, patches in row-major order."""
        b, c, h, w = img.shape
        p = self.patch_size
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(self.patches(img))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.transformer(x)[:, 0])
