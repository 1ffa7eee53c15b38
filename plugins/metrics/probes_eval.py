"""The evaluations behind the representation probes (:mod:`.probes`): seeded stratified splits,
DINO's weighted k-NN vote, a standardised logistic regression with C chosen by inner
cross-validation, and k-means agreement with the labels. Pure functions of ``(features, labels)``;
the metrics keep the features and call these once every image is in.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from probekit.errors import ConfigError

__all__ = ["encode", "splits", "knn_predict", "logistic_predict", "choose_c", "cluster_scores"]


def encode(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Label strings -> ``(classes sorted, codes [N])``: the same codes whatever order images came in."""
    classes, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return classes, codes.astype(np.int64)


def splits(codes: np.ndarray, split: str, folds: int, test_share: float, seed: int,
           who: str = "probe") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seeded, stratified ``(train, test)`` index pairs: ``folds`` of k-fold, or one holdout split.

    Raises:
        ConfigError: fewer than two classes, or a class too small for the split.
    """
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    counts = np.bincount(codes)
    if len(counts) < 2:
        raise ConfigError(f"{who}: the images have {len(counts)} class label(s); a probe needs at least two classes.")
    need = folds if split == "kfold" else 2
    if counts.min() < need:
        raise ConfigError(
            f"{who}: the smallest class has {counts.min()} image(s), fewer than the {need} that split={split!r}"
            + (f" with folds={folds}" if split == "kfold" else "") + " needs; give more images per class"
            + (" or fewer folds." if split == "kfold" else "."))
    dummy = np.zeros(len(codes))
    if split == "kfold":
        yield from StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(dummy, codes)
    else:
        test = max(len(counts), int(round(test_share * len(codes))))  # at least one test image per class
        yield from StratifiedShuffleSplit(n_splits=1, test_size=test, random_state=seed).split(dummy, codes)


def knn_predict(train: torch.Tensor, train_codes: np.ndarray, test: torch.Tensor, k: int, temperature: float,
                num_classes: int) -> np.ndarray:
    """DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``): cosine similarity of L2-normalised
    features, the ``k`` most similar training images vote for their class with weight
    ``exp(sim / temperature)``; the class with the largest summed vote wins (the lowest class code
    on a tie). ``k`` larger than the training set means all of it. Returns codes ``[n_test]``."""
    a = torch.nn.functional.normalize(train.float(), dim=1)
    b = torch.nn.functional.normalize(test.float(), dim=1)
    sim = b @ a.T
    k = min(k, a.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(b.shape[0], num_classes, dtype=torch.float64)
    codes = torch.as_tensor(train_codes)[idx]
    votes.scatter_add_(1, codes, (top.double() / temperature).exp())
    return votes.argmax(1).numpy()


def one_blas_thread():
    """A context in which NumPy's and scikit-learn's BLAS (OpenBLAS, MKL) run one thread.

    Why: the probes' fits are small (hundreds to thousands of images x a few hundred features),
    where BLAS threads cost more than they give, and beside torch's own threads they oversubscribe
    the cores: on this project's 2-core VM under load, each LogisticRegression fit on 1,437 x 384
    took 6-9 s with OpenBLAS's 2 threads against 0.4-0.8 s with one (issue 23's digits runs).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _pipeline(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def choose_c(x: np.ndarray, codes: np.ndarray, grid: Sequence[float], inner: int, seed: int, max_iter: int) -> float:
    """The C of ``grid`` with the best mean accuracy over ``inner`` seeded stratified folds of the
    training images (standardisation fitted within each inner fold); the smallest C on a tie (more
    regularisation). One C when the grid has one, or a class is too small for the inner folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if len(grid) == 1 or np.bincount(codes).min() < inner:
        return float(min(grid))
    cv = StratifiedKFold(n_splits=inner, shuffle=True, random_state=seed)
    scores = []
    for c in sorted(grid):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs' ConvergenceWarning at max_iter: the score still counts
            scores.append(cross_val_score(_pipeline(c, max_iter), x, codes, cv=cv).mean())
    return float(sorted(grid)[int(np.argmax(scores))])


def logistic_predict(train: np.ndarray, train_codes: np.ndarray, test: np.ndarray, c: float,
                     max_iter: int) -> np.ndarray:
    """Multinomial logistic regression (L2, lbfgs) on standardised features (the scaler fitted on
    the training images): predicted codes ``[n_test]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _pipeline(c, max_iter).fit(train, train_codes)
    return model.predict(test)


def cluster_scores(x: torch.Tensor, codes: np.ndarray, seed: int, n_init: int) -> tuple[float, float]:
    """k-means (k = number of classes, ``n_init`` seeded starts) on L2-normalised features, against
    the labels: ``(NMI, ARI)`` (scikit-learn's ``normalized_mutual_info_score``, arithmetic mean, and
    ``adjusted_rand_score``)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    z = torch.nn.functional.normalize(x.float(), dim=1).double().numpy()
    k = int(codes.max()) + 1
    found = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)
    return float(normalized_mutual_info_score(codes, found)), float(adjusted_rand_score(codes, found))
