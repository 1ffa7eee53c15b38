"""The per-row sums the engine's blocks share: the log-partition read at one key, and row dot products.

Both are fast forms of plain reductions (a gather instead of two passes over each row; a reused,
cache-sized product buffer instead of a fresh one per block), so both are checked against the
plain float64 reduction, including the rows where the fast form must step aside.
"""

from __future__ import annotations

import math

import pytest
import torch

from probekit.attention import Workspace, row_dot
from probekit.metric.patch_keys import log_partition


def _logits(shape, seed=0, scale=3.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("first", [None, -200.0, -math.inf, 80.0])
def test_log_partition_matches_logsumexp_whatever_the_first_key_gets(first):
    # None: an ordinary first key; -200 / -inf: its probability underflows or is masked, so the
    # row maximum takes over; 80: the first key takes (almost) all the mass
    z = _logits((2, 3, 7, 11))
    if first is not None:
        z[..., 1, 0] = first
    p = torch.softmax(z, -1)
    ref = torch.logsumexp(z.double(), -1)
    torch.testing.assert_close(log_partition(p, z).double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 6, 33, 197), (1, 2, 3, 1370)])
@pytest.mark.parametrize("start", [0, 1, 5])
def test_row_dot_matches_float64_in_and_out_of_the_engine(shape, start):
    a = torch.softmax(_logits(shape, seed=1), -1)
    b = _logits(shape, seed=2)
    ref = (a.double() * b.double())[..., start:].sum(-1)
    ws = Workspace()
    ws.scratch_bytes = 4 * shape[-1] * 3  # chunks of 3 rows: a block spans several and ends in a short one
    outside = row_dot(a, b, start)
    with ws.active():
        inside = row_dot(a, b, start)
        strided = row_dot(a[:, :, 1:], b[:, :, 1:], start)  # a metric's rows cut from a block
    for got, want in ((outside, ref), (inside, ref), (strided, ref[:, :, 1:])):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert "row_dot" in ws._buffers  # the engine's buffer was used, not a fresh product
