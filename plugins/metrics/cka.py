"""Linear CKA between the layers of a model, or of two models, over an image set (Kornblith et al. 2019).

Two estimators of the HSIC it is made of, both the unbiased HSIC_1 of Song et al. 2012 on linear
kernels ``K = X X^T``:

- ``"full"`` (default): HSIC_1 over all ``n`` images at once, exact and independent of how the
  images are batched, from sums that add up over batches (:func:`cross_products`,
  :func:`hsic_from_cross`); no ``n x n`` Gram matrix is ever formed.
- ``"minibatch"``: HSIC_1 per minibatch, summed over minibatches (Nguyen et al. 2021); it changes
  with the batch size and a short last batch weighs like a full one (:func:`hsic_matrix`).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch

from probekit.errors import ConfigError
from probekit.metric import Metric
from probekit.metric.options import validate_options
from probekit.tokens import TokenLayout

__all__ = ["LinearCKA", "cka_between", "hsic_matrix", "hsic_from_cross", "cross_products", "cka_from_sums"]

Pool = Literal["mean", "flatten", "cls"]
Estimator = Literal["full", "minibatch"]
#: the largest cross-product state the "full" estimator keeps (float64 bytes); wider features are refused
MAX_STATE_BYTES = 8 * 2**30


def features(hidden: torch.Tensor, layout: TokenLayout, pool: str = "mean", where: str = "this model") -> torch.Tensor:
    """One representation per image ``[B, D']`` from block outputs ``[B, T, D]`` (float64).

    Layers may differ in token count and width (a staged model's stages): linear CKA compares
    ``[n, n]`` kernels, so mean-pooled or flattened features of any size compare."""
    if pool == "cls":
        x = hidden[:, cls_token(layout, where)]
    else:
        x = hidden[:, layout.num_prefix :]
        x = x.mean(1) if pool == "mean" else x.reshape(x.shape[0], -1)
    return x.double()


def cls_token(layout: TokenLayout, where: str = "this model") -> int:
    """Index of the class token pool="cls" reads, or a :class:`ConfigError` saying what to use instead."""
    assert layout.prefix_kinds is not None  # TokenLayout.__post_init__ fills in the default kinds
    if "cls" not in layout.prefix_kinds:
        raise ConfigError(
            f"cka with pool='cls' needs a class token in every layer compared, but {where} outputs "
            f"{layout.describe()}. Use pool='mean' (or 'flatten'), or probe only layers that carry one (layers=[...])."
        )
    return layout.prefix_kinds.index("cls")


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel ``X X^T`` of representations ``[n, D]`` -> ``[n, n]``."""
    return x @ x.transpose(-1, -2)


def hsic_matrix(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 (Song et al. 2012) between every pair of kernels: ``[La, n, n]``, ``[Lb, n, n]``.

    ``HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``,
    ``K~`` being ``K`` with a zeroed diagonal. Needs ``n >= 4``. Returns ``[La, Lb]``.
    """
    n = ka.shape[-1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples per minibatch; got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=ka.device)
    ka, kb = ka.masked_fill(eye, 0), kb.masked_fill(eye, 0)
    tr = torch.einsum("aij,bij->ab", ka, kb)
    ra, rb = ka.sum(-1), kb.sum(-1)  # row sums [L, n]
    sa, sb = ra.sum(-1), rb.sum(-1)
    out = tr + torch.outer(sa, sb) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ra @ rb.T)
    return out / (n * (n - 3))


def cross_products(feats: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T W`` for ``W = [X_1 .. X_L | q_1 .. q_L | 1]`` (float64, on the CPU): one batch's share of
    the sums, added in place to ``into`` (a previous result) where given.

    ``X_l`` ``[n, d_l]`` are the layers' features and ``q_l = ||x_i^l||^2`` each image's squared
    norm. The blocks of ``W^T W`` hold every sum :func:`hsic_from_cross` needs: ``X_a^T X_b``,
    the feature sums ``s_a = X_a^T 1``, ``sum_i x_i^a q_i^b``, ``sum_i q_i^a q_i^b``,
    ``sum_i q_i^a`` and ``n``; each is a sum over images, so batches, processes and shards add up.
    """
    x = [f.double() for f in feats]
    q = torch.stack([(f * f).sum(1) for f in x], 1)
    w = torch.cat([*x, q, torch.ones_like(q[:, :1])], 1)
    if into is None:
        return (w.T @ w).cpu()
    return into.addmm_(w.T, w) if w.device.type == "cpu" else into.add_((w.T @ w).cpu())  # no second [D, D]


def hsic_from_cross(cross: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """HSIC_1 (as :func:`hsic_matrix`) of the linear kernels of every pair of the ``L`` layers of
    ``widths`` over all ``n`` images summed into ``cross`` (:func:`cross_products`): ``[L, L]``.

    With ``C = X^T Y``, ``s_x = X^T 1``, ``q_i = ||x_i||^2``, ``r_i = ||y_i||^2``::

        tr(K~L~) = ||C||_F^2 - sum_i q_i r_i
        1'K~1    = ||s_x||^2 - sum_i q_i
        1'K~L~1  = s_x^T C s_y - s_x^T sum_i x_i r_i - s_y^T sum_i y_i q_i + sum_i q_i r_i
    """
    nl, d = len(widths), sum(widths)
    n = cross[-1, -1]
    xq, qq = cross[:d, d:d + nl], cross[d:d + nl, d:d + nl]
    s, qsum = cross[:d, -1], cross[d:d + nl, -1]
    starts = [sum(widths[:i]) for i in range(nl)]
    block = [slice(a, a + w) for a, w in zip(starts, widths, strict=True)]
    seg = torch.zeros(nl, d, dtype=cross.dtype)  # [L, D]: sums features layer by layer
    for i, b in enumerate(block):
        seg[i, b] = 1
    cs = torch.stack([cross[:d, b] @ s[b] for b in block], 1)  # [D, L]: C_ab s_b, row block a
    sq = torch.stack([torch.linalg.vector_norm(cross[a, :d], dim=0) ** 2 for a in block]) @ seg.T  # ||C_ab||_F^2
    tr = sq - qq
    ones = seg @ (s * s) - qsum  # 1'K~1 per layer
    v = seg @ (s[:, None] * xq)  # v[a, b] = s_a^T sum_i x_i^a q_i^b
    u = seg @ (s[:, None] * cs) - v - v.T + qq
    return (tr + torch.outer(ones, ones) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * u) / (n * (n - 3))


def cka_from_sums(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """``CKA = HSIC(K_i, L_j) / sqrt(HSIC(K_i, K_i) HSIC(L_j, L_j))`` -> ``[La, Lb]``."""
    return xy / torch.sqrt(torch.outer(xx, yy)).clamp_min(torch.finfo(xy.dtype).tiny)


def check_state_size(widths: list[int], where: str = "cka") -> None:
    """Refuse a "full" state over :data:`MAX_STATE_BYTES`, saying what to use instead."""
    size = (sum(widths) + len(widths) + 1) ** 2 * 8
    if size > MAX_STATE_BYTES:
        raise ConfigError(
            f"{where} with estimator='full' keeps a float64 cross-product matrix of (total width + layers + 1)^2 "
            f"entries: {size / 2**30:.1f} GiB for {len(widths)} layers of total width {sum(widths)}, over the "
            f"{MAX_STATE_BYTES / 2**30:.0f} GiB bound. Use pool='mean' or 'cls', fewer layers (layers=[...]), "
            "or estimator='minibatch'.")


class LinearCKA(Metric):
    """Linear CKA between every pair of layers over the image set (Kornblith et al. 2019).

    Each layer's representation of an image is its patch tokens, mean-pooled (default),
    flattened, or the CLS token: ``X_l`` ``[n, d_l]`` over the ``n`` images, ``K_l = X_l X_l^T``,
    and ``CKA(i, j) = HSIC_1(K_i, K_j) / sqrt(HSIC_1(K_i, K_i) HSIC_1(K_j, K_j))`` with the
    unbiased HSIC_1 of Song et al. 2012. Invariant to orthogonal transforms and isotropic
    scaling of each layer's features (and, HSIC_1 being unbiased, to shifting them).

    - ``estimator="full"`` (default): HSIC_1 over the whole image set, exact and independent of
      the batch size and of the order and grouping of images (every image counts, a batch of 1
      included; the set needs ``n >= 4``). No ``n x n`` kernel is formed: the state is the float64
      cross-product matrix ``W^T W`` of ``W = [X_1 .. X_L | ||x^1||^2 .. ||x^L||^2 | 1]``
      (:func:`cross_products`), summed over batches, from which :func:`hsic_from_cross` gives every
      HSIC_1. Memory: ``(D + L + 1)^2`` float64 for ``D = sum_l d_l`` (mean pooling of 12 layers of
      width 384: 171 MB; of width 768: 681 MB), which ``pool="flatten"`` multiplies by the token
      count squared; states over 8 GiB are refused (:func:`check_state_size`). Measured against the
      minibatch form and its cost: benchmarks/RESULTS.md, "CKA over the whole image set against minibatch CKA".
    - ``estimator="minibatch"``: HSIC_1 per minibatch ``b`` as in Nguyen et al. 2021 ("Do Wide and
      Deep Networks Learn the Same Things?"),
      ``CKA(i, j) = sum_b HSIC_1(K_i^b, K_j^b) / sqrt(sum_b HSIC_1(K_i^b, K_i^b) sum_b HSIC_1(K_j^b, K_j^b))``:
      the state is the ``[L, L]`` matrix of summed HSIC, but the value changes with the batch
      size (``depends_on = ("batch_size",)``) and a short last batch weighs like a full one;
      minibatches under 4 images are skipped with a warning.

    It is one ``[L, L]`` matrix for the whole image set, not a per-image value: ``probe``
    stores it in ``Results.arrays["model/cka"]`` (rows and columns in the order of the layers
    probed) and adds no table rows. Across two models, use :func:`cka_between`.

    Args:
        pool: ``"mean"`` (mean over patch tokens), ``"flatten"`` (all patch tokens, one long
            vector; sensitive to where things are) or ``"cls"``.
        estimator: ``"full"`` (default) or ``"minibatch"``.

    Returns:
        ``result()``: ``{-1: [L, L]}``; ``dataset_result()``: the same as a NumPy array.
    """

    name = "cka"
    description = "linear CKA between layers over the image set (unbiased HSIC): an [L, L] matrix"
    citation = "Kornblith et al. 2019; Song et al. 2012 (unbiased HSIC); Nguyen et al. 2021 (minibatch CKA)"
    needs = "hidden"
    reduces = "batch"
    per_head = False

    pool: Pool = "mean"
    estimator: Estimator = "full"
    requires = property(lambda self: ("cls",) if self.pool == "cls" else ())  # refused before the forward pass
    #: minibatch HSIC depends on how images are grouped: a part computed at another batch size is not reused
    depends_on = property(lambda self: ("batch_size",) if self.estimator == "minibatch" else ())
    #: conformance checks (probekit.testing) the minibatch estimator fails by design, with the reason
    not_applicable_checks = property(lambda self: {
        "check_merged_halves": "minibatch HSIC (Nguyen et al. 2021) depends on how images are grouped "
        "into minibatches; merged halves equal one pass over the same minibatches, not one larger batch",
    } if self.estimator == "minibatch" else {})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # the declared state's types (add_state sets the attributes)
        self.layers: list[int] | None
        self.add_state("layers", default=None, reduce="same")  # the layer of each row and column
        if self.estimator == "full":
            self.cross: torch.Tensor | None
            self.widths: list[int] | None
            self.add_state("cross", default=None, reduce="sum")  # W^T W summed over batches (cross_products)
            self.add_state("widths", default=None, reduce="same")  # each layer's feature width
        else:
            self.xy: torch.Tensor | None
            self.batches: int
            self.skipped: int
            self.add_state("xy", default=None, reduce="sum")  # [L, L] HSIC_1 summed over minibatches
            self.add_state("batches", default=0, reduce="sum")
            self.add_state("skipped", default=0, reduce="sum")  # images in minibatches under 4
        self._batch: dict[int, torch.Tensor] = {}  # per-batch scratch (features or kernels), emptied at its end

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> None:
        x = features(hidden, layout, self.pool, f"layer {layer}")
        self._batch[layer] = x if self.estimator == "full" else gram(x)
        return None

    def on_batch_end(self) -> dict[int, torch.Tensor]:
        batch, self._batch = self._batch, {}
        if batch:
            (self.update_features if self.estimator == "full" else self.update_grams)(batch)
        return {}

    def _check_layers(self, layers: list[int]) -> None:
        if self.layers is not None and layers != self.layers:
            raise ConfigError(f"cka got layers {layers} after {self.layers}; probe the same layers throughout.")

    def update_features(self, feats: dict[int, torch.Tensor]) -> None:
        """Add one batch (``estimator="full"``): ``{layer: X [n, d]}`` for every layer."""
        layers = sorted(feats)
        self._check_layers(layers)
        widths = [int(feats[i].shape[1]) for i in layers]
        if self.widths is not None and widths != self.widths:
            raise ConfigError(f"cka got feature widths {widths} after {self.widths}; probe images of one size.")
        check_state_size(widths)
        self.cross = cross_products([feats[i] for i in layers], into=self.cross)
        self.layers, self.widths = layers, widths

    def update_grams(self, grams: dict[int, torch.Tensor]) -> None:
        """Add one minibatch (``estimator="minibatch"``): ``{layer: K [n, n]}`` for every layer."""
        layers = sorted(grams)
        n = grams[layers[0]].shape[-1]
        if n < 4:
            self.skipped += n
            warnings.warn(
                f"cka skipped a minibatch of {n} image(s): the unbiased HSIC needs at least 4. "
                "Use batch_size >= 4 (and a set whose size leaves no short last batch), or estimator='full'.",
                stacklevel=2,
            )
            return
        self._check_layers(layers)
        k = torch.stack([grams[i] for i in layers]).double()
        h = hsic_matrix(k, k).cpu()
        self.xy = h if self.xy is None else self.xy + h
        self.layers = layers
        self.batches += 1

    def hsic(self) -> torch.Tensor | None:
        """The ``[L, L]`` HSIC_1 matrix (summed over minibatches for ``"minibatch"``), or None (with a
        warning) before 4 images."""
        if self.estimator == "minibatch":
            if self.xy is None:
                warnings.warn("LinearCKA.result() called before any minibatch.", stacklevel=3)
            return self.xy
        n = 0 if self.cross is None else int(self.cross[-1, -1].item())
        if n < 4:
            warnings.warn(f"LinearCKA.result() over {n} image(s): the unbiased HSIC needs at least 4.", stacklevel=3)
            return None
        assert self.cross is not None and self.widths is not None
        return hsic_from_cross(self.cross, self.widths)

    def result(self) -> dict[int, torch.Tensor]:
        h = self.hsic()
        if h is None:
            return {}
        d = torch.diagonal(h)
        return {-1: cka_from_sums(h, d, d).float()}

    def dataset_result(self) -> np.ndarray | None:
        """The ``[L, L]`` CKA matrix over everything seen (None before 4 images, or any minibatch);
        rows and columns follow :attr:`layers`."""
        if (self.cross if self.estimator == "full" else self.xy) is None:
            return None
        whole = self.result()
        return whole[-1].numpy() if whole else None


def cka_between(model_a, model_b, images, *, batch_size: int = 32, pool: str = "mean", estimator: str = "full",
                layers_a=None, layers_b=None) -> tuple[np.ndarray, list[int], list[int]]:
    """Linear CKA between every layer of one model and every layer of another, on the same images.

    Both models see the same batches (each with its own preprocessing). With
    ``estimator="full"`` (default) the features of both models' layers go into one
    :func:`cross_products` sum and the HSIC_1 is over the whole set, whatever ``batch_size``;
    with ``"minibatch"``, ``HSIC_1(K_i^a, K_j^b)`` is summed per minibatch. Either way
    ``cka_between(m, m, ...)`` equals :class:`LinearCKA`'s matrix with the same options.

    Args:
        model_a, model_b: :class:`~probekit.ProbedModel` instances (or aliases/specs to load).
        images: anything :func:`probekit.resolve_images` takes.
        batch_size: images per forward pass (``"minibatch"``: per minibatch, >= 4; a last batch
            under 4 images is skipped).
        pool: ``"mean"``, ``"flatten"`` or ``"cls"``, as for :class:`LinearCKA`.
        estimator: ``"full"`` or ``"minibatch"``, as for :class:`LinearCKA`.
        layers_a, layers_b: layer indices to compare (default: all).

    Returns:
        ``(cka [La, Lb], layers of a, layers of b)``.

    Raises:
        ConfigError: a bad ``pool``, ``estimator`` or ``batch_size``, or too few images (4 in all,
        or one minibatch of 4).
    """
    from probekit.inputs.images import resolve_images
    from probekit.models import load

    validate_options(LinearCKA, {"pool": pool, "estimator": estimator})
    if batch_size < (4 if estimator == "minibatch" else 1):
        raise ConfigError(f"batch_size must be >= {4 if estimator == 'minibatch' else 1} for cka_between "
                          f"with estimator={estimator!r}; got {batch_size}.")
    pms = [load(m) if isinstance(m, str) else m for m in (model_a, model_b)]
    imgs = resolve_images(images)
    loaders = [
        torch.utils.data.DataLoader(imgs.dataset(pm.preprocess, channels=pm.adapter.in_chans), batch_size=batch_size,
                                    shuffle=False)
        for pm in pms
    ]
    sums: Any = None  # "full": W^T W of both models' features; "minibatch": HSIC_1 sums (a with b, a, b)
    la: list[int] = []
    lb: list[int] = []
    widths: list[int] = []
    for (_, xa), (_, xb) in zip(*loaders, strict=True):  # the same images in the same order
        if estimator == "minibatch" and xa.shape[0] < 4:
            continue
        fa, fb = [_layer_features(pm, x.to(pm.device), lay_sel, pool)
                  for pm, x, lay_sel in ((pms[0], xa, layers_a), (pms[1], xb, layers_b))]
        la, lb = sorted(fa), sorted(fb)
        if estimator == "full":
            feats = [fa[i] for i in la] + [fb[j] for j in lb]
            widths = [int(f.shape[1]) for f in feats]
            check_state_size(widths, "cka_between")
            sums = cross_products(feats, into=sums)
            continue
        ka = torch.stack([gram(fa[i]) for i in la]).cpu()
        kb = torch.stack([gram(fb[j]) for j in lb]).cpu()
        parts = (hsic_matrix(ka, kb), torch.diagonal(hsic_matrix(ka, ka)), torch.diagonal(hsic_matrix(kb, kb)))
        sums = parts if sums is None else tuple(s + p for s, p in zip(sums, parts, strict=True))
    if estimator == "full":
        if sums is None or sums[-1, -1].item() < 4:
            raise ConfigError(f"cka_between needs at least 4 images; got {len(imgs)}.")
        h = hsic_from_cross(sums, widths)
        d = torch.diagonal(h)
        sums = (h[: len(la), len(la):], d[: len(la)], d[len(la):])
    elif sums is None:
        raise ConfigError(f"cka_between needs at least one minibatch of 4 images; got {len(imgs)} image(s).")
    return cka_from_sums(*sums).float().numpy(), la, lb


def _layer_features(pm, x: torch.Tensor, layers, pool: str) -> dict[int, torch.Tensor]:
    lays = pm.adapter.hidden_layouts(x)  # staged models: each block's own grid
    return {i: features(h, lays[i], pool, f"layer {i}") for i, h in pm.hidden_states(x, layers=layers).items()}
