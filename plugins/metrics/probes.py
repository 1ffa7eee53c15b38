"""Representation probes per layer on labelled image sets: what each layer's features know.

Each metric reads every block's output tokens (the residual stream, ``needs = "hidden"``), keeps
one feature vector per image and layer, and, once every image is in, evaluates them against the
images' class labels (``needs_labels``; a set without labels is refused before the forward pass):

- ``knn``: DINO's weighted k-NN accuracy (Caron et al. 2021; k = 20, T = 0.07);
- ``linear_probe``: a multinomial logistic regression on standardised features, C chosen by
  inner cross-validation;
- ``clusters``: k-means with k = the number of classes against the labels (NMI, ARI).

k-NN and the linear probe are evaluated by seeded, stratified k-fold cross-validation (default) or
one holdout split; each image's value per layer is 1.0 where its held-out prediction (from the
fold that tested it) was right, else 0.0, so the table's mean per layer is the accuracy and its CI
over images and the group contrasts come from the summaries as for any metric. With a holdout
split only test images have rows. ``dataset_result()`` is the per-fold accuracy ``[L, folds]``
(``Results.arrays["<model>/<label>"]``, layers in the order probed). Chance is the majority class's
share of the labels (the table's ``label`` column has them).

**The feature store.** Features are kept per image and layer in declared state as float16
(``reduce="cat"``), so partial states merge across batches, processes and Ray shards exactly, in
image order. Memory grows as images x layers x width x 2 bytes (1,797 images x 12 layers x 384 make
16,561,152 B; measured, with the projection's accuracy change on the digits: benchmarks/RESULTS.md,
section "Probe feature store: memory and the random projection's accuracy change"); ``dim`` projects
each layer's features to ``dim`` columns with a seeded Gaussian matrix
(``N(0, 1/dim)``, the same on every shard and process) before they are stored, for wide models;
``max_mb`` bounds the store and a run that would pass it stops with an error naming both.
"""

from __future__ import annotations

import functools
import warnings
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from probekit.errors import ConfigError
from probekit.metric import Metric
from probekit.tokens import TokenLayout

from .probes_eval import choose_c, cluster_scores, encode, knn_predict, logistic_predict, one_blas_thread, splits

__all__ = ["FeatureProbe", "HeldOutProbe", "KnnProbe", "LinearProbe", "ClusterProbe", "pooled", "projection"]

Features = Literal["cls", "mean", "registers"]


def pooled(hidden: torch.Tensor, layout: TokenLayout, features: str, who: str = "probe") -> torch.Tensor:
    """One vector per image ``[B, D]`` from block outputs ``[B, T, D]``: the class token, the mean
    of the patch tokens, or the mean of the register tokens (``layout.prefix_kinds == "reg"``)."""
    kinds = layout.prefix_kinds
    if features == "cls":
        if "cls" not in kinds:
            raise ConfigError(f"{who}: features='cls' needs a class token, but this model outputs "
                              f"{layout.describe()}. Use features='mean'.")
        return hidden[:, kinds.index("cls")]
    if features == "registers":
        regs = [i for i, k in enumerate(kinds) if k == "reg"]
        if not regs:
            raise ConfigError(f"{who}: features='registers' needs register tokens, but this model outputs "
                              f"{layout.describe()}. Use features='mean' (or 'cls').")
        return hidden[:, regs].mean(1)
    return hidden[:, layout.num_prefix:].mean(1)


@functools.lru_cache(maxsize=16)
def projection(width: int, dim: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian random projection ``[width, dim]``, entries ``N(0, 1/dim)`` (Johnson-
    Lindenstrauss): the same matrix in every process for the same ``(width, dim, seed)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + width)
    return torch.randn(width, dim, generator=g, dtype=torch.float64).div_(dim ** 0.5).float()


