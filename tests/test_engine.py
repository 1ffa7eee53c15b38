"""The engine's hot path: blockwise probabilities, fused MAD, reused buffers, flat memory.

Every optimisation of the engine must leave the numbers where the straightforward computation
puts them: full float64 softmax(q k^T * scale + bias), then MAD over the whole matrix.
"""

from __future__ import annotations

import gc
import types

import pytest
import torch

import probekit as pk
from probekit.attention import LayerAttention, Workspace, blocks, row_blocks
from probekit.errors import ConfigError
from probekit.inputs.images import ImageSet
from probekit.engine.blocks import LayerBlocks
from probekit.engine.probe import MetricSink, _loader, build_metrics
from probekit.engine.rows import row_sum
from probekit.metric import Block
from probekit.metric.base import query_span

MAD = pk.metrics.get("mad")


pytestmark = pytest.mark.usefixtures("toy_backend")


def _model(depth=3, heads=3, size=40, patch=8, prefix=1, seed=0):
    torch.manual_seed(seed)
    return pk.load("toy:vit", pretrained=False, image_size=size, patch_size=patch, dim=48, depth=depth,
                   heads=heads, prefix=prefix)


def _images(n=5, size=40, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _ExactSink:
    """Keeps each layer's q, k and scale; probabilities in float64, by the book (no blocks)."""

    layers, wants_attention, wants_hidden = None, True, False

    def __init__(self):
        self.probs = {}

    def attention(self, layer, attn):
        logits = attn.q.double() @ attn.k.double().transpose(-1, -2) * attn.scale
        self.probs[layer] = torch.softmax(logits, -1)


def _reference_mad(pm, x, renormalize=False, units="px") -> dict[int, torch.Tensor]:
    """MAD per layer, all in float64 from the full matrices: no blocks, no fused dot, no cache."""
    sink = _ExactSink()
    with torch.inference_mode(), pm.adapter.tap(sink):
        pm.adapter.forward(x)
    lay = pm.layout(x)
    p = lay.num_prefix
    h, w = lay.grid
    ph, pw = lay.patch_size if units == "px" else (1, 1)
    i = torch.arange(h * w)
    yx = torch.stack([(i // w) * ph, (i % w) * pw], -1).double()
    d = torch.cdist(yx, yx) / (max(h, w) - 1 if units == "fraction" else 1)
    out = {}
    for layer, a in sink.probs.items():
        a = a[:, :, p:, p:]
        if renormalize:
            a = a / a.sum(-1, keepdim=True)
        out[layer] = (a * d).sum(-1).mean(-1)
    return out


def _values(res, metric: str, n: int, heads: int) -> torch.Tensor:
    """``[N, L, H]`` from the long table, images in input order."""
    t = res.table[res.table.metric == metric]
    layers = sorted(t.layer.unique())
    order = {name: i for i, name in enumerate(dict.fromkeys(t.image))}
    out = torch.zeros(n, len(layers), heads, dtype=torch.float64)
    for img, layer, head, v in zip(t["image"], t["layer"], t["head"], t["value"]):
        out[order[img], layers.index(layer), head] = v
    return out


# -- blockwise probabilities ----------------------------------------------------------------------------
def _qk(b=2, h=3, t=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)  # strided views, as taps give
    return qkv[0], qkv[1]


@pytest.mark.parametrize(
    "bias_shape", [None, (3, 11, 11), (2, 3, 11, 11), (2, 1, 1, 11), (11, 11)], ids=lambda s: f"bias{s}"
)
def test_blocks_of_rows_equal_the_full_softmax(bias_shape):
    q, k = _qk()
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=torch.Generator().manual_seed(3))
    attn = LayerAttention(q=q, k=k, scale=0.3, bias=bias)
    logits = q.double() @ k.double().transpose(-1, -2) * 0.3 + (0 if bias is None else bias.double())
    full = torch.softmax(logits, -1)
    ws = Workspace()
    comp = LayerBlocks(attn, ws)  # the engine's blocks, in reused buffers
    for budget in (1, 2 * 3 * 11 * 8 * 3, 10**9):  # one row per block, 3 rows, everything
        blocks = list(row_blocks(1, 11, 2, 3, 11, budget))
        assert [r for s in blocks for r in range(s.start, s.stop)] == list(range(1, 11))
        for s in blocks:
            for got in (comp.block(s, workspace=ws)[1], attn.probs(s)):  # the engine's, the record's plain ones
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), full[:, :, s], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.probs().double(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_shape", [None, (2, 3, 11, 11), (1, 3, 11, 11), (11, 11)])
def test_blocks_of_images_and_rows_equal_the_full_softmax(bias_shape):
    # the engine's blocks: several whole images when they fit the budget, else one image's rows at a time
    q, k = _qk()
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=torch.Generator().manual_seed(3))
    attn = LayerAttention(q=q, k=k, scale=0.3, bias=bias)
    full = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.3 + (0 if bias is None else bias.double()), -1)
    per_image = 3 * 11 * 8 * 10  # heads x keys x (logits + probs) x rows 1..10
    ws = Workspace()
    comp = LayerBlocks(attn, ws)
    for budget, want in ((1, 20), (3 * 11 * 8 * 4, 6), (per_image, 2), (10**9, 1)):
        got = list(blocks(1, 11, 2, 3, 11, budget))
        assert len(got) == want
        covered = sorted((i, r) for bs, rs in got for i in range(bs.start, bs.stop) for r in range(rs.start, rs.stop))
        assert covered == [(i, r) for i in range(2) for r in range(1, 11)]  # each (image, row) once
        for bs, rs in got:
            z, p = comp.block(rs, workspace=ws, batch=bs)
            torch.testing.assert_close(p.double(), full[bs, :, rs], rtol=1e-5, atol=1e-6)
            assert p.numel() * 8 <= max(budget, 3 * 11 * 8)  # within the budget, or one row of one image


def test_row_blocks_respect_the_budget_and_cover_the_range():
    per_row = 4 * 6 * 50 * 4 * 2
    blocks = list(row_blocks(3, 50, 4, 6, 50, 7 * per_row + 5))
    assert all(s.stop - s.start <= 7 for s in blocks)
    assert [r for s in blocks for r in range(s.start, s.stop)] == list(range(3, 50))
    assert len(list(row_blocks(0, 9, 4, 6, 50, 1))) == 9  # below one row: one row per block


def test_workspace_reuses_its_buffers():
    ws = Workspace()
    a = ws.get("probs", (2, 3, 4, 5), "cpu")
    ptr = a.data_ptr()
    b = ws.get("probs", (2, 3, 2, 5), "cpu")  # smaller: same storage
    assert b.data_ptr() == ptr and b.is_contiguous() and ws.nbytes == 2 * 3 * 4 * 5 * 4
    ws.get("probs", (2, 3, 8, 5), "cpu")  # larger: replaced, not added
    assert ws.nbytes == 2 * 3 * 8 * 5 * 4


def test_probabilities_stay_float32_under_bf16_autocast():
    q, k = _qk(t=17, d=16)
    q, k = q.bfloat16(), k.bfloat16()
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, -1)
    attn = LayerAttention(q=q, k=k, scale=0.25)
    for workspace in (None, Workspace()):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the record's plain probabilities, the engine's blocks
            p = attn.probs(slice(2, 9)) if workspace is None else LayerBlocks(attn, workspace).block(
                slice(2, 9), workspace=workspace)[1]
        assert p.dtype == torch.float32
        # float32 maths on the bf16 inputs: 1e-6, where a bf16 matmul would be off by ~1e-3
        torch.testing.assert_close(p.double(), exact[:, :, 2:9], rtol=0, atol=2e-6)


