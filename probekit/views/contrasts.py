"""Statistics between groups of models: is a difference in a metric real or noise?

Every model of a comparison saw the same images, so the unit of evidence is the image: per
metric and layer, each model's per-image value (mean over heads) is averaged within a group
of models (training kind by default), and the groups are compared image by image.

- difference of group means with a percentile bootstrap CI that resamples images (one
  resample shared by both groups: the design is paired) and, inside a group that holds
  several models, models too (a two-level bootstrap: the model spread counts as noise);
- a paired permutation (sign-flip) test of the per-image differences, exact when the
  ``2**n`` sign patterns fit in the permutation budget, with a Holm correction across layers;
- an effect size: Cohen's d_z (mean of the per-image differences over their SD).

numpy does the resampling (vectorised over resamples and layers); nothing here imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["bootstrap_diff", "paired_permutation_p", "holm", "cohens_dz", "contrasts", "per_image_layer",
           "model_groups", "format_contrast", "CONTRAST_COLUMNS"]

CONTRAST_COLUMNS = [
    "metric", "unit", "layer", "group_a", "group_b", "models_a", "models_b", "n_images",
    "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p", "p_holm", "effect_dz", "n_boot", "n_perm",
]


# -- the maths on arrays -------------------------------------------------------------------------
def bootstrap_diff(xa: np.ndarray, xb: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of ``mean(xa) - mean(xb)`` per column.

    Args:
        xa, xb: ``[models, images, layers]`` per-image values of the two groups, images aligned
            (the same image at the same index in both: the resample is shared, i.e. paired).
        n_boot: resamples. level: the CI's coverage.

    Returns:
        ``(low, high)``, each ``[layers]``. Images are resampled with replacement; a group with
        more than one model also has its models resampled with replacement, per resample.
    """
    rng = rng or np.random.default_rng(0)
    xa, xb = np.asarray(xa, float), np.asarray(xb, float)
    n = xa.shape[1]
    idx = rng.integers(0, n, size=(n_boot, n))

    def group_means(x: np.ndarray) -> np.ndarray:
        per_model = x[:, idx].mean(axis=2)  # [models, boot, layers]
        m = x.shape[0]
        if m == 1:
            return per_model[0]
        pick = rng.integers(0, m, size=(n_boot, m))
        weights = np.stack([np.bincount(row, minlength=m) for row in pick]) / m  # [boot, models]
        return np.einsum("bm,mbl->bl", weights, per_model)

    diffs = group_means(xa) - group_means(xb)
    alpha = (1 - level) / 2
    return np.quantile(diffs, alpha, axis=0), np.quantile(diffs, 1 - alpha, axis=0)


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


def contrasts(results, groups: Mapping[str, str] | None = None, *, by: str = "training", n_boot: int = 2000,
              n_perm: int = 10000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every pair of model groups, per metric and layer: :data:`CONTRAST_COLUMNS`.

    Args:
        results: :class:`~probekit.results.Results` of a comparison (all models on one image set).
        groups: ``{model: group}``; default read from the results' metadata (``by``).
        n_boot, n_perm, level, seed: resampling budget, CI coverage, and the seed (results are
            reproducible).

    Returns:
        One row per metric x layer x pair of groups (empty when there are fewer than two groups).
        Only images every model of both groups has are used; layers some model lacks are skipped.
    """
    table = results.table
    models = list(dict.fromkeys(table["model"].astype(str)))
    groups = dict(groups) if groups is not None else model_groups(results.meta, models, by)
    names = list(dict.fromkeys(groups[m] for m in models if m in groups))
    units = {k: (v or {}).get("unit") for k, v in (results.meta.get("metrics") or {}).items()}
    rows: list[dict] = []
    for metric in dict.fromkeys(table["metric"].astype(str)):
        s = per_image_layer(table, metric)
        if s.empty:
            continue
        cube = s.unstack(["layer"])  # (model, image) x layer
        for ga, gb in itertools.combinations(names, 2):
            ma = [m for m in models if groups.get(m) == ga]
            mb = [m for m in models if groups.get(m) == gb]
            rows += _pair_rows(cube, metric, units.get(metric), ga, gb, ma, mb, n_boot, n_perm, level,
                               np.random.default_rng([seed, len(rows)]))
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def _pair_rows(cube: pd.DataFrame, metric, unit, ga, gb, ma, mb, n_boot, n_perm, level, rng) -> list[dict]:
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
    d = xa.mean(0) - xb.mean(0)  # per-image difference of group means [images, layers]
    lo, hi = bootstrap_diff(xa, xb, n_boot=n_boot, level=level, rng=rng)
    p = paired_permutation_p(d, n_perm=n_perm, rng=rng)
    ph = holm(p)
    dz = cohens_dz(d)
    n_signs = 2 ** len(images) if 2 ** len(images) <= n_perm else n_perm  # exact test: every sign pattern
    out = []
    for j, layer in enumerate(layers):
        out.append({
            "metric": metric, "unit": unit, "layer": int(layer), "group_a": ga, "group_b": gb,
            "models_a": len(ma), "models_b": len(mb), "n_images": len(images),
            "mean_a": float(xa[:, :, j].mean()), "mean_b": float(xb[:, :, j].mean()),
            "diff": float(d[:, j].mean()), "ci_low": float(lo[j]), "ci_high": float(hi[j]),
            "p": float(p[j]), "p_holm": float(ph[j]), "effect_dz": float(dz[j]),
            "n_boot": n_boot, "n_perm": n_signs,
        })
    return out


def format_contrast(row: Mapping) -> str:
    """One line for the CLI, e.g.
    ``layer 3: self-supervised 49.2 px vs supervised 71.0 px, diff -21.8 [-26.1, -17.4], p_holm 0.004``."""
    unit = f" {row['unit']}" if row.get("unit") else ""

    def f(x: float) -> str:
        return f"{x:#.3g}" if abs(x) < 10 else f"{x:.1f}"

    return (f"layer {row['layer']}: {row['group_a']} {f(row['mean_a'])}{unit} vs {row['group_b']} "
            f"{f(row['mean_b'])}{unit}, diff {f(row['diff'])} [{f(row['ci_low'])}, {f(row['ci_high'])}], "
            f"p_holm {row['p_holm']:.3g}")
