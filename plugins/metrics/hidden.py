"""Metrics of each block's output tokens: high-norm outlier tokens, and linear CKA between layers."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from probekit.errors import ConfigError
from probekit.metric import Metric
from probekit.metric.options import validate_options
from probekit.tokens import TokenLayout

Pool = Literal["mean", "flatten", "cls"]


class TokenNorms(Metric):
    """High-norm outlier tokens among the patch outputs of each block (Darcet et al. 2024).

    For each image, ``n_i = ||x_i||_2`` of every patch token ``x_i`` a block outputs (prefix
    tokens excluded) and its median ``m = median_i n_i`` (the lower one for an even count, as
    ``torch.median``):

    - ``"outlier_share"``: ``mean_i [n_i > threshold * m]``, the share of outlier patches;
    - ``"max_ratio"``: ``max_i n_i / m``.

    Darcet et al. ("Vision Transformers Need Registers", ICLR 2024) find that large ViTs
    recycle a few low-information patches as global stores, whose norms are about 10x the
    others'; registers remove them. The default ``threshold`` of 2 flags any patch more than
    twice the median; raise it for only the extreme artifacts.

    Args:
        threshold: outlier factor over the median norm (``outlier_share`` only), > 1.
        statistic: ``"outlier_share"`` (default) or ``"max_ratio"``.

    Returns:
        ``[B]`` per image (not per head).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
    >>> x = torch.ones(1, 5, 8); x[0, 4] *= 10          # one of 4 patches is a 10x outlier
    >>> TokenNorms().on_hidden(0, x, lay).tolist(), TokenNorms(statistic="max_ratio").on_hidden(0, x, lay).tolist()
    ([0.25], [10.0])
    """

    name = "token_norms"
    description = "share of patch tokens whose output norm exceeds threshold x the median (high-norm outliers)"
    citation = "Darcet et al. 2024, Vision Transformers Need Registers"
    needs = "hidden"
    reduces = "layer"
    per_head = False
    requires = ()  # block outputs mean the same under windowed attention

    threshold: Annotated[float, Field(gt=1)] = 2.0
    statistic: Literal["outlier_share", "max_ratio"] = "outlier_share"

    unit = property(lambda self: "share of patches" if self.statistic == "outlier_share" else "ratio to median norm")

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The statistic per image of one block's output tokens ``[B, T, D]``: ``[B]``."""
        layout.check(hidden.shape[1], where="hidden states")
        n = hidden[:, layout.num_prefix :].float().norm(dim=-1)  # [B, N]
        med = n.median(dim=-1, keepdim=True).values.clamp_min(torch.finfo(n.dtype).tiny)
        if self.statistic == "max_ratio":
            return (n / med).amax(-1)
        return (n > self.threshold * med).float().mean(-1)


# -- linear CKA with the unbiased minibatch HSIC estimator ------------------------------------------

def features(hidden: torch.Tensor, layout: TokenLayout, pool: str = "mean", where: str = "this model") -> torch.Tensor:
    """One representation per image ``[B, D']`` from block outputs ``[B, T, D]`` (float64).

    Layers may differ in token count and width (a staged model's stages): linear CKA compares
    ``[n, n]`` Gram matrices, so mean-pooled or flattened features of any size compare."""
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


