"""Group contrasts: bootstrap CI, paired permutation test, Holm, effect size, on data with known answers."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from probekit.views.contrasts import (
    bootstrap_diff, cohens_dz, contrasts, format_contrast, holm, paired_permutation_p,
)
from probekit.results import Results


def test_holm_matches_hand_computed_step_down():
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> monotone .06
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, np.nan, 0.6])
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.4, 0.6])


def test_exact_sign_flip_p_for_all_positive_differences():
    # 8 images all +1: only the identity and the all-flipped pattern reach |mean| = 1 -> 2 / 256
    p = paired_permutation_p(np.ones((8, 1)), n_perm=10000)
    assert p[0] == pytest.approx(2 / 256)
    # a zero column is never evidence: every pattern ties
    assert paired_permutation_p(np.zeros((5, 1)))[0] == 1.0


def test_permutation_p_is_uniform_under_a_true_zero_difference():
    ps = []
    for seed in range(120):
        rng = np.random.default_rng(seed)
        base = rng.normal(50, 10, size=(30, 1))          # each image's own level, shared by both groups
        a = base + rng.normal(0, 2, size=(30, 1))
        b = base + rng.normal(0, 2, size=(30, 1))
        ps.append(paired_permutation_p(a - b, n_perm=999, rng=rng)[0])
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert 0.02 < np.mean(np.array(ps) < 0.1) < 0.2     # about 10% of nulls fall under 0.1


def test_bootstrap_ci_covers_a_known_shift_at_the_stated_rate():
    hits, shift = 0, -21.8
    for seed in range(200):
        rng = np.random.default_rng(seed)
        base = rng.normal(70, 8, size=(1, 40, 2))
        xa = base + shift + rng.normal(0, 4, size=(1, 40, 2))
        xb = base + rng.normal(0, 4, size=(1, 40, 2))
        lo, hi = bootstrap_diff(xa, xb, n_boot=800, rng=rng)
        hits += int(lo[0] <= shift <= hi[0])
    assert 0.90 <= hits / 200 <= 0.99


def test_bootstrap_resamples_models_when_a_group_has_several():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, size=(1, 20, 1))
    spread = np.array([-5.0, 0.0, 5.0])[:, None, None]    # three models that disagree a lot
    xa = base + spread + rng.normal(0, 0.1, size=(3, 20, 1))
    xb = base + rng.normal(0, 0.1, size=(1, 20, 1))
    lo, hi = bootstrap_diff(xa, xb, n_boot=2000, rng=rng)
    lo1, hi1 = bootstrap_diff(xa.mean(0, keepdims=True), xb, n_boot=2000, rng=rng)
    assert (hi - lo)[0] > 10 * (hi1 - lo1)[0]            # the model spread counts as noise


def test_cohens_dz():
    d = np.array([[1.0], [2.0], [3.0]])
    assert cohens_dz(d)[0] == pytest.approx(2.0)


def _results(shift: float, n_img: int = 12, layers: int = 3, seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    rows = []
    level = rng.normal(70, 5, size=(n_img, layers))
    for model, training, delta in (("A", "self-supervised", shift), ("B", "supervised", 0.0), ("C", "supervised", 0.0)):
        for i in range(n_img):
            for layer in range(layers):
                for head in range(2):
                    v = level[i, layer] + delta + rng.normal(0, 1) + (0.5 if head else -0.5)
                    rows.append((model, f"im{i}", layer, head, "mad", v))
    meta = {"models": {"A": {"training": "self-supervised"}, "B": {"training": "supervised"},
                       "C": {"training": "supervised", "tags": {"lab": "x"}}},
            "metrics": {"mad": {"unit": "px"}}}
    return Results(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"]), meta=meta)


def test_contrasts_table_from_results():
    res = _results(-20.0)
    c = contrasts(res, n_boot=500, n_perm=5000)  # 2**12 patterns fit: exact test
    assert list(c["layer"]) == [0, 1, 2]
    assert set(c["group_a"]) == {"self-supervised"} and set(c["group_b"]) == {"supervised"}
    t = res.table
    a = t[t.model == "A"].groupby(["image", "layer"])["value"].mean().unstack()
    b = t[t.model.isin(["B", "C"])].groupby(["model", "image", "layer"])["value"].mean().groupby(["image", "layer"]).mean().unstack()
    assert np.allclose(c["diff"], (a - b).mean().to_numpy())
    assert (c["ci_low"] < -18).all() and (c["ci_high"] > -22).all() and (c["ci_low"] < c["diff"]).all()
    assert np.allclose(c["p"], 2 / 4096) and np.allclose(c["p_holm"], 3 * 2 / 4096)  # only +-identity reach it
    assert (c["n_perm"] == 4096).all()
    assert (c["models_b"] == 2).all() and (c["n_images"] == 12).all()
    line = format_contrast(c.iloc[0])
    assert line.startswith("layer 0: self-supervised ") and " px vs supervised " in line and "p_holm " in line
    # grouping by any other column: every model alone in its group ("unknown" for untagged)
    assert contrasts(res, by="lab", n_boot=50, n_perm=50)["group_a"].nunique() == 1
    assert contrasts(res, groups={"A": "g", "B": "g", "C": "g"}).empty