# -- MAD through the engine -------------------------------------------------------------------------------
@pytest.mark.parametrize("block_mb", [1e-6, 0.0031, None, 1e4], ids=["1row", "odd", "default", "whole"])
@pytest.mark.parametrize("options", [{}, {"renormalize": True}, {"units": "fraction"}], ids=str)
def test_blockwise_mad_equals_the_full_matrix_computation(block_mb, options):
    pm, x = _model(), _images()
    ref = _reference_mad(pm, x, **options)
    metric = MAD(**options)
    res = pk.probe(pm, x, metrics=[metric], batch_size=2, block_mb=block_mb)
    got = _values(res, metric.label, len(x), pm.num_heads)
    for layer, want in ref.items():
        torch.testing.assert_close(got[:, layer], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"renormalize": True}, {"queries": "cls"}, {"units": "fraction"}], ids=str)
def test_mad_row_sum_of_a_block_equals_its_rows_one_by_one(options):
    # MAD may answer a block with its rows' sum in one matrix-vector product (a row axis of 1); a block of
    # one row is that row's value: the sum of each block must equal its rows one by one, whichever block
    # they are in (each block reads the distance rows of its own queries)
    lay = pk.TokenLayout(num_prefix=2, grid=(3, 5), patch_size=(8, 6))
    probs = torch.softmax(torch.randn(2, 3, lay.num_tokens, lay.num_tokens) * 3, -1)
    m = MAD(**options)
    rows = query_span(m, lay)
    assert rows == (slice(0, 1) if options.get("queries") == "cls" else slice(2, lay.num_tokens))
    each = torch.stack([row_sum(m, Block(rows=slice(r, r + 1), layout=lay, probs=probs[:, :, r : r + 1]))
                        for r in range(rows.start, rows.stop)], 2)  # [B, H, R]
    if not options:  # each row's value by the book: sum_k A[q, k] d(q, k) over the patch keys
        torch.testing.assert_close(each, (probs[:, :, 2:, 2:] * lay.pixel_distances()).sum(-1))
    blocks = list(row_blocks(rows.start, rows.stop, 2, 3, lay.num_tokens, 2 * 3 * lay.num_tokens * 8 * 4))
    assert len(blocks) == (1 if options.get("queries") == "cls" else 4)  # 15 patch rows: 4, 4, 4, 3
    for s in blocks:
        want = each[:, :, s.start - rows.start : s.stop - rows.start].sum(2)
        torch.testing.assert_close(row_sum(m, Block(rows=s, layout=lay, probs=probs[:, :, s])), want)
    torch.testing.assert_close(m.compute(probs, lay), each.mean(2))


