"""Group contrasts: t-intervals, paired permutation test, Holm, effect sizes and p floors on data with known
answers and against scipy; the CI's coverage and the CI/p agreement of both inference scopes by simulation."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from probekit.results import Results
from probekit.views.contrasts import (
    CONTRAST_COLUMNS,
    cohens_dz,
    contrast_header,
    contrast_note,
    contrasts,
    format_contrast,
    holm,
    model_t,
    pair_stats,
    paired_permutation_p,
    paired_t_ci,
    sign_flip_floor,
)


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


def test_cohens_dz():
    d = np.array([[1.0], [2.0], [3.0]])
    assert cohens_dz(d)[0] == pytest.approx(2.0)


def _results(shift: float, n_img: int = 12, layers: int = 3, seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    rows = []
    level = rng.normal(70, 5, size=(n_img, layers))
    for model, delta in (("A", shift), ("B", 0.0), ("C", 0.0)):  # A self-supervised, B and C supervised
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
    c = contrasts(res, n_perm=5000)  # 2**12 patterns fit: exact test
    assert list(c["layer"]) == [0, 1, 2]
    assert set(c["group_a"]) == {"self-supervised"} and set(c["group_b"]) == {"supervised"}
    t = res.table
    a = t[t.model == "A"].groupby(["image", "layer"])["value"].mean().unstack()
    b = (t[t.model.isin(["B", "C"])].groupby(["model", "image", "layer"])["value"].mean()
         .groupby(["image", "layer"]).mean().unstack())
    assert np.allclose(c["diff"], (a - b).mean().to_numpy())
    assert (c["ci_low"] < -18).all() and (c["ci_high"] > -22).all() and (c["ci_low"] < c["diff"]).all()
    assert np.allclose(c["p"], 2 / 4096) and np.allclose(c["p_holm"], 3 * 2 / 4096)  # only +-identity reach it
    assert (c["n_perm"] == 4096).all()
    assert (c["models_b"] == 2).all() and (c["n_images"] == 12).all()
    assert list(c.columns) == CONTRAST_COLUMNS and (c["inference"] == "images").all()
    d = (a - b).to_numpy()  # images scope: the paired t-interval of the per-image differences
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert np.allclose(c["ci_low"], ci.low) and np.allclose(c["ci_high"], ci.high) and (c["df"] == 11).all()
    assert np.allclose(c["p_floor"], 2 / 4096) and np.allclose(c["p_holm_floor"], 3 * 2 / 4096)
    assert np.allclose(c["effect_dz"], cohens_dz(d)) and c["effect_d"].isna().all()
    line = format_contrast(c.iloc[0])
    assert line.startswith("layer 0: self-supervised ") and " px vs supervised " in line and "p_holm " in line
    # grouping by any other column: every model alone in its group ("unknown" for untagged)
    assert contrasts(res, by="lab", n_perm=50)["group_a"].nunique() == 1
    assert contrasts(res, groups={"A": "g", "B": "g", "C": "g"}).empty


def test_contrasts_over_models_as_a_sample():
    res = _results(-20.0)  # A alone vs B and C: Student's pooled t of the per-model means (A's spread is B/C's)
    c = contrasts(res, inference="models")
    t = res.table
    per_model = t.groupby(["model", "layer"])["value"].mean().unstack()  # mean over images and heads
    ref = stats.ttest_ind(per_model.loc[["A"]], per_model.loc[["B", "C"]], equal_var=True)
    ci = ref.confidence_interval(0.95)
    assert (c["inference"] == "models").all() and (c["df"] == 1).all() and (c["n_perm"] == 0).all()
    assert np.allclose(c["p"], ref.pvalue) and np.allclose(c["ci_low"], ci.low) and np.allclose(c["ci_high"], ci.high)
    assert np.allclose(c["p_holm"], holm(ref.pvalue)) and (c["p_floor"] == 0).all() and (c["p_holm_floor"] == 0).all()
    sd = per_model.loc[["B", "C"]].std(ddof=1)  # the pooled SD: B and C's alone
    assert np.allclose(c["effect_d"], (per_model.loc["A"] - per_model.loc[["B", "C"]].mean()) / sd)
    assert c["effect_dz"].isna().all() and "Student t (pooled)" in c["test"].iloc[0]
    assert "inference over models as a sample, 1 vs 2 models on 12 images" in contrast_header(c)
    # one model a side: nothing to generalise from, and every line says so
    one = contrasts(res, groups={"A": "a", "B": "b"}, inference="models")
    assert one[["ci_low", "ci_high", "p", "p_holm", "df", "effect_d"]].isna().all().all()
    assert format_contrast(one.iloc[0]).endswith("no CI or p") and "no CI or p" in contrast_header(one)
    with pytest.raises(ValueError, match="inference must be one of images, models"):
        contrasts(res, inference="model")


def test_t_statistics_match_scipy():
    rng = np.random.default_rng(3)
    d = rng.normal(1, 2, size=(7, 4))
    lo, hi = paired_t_ci(d, level=0.9)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.9)
    assert np.allclose(lo, ci.low) and np.allclose(hi, ci.high)
    assert np.isnan(paired_t_ci(d[:1])[0]).all()
    ya, yb = rng.normal(0, 1, size=(3, 4)), rng.normal(1, 3, size=(4, 4))
    r, ref = model_t(ya, yb), stats.ttest_ind(ya, yb, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert np.allclose(r["p"], ref.pvalue) and np.allclose(r["ci_low"], ci.low) and np.allclose(r["ci_high"], ci.high)
    assert np.allclose(r["df"], ref.df) and r["test"] == "Welch t of the per-model means"
    pooled = np.sqrt((2 * ya.var(0, ddof=1) + 3 * yb.var(0, ddof=1)) / 5)
    assert np.allclose(r["effect_d"], (ya.mean(0) - yb.mean(0)) / pooled)


def test_sign_flip_p_matches_scipy_permutation_test():
    rng = np.random.default_rng(4)
    d = rng.normal(0.5, 1, size=(9, 3))  # 512 patterns: scipy enumerates them all too
    ref = stats.permutation_test((d,), lambda x, axis: x.mean(axis=axis), permutation_type="samples",
                                 vectorized=True, n_resamples=10**4, axis=0)
    assert np.allclose(paired_permutation_p(d), ref.pvalue)


def test_p_floors_of_six_images_and_twelve_layers():
    # the quickstart's case: every image says the same, so p is as small as 6 images allow
    assert sign_flip_floor(6) == 1 / 32 and sign_flip_floor(12) == 2 / 4096
    assert sign_flip_floor(20, n_perm=9999) == 1e-4  # random patterns: p = (1 + hits) / (1 + n_perm)
    rng = np.random.default_rng(5)
    xb = rng.normal(100, 5, size=(1, 6, 12))
    xa = xb - rng.uniform(30, 67, size=(1, 6, 12))
    st = pair_stats(xa, xb)
    assert np.allclose(st["p"], 1 / 32) and st["p_floor"] == 1 / 32
    assert np.allclose(st["p_holm"], 0.375) and st["p_holm_floor"] == 0.375 and (st["ci_high"] < -25).all()
    rows = pd.DataFrame([{"metric": "mad", "unit": "px", "layer": j, "group_a": "dino", "group_b": "random init",
                          "models_a": 1, "models_b": 1, "n_images": 6, "inference": "images",
                          "mean_a": xa[0, :, j].mean(), "mean_b": xb[0, :, j].mean(),
                          **{k: st[k][j] if np.ndim(st[k]) else st[k] for k in CONTRAST_COLUMNS if k in st}}
                         for j in range(12)])
    assert format_contrast(rows.iloc[0]).endswith("p_holm 0.375 (floor 0.375 with 6 images: the smallest possible)")
    assert contrast_header(rows).endswith("with 6 images no p can go below 0.0312, no Holm p below 0.375")
    note = contrast_note(rows)
    assert "Inference over images for these models" in note and "no p (Holm) below 0.375" in note
    assert "Probe more images" in note
    rows.loc[3, "p_holm"] = 0.5  # above the floor: no mark
    assert format_contrast(rows.iloc[3]).endswith("p_holm 0.5")


# -- simulations: a seeded, vectorised one per claim (the layers axis holds the replicates) -----------------------
REPS = 4000  # the SE of a coverage near 0.95 is sqrt(.95 * .05 / 4000) = 0.0034
DIFFS = {  # per-image differences' noise, mean 0, SD 4: symmetric, skewed (gamma, skewness 2/3), heavy-tailed
    "normal": lambda rng, size: rng.normal(0, 4, size),
    "skewed": lambda rng, size: (rng.gamma(9, 1, size) - 9) * 4 / 3,
    "heavy-tailed": lambda rng, size: rng.standard_t(5, size) * 4 / np.sqrt(5 / 3),
}


@pytest.mark.parametrize("n", [6, 12])
@pytest.mark.parametrize("dist", list(DIFFS))
def test_images_ci_covers_the_true_difference_at_the_nominal_rate_with_few_images(n, dist):
    rng = np.random.default_rng([n, len(dist)])
    shift = -21.8
    base = rng.normal(70, 8, size=(1, n, REPS))  # each image's own level, shared by both groups
    st = pair_stats(base + shift + DIFFS[dist](rng, (1, n, REPS)), base)
    coverage = np.mean((st["ci_low"] <= shift) & (shift <= st["ci_high"]))
    assert 0.93 <= coverage <= 0.97, coverage


def _several_models(rng, ma: int, mb: int, model_sd: float, n: int = 12, shift: float = 0.0):
    """Per-image values of two groups of models drawn from one population of models (``shift`` apart):
    value = image level + the model's own offset (sd ``model_sd``) + model x image noise (sd 1)."""
    s = rng.normal(70, 8, size=(1, n, REPS))
    xa = s + shift + rng.normal(0, model_sd, size=(ma, 1, REPS)) + rng.normal(0, 1, size=(ma, n, REPS))
    xb = s + rng.normal(0, model_sd, size=(mb, 1, REPS)) + rng.normal(0, 1, size=(mb, n, REPS))
    return xa, xb


