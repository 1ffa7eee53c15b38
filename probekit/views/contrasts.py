"""Statistics between groups of models: is a difference in a metric real or noise?

Every model of a comparison saw the same images: per metric and layer, each model's per-image
value (mean over heads) is averaged within a group of models (training kind by default), and the
groups are compared. The CI, the p-value and the effect size of a row answer one question, the
run file's ``report.inference`` (column ``inference``):

- ``images`` (the default): for *these* models, is the group difference non-zero on average over
  images like these? The unit is the image, the data the per-image differences of group means
  ``d``: a paired t-interval of ``mean(d)`` (nominal coverage at small n, as summary.csv's CIs), a
  paired permutation (sign-flip) test of ``d`` (exact when the ``2**n`` sign patterns fit in the
  budget), and Cohen's d_z (``mean(d) / sd(d)``). Models are held fixed: two groups of models that
  differ only by chance (their own seeds) still differ here, and rightly so for this question.
- ``models``: the models of each group as a random sample of such models; do the groups differ
  on average over models like these (each model's mean over these images)? The unit is the model:
  a Welch t-interval and t-test of the per-model means (Student's pooled t when a group holds one
  model; no CI or p with fewer than three models), and Cohen's d of the per-model means.

Holm's correction runs across the layers of a metric and pair. ``p_floor`` and ``p_holm_floor``
are the smallest p and Holm p the test can give on data of this size (``2 / 2**n`` for the exact
sign-flip test of n images; ``m`` times that after Holm over ``m`` layers; 0 for a t-test): a p at
its floor says the evidence is as strong as this many images can show, never "no difference".

numpy does the enumeration (vectorised over sign patterns and layers); nothing here imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = ["paired_t_ci", "model_t", "paired_permutation_p", "sign_flip_floor", "holm", "cohens_dz", "pair_stats",
           "contrasts", "per_image_layer", "image_layer_means", "layer_cube", "model_groups", "format_contrast",
           "contrast_header", "contrast_note", "at_floor", "CONTRAST_COLUMNS", "INFERENCE"]

Inference = Literal["images", "models"]
INFERENCE: tuple[Inference, ...] = ("images", "models")

CONTRAST_COLUMNS = [
    "metric", "unit", "layer", "group_a", "group_b", "models_a", "models_b", "n_images", "inference",
    "mean_a", "mean_b", "diff", "ci_low", "ci_high", "df", "p", "p_floor", "p_holm", "p_holm_floor",
    "effect_dz", "effect_d", "test", "n_perm",
]


# -- the maths on arrays -------------------------------------------------------------------------
def _t_interval(mean: np.ndarray, se: np.ndarray, df: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy import stats  # a dependency; imported here so the CLI starts without it

    half = stats.t.ppf(0.5 + level / 2, df) * se
    return mean - half, mean + half


def paired_t_ci(d: np.ndarray, *, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student t-interval of ``mean(d)`` per column of the paired differences ``d`` ``[images, layers]``.

    ``mean(d) +- t(n - 1) * sd(d) / sqrt(n)``: nominal coverage for normal differences at any n
    (a percentile bootstrap covers 0.87 at n = 6). NaN with fewer than two images.

    >>> lo, hi = paired_t_ci(np.array([[1.0], [2.0], [3.0]]))   # mean 2, se 1/sqrt(3), t(2) = 4.303
    >>> round(float(lo[0]), 3), round(float(hi[0]), 3)
    (-0.484, 4.484)
    """
    d = np.asarray(d, float)
    if d.ndim == 1:
        d = d[:, None]
    n = d.shape[0]
    if n < 2:
        nan = np.full(d.shape[1:], np.nan)
        return nan, nan.copy()
    return _t_interval(d.mean(axis=0), d.std(axis=0, ddof=1) / np.sqrt(n), n - 1, level)


