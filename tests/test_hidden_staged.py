"""Hidden-state metrics (token norms, linear CKA) on staged and windowed timm models.

Each layer's hidden states are the output of the block holding its attention, as ``[B, T, C]``
with that block's own layout. The references here read the blocks' outputs through forward hooks
registered by the test on the timm modules themselves (not through the adapter), and compute the
metrics the plain way: per-image norms and their median, and the unbiased HSIC of Song et al. 2012
written from its definition with ones vectors, pair of layers by pair of layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.errors import ConfigError, UnsupportedArchitectureError

from probekit.testing import randomize_parameters
from probekit_tests_hidden import check_cka, check_token_norms, cka_of, hooked_outputs, reference_cka

# tiny random-init configs: two Swin stages (14x14 then 7x7 tokens), three PiT stages (7x7, 4x4, 2x2
# with a class token), CaiT with two patch layers then two class-attention layers
SPECS = {
    "swin": ("timm:swin_tiny_patch4_window7_224",
             dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7, img_size=56)),
    "pit": ("timm:pit_ti_224", dict(depth=(1, 1, 1), heads=(1, 2, 2), base_dims=(16, 16, 16), img_size=64)),
    "cait": ("timm:cait_xxs24_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=48, patch_size=16)),
}


def build(family: str) -> pk.ProbedModel:
    spec, kw = SPECS[family]
    pm = pk.load(spec, pretrained=False, **kw)
    randomize_parameters(pm.model, seed=0, scale=0.2)
    return pm


def mvit(cls_token: bool) -> pk.ProbedModel:
    """MViTv2, two stages, queries pooled by 2 at the second (16x16 then 8x8 tokens at 64 px)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 2), embed_dim=16, num_heads=1, use_cls_token=cls_token,
                           stride_q=((1, 1), (2, 2)))
    model = MultiScaleVit(cfg, img_size=64, num_classes=0)
    randomize_parameters(model, seed=0, scale=0.2)
    return pk.wrap(model)


def swin_patch_tokens(pm, x):
    """Swin blocks output channels-last grids [B, H, W, C]; their tokens are the H*W cells."""
    blocks = [b for stage in pm.model.layers for b in stage.blocks]
    return [o.reshape(o.shape[0], o.shape[1] * o.shape[2], o.shape[3]) for o in hooked_outputs(blocks, x, pm.model)]


def pit_patch_tokens(pm, x):
    """PiT blocks output [B, prefix + N, C], the class (and distillation) tokens first."""
    blocks = [b for stage in pm.model.transformers for b in stage.blocks]
    n = pm.model.cls_token.shape[1]
    return [o[:, n:] for o in hooked_outputs(blocks, x, pm.model)]


@pytest.mark.parametrize("family,tokens,grids", [("swin", swin_patch_tokens, [196, 196, 49, 49]),
                                                 ("pit", pit_patch_tokens, [49, 16, 4])])
def test_token_norms_equal_the_blocks_outputs(family, tokens, grids):
    pm = build(family)
    x = pm.example_input(3, seed=2)
    check_token_norms(pm, x, tokens(pm, x), grids)


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_cka_across_swin_stages_equals_a_reference_on_the_block_outputs(pool):
    pm = build("swin")
    want = check_cka(pm, pm.example_input(8, seed=3), swin_patch_tokens, pool)
    assert want.shape == (4, 4)
    assert want[0, 3] < 0.999  # layers are not all alike


def test_cka_cls_pool_where_every_block_carries_the_class_token():
    pm = mvit(cls_token=True)  # queries pooled at the second stage, the class token kept
    x = pm.example_input(4, seed=4)
    res = pk.probe(pm, x, metrics=[{"cka": {"pool": "cls"}}], batch_size=4)
    got = cka_of(res)
    blocks = [b for stage in pm.model.stages for b in stage.blocks]
    outs = hooked_outputs(blocks, x, pm.model)
    assert [o.shape[1] for o in outs] == [1 + 16 * 16, 1 + 8 * 8, 1 + 8 * 8]
    np.testing.assert_allclose(got, reference_cka([[o[:, 0] for o in outs]]), rtol=1e-4, atol=1e-6)


def test_cka_cls_pool_refuses_a_layer_without_the_class_token():
    pm = build("cait")  # the class token joins at the class-attention layers (2, 3) only
    x = pm.example_input(4, seed=5)
    with pytest.raises(ConfigError, match=r"pool='cls' needs a class token in every layer compared, but layer 0 "
                                          r"outputs 0 prefix \(none\) \+ 3x3 patches.*pool='mean'"):
        pk.probe(pm, x, metrics=[{"cka": {"pool": "cls"}}], batch_size=4)
    res = pk.probe(pm, x, metrics=[{"cka": {"pool": "cls"}}], batch_size=4, layers=[2, 3])
    assert cka_of(res).shape == (2, 2)
    swin = build("swin")  # no class token anywhere: refused before the forward pass
    with pytest.raises(UnsupportedArchitectureError, match="needs a class token, but this model.s input has no class"):
        pk.probe(swin, swin.example_input(4), metrics=[{"cka": {"pool": "cls"}}], batch_size=4)


def test_cait_class_layers_report_the_class_token_beside_the_patches():
    pm = build("cait")
    x = pm.example_input(2, seed=6)
    hid = pm.hidden_states(x)
    patch_out = hooked_outputs(list(pm.model.blocks), x, pm.model)[-1]
    cls_out = hooked_outputs(list(pm.model.blocks_token_only), x, pm.model)
    for i, c in zip((2, 3), cls_out):
        torch.testing.assert_close(hid[i], torch.cat([c, patch_out], 1))
    lays = pm.adapter.hidden_layouts(x)
    assert [lays[i].num_prefix for i in range(4)] == [0, 0, 1, 1]