def _rejects(st) -> tuple[np.ndarray, np.ndarray]:
    return st["p"] < 0.05, (st["ci_low"] > 0) | (st["ci_high"] < 0)


@pytest.mark.parametrize(("ma", "mb"), [(3, 3), (2, 4), (1, 3)])
def test_models_scope_holds_its_level_and_its_ci_agrees_with_its_p(ma, mb):
    # no true group difference, models that differ by chance (their own seeds): over models as a sample,
    # p < 0.05 in about 5% of runs (Welch is a little conservative at 3 vs 3), and the CI excludes 0 exactly then
    rng = np.random.default_rng([ma, mb])
    xa, xb = _several_models(rng, ma, mb, model_sd=3.0)
    p_low, ci_out = _rejects(pair_stats(xa, xb, inference="models"))
    assert 0.03 <= p_low.mean() <= 0.07, p_low.mean()
    assert np.mean(p_low == ci_out) >= 0.999
    # with a true difference of 3 model SDs' worth, the CI covers it at about the stated rate
    xa, xb = _several_models(rng, ma, mb, model_sd=3.0, shift=5.0)
    st = pair_stats(xa, xb, inference="models")
    assert 0.93 <= np.mean((st["ci_low"] <= 5.0) & (5.0 <= st["ci_high"])) <= 0.98


