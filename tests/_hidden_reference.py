"""Reference code for hidden-state metric tests (loaded by conftest.py as ``probekit_tests_hidden``).

Block outputs are read through forward hooks the tests register on the library's own modules (not
through an adapter); token norms and CKA are computed the plain way: the unbiased HSIC of Song et
al. 2012 written from its definition with ones vectors, pair of layers by pair of layers.
"""

from __future__ import annotations

import numpy as np
import torch


def hooked_outputs(blocks, x, model) -> list[torch.Tensor]:
    """The raw outputs of ``blocks`` for one forward of ``model`` (forward hooks set here)."""
    outs = []
    def keep(module, args, out):
        outs.append(out[0] if isinstance(out, tuple) else out)  # MViTv2 blocks return (tokens, grid)

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def norm_reference(patches: list[torch.Tensor], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """token_norms from per-layer patch tokens ``[B, N, C]``: the largest norm over the image's median
    norm, and the share of tokens above ``threshold`` times the median, each ``[L, B]``."""
    norms = [p.float().norm(dim=-1) for p in patches]  # [B, N] per layer
    med = [n.median(dim=-1, keepdim=True).values for n in norms]
    ratio = np.stack([(n / m).amax(-1).numpy() for n, m in zip(norms, med)])
    share = np.stack([(n > threshold * m).float().mean(-1).numpy() for n, m in zip(norms, med)])
    return ratio, share


def check_token_norms(pm, x: torch.Tensor, patches: list[torch.Tensor], grids: list[int]) -> None:
    """probekit's token_norms (max ratio; share above 1.2x the median) on ``x`` equal
    :func:`norm_reference` on ``patches``, the blocks' patch tokens read by the test's own hooks,
    whose counts per layer are ``grids``."""
    import probekit as pk

    metrics = [{"token_norms": {"statistic": "max_ratio"}}, {"token_norms": {"threshold": 1.2}}]
    res = pk.probe(pm, x, metrics=metrics, batch_size=x.shape[0])
    assert [p.shape[1] for p in patches] == grids
    want_ratio, want_share = norm_reference(patches, 1.2)
    labels = sorted(res.table.metric.unique())
    ratio_label = next(lbl for lbl in labels if "max_ratio" in lbl)
    share_label = next(lbl for lbl in labels if "threshold" in lbl)
    np.testing.assert_allclose(per_layer(res, ratio_label, x.shape[0]), want_ratio, rtol=1e-5)
    np.testing.assert_allclose(per_layer(res, share_label, x.shape[0]), want_share, atol=1e-6)
    assert want_ratio.min() > 1 and want_ratio.max() > 1.05 and 0 < want_share.mean() < 1  # non-trivial values


def check_cka(pm, x: torch.Tensor, tokens, pool: str, batch: int = 4) -> np.ndarray:
    """probekit's CKA (probe and cka_between, the whole-set estimator) over batches of ``batch`` images
    equals :func:`reference_cka` on ``tokens(pm, images) -> [[B, N, C] per layer]`` of all images at
    once pooled by ``pool`` ("mean" or "flatten"); returns the reference."""
    import probekit as pk
    from probekit.plugins.metrics.hidden import cka_between

    res = pk.probe(pm, x, metrics=[{"cka": {"pool": pool}}], batch_size=batch)

    def pooled(t):
        return t.mean(1) if pool == "mean" else t.flatten(1)

    want = reference_cka([[pooled(t) for t in tokens(pm, x)]])  # one "minibatch" of every image: the whole set
    np.testing.assert_allclose(cka_of(res), want, rtol=1e-4, atol=1e-6)
    between, la, lb = cka_between(pm, pm, x, batch_size=batch, pool=pool)
    assert la == lb == list(range(pm.num_layers))
    np.testing.assert_allclose(between, want, rtol=1e-4, atol=1e-6)
    return want


def cka_of(res) -> np.ndarray:
    (matrix,) = [v for k, v in res.arrays.items() if "/cka" in k]
    return matrix


def per_layer(res, metric: str, n_images: int) -> np.ndarray:
    t = res.table[res.table.metric == metric]
    return np.stack([t[t.layer == i].sort_values("image", key=lambda s: s.astype(int)).value.to_numpy()
                     for i in sorted(t.layer.unique())])  # [L, images]


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of Song et al. 2012 from its definition."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    term = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one.T @ k @ l @ one))
    return term.squeeze() / (n * (n - 3))


def reference_cka(feats_per_batch: list[list[torch.Tensor]]) -> np.ndarray:
    """Minibatch CKA: sums of HSIC over minibatches, then the ratio (Nguyen et al. 2021); over one
    batch of every image, the whole-set CKA."""
    nl = len(feats_per_batch[0])
    xy = torch.zeros(nl, nl, dtype=torch.float64)
    for feats in feats_per_batch:
        grams = [f.double() @ f.double().T for f in feats]
        for i in range(nl):
            for j in range(nl):
                xy[i, j] += unbiased_hsic(grams[i], grams[j])
    d = torch.diagonal(xy)
    return (xy / torch.sqrt(torch.outer(d, d))).numpy()
