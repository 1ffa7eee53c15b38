"""What a small pk.probe call does besides the forward, made cheaper without changing what it returns
(issue 25; the figures: benchmarks/bench_call_cost.py).

The long table is built in its column types at once and Results no longer converts it (the
conversion's result is asserted equal); a model in eval mode throughout is not walked three times
(a leaf in train mode is still found and given back); a preprocessed tensor's batches are slices
of it, not a DataLoader's (the same values, a strided tensor included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probekit as pk
from probekit.results.table import _is_typed, _typed


def _converted(df: pd.DataFrame) -> pd.DataFrame:
    """What Results made of any table before issue 25: every column converted (the reference)."""
    df = df[["model", "image", "layer", "head", "metric", "value"]].reset_index(drop=True)
    for col, dt in {"model": "category", "image": "string", "layer": "int16", "head": "int16",
                    "metric": "category"}.items():
        df[col] = df[col].astype(str).astype(dt) if dt in ("category", "string") else df[col].astype(dt)
    df["value"] = df["value"].astype("float64")
    return df


def _tiny():
    torch.manual_seed(0)
    return pk.load("timm:vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                   patch_size=8, img_size=32)


def test_the_probe_table_is_already_what_the_conversion_makes():
    pm = _tiny()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    table = pk.probe(pm, x, metrics=["mad", "entropy", "prefix_mass"], batch_size=2).table
    assert _is_typed(table)
    plain = table.astype({"model": object, "image": object, "metric": object, "layer": "int64", "head": "int64"})
    assert not _is_typed(plain)
    pd.testing.assert_frame_equal(table, _converted(plain), check_exact=True, check_categorical=True)
    assert len(table) == 3 * 3 * 2 * 2 and list(table["metric"].cat.categories) == ["entropy", "mad", "prefix_mass"]


def _typed_frame() -> pd.DataFrame:
    return _converted(pd.DataFrame({"model": ["m"] * 4, "image": ["a", "a", "b", "b"], "layer": [0, 1, 0, 1],
                                    "head": [-1] * 4, "metric": ["mad", "x", "mad", "x"], "value": [1.0, 2, 3, 4]}))


@pytest.mark.parametrize("change", ["unused category", "unsorted categories", "missing category", "missing image",
                                    "index", "layer int64", "column order"])
def test_a_table_the_conversion_would_change_is_converted(change):
    df = _typed_frame()
    assert _is_typed(df)
    if change == "unused category":
        df["metric"] = df["metric"].cat.add_categories(["zzz"])
    elif change == "unsorted categories":
        df["metric"] = df["metric"].cat.reorder_categories(["x", "mad"])
    elif change == "missing category":
        df.loc[0, "metric"] = np.nan
    elif change == "missing image":
        df.loc[1, "image"] = pd.NA
    elif change == "index":
        df.index = [3, 2, 1, 0]
    elif change == "layer int64":
        df["layer"] = df["layer"].astype("int64")
    else:
        df = df[["image", "model", "layer", "head", "metric", "value"]]
    assert not _is_typed(df)
    pd.testing.assert_frame_equal(_typed(df), _converted(df), check_exact=True, check_categorical=True)


def test_a_leaf_module_in_train_mode_is_found_and_given_back():
    pm = _tiny()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm.model.eval()
    want = pk.probe(pm, x, metrics=["mad"]).table["value"].to_numpy()
    leaf = pm.model.blocks[1].attn.attn_drop
    leaf.p = 0.5  # a dropout that would change the values if it ran in train mode
    leaf.train()
    got = pk.probe(pm, x, metrics=["mad"]).table["value"].to_numpy()
    np.testing.assert_array_equal(got, want)
    assert leaf.training and [m for m in pm.model.modules() if m.training] == [leaf]


def test_a_probe_on_a_tensor_leaves_malloc_as_it_is_and_decoding_tunes_it(monkeypatch):
    """malloc's tuning (probekit.inputs.memory.tame) is for decoding image files; on a tensor nothing is
    decoded, and the tuning would slow every later forward pass in the process (bench_call_cost.py --malloc)."""
    from probekit.inputs import images as image_inputs

    tuned: list[int] = []
    monkeypatch.setattr(image_inputs, "tame", lambda: tuned.append(1) or True)
    pm = _tiny()
    pk.probe(pm, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)), metrics=["mad"])
    assert tuned == []
    pk.probe(pm, "sample", metrics=["mad"])  # the bundled photos, decoded
    assert tuned


def test_a_tensors_batches_are_its_slices_strided_or_not():
    pm = _tiny()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    strided = x.contiguous(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    want = pk.probe(pm, x, metrics=["mad"], batch_size=5).table
    for images, batch in ((x, 2), (strided, 2), (strided, 5)):  # 2, 2, 1 images; then all at once
        got = pk.probe(pm, images, metrics=["mad"], batch_size=batch).table
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6, atol=1e-5)
    assert list(want["image"].unique()) == [str(i) for i in range(5)]


# -- layers on CPU: the C kernel's whole attention pass (probekit.engine.kernels.cpu_pass) -------------------
def _vit197(depth=2):
    from probekit.testing import randomize_parameters

    torch.manual_seed(0)
    pm = pk.load("timm:vit_base_patch16_224", pretrained=False, embed_dim=32, depth=depth, num_heads=2)
    randomize_parameters(pm.model, scale=0.2)  # sharper heads than random init's near-uniform ones
    return pm


def _count_cpu_pass(monkeypatch):
    from probekit.engine.kernels import cpu_pass

    calls = []
    run = cpu_pass.Prepared.run
    monkeypatch.setattr(cpu_pass.Prepared, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


def _values(pm, x, metrics, **kw) -> np.ndarray:
    return pk.probe(pm, x, metrics=metrics, batch_size=2, **kw).table["value"].to_numpy()


@pytest.mark.parametrize("metrics", [["mad"], ["mad", "entropy", "prefix_mass", {"mad": {"units": "patch"}},
                                               {"mad": {"renormalize": True}}]], ids=["mad", "kernel terms"])
def test_layers_take_the_cpu_pass_with_the_same_numbers(metrics, monkeypatch):
    from probekit.engine.kernels import cpu_pass

    pm = _vit197()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))  # batches of 2 and 1
    calls = _count_cpu_pass(monkeypatch)
    got = _values(pm, x, metrics)
    assert len(calls) == 2 * 2  # every layer of both batches (197 tokens: one pass, auto)
    separate = _values(pm, x, metrics, attention_pass="separate")
    monkeypatch.setattr(cpu_pass, "applies", lambda *a, **k: False)
    blocked = _values(pm, x, metrics)  # the blocked one pass, as before
    np.testing.assert_allclose(got, separate, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, blocked, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 * 2


def test_the_cpu_pass_output_is_the_models_own():
    from probekit.engine.probe import MetricSink, build_metrics

    pm = _vit197()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        plain = pm.adapter.forward(x)
        sink = MetricSink(build_metrics(["mad"]))
        with pm.adapter.tap(sink):
            sink.start(pm.layout(x))
            tapped = pm.adapter.forward(x)
    rel = ((tapped - plain).abs().max() / plain.abs().max()).item()
    assert rel < 5e-6, rel  # float32 rounding of another summation order (tests/test_one_pass.py: REL)


def test_a_metric_the_kernel_cannot_serve_sends_the_layer_the_blocked_way(monkeypatch):
    pm = _vit197()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    calls = _count_cpu_pass(monkeypatch)
    metrics = ["mad", "distance_profile"]  # its histogram is no CPU kernel term
    got = pk.probe(pm, x, metrics=metrics).table
    assert calls == []
    want = pk.probe(pm, x, metrics=metrics, attention_pass="separate").table
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_metric_that_declines_the_terms_gets_the_blocked_path_after_the_cpu_pass(monkeypatch):
    pm = _vit197()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    calls = _count_cpu_pass(monkeypatch)
    metrics = ["mad", {"mad": {"queries": "cls"}}]  # CLS queries: row_values declines the terms (None)
    got = _values(pm, x, metrics)
    assert len(calls) == 2
    np.testing.assert_allclose(got, _values(pm, x, metrics, attention_pass="separate"), rtol=1e-5, atol=1e-6)


def test_a_layer_unlike_the_last_one_does_not_reuse_its_prepared_pass():
    """The sink keeps the C kernel's prepared pass for the next layers of the same shape (cpu_pass.Prepared);
    a layer with other strides, another length or a bias must not be served by it: every layer's values
    and output equal the plain computation."""
    from probekit.attention import LayerAttention
    from probekit.engine.kernels import cpu_pass
    from probekit.engine.probe import MetricSink, build_metrics

    lay = pk.TokenLayout(num_prefix=1, grid=(8, 8), patch_size=(16, 16))
    t = lay.num_tokens
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(2, t, 3, 2, 16, generator=g).permute(2, 0, 3, 1, 4)
    strided = LayerAttention(q=qkv[0], k=qkv[1], v=qkv[2], scale=0.25)
    dense = LayerAttention(q=qkv[0].contiguous() * 2, k=qkv[1].contiguous(), v=qkv[2].contiguous(), scale=0.25)
    biased = LayerAttention(q=qkv[0], k=qkv[1], v=qkv[2], scale=0.25, bias=torch.randn(t, t, generator=g))
    layers = [strided, strided, dense, biased, strided]
    sink = MetricSink(build_metrics(["mad"]))
    sink.start(lay)
    outputs = [sink.attention(i, a) for i, a in enumerate(layers)]
    values = sink.finish()["mad"]
    assert isinstance(sink._prepared, cpu_pass.Prepared)
    dist = torch.cdist(*[torch.tensor([[i // 8, i % 8] for i in range(64)], dtype=torch.float64) * 16] * 2)
    for i, a in enumerate(layers):
        z = a.q.double() @ a.k.double().transpose(-1, -2) * a.scale
        if a.bias is not None:
            z = z + a.bias.double()
        p = torch.softmax(z, -1)
        want = (p[:, :, 1:, 1:] * dist).sum(-1).mean(-1)
        torch.testing.assert_close(values[i].double(), want, rtol=2e-5, atol=2e-5, msg=f"layer {i}")
        out = outputs[i]  # every layer's output made here (65 tokens: one pass; the biased one in blocks)
        assert out is not None, i
        torch.testing.assert_close(out.double(), p @ a.v.double(), rtol=2e-5, atol=2e-5, msg=f"output {i}")


def test_the_cpu_pass_refuses_what_it_does_not_compute():
    from probekit.attention import LayerAttention
    from probekit.engine.kernels.cpu_pass import applies
    from probekit.engine.probe import build_metrics

    q = torch.randn(2, 3, 17, 8)
    mad = build_metrics(["mad"])
    assert applies(LayerAttention(q=q, k=q, v=q, scale=0.3), mad)
    long = torch.randn(1, 2, 1370, 8)  # any length: no [T, T] block is made
    assert applies(LayerAttention(q=long, k=long, v=long, scale=0.3), mad)
    refused = {
        "a bias": (LayerAttention(q=q, k=q, v=q, scale=0.3, bias=torch.zeros(17, 17)), mad),
        "no v": (LayerAttention(q=q, k=q, scale=0.3), mad),
        "probabilities": (LayerAttention(probs_given=torch.rand(2, 3, 17, 17)), mad),
        "bf16": (LayerAttention(q=q.bfloat16(), k=q.bfloat16(), v=q.bfloat16(), scale=0.3), mad),
        "bf16 output": (LayerAttention(q=q, k=q, v=q, scale=0.3, out_dtype=torch.bfloat16), mad),
        "strided last dimension": (LayerAttention(q=q, k=q, v=torch.randn(2, 3, 8, 17).transpose(2, 3), scale=0.3),
                                   mad),
        "fewer keys": (LayerAttention(q=q, k=q[:, :, :9], v=q[:, :, :9], scale=0.3), mad),
        "not a kernel term": (LayerAttention(q=q, k=q, v=q, scale=0.3), build_metrics(["distance_profile"])),
    }
    for why, args in refused.items():
        assert not applies(*args), why


# (batch, heads, d, dv, prefix tokens, grid, patch): register-tile edges (rows past a tile, keys past a
# panel, dv past the vector width), registers, rectangular patches, and a long layer
KERNEL_CASES = [(1, 6, 64, 64, 1, (14, 14), (16, 16)), (2, 3, 8, 8, 1, (3, 4), (8, 6)),
                (2, 2, 24, 40, 2, (4, 17), (14, 14)), (1, 4, 96, 80, 5, (16, 16), (14, 14)),
                (1, 1, 16, 17, 0, (1, 1), (16, 16)), (1, 2, 64, 64, 1, (28, 28), (16, 16))]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "b{}h{}d{}dv{}n{}g{}x{}".format(*c[:5], *c[5]))
def test_the_c_attention_pass_equals_the_plain_computation(case):
    """pk_attention (probekit/engine/kernels/_cpu_rows.c) on strided q, k, v as timm's fused qkv hands
    them over: the output equals softmax(q kᵀ s) v made in float64, and every row term equals the row
    kernel's on the same logits (the blocked path's)."""
    from probekit.engine.kernels import cpu as cpu_kernel
    from probekit.engine.kernels.block_terms import layer_terms

    b, h, d, dv, n0, grid, patch = case
    lay = pk.TokenLayout(num_prefix=n0, grid=grid, patch_size=patch)
    t = lay.num_tokens
    g = torch.Generator().manual_seed(8)
    qkv = 2 * torch.randn(b, t, 3, h, max(d, dv), generator=g).permute(2, 0, 3, 1, 4)  # views into one tensor
    q, k, v = qkv[0][..., :d], qkv[1][..., :d], qkv[2][..., :dv]
    scale = d**-0.5
    out = torch.full((b, t, h, dv), float("nan")).transpose(1, 2)
    terms = layer_terms(b, h, t, n0, cpu_kernel.TERMS, "cpu")
    cpu_kernel.attention(q, k, v, out, scale, lay, terms)
    z = q.double() @ k.double().transpose(-1, -2) * scale
    want = torch.softmax(z, -1) @ v.double()
    assert (out.double() - want).abs().max() / want.abs().max() < 2e-6
    ref = layer_terms(b, h, t, n0, cpu_kernel.TERMS, "cpu")
    cpu_kernel.softmax_terms(z.float(), torch.empty(b, h, t, t), slice(0, b), slice(0, t), lay, ref)
    for name in ("lse", "patch_mass", "patch_logit", "dist_px", "dist_grid", "prefix"):
        got, exp = getattr(terms, name), getattr(ref, name)
        if exp is None:
            assert got is None and n0 == 0, name
            continue
        torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "b{}h{}d{}dv{}n{}g{}x{}".format(*c[:5], *c[5]))
def test_the_c_attention_pass_without_an_output_makes_the_same_terms_and_reads_no_v(case):
    """The last layer a stopped forward waits for needs no output (probe's stop_early): pk_attention with out
    NULL skips P V and the copy of v; every term is as with the output, bit for bit, whatever v holds."""
    from probekit.engine.kernels import cpu as cpu_kernel
    from probekit.engine.kernels.block_terms import layer_terms

    b, h, d, dv, n0, grid, patch = case
    lay = pk.TokenLayout(num_prefix=n0, grid=grid, patch_size=patch)
    t = lay.num_tokens
    qkv = 2 * torch.randn(b, t, 3, h, max(d, dv), generator=torch.Generator().manual_seed(3)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0][..., :d], qkv[1][..., :d], qkv[2][..., :dv]
    out = torch.empty(b, t, h, dv).transpose(1, 2)
    terms = layer_terms(b, h, t, n0, cpu_kernel.TERMS, "cpu")
    call = cpu_kernel.AttentionCall(q, k, v, out, lay, terms)
    call(q, k, v, out, d**-0.5)
    names = [n for n in ("lse", "patch_mass", "patch_logit", "dist_px", "dist_grid", "prefix")
             if getattr(terms, n) is not None]
    want = {n: getattr(terms, n).clone() for n in names}
    for n in names:
        getattr(terms, n).fill_(float("nan"))
    v.fill_(float("nan"))  # never read without an output
    call(q, k, v, None, d**-0.5)
    for n in names:
        assert torch.equal(getattr(terms, n), want[n]), n


def _attention_case(seed: int = 9):
    from probekit.engine.kernels import cpu as cpu_kernel
    from probekit.engine.kernels.block_terms import layer_terms

    lay = pk.TokenLayout(num_prefix=1, grid=(7, 9), patch_size=(14, 16))
    t = lay.num_tokens
    qkv = torch.randn(2, t, 3, 3, 40, generator=torch.Generator().manual_seed(seed)).permute(2, 0, 3, 1, 4)

    def run():
        out = torch.empty(2, t, 3, 40).transpose(1, 2)
        terms = layer_terms(2, 3, t, 1, cpu_kernel.TERMS, "cpu")
        cpu_kernel.attention(qkv[0], qkv[1], qkv[2], out, 40**-0.5, lay, terms)
        return out, terms

    return run


def test_the_c_attention_pass_splits_its_work_the_same_way_on_python_threads(python_threads):
    run = _attention_case()
    out1, t1 = run()
    with python_threads():
        out2, t2 = run()
    assert torch.equal(out1, out2)
    for name in ("lse", "patch_mass", "dist_px", "prefix"):
        assert torch.equal(getattr(t1, name), getattr(t2, name)), name


def test_the_kernels_key_positions_stay_alive_while_their_pointers_are_held():
    """The kernels read each key's grid position through pointers (cpu._layout_args, cached per layout) into
    tensors that cpu._key_positions makes and caches, in a smaller cache: evicted from it, the tensors must
    live on with the layout's arguments, or the distance terms read freed memory (seen: a flaky MAD)."""
    from probekit.engine.kernels import cpu as cpu_kernel

    run = _attention_case()  # 7 x 9 patches
    want_out, want = run()
    for n in range(12):  # more layouts than _key_positions keeps: the 7 x 9 grid's positions leave its cache
        cpu_kernel._key_positions(40 + n, 5)
    junk = [torch.full((63,), 1e4) for _ in range(500)]  # freed memory of their size, overwritten
    out, terms = run()
    del junk
    assert torch.equal(out, want_out)
    for name in ("dist_px", "dist_grid"):
        assert torch.equal(getattr(terms, name), getattr(want, name)), name


def test_the_portable_build_of_the_c_attention_pass_gives_the_same_numbers(monkeypatch, tmp_path):
    """The register tiles differ by instruction set (_cpu_rows.c: AVX-512's, or the narrower ones every other
    machine builds): the build without -march=native takes the other branch here, and must agree."""
    from probekit.engine.kernels import cpu as cpu_kernel

    run = _attention_case()
    native_out, native_terms = run()
    dest = tmp_path / "rows-portable.so"
    cpu_kernel._compile(cpu_kernel._SOURCE.read_bytes(), "cc", ("-fopenmp",), dest)
    lib = cpu_kernel.RowKernel(str(dest))
    cpu_kernel._declare(lib)
    monkeypatch.setattr(cpu_kernel, "library", lambda: lib)
    out, terms = run()
    torch.testing.assert_close(out, native_out, rtol=2e-6, atol=2e-6)
    for name in ("lse", "patch_mass", "patch_logit", "dist_px", "dist_grid", "prefix"):
        torch.testing.assert_close(getattr(terms, name), getattr(native_terms, name), rtol=2e-6, atol=2e-6)


def test_the_kernel_without_the_logit_sum_gives_the_same_terms():
    """MAD's terms alone take a loop without <p, z>_patch (probekit/engine/kernels/_cpu_rows.c): same numbers."""
    from probekit.engine.kernels import cpu as cpu_kernel
    from probekit.engine.kernels.block_terms import layer_terms

    lay = pk.TokenLayout(num_prefix=1, grid=(5, 6), patch_size=(16, 16))
    t = lay.num_tokens
    z = torch.randn(2, 3, t, t, generator=torch.Generator().manual_seed(7)) * 4
    out = {}
    for name, want in (("all", cpu_kernel.TERMS), ("mad", frozenset({"dist", "patch_mass"}))):
        terms = layer_terms(2, 3, t, lay.num_prefix, want, "cpu")
        p = torch.empty_like(z)
        cpu_kernel.softmax_terms(z, p, slice(0, 2), slice(0, t), lay, terms)
        out[name] = (p, terms)
    assert out["mad"][1].patch_logit is None
    assert torch.equal(out["all"][0], out["mad"][0])
    for key in ("lse", "patch_mass", "dist_px", "dist_grid"):
        assert torch.equal(getattr(out["all"][1], key), getattr(out["mad"][1], key)), key


def test_a_small_workspace_is_kept_for_the_next_call_in_the_thread():
    import threading

    from probekit.engine import probe as engine

    pm = _vit197(depth=1)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    first = pk.probe(pm, x, metrics=["mad", "entropy"]).table
    kept = engine._KEPT.workspace
    assert kept is not None and 0 < kept.nbytes <= engine.KEEP_WORKSPACE_BYTES
    with engine._workspace() as ws:  # taken while a call runs: a call inside it gets its own
        assert ws is kept and engine._KEPT.workspace is None
        with engine._workspace() as inner:
            assert inner is not kept
    again = pk.probe(pm, x, metrics=["mad", "entropy"]).table
    pd.testing.assert_frame_equal(again, first, check_exact=True)  # same buffers, same numbers
    other = []
    threading.Thread(target=lambda: other.append(getattr(engine._KEPT, "workspace", None))).start()
    assert other == [None] or other == []  # per thread


def test_a_large_workspace_is_given_back():
    from probekit.engine import probe as engine

    pm = _vit197(depth=1)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    pk.probe(pm, x, metrics=["mad"], attention_pass="separate", block_mb=16)  # blocked path: 2 x 0.6 MB blocks
    assert engine._KEPT.workspace is not None
    engine.KEEP_WORKSPACE_BYTES, keep = 2**10, engine.KEEP_WORKSPACE_BYTES
    try:
        pk.probe(pm, x, metrics=["mad"], attention_pass="separate", block_mb=16)
        assert engine._KEPT.workspace is None
    finally:
        engine.KEEP_WORKSPACE_BYTES = keep
