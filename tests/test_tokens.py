"""TokenLayout: positions on rectangular grids, cached distances, clear mismatch errors."""

import math

import pytest
import torch

import probekit as pk
from probekit.errors import LayoutError


def test_rectangular_grid_coordinates_are_row_major():
    lay = pk.TokenLayout(num_prefix=2, grid=(3, 5), patch_size=(14, 16))
    c = lay.coords()
    assert lay.num_patches == 15 and lay.num_tokens == 17
    for i in range(15):
        assert tuple(c[i].tolist()) == (i // 5, i % 5)
    assert lay.prefix_kinds == ("cls", "reg")
    assert lay.image_size == (42, 80)


def test_pixel_distances_against_brute_force_on_non_square_patches():
    lay = pk.TokenLayout(num_prefix=0, grid=(3, 4), patch_size=(14, 16))
    d = lay.pixel_distances()
    for a in range(12):
        for b in range(12):
            ra, ca, rb, cb = a // 4, a % 4, b // 4, b % 4
            assert d[a, b].item() == pytest.approx(math.hypot(14 * (ra - rb), 16 * (ca - cb)), rel=1e-6)
    assert torch.equal(lay.grid_distances() * 16, pk.TokenLayout(0, (3, 4), 16).pixel_distances())
    assert lay.pixel_distances() is d  # cached per (grid, patch size, device)


def test_mismatch_names_both_numbers():
    lay = pk.TokenLayout(num_prefix=1, grid=(14, 14), patch_size=16)
    lay.check(197)
    with pytest.raises(LayoutError, match=r"produced 257 tokens but the layout describes 197 \(1 prefix \+ 14x14"):
        lay.check(257)


def test_invalid_layouts_are_refused():
    with pytest.raises(LayoutError):
        pk.TokenLayout(num_prefix=1, grid=(0, 14), patch_size=16)
    with pytest.raises(LayoutError, match="prefix_kinds has 1 entries for 2"):
        pk.TokenLayout(num_prefix=2, grid=(2, 2), patch_size=16, prefix_kinds=("cls",))


def test_layer_attention_blocks_equal_full_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)
    bias = torch.randn(3, 10, 10, generator=g)
    att = pk.LayerAttention(q=q, k=k, scale=0.5, bias=bias)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1)
    torch.testing.assert_close(att.probs(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(att.probs(slice(3, 7)), ref[:, :, 3:7], rtol=0, atol=1e-6)
    assert att.probs(slice(0, 2)).dtype == torch.float32
