"""Representation probes (plugins/metrics/probes.py): each equals a plain reference on the same
features (scikit-learn's own estimators), merges exactly, and gets its labels through the engine."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, StratifiedShuffleSplit
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import probekit as pk
from probekit.errors import ConfigError
from probekit.metric.state import state_from_json, state_to_json
from probekit.plugins.metrics.probes import ClusterProbe, KnnProbe, LinearProbe
from probekit.testing import check_metric
from probekit.tokens import TokenLayout

LAYOUT = TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(8, 8))
LAYERS, N, D, CLASSES = 3, 60, 12, 3


def _data(seed: int = 0):
    """Per layer, features with class structure that grows with depth, and each image's label."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(N) % CLASSES
    centers = torch.randn(CLASSES, D, generator=g)
    feats = [centers[codes] * (0.4 + 0.5 * layer) + torch.randn(N, D, generator=g) for layer in range(LAYERS)]
    return feats, [f"c{int(c)}" for c in codes]


def _feed(metric, feats, labels, batches=(N,)):
    """The engine's calls for images in consecutive batches: labels, then each layer's block output,
    whose patch tokens all equal the image's feature (their mean is it) and whose class token is noise."""
    lo = 0
    for size in batches:
        metric.on_labels(labels[lo:lo + size])
        for layer, x in enumerate(feats):
            part = x[lo:lo + size]
            hidden = torch.cat([torch.randn(len(part), 1, D), part[:, None].expand(-1, 4, -1)], 1)
            metric.on_hidden(layer, hidden, LAYOUT)
        metric.on_batch_end()
        lo += size
    return metric


def _stored(metric):
    layers, x, classes, codes = metric.stored()
    return [x[layer].double().numpy() for layer in layers], codes


def test_knn_equals_sklearn_with_dinos_weighting():
    feats, labels = _data()
    m = _feed(KnnProbe(k=7, temperature=0.1, folds=4, seed=3), feats, labels)
    xs, y = _stored(m)
    per_image, accs = m.per_image(), m.dataset_result()
    assert accs.shape == (LAYERS, 4)
    for layer, x in enumerate(xs):
        right = np.zeros(N)
        for f, (tr, te) in enumerate(StratifiedKFold(4, shuffle=True, random_state=3).split(x, y)):
            ref = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute",
                                       weights=lambda d: np.exp((1 - d) / 0.1)).fit(x[tr], y[tr])
            hit = ref.predict(x[te]) == y[te]
            right[te] = hit
            assert accs[layer, f] == pytest.approx(hit.mean(), abs=1e-12)
        np.testing.assert_array_equal(per_image[layer].numpy(), right)
    assert m.result()[LAYERS - 1].item() > m.result()[0].item()  # the deeper layer separates the classes more


@pytest.mark.slow
def test_linear_probe_equals_grid_search_over_the_same_pipeline():
    feats, labels = _data(1)
    m = _feed(LinearProbe(cs=(0.01, 1.0), folds=3, seed=2), feats, labels)
    xs, y = _stored(m)
    per_image, accs = m.per_image(), m.dataset_result()
    for layer, x in enumerate(xs):
        right = np.zeros(N)
        for f, (tr, te) in enumerate(StratifiedKFold(3, shuffle=True, random_state=2).split(x, y)):
            search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                                  {"logisticregression__C": [0.01, 1.0]},
                                  cv=StratifiedKFold(3, shuffle=True, random_state=2 + f)).fit(x[tr], y[tr])
            hit = search.predict(x[te]) == y[te]
            right[te] = hit
            assert accs[layer, f] == pytest.approx(hit.mean(), abs=1e-12)
        np.testing.assert_array_equal(per_image[layer].numpy(), right)


def test_clusters_equal_kmeans_nmi_ari():
    feats, labels = _data(2)
    m = _feed(ClusterProbe(seed=4, n_init=3), feats, labels)
    xs, y = _stored(m)
    got = m.dataset_result()
    assert got.shape == (LAYERS, 2) and m.per_image() == {}
    for layer, x in enumerate(xs):
        z = x / np.linalg.norm(x, axis=1, keepdims=True)
        found = KMeans(n_clusters=CLASSES, n_init=3, random_state=4).fit_predict(z)
        np.testing.assert_allclose(got[layer], [normalized_mutual_info_score(y, found),
                                                adjusted_rand_score(y, found)], atol=1e-12)