def test_results_do_not_depend_on_batch_size():
    pm, x = _model(), _images(n=5)
    runs = [_values(pk.probe(pm, x, metrics=["mad"], batch_size=b), "mad", 5, pm.num_heads) for b in (1, 2, 5)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-5)


def test_results_are_deterministic_on_cpu():
    pm, x = _model(), _images()
    a = pk.probe(pm, x, metrics=["mad", "entropy"], batch_size=2, block_mb=0.003).table
    b = pk.probe(pm, x, metrics=["mad", "entropy"], batch_size=2, block_mb=0.003).table
    assert a.value.tolist() == b.value.tolist()


class _DtypeSpy(pk.Metric):
    """Records the dtype of what the engine hands to row-wise metrics."""

    name = "dtype_spy"
    requires = ()

    def row_values(self, block):
        self.__dict__.setdefault("seen", set()).add(block.probs.dtype)
        return block.probs.sum(-1)


def test_bf16_compute_keeps_float32_probabilities_and_close_values():
    pm, x = _model(), _images()
    spy = _DtypeSpy()
    fp32 = _values(pk.probe(pm, x, metrics=["mad"], batch_size=5), "mad", 5, pm.num_heads)
    res = pk.probe(pm, x, metrics=["mad", spy], batch_size=5, dtype="bf16")
    assert spy.seen == {torch.float32}
    assert res.meta["dtype"] == "torch.bfloat16"
    bf16 = _values(res, "mad", 5, pm.num_heads)
    # the model itself runs in bf16 (q, k rounded), so values move, but only a little
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(_values(res, "dtype_spy", 5, pm.num_heads),
                               torch.ones_like(bf16), rtol=0, atol=1e-5)  # rows still sum to 1


