"""Bootstrap confidence intervals and paired tests over question ids, against hand-computed cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest

from hbt_accel.evaluation.grid import PerQueryScores, summarize
from hbt_accel.evaluation.statistics import (
    CI_KEYS,
    confidence_intervals,
    format_p_value,
    paired_difference,
    weighted_headline,
)


def two_language_scores() -> PerQueryScores:
    """Ids q1, q2 in en and de; q3 in en only. Ranks hand-picked: AP = 1 / rank with one relevant sentence.

    en queries: q1 ranks (en 1, de 2), q2 (2, 4), q3 (1, -); de queries: q1 (1, 1), q2 (4, 2).
    """
    nan = np.nan
    return PerQueryScores(
        benchmark="hand",
        languages=["en", "de"],
        query_ids=["q1", "q2", "q3", "q1", "q2"],
        query_language=np.array([0, 0, 0, 1, 1]),
        pair_ranks=np.array([[1, 2], [2, 4], [1, nan], [1, 1], [4, 2]], dtype=float),
        multi_ap=np.array([1.0, 0.5, 1.0, 0.75, 0.25]),
        multi_distance=np.array([1.0, 2.0, 0.0, 1.0, 3.0]),
    )


def test_unit_weights_give_the_summary_numbers_by_hand():
    scores = two_language_scores()
    values = dict(zip(CI_KEYS, weighted_headline(scores, np.ones(5))[:, 0]))
    # mono: en-en (1 + 1/2 + 1)/3 = 5/6, de-de (1 + 1/2)/2 = 3/4; mean 19/24
    assert values["mono_map"] == pytest.approx(19 / 24)
    # cross: en-de (1/2 + 1/4)/2 = 3/8, de-en (1 + 1/4)/2 = 5/8; mean 1/2
    assert values["cross_map"] == pytest.approx(0.5)
    assert values["multi_map"] == pytest.approx(((1 + 0.5 + 1) / 3 + (0.75 + 0.25) / 2) / 2)
    assert values["rank_distance"] == pytest.approx(((1 + 2 + 0) / 3 + (1 + 3) / 2) / 2)
    summary = summarize(scores)
    for key in CI_KEYS:
        assert values[key] == pytest.approx(summary[key]), key


def test_drawing_an_id_twice_weighs_all_its_languages_twice():
    scores = two_language_scores()
    doubled = PerQueryScores(
        benchmark="hand",
        languages=scores.languages,
        query_ids=[*scores.query_ids, "q2", "q2"],
        query_language=np.append(scores.query_language, [0, 1]),
        pair_ranks=np.vstack([scores.pair_ranks, scores.pair_ranks[[1, 4]]]),
        multi_ap=np.append(scores.multi_ap, scores.multi_ap[[1, 4]]),
        multi_distance=np.append(scores.multi_distance, scores.multi_distance[[1, 4]]),
    )
    weights = np.array([1, 2, 1, 1, 2])  # q2 drawn twice: both its rows (en and de) count twice
    weighted = weighted_headline(scores, weights)[:, 0]
    explicit = summarize(doubled)
    for k, key in enumerate(CI_KEYS):
        assert weighted[k] == pytest.approx(explicit[key]), key


def test_one_language_interval_equals_scipys_bootstrap_of_the_mean():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    ranks = rng.integers(1, 30, size=300).astype(float)
    scores = PerQueryScores(
        "one",
        ["en"],
        [f"q{i}" for i in range(300)],
        np.zeros(300, dtype=int),
        ranks[:, None],
        1 / ranks,
        np.zeros(300),
    )
    ours = confidence_intervals(scores, n_resamples=400, seed=9)["mono_map"]
    # np.unique sorts the ids: q0, q1, q10, ...; scipy draws the same positions with the same generator
    order = np.argsort(np.array(scores.query_ids))
    theirs = bootstrap(
        ((1 / ranks)[order],),
        np.mean,
        n_resamples=400,
        method="percentile",
        batch=100,
        random_state=np.random.default_rng(9),
    ).confidence_interval
    assert ours["value"] == pytest.approx(float(np.mean(1 / ranks)))
    assert ours["low"] == pytest.approx(theirs.low, abs=1e-12) and ours["high"] == pytest.approx(
        theirs.high, abs=1e-12
    )
    assert ours["low"] < ours["value"] < ours["high"]


def test_identical_answers_leave_no_uncertainty():
    scores = PerQueryScores(
        "same", ["en"], ["a", "b", "c"], np.zeros(3, dtype=int), np.full((3, 1), 2.0), np.full(3, 0.5), np.ones(3)
    )
    interval = confidence_intervals(scores, n_resamples=50)["mono_map"]
    assert interval == {"value": 0.5, "low": 0.5, "high": 0.5}


def test_paired_difference_of_a_model_with_itself_and_with_a_worse_one():
    scores = two_language_scores()
    same = paired_difference(scores, scores, n_resamples=200)["multi_map"]
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}

    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 5, size=(400, 1)).astype(float)
    ids = [f"q{i}" for i in range(400)]
    good = PerQueryScores("x", ["en"], ids, np.zeros(400, dtype=int), ranks, 1 / ranks[:, 0], np.zeros(400))
    worse = PerQueryScores("x", ["en"], ids, np.zeros(400, dtype=int), ranks + 1, 1 / (ranks[:, 0] + 1), np.zeros(400))
    gap = paired_difference(good, worse, n_resamples=300)["mono_map"]
    assert gap["difference"] == pytest.approx(float(np.mean(1 / ranks - 1 / (ranks + 1))))
    assert 0 < gap["low"] < gap["difference"] < gap["high"] and gap["p_value"] < 0.01
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(good, two_language_scores())
    # no resample crossed 0: the report says below the bootstrap's resolution (2/300, rounded up), never p = 0
    assert gap["p_value"] == 0.0 and format_p_value(gap["p_value"], 300) == "p<0.0067"
    assert format_p_value(0, 1000) == "p<0.002" and format_p_value(0, 600) == "p<0.0034"
    assert format_p_value(0.11, 1000) == "p=0.110" and format_p_value(1.0, 200) == "p=1.000"
    # several seeds a side: mean over a's runs minus mean over b's runs
    seeds = paired_difference([good, good], [worse, good], n_resamples=100)["mono_map"]
    assert seeds["difference"] == pytest.approx(gap["difference"] / 2)


def test_the_smallest_non_zero_bootstrap_p_is_two_over_the_resamples():
    from hbt_accel.evaluation.statistics import _gaps

    draws = np.linspace(0.1, 1.0, 1000)[None, :].repeat(len(CI_KEYS), axis=0)  # every resample above 0
    assert _gaps(np.ones(len(CI_KEYS)), draws[:, 0], draws[:, -1], draws)["multi_map"]["p_value"] == 0.0
    draws[:, 0] = 0.0  # one resample exactly at 0 counts on both sides: p = 2 x 1/1,000
    assert _gaps(np.ones(len(CI_KEYS)), draws[:, 0], draws[:, -1], draws)["multi_map"]["p_value"] == 0.002


def _scores(multi_ap_per_id: np.ndarray, ids: list[str]) -> PerQueryScores:
    """One language; ranks 1 everywhere, the multilingual AP given per question id."""
    count = len(ids)
    return PerQueryScores(
        benchmark="t",
        languages=["en"],
        query_ids=list(ids),
        query_language=np.zeros(count, dtype=np.int64),
        pair_ranks=np.ones((count, 1)),
        multi_ap=np.asarray(multi_ap_per_id, dtype=np.float64),
        multi_distance=np.zeros(count),
    )


def test_hierarchical_interval_over_seeds_by_hand():
    """a's two seeds score .5 and 1 on every question, b's .5: a resample's seed draw is {.5,.5}, {.5,1} twice or
    {1,1}, so the difference is 0, .25 or .5 with chances 1/4, 1/2, 1/4; the questions add nothing."""
    from hbt_accel.evaluation.statistics import hierarchical_difference

    ids = [f"q{i}" for i in range(20)]
    a = [_scores(np.full(20, 0.5), ids), _scores(np.full(20, 1.0), ids)]
    b = [_scores(np.full(20, 0.5), ids)] * 2
    result = hierarchical_difference(a, b, {}, n_resamples=4000, seed=1)["multi_map"]
    assert result["difference"] == pytest.approx(0.25)
    assert (result["low"], result["high"]) == (0.0, 0.5)
    assert result["p_value"] == pytest.approx(0.5, abs=0.04)  # twice the 1/4 of draws at 0


def test_seed_t_interval_by_hand_and_wider_than_the_bootstraps_seed_draw():
    """a's seeds score .6 / .7 / .8 on every question, b's .5: gaps .1, .2, .3, mean .2, standard error .1 / sqrt(3).
    With 2 degrees of freedom the t distribution has closed forms: the 97.5% quantile is .95 / sqrt(2 x .975 x .025)
    = 4.303, and t = .2 / (.1 / sqrt(3)) = sqrt(12) has two-sided p = 1 - sqrt(12) / sqrt(14) = .0742. The bootstrap
    over the same seeds stays within the lowest and highest gap, [.1, .3]."""
    from hbt_accel.evaluation.statistics import hierarchical_difference, seed_t_difference

    ids = [f"q{i}" for i in range(20)]
    a = [_scores(np.full(20, value), ids) for value in (0.6, 0.7, 0.8)]
    b = [_scores(np.full(20, 0.5), ids)] * 3
    result = seed_t_difference(a, b)["multi_map"]
    half_width = 0.95 / np.sqrt(2 * 0.975 * 0.025) * 0.1 / np.sqrt(3)
    assert result["difference"] == pytest.approx(0.2)
    assert (result["low"], result["high"]) == pytest.approx((0.2 - half_width, 0.2 + half_width))
    assert result["p_value"] == pytest.approx(1 - np.sqrt(12 / 14))
    bootstrap = hierarchical_difference(a, b, {}, n_resamples=2000)["multi_map"]
    assert (
        0.1 - 1e-9 <= bootstrap["low"] < bootstrap["high"] <= 0.3 + 1e-9 and result["low"] < 0 < 0.4 < result["high"]
    )
    # paired by position: the same three gaps with b's seeds shuffled would not be the same test
    assert seed_t_difference(a, [_scores(np.full(20, v), ids) for v in (0.5, 0.6, 0.7)])["multi_map"]["low"] == (
        pytest.approx(0.1)
    )  # every gap .1: no spread
    # unequal seed counts: Welch's test; fewer than 2 runs a side: none
    welch = seed_t_difference(a, [_scores(np.full(20, 0.5), ids), _scores(np.full(20, 0.6), ids)])["multi_map"]
    assert welch["difference"] == pytest.approx(0.15) and welch["low"] < 0 < welch["high"]
    assert seed_t_difference(a, b[:1]) is None


def test_clustering_by_article_widens_the_interval():
    """10 articles of 10 questions; a beats b by +d on every question of half the articles and loses by d on the
    other half. Resampling 100 questions as if independent gives an interval ~sqrt(10) narrower than resampling the
    10 articles that really vary."""
    from hbt_accel.evaluation.statistics import hierarchical_difference, paired_difference

    ids = [f"q{i}" for i in range(100)]
    article_of = {q: f"article{i // 10}" for i, q in enumerate(ids)}
    sign = np.array([1.0 if (i // 10) % 2 else -1.0 for i in range(100)])
    a, b = _scores(0.5 + 0.1 * sign, ids), _scores(np.full(100, 0.5), ids)
    by_id = paired_difference(a, b, n_resamples=2000)["multi_map"]
    by_article = hierarchical_difference([a], [b], article_of, n_resamples=2000)["multi_map"]
    assert by_id["difference"] == pytest.approx(0.0, abs=1e-12) == by_article["difference"]
    width_id, width_article = by_id["high"] - by_id["low"], by_article["high"] - by_article["low"]
    assert 2.2 < width_article / width_id < 4.5  # sqrt(10) = 3.2 expected
    assert width_article == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(10), rel=0.2)  # the mean of 10 values of +-.1


def test_resampling_units_are_articles_unless_one_article_is_scored():
    """Two articles (and an id without one) are resampled as articles; questions from one article fall back to the
    question ids, as one unit cannot be resampled, and say so."""
    from hbt_accel.evaluation.statistics import resampling_units

    scores = _scores(np.array([0.2, 0.4, 0.6, 0.8]), ["q1", "q2", "q3", "q4"])
    two = {"q1": "A", "q2": "A", "q3": "B"}
    assert resampling_units(scores, two) == (two, "2 articles")
    one = {"q1": "A", "q2": "A", "q3": "A", "q4": "A"}
    assert resampling_units(scores, one) == ({}, "4 question ids (1 article(s) scored)")
    assert resampling_units(scores, {}) == ({}, "4 question ids (0 article(s) scored)")


def test_holm_adjustment_by_hand():
    from hbt_accel.evaluation.statistics import holm_adjusted

    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_saturating_fit_recovers_a_known_curve_and_says_when_the_target_is_out_of_reach():
    from hbt_accel.evaluation.statistics import saturating_fit

    sizes = [100, 250, 500, 1000]
    a, b, c = 0.70, 2.0, 0.6
    exact = [[a - b * size**-c] * 3 for size in sizes]  # three identical seeds: no spread
    fit = saturating_fit(sizes, exact, target=0.68, n_resamples=50)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((a, b, c), rel=1e-3)
    assert fit["size_for_target"] == pytest.approx((b / (a - 0.68)) ** (1 / c), rel=1e-2)  # 2,154 ids by hand
    assert fit["a_interval"] == pytest.approx([a, a], rel=1e-3)
    unreachable = saturating_fit(sizes, exact, target=0.75, n_resamples=50)
    assert unreachable["size_for_target"] is None and unreachable["share_of_refits_reaching_target"] == 0.0


def test_a_saved_per_query_file_with_missing_ids_loads_back_to_the_same_numbers(tmp_path):
    """MLQA-R pools lack some ids: their ranks are saved as -1 and must load back as missing (NaN), not as rank -1
    (which once made an AP of -1 and a recall hit of every missing pair in the reports' intervals)."""
    from hbt_accel.evaluation.grid import PerQueryScores, summarize

    nan = float("nan")
    scores = PerQueryScores(
        benchmark="mlqa-r:validation",
        languages=["en", "de"],
        query_ids=["a", "b", "a"],
        query_language=np.array([0, 0, 1]),
        pair_ranks=np.array([[1.0, 3.0], [2.0, nan], [1.0, 4.0]]),  # "b" has no German sentence
        multi_ap=np.array([0.75, 0.5, 0.625]),
        multi_distance=np.array([2.0, 0.0, 3.0]),
        multi_ranks=np.array([[1.0, 3.0], [2.0, nan], [4.0, 1.0]]),
    )
    loaded = PerQueryScores.load(scores.save(tmp_path / "per_query.npz"))
    np.testing.assert_array_equal(np.isnan(loaded.pair_ranks), np.isnan(scores.pair_ranks))
    np.testing.assert_array_equal(np.isnan(loaded.multi_ranks), np.isnan(scores.multi_ranks))
    assert summarize(loaded)["grid"] == summarize(scores)["grid"]
    assert summarize(loaded)["cross_map"] == pytest.approx((1 / 3 + 1) / 2)  # en-de: only "a"; de-en: 1/1