def test_images_scope_asks_about_these_models_and_its_ci_agrees_with_its_p():
    rng = np.random.default_rng(7)
    # the same models as above: these particular models do differ (by their offsets), and over images the
    # test finds it most of the time; that is its question, not a false positive
    xa, xb = _several_models(rng, 3, 3, model_sd=3.0)
    p_low, ci_out = _rejects(pair_stats(xa, xb))
    assert p_low.mean() > 0.7 and np.mean(p_low == ci_out) >= 0.95
    # models that do not differ at all (no offsets): p < 0.05 in about 5% of runs, and the CI agrees
    xa, xb = _several_models(rng, 3, 3, model_sd=0.0)
    p_low, ci_out = _rejects(pair_stats(xa, xb))
    assert 0.03 <= p_low.mean() <= 0.07 and 0.03 <= ci_out.mean() <= 0.07
    assert np.mean(p_low == ci_out) >= 0.95


def test_the_run_file_chooses_the_scope_and_the_outputs_say_which(tmp_path, run_file, toy_backend):
    import json
    import re

    from typer.testing import CliRunner

    from probekit.api import compare
    from probekit.cli import app
    from probekit.errors import ConfigError

    models = [{"model": "toy:vit", "label": "a1", "training": "self-supervised"},
              {"model": "toy:vit", "label": "a2", "training": "self-supervised", "options": {"heads": 2}},
              {"model": "toy:vit", "label": "b", "training": "supervised", "options": {"depth": 3}}]
    path = run_file(models=models, images={"path": "sample", "count": 4}, report={"showcase": 0, "inference": "models"})
    r = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    head = "mad: self-supervised vs supervised (inference over models as a sample, 2 vs 1 models on 4 images: "
    assert head + "95% t-CI; p: Student t (pooled) of the per-model means, Holm over 2 layers)" in r.stdout
    assert r.stdout.count("p_holm ") == 2  # a line per layer the three models share
    cmp = compare(path, out=tmp_path / "out")  # cached: the same numbers
    csv = pd.read_csv(cmp.run_dir / "contrasts.csv")
    assert (csv["inference"] == "models").all() and (csv["models_a"] == 2).all() and csv["p"].notna().all()
    html = (cmp.run_dir / "report.html").read_text()
    assert "Inference over models as a sample (run file report.inference: models)" in html
    # `probekit report` of the finished directory computes the contrasts again, in the run's scope
    r = CliRunner().invoke(app, ["report", str(cmp.run_dir)])
    assert r.exit_code == 0, r.output
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>',
                     (cmp.run_dir / "report.html").read_text(), re.S).group(1)
    assert {row["inference"] for row in json.loads(data)["contrasts"]} == {"models"}
    with pytest.raises(ConfigError, match="inference"):
        compare(run_file(models=models, report={"inference": "model"}, file="bad.yaml"), out=tmp_path / "bad")