def test_holdout_rows_are_the_test_images():
    feats, labels = _data()
    m = _feed(KnnProbe(split="holdout", test_share=0.3, seed=5), feats, labels)
    xs, y = _stored(m)
    _, te = next(StratifiedShuffleSplit(1, test_size=18, random_state=5).split(xs[0], y))
    for v in m.per_image().values():
        assert sorted(np.flatnonzero(~np.isnan(v.numpy()))) == sorted(te)
    assert m.dataset_result().shape == (LAYERS, 1)


@pytest.mark.parametrize("cls", [KnnProbe, LinearProbe, ClusterProbe])
def test_merged_halves_through_json_equal_one_pass(cls):
    feats, labels = _data()
    opts = {"cs": (1.0,)} if cls is LinearProbe else {}
    one = _feed(cls(**opts), feats, labels, batches=(7, 20, 33))
    a = _feed(cls(**opts), [x[:25] for x in feats], labels[:25], batches=(25,))
    b = _feed(cls(**opts), [x[25:] for x in feats], labels[25:], batches=(10, 25))
    merged = cls(**opts).merge(state_from_json(state_to_json(a.state_dict()))).merge(
        state_from_json(state_to_json(b.state_dict())))
    np.testing.assert_array_equal(merged.dataset_result(), one.dataset_result())
    for layer, v in one.per_image().items():
        torch.testing.assert_close(merged.per_image()[layer], v, rtol=0, atol=0, equal_nan=True)


def test_projection_is_seeded_and_bounded():
    feats, labels = _data()
    a, b = _feed(KnnProbe(dim=5, seed=1), feats, labels), _feed(KnnProbe(dim=5, seed=1), feats, labels, (30, 30))
    assert a.feats[0][0].shape == (N, 5) and a.feats[0][0].dtype == torch.float16
    assert a.nbytes == b.nbytes == N * LAYERS * 5 * 2  # images x layers x width x 2 bytes
    torch.testing.assert_close(torch.cat(b.feats[2]), a.feats[2][0], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="max_mb=0.001.*Set dim"):
        _feed(KnnProbe(max_mb=0.001), feats, labels)


def test_refusals_say_what_to_do():
    feats, labels = _data()
    with pytest.raises(ConfigError, match="registers.*features='mean'"):
        _feed(KnnProbe(features="registers"), feats, labels)
    with pytest.raises(ConfigError, match="smallest class has 20.*fewer folds"):
        _feed(KnnProbe(folds=21), feats, labels).per_image()
    assert KnnProbe(features="cls").requires == ("cls",)  # refused before the forward pass on models without one


@pytest.mark.parametrize("metric", [KnnProbe(folds=2), LinearProbe(folds=2, cs=(1.0,)), ClusterProbe(n_init=1)])
def test_conformance(metric):
    check_metric(metric)


# -- through the engine ------------------------------------------------------------------------------

@pytest.fixture
def class_tree(tmp_path):
    samples = sorted(pk.sample_images())[:6]
    root = tmp_path / "classes"
    for i, path in enumerate(samples):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / f"c{i % 2}" / path.name)
    return root


@pytest.mark.usefixtures("toy_backend")
def test_labels_reach_the_probes_through_probe_and_batch_size_does_not_matter(class_tree):
    pm = pk.load("toy:vit")
    src = pk.sources.ClassFolder(class_tree)
    metrics = [KnnProbe(folds=2, k=3), LinearProbe(folds=2, cs=(1.0,)), "mad"]
    res = pk.probe(pm, src, metrics, batch_size=3)
    again = pk.probe(pm, src, [KnnProbe(folds=2, k=3), LinearProbe(folds=2, cs=(1.0,)), "mad"], batch_size=8)
    t = res.table
    knn = t[t["metric"].astype(str) == "knn[folds=2,k=3]"]
    assert len(knn) == 6 * pm.num_layers and set(knn["value"]) <= {0.0, 1.0}
    names = knn["image"].astype(str)
    assert dict(zip(names, knn["label"], strict=True)) == {n: n.split("/")[0] for n in names}
    cols = ["metric", "image", "layer", "head"]
    a, b = (r.table.sort_values(cols).reset_index(drop=True) for r in (res, again))
    np.testing.assert_array_equal(a["value"].to_numpy(), b["value"].to_numpy())
    key = f"{res.meta['model']}/knn[folds=2,k=3]"
    assert res.arrays[key].shape == (pm.num_layers, 2)
    np.testing.assert_array_equal(res.arrays[key], again.arrays[key])
    # the per-image values are each image's held-out correctness: the fold accuracies' mean over images
    np.testing.assert_allclose(knn.groupby("layer")["value"].mean().to_numpy(), res.arrays[key].mean(1))