def model_t(ya: np.ndarray, yb: np.ndarray, *, level: float = 0.95) -> dict[str, Any]:
    """Two-sample t statistics of per-model means, models as a random sample of each group.

    Args:
        ya, yb: ``[models, layers]`` each model's mean over the images.

    Returns:
        ``diff, ci_low, ci_high, p, df, effect_d`` (each ``[layers]``) and ``test``. Welch's t when
        both groups hold two models or more; Student's pooled t when one holds a single model (its
        spread is then taken to be the other group's); all NaN with fewer than three models.
        ``effect_d`` is Cohen's d: the difference over the pooled SD of the per-model means.
    """
    from scipy import stats

    ya, yb = np.asarray(ya, float), np.asarray(yb, float)
    ma, mb = ya.shape[0], yb.shape[0]
    diff = ya.mean(axis=0) - yb.mean(axis=0)
    nan = np.full(diff.shape, np.nan)
    if ma + mb < 3:
        return {"diff": diff, "ci_low": nan, "ci_high": nan, "p": nan, "df": nan, "effect_d": nan,
                "test": f"none: inference over models needs 3 models or more ({ma} + {mb})"}
    va = ya.var(axis=0, ddof=1) if ma > 1 else np.zeros_like(diff)
    vb = yb.var(axis=0, ddof=1) if mb > 1 else np.zeros_like(diff)
    pooled = ((ma - 1) * va + (mb - 1) * vb) / (ma + mb - 2)
    if ma > 1 and mb > 1:
        se = np.sqrt(va / ma + vb / mb)
        with np.errstate(divide="ignore", invalid="ignore"):
            df = se**4 / ((va / ma) ** 2 / (ma - 1) + (vb / mb) ** 2 / (mb - 1))
        df = np.where(np.isfinite(df), df, ma + mb - 2)  # both spreads 0: the pooled df
        test = "Welch t of the per-model means"
    else:
        se = np.sqrt(pooled * (1 / ma + 1 / mb))
        df = np.full(diff.shape, float(ma + mb - 2))
        test = "Student t (pooled) of the per-model means"
    lo, hi = _t_interval(diff, se, df, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(diff) / se
        p = np.where(se > 0, 2 * stats.t.sf(t, df), np.where(diff == 0, 1.0, 0.0))
        effect = np.where(pooled > 0, diff / np.sqrt(pooled), np.nan)
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "p": p, "df": df, "effect_d": effect, "test": test}