def cka_from_sums(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """``CKA = sum HSIC(K_i, L_j) / sqrt(sum HSIC(K_i, K_i) sum HSIC(L_j, L_j))`` -> ``[La, Lb]``."""
    return xy / torch.sqrt(torch.outer(xx, yy)).clamp_min(torch.finfo(xy.dtype).tiny)


class LinearCKA(Metric):
    """Linear CKA between every pair of layers over the image set (Kornblith et al. 2019).

    Each layer's representation of an image is its patch tokens, mean-pooled (default),
    flattened, or the CLS token; ``K_l = X_l X_l^T`` over a minibatch of ``n`` images. With
    the unbiased HSIC_1 estimator and minibatches as in Nguyen et al. 2021 ("Do Wide and Deep
    Networks Learn the Same Things?")::

        CKA(i, j) = sum_b HSIC_1(K_i^b, K_j^b) / sqrt(sum_b HSIC_1(K_i^b, K_i^b) sum_b HSIC_1(K_j^b, K_j^b))

    a ratio of sums over minibatches ``b`` (not a mean of per-batch ratios), so it is
    independent of the order of batches, and mergeable: the state is the ``[L, L]`` matrix of
    summed HSIC. Invariant to orthogonal transforms and isotropic scaling of each layer's
    features. Minibatches of fewer than 4 images (the estimator's minimum) are skipped with a
    warning: use ``batch_size >= 4`` and mind a short last batch.

    It is one ``[L, L]`` matrix for the whole image set, not a per-image value: ``probe``
    stores it in ``Results.arrays["model/cka"]`` (rows and columns in the order of the layers
    probed) and adds no table rows. Across two models, use :func:`cka_between`.

    Args:
        pool: ``"mean"`` (mean over patch tokens), ``"flatten"`` (all patch tokens, one long
            vector; sensitive to where things are) or ``"cls"``.

    Returns:
        ``result()``: ``{-1: [L, L]}``; ``dataset_result()``: the same as a NumPy array.
    """

    name = "cka"
    description = "linear CKA between layers over the image set (unbiased minibatch HSIC): an [L, L] matrix"
    citation = "Kornblith et al. 2019; Nguyen et al. 2021 (minibatch CKA)"
    needs = "hidden"
    reduces = "batch"
    per_head = False
    #: minibatch HSIC depends on how images are grouped: a part computed at another batch size is not reused
    depends_on = ("batch_size",)
    #: conformance checks (probekit.testing) this metric fails by design, with the reason
    not_applicable_checks = {
        "check_merged_halves": "minibatch HSIC (Nguyen et al. 2021) depends on how images are grouped "
        "into minibatches; merged halves equal one pass over the same minibatches, not one larger batch",
    }

    pool: Pool = "mean"
    requires = property(lambda self: ("cls",) if self.pool == "cls" else ())  # refused before the forward pass

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # the declared state's types (add_state sets the attributes)
        self.xy: torch.Tensor | None
        self.layers: list[int] | None
        self.batches: int
        self.skipped: int
        self.add_state("xy", default=None, reduce="sum")  # [L, L] HSIC_1 summed over minibatches
        self.add_state("layers", default=None, reduce="same")  # the layer of each row and column
        self.add_state("batches", default=0, reduce="sum")
        self.add_state("skipped", default=0, reduce="sum")  # images in minibatches under 4
        self._grams: dict[int, torch.Tensor] = {}  # per-batch scratch, emptied at each batch's end

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> None:
        self._grams[layer] = gram(features(hidden, layout, self.pool, f"layer {layer}"))
        return None

    def on_batch_end(self) -> dict[int, torch.Tensor]:
        grams, self._grams = self._grams, {}
        if grams:
            self.update_grams(grams)
        return {}

    def update_grams(self, grams: dict[int, torch.Tensor]) -> None:
        """Add one minibatch: ``{layer: K [n, n]}`` for every layer."""
        layers = sorted(grams)
        n = grams[layers[0]].shape[-1]
        if n < 4:
            self.skipped += n
            warnings.warn(
                f"cka skipped a minibatch of {n} image(s): the unbiased HSIC needs at least 4. "
                "Use batch_size >= 4 (and a set whose size leaves no short last batch).",
                stacklevel=2,
            )
            return
        if self.layers is not None and layers != self.layers:
            raise ConfigError(f"cka got layers {layers} after {self.layers}; probe the same layers throughout.")
        k = torch.stack([grams[i] for i in layers]).double()
        h = hsic_matrix(k, k).cpu()
        self.xy = h if self.xy is None else self.xy + h
        self.layers = layers
        self.batches += 1

    def result(self) -> dict[int, torch.Tensor]:
        if self.xy is None:
            warnings.warn("LinearCKA.result() called before any minibatch.", stacklevel=2)
            return {}
        d = torch.diagonal(self.xy)
        return {-1: cka_from_sums(self.xy, d, d).float()}

    def dataset_result(self) -> np.ndarray | None:
        """The ``[L, L]`` CKA matrix over everything seen (None before any minibatch); rows and
        columns follow :attr:`layers`."""
        return None if self.xy is None else self.result()[-1].numpy()


def cka_between(model_a, model_b, images, *, batch_size: int = 32, pool: str = "mean",
                layers_a=None, layers_b=None) -> tuple[np.ndarray, list[int], list[int]]:
    """Linear CKA between every layer of one model and every layer of another, on the same images.

    Both models see the same minibatches (each with its own preprocessing), so
    ``HSIC_1(K_i^a, K_j^b)`` is summed per minibatch exactly as :class:`LinearCKA` does within
    one model; ``cka_between(m, m, ...)`` equals that metric's matrix.

    Args:
        model_a, model_b: :class:`~probekit.ProbedModel` instances (or aliases/specs to load).
        images: anything :func:`probekit.resolve_images` takes.
        batch_size: images per minibatch (>= 4; a last batch under 4 images is skipped).
        pool: ``"mean"``, ``"flatten"`` or ``"cls"``, as for :class:`LinearCKA`.
        layers_a, layers_b: layer indices to compare (default: all).

    Returns:
        ``(cka [La, Lb], layers of a, layers of b)``.

    Raises:
        ConfigError: a bad ``pool`` or ``batch_size``, or no minibatch of 4 images.
    """
    from probekit.inputs.images import resolve_images
    from probekit.models import load

    validate_options(LinearCKA, {"pool": pool})
    if batch_size < 4:
        raise ConfigError(f"batch_size must be >= 4 for the unbiased HSIC; got {batch_size}.")
    pms = [load(m) if isinstance(m, str) else m for m in (model_a, model_b)]
    imgs = resolve_images(images)
    loaders = [
        torch.utils.data.DataLoader(imgs.dataset(pm.preprocess, channels=pm.adapter.in_chans), batch_size=batch_size,
                                    shuffle=False)
        for pm in pms
    ]
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # HSIC_1 sums: a with b, a, b
    la: list[int] = []
    lb: list[int] = []
    for (_, xa), (_, xb) in zip(*loaders, strict=True):  # the same images in the same order
        if xa.shape[0] < 4:
            continue
        grams_a, grams_b = [
            _layer_grams(pm, x.to(pm.device), lay_sel, pool)
            for pm, x, lay_sel in ((pms[0], xa, layers_a), (pms[1], xb, layers_b))
        ]
        la, lb = sorted(grams_a), sorted(grams_b)
        ka = torch.stack([grams_a[i] for i in la]).cpu()
        kb = torch.stack([grams_b[i] for i in lb]).cpu()
        parts = (hsic_matrix(ka, kb), torch.diagonal(hsic_matrix(ka, ka)), torch.diagonal(hsic_matrix(kb, kb)))
        sums = parts if sums is None else (sums[0] + parts[0], sums[1] + parts[1], sums[2] + parts[2])
    if sums is None:
        raise ConfigError(f"cka_between needs at least one minibatch of 4 images; got {len(imgs)} image(s).")
    return cka_from_sums(*sums).float().numpy(), la, lb


def _layer_grams(pm, x: torch.Tensor, layers, pool: str) -> dict[int, torch.Tensor]:
    lays = pm.adapter.hidden_layouts(x)  # staged models: each block's own grid
    return {i: gram(features(h, lays[i], pool, f"layer {i}")) for i, h in pm.hidden_states(x, layers=layers).items()}