class FeatureProbe(Metric):
    """The feature store every probe shares (not a metric on its own: see :mod:`.probes`).

    Options: ``features`` (``"cls"``, ``"mean"`` of patch tokens, ``"registers"``), ``seed`` (the
    split's, the projection's and k-means'), ``dim`` (random projection width, None: off) and
    ``max_mb`` (the store's bound).
    """

    needs = "hidden"
    reduces = "batch"
    per_head = False
    needs_labels = True
    whole_set = True
    unit = "accuracy"

    features: Features = "mean"
    seed: Annotated[int, Field(ge=0)] = 0
    dim: Annotated[int | None, Field(ge=1, examples=[64])] = None
    max_mb: Annotated[float, Field(gt=0)] = 2048.0

    requires = property(lambda self: ("cls",) if self.features == "cls" else ())  # refused before the forward pass
    not_applicable_checks = {
        "check_batch_order_invariance": "the values compare images through seeded choices made by position in "
        "the set (the stratified folds, k-means' initial centres): a permuted set is another split or start",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.feats: dict[int, list[torch.Tensor]]
        self.labels: list[str]
        self.nbytes: int
        self.add_state("feats", default={}, reduce="cat")  # {layer: [float16 [B, D] per batch]}
        self.add_state("nbytes", default=0, reduce="sum")  # the store's size: what max_mb bounds
        self.add_state("labels", default=[], reduce="cat")  # each image's label, in the order seen
        self._done: tuple[Any, Any] | None = None  # (state size, evaluation): per_image and dataset_result share it

    def on_labels(self, labels: list[str]) -> None:
        self.labels.extend(str(v) for v in labels)
        self._done = None

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> None:
        layout.check(hidden.shape[1], where="hidden states")
        x = pooled(hidden, layout, self.features, f"metric {self.name!r}").float()
        if self.dim is not None:
            x = x @ projection(x.shape[1], self.dim, self.seed).to(x.device)
        x = x.cpu()
        if not torch.isfinite(x.half()).all() and torch.isfinite(x).all():
            raise ConfigError(f"metric {self.name!r}: layer {layer}'s features exceed float16's range (the store's "
                              "type); probe fewer layers (layers=[...]) or set dim to project them.")
        self.feats.setdefault(layer, []).append(x.half())
        self.nbytes += x.numel() * 2
        self._done = None
        mb = self.nbytes / 2**20
        if mb > self.max_mb:
            raise ConfigError(
                f"metric {self.label!r}: its feature store reached {mb:.0f} MB, over max_mb={self.max_mb:g} (images x "
                "layers x width x 2 bytes). Set dim (a random projection width, e.g. dim=256), probe fewer layers "
                "or images, or raise max_mb.")
        return None

    def reset(self) -> None:
        super().reset()
        self._done = None

    def merge(self, other: Metric | dict) -> Metric:
        super().merge(other)
        self._done = None
        return self

    # -- the evaluation, once every image is in ------------------------------------------------------
    def stored(self) -> tuple[list[int], dict[int, torch.Tensor], np.ndarray, np.ndarray]:
        """``(layers, {layer: features [N, D] float32}, classes, codes [N])`` of everything seen."""
        layers = sorted(self.feats)
        x = {layer: torch.cat(self.feats[layer]).float() for layer in layers}
        for layer in layers:
            if len(x[layer]) != len(self.labels):
                raise RuntimeError(f"{self.label}: layer {layer} has {len(x[layer])} images but {len(self.labels)} "
                                   "labels (labels reach the metric in on_labels at each batch's start)")
        classes, codes = encode(self.labels)
        return layers, x, classes, codes

    def evaluate(self) -> Any:
        """The evaluation of the whole store (computed once per state; see the subclasses)."""
        raise NotImplementedError

    def _evaluated(self) -> Any:
        key = (len(self.labels), tuple(sorted(self.feats)))
        if self._done is None or self._done[0] != key:
            self._done = (key, self.evaluate())
        return self._done[1]

    def result(self) -> dict[int, torch.Tensor]:
        if not self.feats:
            warnings.warn(f"{type(self).__name__}.result() called before any update.", stacklevel=2)
            return {}
        return {layer: v.double().nanmean(0).float() for layer, v in self.per_image().items()}


class HeldOutProbe(FeatureProbe):
    """A supervised probe evaluated on held-out images: seeded stratified ``split`` (``"kfold"``
    with ``folds`` folds, or ``"holdout"`` with ``test_share`` of the images tested)."""

    split: Literal["kfold", "holdout"] = "kfold"
    folds: Annotated[int, Field(ge=2)] = 5
    test_share: Annotated[float, Field(gt=0, lt=1, examples=[0.5])] = 0.25

    @property
    def not_applicable_checks(self) -> dict[str, str]:  # type: ignore[override]
        """The kit's batch (6 images, 3 per class) is too small for more than 3 folds; those checks
        are run with folds=2 by tests/test_probes.py, and on 60 images there."""
        if self.split != "kfold" or self.folds <= 3:
            return dict(FeatureProbe.not_applicable_checks)
        why = (f"folds={self.folds} needs {self.folds} images per class and the kit's batch has 3 per class "
               "(tests/test_probes.py runs the kit with folds=2, and merges and round trips on 60 images)")
        return {"check_merged_halves": why, "check_state_dict_round_trip": why, "check_batch_size_invariance": why,
                **FeatureProbe.not_applicable_checks}

    def check_labels(self, labels: list[str]) -> None:
        """The split must be possible: two classes or more, each with ``folds`` images (2 for a holdout)."""
        next(splits(encode(labels)[1], self.split, self.folds, self.test_share, self.seed, f"metric {self.label!r}"))

    def predict(self, train: torch.Tensor, train_codes: np.ndarray, test: torch.Tensor, num_classes: int,
                fold: int) -> np.ndarray:
        """Predicted codes of the ``test`` images from the ``train`` images."""
        raise NotImplementedError

    def evaluate(self) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        """``({layer: [N] 1.0 right / 0.0 wrong / NaN untested}, fold accuracies [L, folds])``."""
        layers, x, classes, codes = self.stored()
        parts = list(splits(codes, self.split, self.folds, self.test_share, self.seed, f"metric {self.label!r}"))
        per_image, accs = {}, np.zeros((len(layers), len(parts)))
        with one_blas_thread():
            for i, layer in enumerate(layers):
                right = torch.full((len(codes),), float("nan"))
                for f, (tr, te) in enumerate(parts):
                    hit = self.predict(x[layer][tr], codes[tr], x[layer][te], len(classes), f) == codes[te]
                    right[te] = torch.as_tensor(hit, dtype=torch.float32)
                    accs[i, f] = hit.mean()
                per_image[layer] = right
        return per_image, accs

    def per_image(self) -> dict[int, torch.Tensor]:
        """Per layer, each image's held-out correctness (1.0 / 0.0; NaN: a training image of a holdout split)."""
        return dict(self._evaluated()[0]) if self.feats else {}

    def dataset_result(self) -> np.ndarray | None:
        """The per-fold accuracies ``[L, folds]`` (``[L, 1]`` for a holdout split)."""
        return self._evaluated()[1] if self.feats else None


class KnnProbe(HeldOutProbe):
    """DINO's weighted k-NN accuracy per layer (Caron et al. 2021, ``eval_knn.py``).

    Features are L2-normalised; each held-out image's ``k`` most cosine-similar training images
    vote for their class with weight ``exp(sim / temperature)``; the largest summed vote is the
    prediction. ``k = 20`` and ``T = 0.07`` are DINO's. Values: 1.0 / 0.0 per held-out image.
    """

    name = "knn"
    display_name = "k-NN accuracy"
    description = "DINO's weighted k-NN accuracy of each layer's features on held-out images (cosine, k=20, T=0.07)"
    citation = "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers (k-NN evaluation)"

    k: Annotated[int, Field(ge=1)] = 20
    temperature: Annotated[float, Field(gt=0, examples=[0.1])] = 0.07

    def predict(self, train, train_codes, test, num_classes, fold):
        return knn_predict(train, train_codes, test, self.k, self.temperature, num_classes)


class LinearProbe(HeldOutProbe):
    """A linear probe per layer: multinomial logistic regression (scikit-learn, L2, lbfgs) on
    features standardised on the training images, with C chosen from ``cs`` by ``inner_folds``-fold
    seeded stratified cross-validation within each training fold. Values: 1.0 / 0.0 per held-out image.
    """

    name = "linear_probe"
    display_name = "linear-probe accuracy"
    description = "multinomial logistic regression accuracy of each layer's features on held-out images"
    citation = "Alain & Bengio 2017, Understanding intermediate layers using linear classifier probes"

    cs: Annotated[tuple[float, ...], Field(min_length=1, examples=[(1.0,), (0.1, 1.0)])] = (0.01, 0.1, 1.0)
    inner_folds: Annotated[int, Field(ge=2)] = 3
    max_iter: Annotated[int, Field(ge=1)] = 1000

    def predict(self, train, train_codes, test, num_classes, fold):
        xtr, xte = train.double().numpy(), test.double().numpy()
        c = choose_c(xtr, train_codes, self.cs, self.inner_folds, self.seed + fold, self.max_iter)
        return logistic_predict(xtr, train_codes, xte, c, self.max_iter)


class ClusterProbe(FeatureProbe):
    """Clustering agreement per layer: k-means (k = the number of classes, ``n_init`` seeded starts)
    on L2-normalised features against the labels, as NMI and ARI.

    A dataset-level result with no table rows: ``dataset_result()`` is ``[L, 2]`` (NMI, ARI; layers in
    the order probed), ``result()`` ``{layer: [NMI, ARI]}``.
    """

    name = "clusters"
    display_name = "k-means agreement"
    description = "k-means (k = classes) on each layer's features against the labels: NMI and ARI"
    citation = "Walmer et al. 2023, Teaching Matters (k-means cluster purity of ViT features)"
    unit = "NMI, ARI"

    n_init: Annotated[int, Field(ge=1)] = 10

    def check_labels(self, labels: list[str]) -> None:
        if len(set(labels)) < 2:
            raise ConfigError(f"metric {self.label!r}: the images have one class label; clustering needs two or more.")

    def evaluate(self) -> np.ndarray:
        layers, x, classes, codes = self.stored()
        if len(classes) < 2:
            raise ConfigError(f"metric {self.label!r}: the images have one class label; clustering needs two or more.")
        with one_blas_thread():
            return np.array([cluster_scores(x[layer], codes, self.seed, self.n_init) for layer in layers])

    def per_image(self) -> dict[int, torch.Tensor]:
        return {}  # a dataset-level result: no rows

    def result(self) -> dict[int, torch.Tensor]:
        if not self.feats:
            warnings.warn(f"{type(self).__name__}.result() called before any update.", stacklevel=2)
            return {}
        return {layer: torch.as_tensor(v, dtype=torch.float32)
                for layer, v in zip(sorted(self.feats), self._evaluated(), strict=True)}

    def dataset_result(self) -> np.ndarray | None:
        """``[L, 2]``: NMI and ARI per layer."""
        return self._evaluated() if self.feats else None
