"""Hidden-state metrics (token norms, linear CKA) on transformers' staged encoders: Swin and SwinV2
(blocks output ``[B, H * W, C]``, the grid halved by patch merging between stages) and the SAM vision
encoder (blocks output ``[B, H, W, C]``, windows padded then cropped back).

The references read the blocks' outputs through forward hooks the test registers on transformers'
modules (not through the adapter) and compute the metrics the plain way (tests/_hidden_reference.py).
"""

from __future__ import annotations

import pytest
import torch

import probekit as pk
from probekit.errors import UnsupportedArchitectureError
from probekit_tests_hidden import check_cka, check_token_norms, hooked_outputs
from probekit_tests_windowed import hf_sam_encoder, hf_swin, hf_swinv2

# 32 px Swin/SwinV2, patch 4: 8x8 tokens, 4x4 after merging; 80 px SAM, patch 16: 5x5 tokens in every
# block (windows of 3 pad it to 6x6, block 1 global)
MODELS = {"swin": (hf_swin, [64, 64, 16, 16]), "swinv2": (hf_swinv2, [64, 64, 16, 16]),
          "sam": (lambda: hf_sam_encoder(80), [25, 25, 25])}


def block_tokens(pm, x) -> list[torch.Tensor]:
    """Each block's output as [B, N, C] read by hooks on the transformers blocks: Swin's [B, H * W, C]
    as is, SAM's channels-last [B, H, W, C] grid flattened row by row."""
    enc = pm.adapter.model
    blocks = list(enc.layers) if hasattr(enc, "layers") else [b for s in enc.encoder.layers for b in s.blocks]
    return [o.reshape(o.shape[0], -1, o.shape[-1]) for o in hooked_outputs(blocks, x, enc)]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_token_norms_equal_the_blocks_outputs(family):
    build, grids = MODELS[family]
    pm = build()
    x = pm.example_input(3, seed=2)
    check_token_norms(pm, x, block_tokens(pm, x), grids)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_cka_mean_pool_equals_a_reference_on_the_block_outputs(family):
    pm = MODELS[family][0]()
    want = check_cka(pm, pm.example_input(8, seed=3), block_tokens, "mean")
    assert want.shape == (pm.num_layers,) * 2 and want[0, -1] < 0.999  # layers are not all alike
