"""Linear CKA over the whole image set (issue 23 item 3): exact, independent of batching, mergeable.

The reference is the textbook one: each layer's ``n x n`` linear kernel over every image and the
unbiased HSIC_1 of Song et al. 2012 written out on it, in float64.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.errors import ConfigError
from probekit.metric.state import state_from_json, state_to_json
from probekit.plugins.metrics.cka import LinearCKA, check_state_size, cka_between, cross_products, hsic_from_cross


def gram_hsic(ka: np.ndarray, kb: np.ndarray) -> float:
    """HSIC_1 of two whole-set kernels, as Song et al. 2012 write it (zeroed diagonals)."""
    n = len(ka)
    ka, kb = ka - np.diag(np.diag(ka)), kb - np.diag(np.diag(kb))
    one = np.ones(n)
    return float((np.trace(ka @ kb) + (one @ ka @ one) * (one @ kb @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ ka @ kb @ one)) / (n * (n - 3)))


def gram_cka(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor] | None = None) -> np.ndarray:
    """CKA between every layer of ``feats_a`` and of ``feats_b`` (default: itself) from the kernels."""
    ka = [(f.double() @ f.double().T).numpy() for f in feats_a]
    kb = ka if feats_b is None else [(f.double() @ f.double().T).numpy() for f in feats_b]
    xy = np.array([[gram_hsic(a, b) for b in kb] for a in ka])
    xx, yy = [gram_hsic(a, a) for a in ka], [gram_hsic(b, b) for b in kb]
    return xy / np.sqrt(np.outer(xx, yy))


def test_sums_equal_the_gram_matrix_reference_however_the_set_is_split():
    g = torch.Generator().manual_seed(0)
    n, widths = 13, [5, 3, 7]
    offsets = (2.0, -1.0, 0.0)  # features far from centred: the sums must cancel the offsets exactly
    feats = [torch.randn(n, d, generator=g, dtype=torch.float64) + o for d, o in zip(widths, offsets, strict=True)]
    feats[1] = feats[1] + 0.8 * feats[0][:, :3]  # dependent layers: CKA well away from 0 and 1
    want = np.array([[gram_hsic((a @ a.T).numpy(), (b @ b.T).numpy()) for b in feats] for a in feats])
    got = hsic_from_cross(cross_products(feats), widths).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    pieces = [slice(0, 1), slice(1, 6), slice(6, 13)]  # a batch of 1 counts like any other
    split = sum(cross_products([f[s] for f in feats]) for s in pieces)
    np.testing.assert_allclose(hsic_from_cross(split, widths).numpy(), want, rtol=1e-10, atol=1e-12)
    cka = gram_cka(feats)
    assert 0.3 < cka[0, 1] < 0.95


def _toy(depth: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return pk.load("toy:vit", pretrained=False, image_size=24, patch_size=8, dim=16, depth=depth, heads=2,
                   prefix=1, label=f"toy{depth}-{seed}")


def _cka(res) -> np.ndarray:
    (matrix,) = [v for k, v in res.arrays.items() if "/cka" in k]
    return matrix


@pytest.mark.usefixtures("toy_backend")
def test_probe_gives_one_matrix_at_every_batch_size_equal_to_the_reference_and_to_cka_between():
    pm = _toy()
    x = torch.randn(12, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    runs = {}
    for bs in (3, 4, 5, 12):  # the minibatch estimator skips batches under 4 (all at 3, the last of 2 at 5), warning
        with pytest.warns(UserWarning, match="skipped a minibatch") if bs in (3, 5) else contextlib.nullcontext():
            runs[bs] = pk.probe(pm, x, metrics=["cka", {"cka": {"estimator": "minibatch"}}], batch_size=bs).arrays
    mats = {bs: a[f"{pm.label}/cka"] for bs, a in runs.items()}
    want = gram_cka([h[:, 1:].mean(1) for h in pm.hidden_states(x).values()])
    assert 0.2 < want.min() < 0.99  # layers that differ
    for m in mats.values():
        np.testing.assert_allclose(m, want, rtol=1e-6, atol=1e-6)
    minibatch = {bs: runs[bs][f"{pm.label}/cka[estimator=minibatch]"] for bs in (4, 12)}
    assert np.abs(minibatch[4] - minibatch[12]).max() > 1e-3  # what the whole-set estimator removes
    np.testing.assert_allclose(minibatch[12], want, rtol=1e-6, atol=1e-6)  # one minibatch of all: the same
    between, la, lb = cka_between(pm, pm, x, batch_size=3)
    assert la == lb == [0, 1, 2]
    np.testing.assert_allclose(between, mats[3], rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("toy_backend")
def test_merged_halves_equal_one_pass_through_a_json_round_trip():
    pm = _toy()
    x = torch.randn(9, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    one = LinearCKA(pool="flatten")
    pk.probe(pm, x, metrics=[one], batch_size=4)
    halves = [LinearCKA(pool="flatten"), LinearCKA(pool="flatten")]
    for m, s in zip(halves, (slice(0, 4), slice(4, 9)), strict=True):
        pk.probe(pm, x[s], metrics=[m], batch_size=3)  # batches of 3 and 1, then 3 and 2
    states = [state_from_json(json.loads(json.dumps(state_to_json(m.state_dict())))) for m in halves]
    merged = LinearCKA(pool="flatten").merge(states[0]).merge(states[1])
    np.testing.assert_allclose(merged.dataset_result(), one.dataset_result(), rtol=1e-6, atol=1e-7)
    want = gram_cka([h[:, 1:].flatten(1) for h in pm.hidden_states(x).values()])
    np.testing.assert_allclose(one.dataset_result(), want, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="at least 4"):  # too few images: no matrix, the rest of the run kept
        res = pk.probe(pm, x[:3], metrics=["cka", "token_norms"], batch_size=1)
    assert not res.arrays and len(res.table) == 3 * 3


@pytest.mark.usefixtures("toy_backend")
def test_cka_between_two_models_equals_the_gram_reference():
    pa, pb = _toy(depth=2, seed=3), _toy(depth=3, seed=4)
    x = torch.randn(10, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    got, la, lb = cka_between(pa, pb, x, batch_size=3)
    assert got.shape == (2, 3) and la == [0, 1] and lb == [0, 1, 2]
    want = gram_cka(*[[h[:, 1:].mean(1) for h in pm.hidden_states(x).values()] for pm in (pa, pb)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="at least 4 images"):
        cka_between(pa, pb, x[:3], batch_size=1)


def test_a_state_over_the_bound_is_refused_with_what_to_do():
    check_state_size([384] * 12)  # ViT-S, mean pooled: 171 MB
    with pytest.raises(ConfigError, match=r"GiB for 12 layers of total width 903168.*pool='mean'"):
        check_state_size([196 * 384] * 12)  # ViT-S, flattened


@pytest.mark.usefixtures("toy_backend")
def test_ray_stages_merge_chunks_under_4_images_into_the_local_matrix(run_file):
    """The Ray engine's stages without a cluster (as tests/test_probes.py runs them): chunks of 2
    images each keep their state, and the shards merge to the local engine's matrix."""
    import pickle
    from types import SimpleNamespace

    from probekit.runs.config import as_config, check_run
    from probekit.runs.engines import ray as engine
    from probekit.runs.engines.stages import ProbeReplica, decode_chunk
    from probekit.runs.shards import states_of, whole_part

    run = check_run(as_config(run_file(images={"path": "sample", "count": 6}, metrics=["cka"], batch_size=2)).resolve())
    torch.manual_seed(run.config.seed)
    pm = pk.load("toy:vit")
    local = pk.probe(pm, run.images, ["cka"], batch_size=2, label="toy")
    shards = [(0, 4), (4, 6)]
    chunks = engine._chunks(shards, [0, 1], 2)
    job = engine._Job(0, "toy", run.metrics, {}, [], {}, [0, 1])
    replica = ProbeReplica(model="toy:vit", label="toy", options={}, seed=run.config.seed, device=None,
                           metrics=[("cka", {})], dtype=run.config.dtype, batch_size=2)
    for c, _, lo, hi in chunks:
        row = decode_chunk({"chunk": c, "images": pickle.dumps(run.images.subset(range(lo, hi)))}, pm.preprocess)
        job.chunks[c] = pickle.loads(replica({k: [v] for k, v in row.items()})["payload"][0])  # 2 images: no matrix
    for s, (lo, hi) in enumerate(shards):
        job.have[s] = engine._shard_results(run, job, lo, hi, [c for c, cs, _, _ in chunks if cs == s])
    assert len(states_of(job.have[0]["cka"])) == 1  # its 2 chunks' sums stored as one state
    record = SimpleNamespace(images=SimpleNamespace(names=run.images.names, fingerprint="f"))
    whole = whole_part(run, "toy", [job.have[s]["cka"] for s in range(len(shards))], run.metrics[0], record, "ray", [])
    np.testing.assert_allclose(whole.arrays["toy/cka"], local.arrays["toy/cka"], rtol=1e-6, atol=1e-7)
