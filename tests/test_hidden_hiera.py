"""Hidden-state metrics on Hiera (timm and transformers), whose blocks keep their tokens in the
unrolled mask-unit order: the tap puts each block's output row-major (``_hiera_geometry.row_major``).

The order is checked against each library's own reroll (timm's ``forward_intermediates``,
transformers' ``reshaped_hidden_states``: each stage's last block output as a row-major grid); token
norms and mean-pooled CKA against the blocks' outputs read by the test's own forward hooks.
"""

from __future__ import annotations

import pytest
import torch

import probekit as pk
from probekit.testing import randomize_parameters
from probekit_tests_hidden import check_cka, check_token_norms, hooked_outputs

# four stages (mask units, pooled mask units, global, pooled global): 16x16 tokens at 64 px, then 8x8, 4x4, 2x2
GRIDS = [256, 64, 64, 16, 16, 4]


def build(library: str) -> pk.ProbedModel:
    if library == "timm":
        pm = pk.load("timm:hiera_tiny_224", pretrained=False, img_size=(64, 64), embed_dim=16, num_heads=1,
                     stages=(1, 2, 2, 1))
    else:
        pm = pk.load("hf:facebook/hiera-tiny-224-hf", pretrained=False,
                     config=dict(embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 2, 4], image_size=[64, 64]))
    randomize_parameters(pm.model, seed=0, scale=0.2)
    return pm


def blocks(pm) -> list[torch.nn.Module]:
    m = pm.adapter.model
    return list(m.blocks) if hasattr(m, "blocks") else [b for s in m.encoder.stages for b in s.layers]


def rerolled(pm, x) -> list[torch.Tensor]:
    """Each stage's last block output as row-major tokens [B, h * w, C], rerolled by the library itself."""
    m = pm.adapter.model
    with torch.inference_mode():
        if hasattr(m, "forward_intermediates"):  # timm: [B, C, h, w]
            grids = m.forward_intermediates(x, indices=4, intermediates_only=True, norm=False)
            return [g.flatten(2).transpose(1, 2) for g in grids]
        grids = m(x, output_hidden_states=True).reshaped_hidden_states[1:]  # [B, h, w, C]; [0]: the embedding
        return [g.flatten(1, 2) for g in grids]


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_hiera_block_outputs_are_put_row_major_as_the_library_rerolls_them(library):
    pm = build(library)
    x = pm.example_input(2, seed=1)
    hid = pm.hidden_states(x)
    lays = pm.adapter.hidden_layouts(x)
    assert [lays[i].num_tokens for i in range(6)] == GRIDS and [lays[i].patch_size for i in (0, 1, 3, 5)] == [
        (4, 4), (8, 8), (16, 16), (32, 32)]
    for i, want in zip((0, 2, 4, 5), rerolled(pm, x)):  # the last block of each stage
        torch.testing.assert_close(hid[i], want, rtol=0, atol=0)
    raw = hooked_outputs(blocks(pm), x, pm.adapter.model)
    assert not torch.equal(raw[0], hid[0])  # the unrolled order is not row-major: the reorder matters


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_hiera_token_norms_and_cka_equal_the_blocks_outputs(library):
    pm = build(library)
    x = pm.example_input(3, seed=2)
    check_token_norms(pm, x, hooked_outputs(blocks(pm), x, pm.adapter.model), GRIDS)
    want = check_cka(pm, pm.example_input(8, seed=3), lambda pm, xb: hooked_outputs(blocks(pm), xb, pm.adapter.model),
                     "mean")
    assert want[0, -1] < 0.999  # layers are not all alike