@pytest.mark.usefixtures("toy_backend")
def test_unlabelled_images_are_refused_before_the_forward_pass(monkeypatch):
    pm = pk.load("toy:vit")
    monkeypatch.setattr(pm.adapter, "forward", lambda x: pytest.fail("the forward pass ran"))
    with pytest.raises(ConfigError, match="knn need a class label per image.*kind: classes"):
        pk.probe(pm, "sample", ["knn", "mad"])


@pytest.mark.usefixtures("toy_backend")
def test_ray_stages_give_the_probes_labels_and_rows_from_the_merged_state(class_tree, run_file):
    """The Ray engine's stages without a cluster: chunks decoded and probed by a replica (labels
    with them), shard parts with the state as JSON, the whole-set part merged from them: the
    local engine's rows, labels and fold accuracies."""
    import pickle
    from types import SimpleNamespace

    from probekit.runs.config import as_config, check_run
    from probekit.runs.engines import ray as engine
    from probekit.runs.engines.stages import ProbeReplica, decode_chunk
    from probekit.runs.shards import whole_part

    metrics = [{"name": "knn", "options": {"folds": 2, "k": 3}}, {"name": "clusters", "options": {"n_init": 2}}, "mad"]
    run = check_run(as_config(run_file(models=["toy:vit"], images={"kind": "classes", "path": str(class_tree)},
                                       metrics=metrics, batch_size=2)).resolve())
    torch.manual_seed(run.config.seed)
    pm = pk.load("toy:vit")
    local = pk.probe(pm, run.images, [type(m)(**m.options()) for m in run.metrics], batch_size=2, label="toy")
    shards = [(0, 4), (4, 6)]
    chunks = engine._chunks(shards, [0, 1], 2)
    job = engine._Job(0, "toy", run.metrics, {}, [], {}, [0, 1],
                      labels=dict(zip(run.images.names, run.images.labels, strict=True)))
    replica = ProbeReplica(model="toy:vit", label="toy", options={}, seed=run.config.seed, device=None,
                           metrics=[(m.name, m.options()) for m in run.metrics], dtype=run.config.dtype, batch_size=2)
    for c, _, lo, hi in reversed(chunks):  # chunks arrive in any order
        row = decode_chunk({"chunk": c, "images": pickle.dumps(run.images.subset(range(lo, hi)))}, pm.preprocess)
        job.chunks[c] = pickle.loads(replica({k: [v] for k, v in row.items()})["payload"][0])
    for s, (lo, hi) in enumerate(shards):
        job.have[s] = engine._shard_results(run, job, lo, hi, [c for c, cs, _, _ in chunks if cs == s])
    assert len(job.have[0]["knn[folds=2,k=3]"].table) == 0  # a shard makes no probe rows, only state
    record = SimpleNamespace(images=SimpleNamespace(names=run.images.names, fingerprint="f"))
    cols = ["image", "layer", "head", "metric", "label", "value"]
    for m in run.metrics:
        whole = whole_part(run, "toy", [job.have[s][m.label] for s in range(len(shards))], m, record, "ray", [])
        ref = local.table[local.table["metric"].astype(str) == m.label]
        assert len(whole.table) == len(ref) and (len(ref) == 0) == (m.name == "clusters")
        if not len(ref):
            continue
        a, b = (t[cols].astype(str).sort_values(cols[:4]).reset_index(drop=True) for t in (whole.table, ref))
        pd.testing.assert_frame_equal(a, b)
        assert whole.meta["images"]["count"] == 6
        if m.name != "mad":
            np.testing.assert_array_equal(whole.arrays[f"toy/{m.label}"], local.arrays[f"toy/{m.label}"])


def test_a_run_file_with_probes_on_unlabelled_images_cannot_start(run_file):
    from probekit.runs.config import as_config, check_run

    with pytest.raises(ConfigError, match="images: Metric.*knn need a class label per image"):
        check_run(as_config(run_file(metrics=["knn", "mad"])).resolve())


@pytest.mark.usefixtures("toy_backend")
def test_classes_too_small_for_the_folds_are_refused_before_the_forward_pass(class_tree, monkeypatch, run_file):
    from probekit.runs.config import as_config, check_run

    pm = pk.load("toy:vit")
    monkeypatch.setattr(pm.adapter, "forward", lambda x: pytest.fail("the forward pass ran"))
    with pytest.raises(ConfigError, match="smallest class has 3 image.*folds=5.*fewer folds"):
        pk.probe(pm, pk.sources.ClassFolder(class_tree), ["knn"])
    with pytest.raises(ConfigError, match="metrics: metric 'knn'.*smallest class has 3"):
        check_run(as_config(run_file(images={"kind": "classes", "path": str(class_tree)}, metrics=["knn"])).resolve())