def paired_permutation_p(d: np.ndarray, *, n_perm: int = 10000,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Two-sided sign-flip permutation p-value of ``mean(d) == 0`` per column of ``d`` ``[images, layers]``.

    Under the null the two groups are exchangeable on each image, so each image's difference
    keeps or flips its sign. All ``2**n`` patterns are used when they fit in ``n_perm`` (an exact
    test); otherwise ``n_perm`` random patterns, with ``p = (1 + #{|T*| >= |T|}) / (1 + n_perm)``.
    """
    rng = rng or np.random.default_rng(0)
    d = np.asarray(d, float)
    if d.ndim == 1:
        d = d[:, None]
    n = d.shape[0]
    obs = np.abs(d.mean(axis=0))
    tol = 1e-12 * np.maximum(1.0, obs)
    if 2**n <= n_perm:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # every pattern, identity included
        stats = np.abs(signs @ d) / n
        return (stats >= obs - tol).mean(axis=0)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, n))
    stats = np.abs(signs @ d) / n
    return (1 + (stats >= obs - tol).sum(axis=0)) / (1 + n_perm)


def sign_flip_floor(n: int, n_perm: int = 10000) -> float:
    """The smallest p :func:`paired_permutation_p` can give for ``n`` images: ``2 / 2**n`` when the
    test is exact (only the observed pattern and its mirror reach the largest ``|mean|``), else
    ``1 / (1 + n_perm)``.

    >>> sign_flip_floor(6), sign_flip_floor(20, n_perm=9999)
    (0.03125, 0.0001)
    """
    return 2 / 2**n if 2**n <= n_perm else 1 / (1 + n_perm)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaNs are left out of the family)."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def cohens_dz(d: np.ndarray) -> np.ndarray:
    """Paired effect size per column: mean of the differences over their SD (NaN when SD is 0 or n < 2)."""
    d = np.asarray(d, float)
    if d.shape[0] < 2:
        return np.full(d.shape[1:], np.nan)
    sd = d.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, d.mean(axis=0) / sd, np.nan)


# -- from Results ------------------------------------------------------------------------------------
def per_image_layer(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``model x image x layer`` mean over heads for one metric (the unit the statistics work on)."""
    t = table[table["metric"].astype(str) == metric]
    if (t["head"] >= 0).any():
        t = t[t["head"] >= 0]
    return t.groupby([t["model"].astype(str), t["image"].astype(str), "layer"], observed=True)["value"].mean()


def image_layer_means(results, metric: str) -> pd.Series:
    """:func:`per_image_layer` of ``results``; of results on disk (a run's dataset), read one part at a time."""
    if getattr(results, "source", None) is not None:
        return results.source.per_image_layer(metric)
    return per_image_layer(results.table, metric)


def layer_cube(results, metric: str) -> pd.DataFrame:
    """``(model, image) x layer``: each model's per-image mean over heads of ``metric`` (empty when it
    has no rows). Of results on disk, built a model at a time from its parts: never a long table of
    every model's per-image values (20 models x 50,000 images x 12 layers are 12 M of them)."""
    source = getattr(results, "source", None)
    if source is None:
        s = per_image_layer(results.table, metric)
        return s.unstack(["layer"]) if not s.empty else pd.DataFrame()
    scan = source.filter(metrics=[metric])
    heads = scan.has_heads()  # decided for the metric, as one table of every model decides it
    pieces = {}
    for m in scan.models:
        s = scan.filter(models=[m]).per_image_layer(metric, heads=heads)
        if not s.empty:
            pieces[m] = s.droplevel("model").unstack("layer")
    if not pieces:
        return pd.DataFrame()
    return pd.concat(pieces, names=["model", "image"]).sort_index().sort_index(axis=1)


def model_groups(meta: Mapping, models: list[str], by: str = "training") -> dict[str, str]:
    """``{model: group}`` from the run's per-model record (``training`` or a tag named ``by``)."""
    per = meta.get("models") or {}
    out = {}
    for m in models:
        rec = per.get(m) or {}
        tags = rec.get("tags") or {}
        val = tags.get(by) if by in tags else rec.get(by)
        if val is None and by == "training":
            val = (rec.get("model_meta") or {}).get("training")
        out[m] = str(val) if val is not None else "unknown"
    return out


def pair_stats(xa: np.ndarray, xb: np.ndarray, *, inference: Inference = "images", n_perm: int = 10000,
               level: float = 0.95, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The statistics of one pair of groups, per layer (a Holm family), in the scope ``inference``.

    Args:
        xa, xb: ``[models, images, layers]`` per-image values of the two groups, images aligned.

    Returns:
        ``diff, ci_low, ci_high, df, p, p_holm, effect_dz, effect_d`` (each ``[layers]``) and the
        scalars ``p_floor, p_holm_floor, test, n_perm`` (sign patterns used; 0 for a t-test).
    """
    if inference not in INFERENCE:
        raise ValueError(f"inference must be one of {', '.join(INFERENCE)}, not {inference!r}")
    xa, xb = np.asarray(xa, float), np.asarray(xb, float)
    n = xa.shape[1]
    nan = np.full(xa.shape[2:], np.nan)
    if inference == "images":
        d = xa.mean(0) - xb.mean(0)  # per-image difference of group means [images, layers]
        lo, hi = paired_t_ci(d, level=level)
        p = paired_permutation_p(d, n_perm=n_perm, rng=rng)
        exact = 2**n <= n_perm
        out = {"diff": d.mean(0), "ci_low": lo, "ci_high": hi, "df": np.full(nan.shape, n - 1.0), "p": p,
               "effect_dz": cohens_dz(d), "effect_d": nan, "p_floor": sign_flip_floor(n, n_perm),
               "n_perm": 2**n if exact else n_perm,
               "test": f"exact sign-flip (2^{n} patterns)" if exact else f"sign-flip ({n_perm} random patterns)"}
    else:
        out = model_t(xa.mean(1), xb.mean(1), level=level)
        out.update(effect_dz=nan, p_floor=0.0, n_perm=0)
    out["p_holm"] = holm(out["p"])
    family = int(np.isfinite(out["p"]).sum())
    out["p_holm_floor"] = min(1.0, family * out["p_floor"]) if family else float("nan")
    return out


def contrasts(results, groups: Mapping[str, str] | None = None, *, by: str = "training",
              inference: Inference = "images", n_perm: int = 10000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Every pair of model groups, per metric and layer: :data:`CONTRAST_COLUMNS`.

    Args:
        results: :class:`~probekit.results.Results` of a comparison (all models on one image set).
        groups: ``{model: group}``; default read from the results' metadata (``by``).
        inference: ``images`` (these models, images as the sample) or ``models`` (models as a
            sample of their group): what the CI, p and effect size generalise over (module docs).
        n_perm, level, seed: permutation budget, CI coverage, and the seed (results are reproducible).

    Returns:
        One row per metric x layer x pair of groups (empty when there are fewer than two groups).
        Only images every model of both groups has are used; layers some model lacks are skipped.
    """
    models = results.models
    groups = dict(groups) if groups is not None else model_groups(results.meta, models, by)
    names = list(dict.fromkeys(groups[m] for m in models if m in groups))
    units = {k: (v or {}).get("unit") for k, v in (results.meta.get("metrics") or {}).items()}
    rows: list[dict] = []
    for metric in results.metrics:
        cube = layer_cube(results, metric)  # (model, image) x layer
        if cube.empty:
            continue
        for ga, gb in itertools.combinations(names, 2):
            ma = [m for m in models if groups.get(m) == ga]
            mb = [m for m in models if groups.get(m) == gb]
            rows += _pair_rows(cube, metric, units.get(metric), ga, gb, ma, mb, inference, n_perm, level,
                               np.random.default_rng([seed, len(rows)]))
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def _pair_rows(cube: pd.DataFrame, metric, unit, ga, gb, ma, mb, inference, n_perm, level, rng) -> list[dict]:
    sub = cube.loc[cube.index.get_level_values(0).isin(ma + mb)]
    sub = sub.dropna(axis=1, how="any")  # layers every model has
    per_model = {m: sub.xs(m, level=0) for m in ma + mb if m in sub.index.get_level_values(0)}
    if not sub.shape[1] or any(m not in per_model for m in ma + mb):
        return []
    images = sorted(set.intersection(*(set(v.index) for v in per_model.values())))
    if not images:
        return []
    layers = list(sub.columns)
    xa = np.stack([per_model[m].loc[images, layers].to_numpy() for m in ma])
    xb = np.stack([per_model[m].loc[images, layers].to_numpy() for m in mb])
    st = pair_stats(xa, xb, inference=inference, n_perm=n_perm, level=level, rng=rng)
    out = []
    for j, layer in enumerate(layers):
        row: dict[str, Any] = {
            "metric": metric, "unit": unit, "layer": int(layer), "group_a": ga, "group_b": gb,
            "models_a": len(ma), "models_b": len(mb), "n_images": len(images), "inference": inference,
            "mean_a": float(xa[:, :, j].mean()), "mean_b": float(xb[:, :, j].mean()),
        }
        row.update({k: float(st[k][j]) for k in ("diff", "ci_low", "ci_high", "df", "p", "p_holm", "effect_dz",
                                                  "effect_d")})
        row.update({k: st[k] for k in ("p_floor", "p_holm_floor", "test", "n_perm")})
        out.append(row)
    return out


def at_floor(p: float, floor: float) -> bool:
    """Whether ``p`` is its test's smallest attainable value (a floor above 0 only)."""
    return bool(floor > 0 and np.isfinite(p) and p <= floor * (1 + 1e-9))


def contrast_header(rows: pd.DataFrame) -> str:
    """What the rows of one metric and pair answer, in words (the CLI's line above them)."""
    r = rows.iloc[0]
    n, m = int(r["n_images"]), int(np.isfinite(rows["p"].to_numpy(float)).sum())
    if not m:
        return f"inference over {r['inference']}: {r['test']}; no CI or p"
    if r["inference"] == "models":
        return (f"inference over models as a sample, {int(r['models_a'])} vs {int(r['models_b'])} models on "
                f"{n} images: 95% t-CI; p: {r['test']}, Holm over {m} layers")
    return (f"inference over images for these models: 95% t-CI; p: {r['test']}, Holm over {m} layers; with {n} "
            f"images no p can go below {r['p_floor']:.3g}, no Holm p below {r['p_holm_floor']:.3g}")


def contrast_note(table: pd.DataFrame) -> str:
    """What a table's contrasts answer and the floors of their p-values, for the report."""
    if table is None or not len(table):
        return ""
    out = []
    for inference, rows in table.groupby("inference", sort=False):
        if inference == "models":
            out.append("Inference over models as a sample (run file report.inference: models): the 95% t-interval, "
                       "the t-test p (Welch's; Student's pooled when a group holds one model) and Cohen's d use each "
                       "model's mean over the images, the models of a group being a random sample of such models; "
                       "they say whether models like these differ, on this image set. A pair with fewer than three "
                       "models has no CI or p. A t-test has no floor.")
            continue
        out.append("Inference over images for these models (run file report.inference: images): the 95% t-interval "
                   "of the per-image differences, the paired sign-flip p and d_z say whether these particular "
                   "models differ on images like these; groups whose models differ only by chance (seeds) still "
                   "differ here (report.inference: models asks about models as a sample).")
        for (n, pf, hf), _ in rows.groupby(["n_images", "p_floor", "p_holm_floor"], sort=False):
            out.append(f"With {n} images no p can go below {pf:.3g} and, after Holm across the layers, no p (Holm) "
                       f"below {hf:.3g}: a p (Holm) marked \u201cfloor\u201d is the strongest evidence {n} images "
                       "can give, not a sign of no difference." + (" Probe more images for stronger evidence."
                                                                    if hf >= 0.05 else ""))
    return " ".join(out)


def format_contrast(row: Mapping) -> str:
    """One line for the CLI, e.g. ``layer 3: self-supervised 49.2 px vs random init 115.7 px, diff -66.5
    [-69.4, -62.8], p_holm 0.375 (floor 0.375 with 6 images: the smallest possible)``."""
    unit = f" {row['unit']}" if row.get("unit") else ""

    def f(x: float) -> str:
        return f"{x:#.3g}" if abs(x) < 10 else f"{x:.1f}"

    ph = row["p_holm"]
    if not np.isfinite(ph):
        evidence = "no CI or p"
    else:
        evidence = f"[{f(row['ci_low'])}, {f(row['ci_high'])}], p_holm {ph:.3g}"
        if at_floor(ph, row.get("p_holm_floor", 0.0)):
            evidence += f" (floor {row['p_holm_floor']:.3g} with {row['n_images']} images: the smallest possible)"
    return (f"layer {row['layer']}: {row['group_a']} {f(row['mean_a'])}{unit} vs {row['group_b']} "
            f"{f(row['mean_b'])}{unit}, diff {f(row['diff'])} {evidence}")