@pytest.mark.parametrize("inference", ["images", "models"])
def test_contrasts_of_results_on_disk_equal_those_in_memory_built_a_model_at_a_time(tmp_path, monkeypatch, inference):
    """Of a results folder split into small parts (an image's heads across two of them), contrasts equal
    the in-memory ones, and the per-image values are read a model at a time (never every model's)."""
    from probekit.results.dataset import DatasetWriter, ResultsScan

    res = _results(-3.0)
    w = DatasetWriter(tmp_path / "results.parquet")
    for model, g in res.table.groupby("model", observed=True):
        for s, rows in enumerate(np.array_split(np.arange(len(g)), 5)):  # 5 parts: cuts through images
            w.write(g.iloc[rows], str(model), "mad", s)
    w.commit(res.meta)
    lazy = Results.scan(tmp_path / "results.parquet")
    lazy = Results._lazy(lazy, meta=res.meta)
    real = ResultsScan.per_image_layer
    seen: list[list[str]] = []

    def one_model(self, metric, heads=None):
        seen.append(self.models)
        return real(self, metric, heads)

    monkeypatch.setattr(ResultsScan, "per_image_layer", one_model)
    got = contrasts(lazy, inference=inference, n_perm=500)
    assert seen == [["A"], ["B"], ["C"]]
    pd.testing.assert_frame_equal(got, contrasts(res, inference=inference, n_perm=500), rtol=1e-12)