# -- memory does not grow with depth ----------------------------------------------------------------------
class _Watch(MetricSink):
    """A sink that counts, at each layer, the live tensors as large as one layer's attention."""

    def attention(self, layer, attn):
        out = super().attention(layer, attn)
        b, h, t = attn.shape
        big = 0  # (the layer's float32 copies of q and k live in the workspace's buffers, [B, H, T, d])
        for o in gc.get_objects():  # attention-shaped: [..., T] with half a layer's elements or more
            if (type(o) is torch.Tensor and o.dim() >= 2 and o.shape[-1] == t
                    and o.numel() >= b * h * t * t // 2):
                big += 1
        self.__dict__.setdefault("big", []).append(big)
        copies = sum(self.workspace._buffers[n].numel() * 4 for n in ("q", "k", "v") if n in self.workspace._buffers)
        self.__dict__.setdefault("workspace_bytes", []).append(self.workspace.nbytes - copies)
        self.__dict__.setdefault("copy_bytes", []).append(copies)
        return out


def _watch_run(depth: int, block_mb: float):
    pm, x = _model(depth=depth), _images(n=4)
    sink = _Watch(build_metrics(["mad", "entropy"]), block_mb=block_mb)
    with torch.inference_mode(), pm.adapter.tap(sink):
        sink.start(pm.layout(x))
        pm.adapter.forward(x)
        values = sink.finish()
    return sink, values, pm.layout(x)


def test_memory_does_not_grow_with_depth():
    budget_mb = 0.02
    shallow, _, lay = _watch_run(depth=2, block_mb=budget_mb)
    deep, values, _ = _watch_run(depth=6, block_mb=budget_mb)
    # no tensor of (half) a layer's attention survives a layer, at any depth
    assert max(deep.big) == max(shallow.big) == 0
    # one set of block buffers for the whole forward, within the budget (at least one row)
    per_row = 4 * 3 * lay.num_tokens * 4 * 2
    assert len(set(deep.workspace_bytes)) == 1
    # (plus the chunk buffer of per-row sums: half the budget at most, or one row of keys, and the
    # rows' 1 / sum of a block)
    assert deep.workspace_bytes[0] <= (max(budget_mb * 2**20, per_row) + max(budget_mb * 2**20 / 2, 4 * lay.num_tokens)
                                       + 4 * 3 * lay.num_tokens * 4)
    # and one layer's float32 q and k ([4 images, 3 heads, T, 16]; this toy tap hands over no v), the
    # same buffers for every layer
    assert set(deep.copy_bytes) == {2 * 4 * 3 * lay.num_tokens * 16 * 4}
    # what the sink keeps per layer is [B, H] values, nothing of the attention
    assert all(v.shape == (4, 3) for per_layer in values.values() for v in per_layer.values())


def test_a_full_layer_of_attention_is_visible_to_the_watch():
    """The watch above can fail: a sink that keeps each layer's probabilities is caught."""

    class Hoarder(_Watch):
        def attention(self, layer, attn):
            self.__dict__.setdefault("kept", []).append(attn.probs())
            return super().attention(layer, attn)

    pm, x = _model(depth=4), _images(n=4)
    sink = Hoarder(build_metrics(["mad"]), block_mb=0.02)
    with torch.inference_mode(), pm.adapter.tap(sink):
        sink.start(pm.layout(x))
        pm.adapter.forward(x)
    assert sink.big == [1, 2, 3, 4]


class _LogitSpy(pk.Metric):
    """A metric that reads the block's logits and checks them against the probabilities it is given."""

    name = "logit_spy"
    requires = ()

    def row_values(self, block):
        seen = self.__dict__.setdefault("seen", [])
        seen.append(None if block.logits is None else (block.logits.clone(), block.probs.clone(), block.rows))
        return block.probs.sum(-1)


def test_metrics_that_ask_for_logits_get_the_softmax_inputs():
    q, k = _qk(t=11)
    spy = _LogitSpy()
    sink = MetricSink([spy], block_mb=3 * 11 * 8 * 4 / 2**20)  # blocks of 4 rows of one image
    sink.start(pk.TokenLayout(num_prefix=1, grid=(2, 5), patch_size=8))
    sink.attention(0, LayerAttention(q=q, k=k, scale=0.3))
    exact = q.double() @ k.double().transpose(-1, -2) * 0.3
    assert [r for _, _, r in spy.seen] == [slice(1, 5), slice(5, 9), slice(9, 11)] * 2  # image by image
    for i, (logits, probs, rows) in enumerate(spy.seen):
        torch.testing.assert_close(logits.double(), exact[i // 3 : i // 3 + 1, :, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.softmax(logits, -1), probs)
    spy.seen.clear()  # a tap that hands over probabilities has no logits to give
    sink.attention(1, LayerAttention(probs_given=torch.softmax(exact.float(), -1)))
    assert spy.seen and all(s is None for s in spy.seen)


def test_probabilities_keep_gradients_outside_the_engine():
    q, k = _qk(t=7)
    q = q.clone().requires_grad_(True)
    LayerAttention(q=q, k=k, scale=0.5).probs(slice(1, 7))[..., 0].sum().backward()
    assert q.grad is not None and q.grad[:, :, 1:].abs().sum() > 0 and q.grad[:, :, 0].abs().sum() == 0


@pytest.mark.parametrize("row_terms", ["auto", "torch", "none"])
@pytest.mark.parametrize("sharpness", [0.1, 5.0, 40.0])
@pytest.mark.parametrize("masked", [False, True])
def test_entropy_from_logits_equals_the_float64_formula(sharpness, masked, row_terms):
    # the engine hands entropy its per-row sums (row_terms "auto": the C row kernel's where it built;
    # "torch": PyTorch's) or its logits ("none"), never a log per element; sharp heads and masked keys
    # (-inf logits, where the dot product is undefined) must still give the direct value
    lay = pk.TokenLayout(num_prefix=1, grid=(5, 6), patch_size=14)
    t = lay.num_tokens
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, t, 8, generator=g) * sharpness, torch.randn(2, 3, t, 8, generator=g)
    bias = torch.zeros(t, t)
    if masked:
        bias[:, 4:9] = float("-inf")
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.35 + bias.double(), -1)[:, :, 1:, 1:]
    a = p / p.sum(-1, keepdim=True)
    exact = (-torch.special.xlogy(a, a).sum(-1)).mean(-1)
    for options in ({}, {"normalized": True}):
        sink = MetricSink(build_metrics([("entropy", options)]), block_mb=0.001, row_terms=row_terms)
        sink.start(lay)
        sink.attention(0, LayerAttention(q=q, k=k, scale=0.35, bias=bias))
        want = exact / torch.log(torch.tensor(30.0, dtype=torch.float64)) if options else exact
        got = sink.finish()[sink.metrics[0].label][0].double()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


# regression: a preprocessed tensor already on the accelerator was handed to a pinning DataLoader
def test_loader_does_not_pin_a_tensor_already_on_a_device():
    pm = types.SimpleNamespace(preprocess=None, adapter=types.SimpleNamespace(in_chans=3))
    on_device = ImageSet(names=["0", "1"], tensor=torch.empty(2, 3, 8, 8, device="meta"))
    on_host = ImageSet(names=["0", "1"], tensor=torch.zeros(2, 3, 8, 8))
    loader = _loader(pm, on_device, 2, 2, pin=True)
    assert loader.pin_memory is False and loader.num_workers == 0
    loader = _loader(pm, on_host, 2, 2, pin=True)
    assert loader.pin_memory is True and loader.num_workers == 2


# regression: ``probe(layers=...)`` with indices the model does not have returned an empty table
def test_probe_refuses_layers_the_model_does_not_have(toy_backend):
    pm = pk.load("toy:vit", depth=2)
    x = torch.randn(2, 3, 32, 32)
    for bad in ([2], [0, -1]):
        with pytest.raises(ConfigError, match=r"has 2 layers, numbered 0 to 1"):
            pk.probe(pm, x, metrics=["mad"], layers=bad)
    res = pk.probe(pm, x, metrics=["mad"], layers=[1])
    assert sorted(res.table["layer"].unique()) == [1]
