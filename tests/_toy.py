"""A tiny ViT and its adapter (spec prefix ``toy:``), for fast tests of the run machinery.

It runs SDPA (its own fast path) and reports q and k to the sink, like a real adapter.
Names: ``toy:vit`` builds; ``toy:missing`` fails to load (weights unavailable);
option ``fail_at_batch=n`` raises during the n-th batch (0-based), to test failures mid-run.
Load it with ``load_toy()`` (test files are not importable packages under importlib mode).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import probekit as pk
from probekit.adapter import wants
from probekit.attention import LayerAttention
from probekit.errors import WeightsUnavailableError
from probekit.adapter_options import AdapterOptions


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.report = None  # set by the tap: called with (q, k, scale)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scale = (d // self.heads) ** -0.5
        if self.report is not None:
            self.report(q, k, scale)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(o)
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    def __init__(self, image_size=32, patch_size=8, dim=32, depth=2, heads=2, prefix=1):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_size, self.prefix_count = patch_size, prefix
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.pos = nn.Parameter(torch.randn(1, prefix + n, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        for blk in self.blocks:  # sharp, varied heads: far from uniform attention
            nn.init.normal_(blk.qkv.weight, std=1.5 / math.sqrt(dim))
        self.fail_at_batch, self.batches = None, 0
        self.block_hook = None

    def forward(self, x):
        if self.fail_at_batch is not None and self.batches == self.fail_at_batch:
            raise RuntimeError("toy model failed on purpose")
        self.batches += 1
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if self.block_hook is not None:
                self.block_hook(i, t)
        return t


class ToyOptions(AdapterOptions):
    """The toy's own options, declared as any adapter declares them."""

    img_size: int | None = None
    patch_size: int = 8
    dim: int = 32
    depth: int = 2
    heads: int = 2
    prefix: int = 1
    fail_at_batch: int | None = None


class ToyAdapter(pk.Adapter):
    name = "toy"
    library = "torch"
    extra = ""
    options_schema = ToyOptions

    @classmethod
    def from_spec(cls, name, *, pretrained=True, checkpoint=None, image_size=None, fail_at_batch=None, **options):
        if name == "missing":
            raise WeightsUnavailableError("toy weights 'missing' are not on this machine.")
        size = int(image_size or options.pop("img_size", 32))
        model = ToyViT(image_size=size, **options)
        model.fail_at_batch = fail_at_batch

        def preprocess(im):
            im = im.resize((size, size))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
            return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.25

        return cls(model, preprocess, image_size=(size, size), weights=f"toy-random-{name}")

    @property
    def num_layers(self):
        return len(self.model.blocks)

    @property
    def num_heads(self):
        return self.model.blocks[0].heads

    def layout(self, pixel_values):
        p = self.model.patch_size
        h, w = pixel_values.shape[-2:]
        return pk.TokenLayout(num_prefix=self.model.prefix_count, grid=(h // p, w // p), patch_size=(p, p))

    @contextmanager
    def tap(self, sink):
        try:
            for i, blk in enumerate(self.model.blocks):
                if sink.wants_attention and wants(sink, i):
                    blk.report = (lambda i: lambda q, k, s: sink.attention(i, LayerAttention(q=q, k=k, scale=s)))(i)
            if sink.wants_hidden:
                self.model.block_hook = lambda i, t: sink.hidden(i, t) if wants(sink, i) else None
            yield
        finally:
            for blk in self.model.blocks:
                blk.report = None
            self.model.block_hook = None


def load_toy():
    """Register the toy adapter once per session (idempotent)."""
    if pk.adapters.is_registered("toy") and pk.adapters.get("toy") is ToyAdapter:
        return ToyAdapter
    pk.adapters.register(ToyAdapter)
    return ToyAdapter
