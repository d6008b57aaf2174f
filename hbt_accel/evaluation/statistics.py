"""Confidence intervals and paired tests for the LAReQA headline numbers, by bootstrapping question ids.

A question id is shared by all languages (the same question translated), so a resample draws ids, not rows: every
language version of a drawn id comes along, as often as the id was drawn. Each resample is a reweighting of the
queries; `weighted_headline` recomputes the macro averages exactly as `grid.summarize` does (with all weights 1 it
gives the same numbers). The resampling and the percentile interval are scipy's (`scipy.stats.bootstrap`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from hbt_accel.evaluation.grid import PerQueryScores
from hbt_accel.evaluation.schema import HEADLINE_KEYS, RECALL_AT_1, RECALL_AT_10

CI_KEYS = (*HEADLINE_KEYS, RECALL_AT_1.key, RECALL_AT_10.key)


def _cell_means(scores: PerQueryScores, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of `values` (Q, K; NaN = not applicable) over each query language's queries -> (B, L, K).

    weights: (B, Q), one reweighting of the queries per row. NaN where a language has no weight on a column.
    """
    valid = ~np.isnan(values)  # (Q, K)
    filled = np.where(valid, values, 0.0)  # (Q, K)
    out = np.full((weights.shape[0], len(scores.languages), values.shape[1]), np.nan)
    for i in range(len(scores.languages)):
        rows = scores.query_language == i
        if not rows.any():
            continue
        w = weights[:, rows]  # (B, n_i)
        total = w @ valid[rows]  # (B, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, i] = np.where(total > 0, (w @ filled[rows]) / total, np.nan)
    return out


def weighted_headline(scores: PerQueryScores, weights: np.ndarray) -> np.ndarray:
    """(len(CI_KEYS), B): mono / cross / multi mAP, rank distance, R@1, R@10 under each row of `weights` (B, Q)."""
    weights = np.atleast_2d(weights).astype(np.float64)
    ranks = scores.pair_ranks  # (Q, L)
    ap = _cell_means(scores, 1.0 / ranks, weights)  # (B, L, L): rank r -> AP 1/r with one relevant sentence
    diagonal = np.eye(len(scores.languages), dtype=bool)
    multi = _cell_means(scores, scores.multi_ap[:, None], weights)[:, :, 0]  # (B, L)
    distance = _cell_means(scores, scores.multi_distance[:, None], weights)[:, :, 0]  # (B, L)
    recall = [
        _cell_means(scores, np.where(np.isnan(ranks), np.nan, ranks <= k), weights) for k in (1, 10)
    ]  # (B, L, L) each
    with warnings.catch_warnings():  # a resample with no query in some setting: that mean is NaN, no warning
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        return np.stack(
            [
                np.nanmean(ap[:, diagonal], axis=1),
                np.nanmean(ap[:, ~diagonal], axis=1),
                np.nanmean(multi, axis=1),
                np.nanmean(distance, axis=1),
                *[np.nanmean(r.reshape(len(r), -1), axis=1) for r in recall],
            ]
        )


def _cluster_index(scores: PerQueryScores, article_of: dict[str, str] | None) -> tuple[np.ndarray, int]:
    """(for each query row the index of its cluster, the number of clusters): the question's article where
    `article_of` names one (questions on one passage are not independent), else the question id itself."""
    article_of = article_of or {}
    clusters = [f"article:{article_of[q]}" if q in article_of else f"id:{q}" for q in scores.query_ids]
    names, index = np.unique(np.asarray(clusters), return_inverse=True)
    return index, len(names)


def scored_articles(query_ids: Sequence[str], article_of: dict[str, str]) -> int:
    """How many articles the scored questions come from (an id without one is not counted)."""
    return len({article_of[q] for q in query_ids if q in article_of})


def resampling_units(scores: PerQueryScores, article_of: dict[str, str]) -> tuple[dict[str, str], str]:
    """(the article map a bootstrap of `scores` resamples with, what it resamples in words): whole articles, or the
    question ids when the scored questions come from fewer than two articles (one unit cannot be resampled)."""
    articles = scored_articles(scores.query_ids, article_of)
    if articles < 2:
        return {}, f"{len(set(scores.query_ids))} question ids ({articles} article(s) scored)"
    return article_of, f"{articles} articles"


def _bootstrap(
    statistic: Callable, scores: PerQueryScores, n_resamples: int, confidence: float, seed: int, article_of=None
):
    from scipy.stats import bootstrap

    index, num_ids = _cluster_index(scores, article_of)

    def resampled(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        drawn = np.moveaxis(np.atleast_2d(drawn), axis, -1).astype(np.int64)  # (B, num_ids) drawn id indices
        counts = np.stack([np.bincount(row, minlength=num_ids) for row in drawn])  # (B, num_ids)
        return statistic(counts[:, index])  # weights (B, Q) -> (K, B)

    return bootstrap(
        (np.arange(num_ids),),
        resampled,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=100,  # 100 resamples at a time: (100, Q) weights stay small
        random_state=np.random.default_rng(seed),
    )


def confidence_intervals(
    scores: PerQueryScores,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    article_of: dict[str, str] | None = None,
) -> dict[str, dict]:
    """{metric: {value, low, high}} for mono / cross / multi mAP, rank distance, R@1, R@10 (percentile bootstrap
    over question ids, or over whole articles with `article_of`: question id -> article)."""
    point = weighted_headline(scores, np.ones(len(scores.query_ids)))[:, 0]
    result = _bootstrap(lambda w: weighted_headline(scores, w), scores, n_resamples, confidence, seed, article_of)
    low, high = result.confidence_interval
    return {
        key: {"value": float(point[k]), "low": float(low[k]), "high": float(high[k])} for k, key in enumerate(CI_KEYS)
    }


def paired_difference(
    a: PerQueryScores | Sequence[PerQueryScores],
    b: PerQueryScores | Sequence[PerQueryScores],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    article_of: dict[str, str] | None = None,
) -> dict[str, dict]:
    """{metric: {difference, low, high, p_value}} of model a minus model b on the same questions.

    a and b may each be several runs (seeds): the difference is then mean over a's runs minus mean over b's runs.
    Every run is resampled with the same question ids (paired); with `article_of` (question id -> article), whole
    articles are resampled instead (`hierarchical_difference` also resamples the seeds). p_value: two-sided, from
    the bootstrap distribution of the difference (twice the smaller share of resamples on either side of 0).
    """
    a_runs = [a] if isinstance(a, PerQueryScores) else list(a)
    b_runs = [b] if isinstance(b, PerQueryScores) else list(b)
    reference = a_runs[0]
    for run in a_runs + b_runs:
        if run.query_ids != reference.query_ids or run.languages != reference.languages:
            raise ValueError("paired_difference: the evaluations must cover the same questions and languages")

    def difference(weights: np.ndarray) -> np.ndarray:
        mean_a = np.mean([weighted_headline(run, weights) for run in a_runs], axis=0)
        mean_b = np.mean([weighted_headline(run, weights) for run in b_runs], axis=0)
        return mean_a - mean_b  # (K, B)

    point = difference(np.ones((1, len(reference.query_ids))))[:, 0]
    result = _bootstrap(difference, reference, n_resamples, confidence, seed, article_of)
    return _gaps(point, *result.confidence_interval, result.bootstrap_distribution)


def _gaps(point: np.ndarray, low: np.ndarray, high: np.ndarray, draws: np.ndarray) -> dict[str, dict]:
    """{metric: {difference, low, high, p_value}}; p_value two-sided from the draws (K, n_resamples): twice the
    smaller share of resamples on either side of 0."""
    p_values = np.minimum(1.0, 2 * np.minimum((draws <= 0).mean(axis=1), (draws >= 0).mean(axis=1)))
    p_values = np.where(np.isnan(draws).all(axis=1), np.nan, p_values)  # a metric with no value has no p
    rows = zip(point, low, high, p_values)
    return {
        key: dict(zip(("difference", "low", "high", "p_value"), map(float, row))) for key, row in zip(CI_KEYS, rows)
    }


def smallest_p_value(n_resamples: int) -> float:
    """The smallest non-zero two-sided p that `_gaps` can give from n resamples (one of n at or across 0, doubled):
    a stored 0 means below it, not zero."""
    return 2 / n_resamples


def format_p_value(p_value: float, n_resamples: int) -> str:
    """'p=0.110', or 'p<0.002' when no resample fell at or across 0 (the bound rounded up, so it stays true)."""
    if p_value != 0:
        return f"p={p_value:.3f}"
    return f"p<{math.ceil(smallest_p_value(n_resamples) * 1e4) / 1e4:g}"


# ----------------------------------------------------------------------------------------------------------------
# Two-level (hierarchical) bootstrap: seeds, then whole articles
# ----------------------------------------------------------------------------------------------------------------
def hierarchical_difference(
    a: Sequence[PerQueryScores],
    b: Sequence[PerQueryScores],
    article_of: dict[str, str],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """{metric: {difference, low, high, p_value}} of a's seeds minus b's seeds, resampling the two sources of noise:
    each resample draws seeds with replacement (retraining noise; by seed index, the same draw for both sides when
    they have as many seeds, since seed k of both settings shares its data order), then whole articles with
    replacement (questions of one article are not independent: they share a context), each drawn article bringing
    all its questions in every language. `article_of`: question id -> article; an id without one is its own article.

    Written here rather than with `scipy.stats.bootstrap`, which resamples one level only. Percentile interval;
    p_value as in `paired_difference`."""
    reference = a[0]
    for run in [*a, *b]:
        if run.query_ids != reference.query_ids or run.languages != reference.languages:
            raise ValueError("hierarchical_difference: the evaluations must cover the same questions and languages")
    query_article, num_articles = _cluster_index(reference, article_of)
    rng = np.random.default_rng(seed)
    point = _seed_means(a, b, np.ones((1, len(reference.query_ids))), None, None)[:, 0]
    draws = []
    for start in range(0, n_resamples, 100):
        size = min(100, n_resamples - start)
        article_counts = rng.multinomial(num_articles, np.full(num_articles, 1 / num_articles), size=size)
        seeds_a = rng.integers(0, len(a), size=(size, len(a)))
        seeds_b = seeds_a if len(a) == len(b) else rng.integers(0, len(b), size=(size, len(b)))
        draws.append(_seed_means(a, b, article_counts[:, query_article].astype(np.float64), seeds_a, seeds_b))
    draws = np.concatenate(draws, axis=1)  # (K, n_resamples)
    tail = (1 - confidence) / 2
    with warnings.catch_warnings():  # a metric with no value (cross mAP of one language): NaN, no warning
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        low, high = np.nanquantile(draws, tail, axis=1), np.nanquantile(draws, 1 - tail, axis=1)
    return _gaps(point, low, high, draws)


def _seed_means(a, b, weights: np.ndarray, seeds_a, seeds_b) -> np.ndarray:
    """(K, B): mean over each resample's drawn seeds of a's headline minus b's, under question weights (B, Q);
    seeds None = every seed once."""

    def side(runs, drawn) -> np.ndarray:
        headline = np.stack([weighted_headline(run, weights) for run in runs])  # (R, K, B)
        if drawn is None:
            return headline.mean(axis=0)
        counts = np.stack([np.bincount(row, minlength=len(runs)) for row in drawn]).T / drawn.shape[1]  # (R, B)
        return np.einsum("rkb,rb->kb", headline, counts)

    return side(a, seeds_a) - side(b, seeds_b)


def seed_t_difference(
    a: Sequence[PerQueryScores], b: Sequence[PerQueryScores], confidence: float = 0.95
) -> dict[str, dict] | None:
    """{metric: {difference, low, high, p_value}} of a's seeds minus b's from a t-test over the seeds' headline
    numbers on these questions: paired by position when both sides have as many runs (pass them in seed order: seed
    k of both settings shares its data order), Welch's otherwise. None with fewer than 2 runs on a side.

    The check on the hierarchical interval's seed draw: drawing 3 seeds with replacement draws the lowest one three
    times with chance 1/27, more than the 2.5% tail, so that draw's 95% interval never reaches past the lowest and
    highest seed, while the t quantile with 2 degrees of freedom is 4.3 standard errors. This one leaves question
    sampling out (the questions are fixed)."""
    from scipy import stats

    if min(len(a), len(b)) < 2:
        return None
    ones = np.ones((1, len(a[0].query_ids)))
    headline_a, headline_b = (np.stack([weighted_headline(run, ones)[:, 0] for run in side]) for side in (a, b))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # a metric without spread or value: NaN
        if len(a) == len(b):
            result = stats.ttest_rel(headline_a, headline_b, axis=0)
        else:
            result = stats.ttest_ind(headline_a, headline_b, axis=0, equal_var=False)
        interval = result.confidence_interval(confidence)
    point = headline_a.mean(axis=0) - headline_b.mean(axis=0)
    rows = zip(point, interval.low, interval.high, result.pvalue)
    return {
        key: dict(zip(("difference", "low", "high", "p_value"), map(float, row))) for key, row in zip(CI_KEYS, rows)
    }


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (the family-wise error rate), in the input order.
    By hand: scipy has only the Benjamini-Hochberg false discovery rate, and statsmodels is not a dependency."""
    values = np.asarray(p_values, dtype=np.float64)
    present = np.flatnonzero(~np.isnan(values))  # a p-value that does not exist (NaN) is no test of the family
    adjusted, running = np.full(len(values), np.nan), 0.0
    for rank, index in enumerate(present[np.argsort(values[present])]):
        running = max(running, (len(present) - rank) * values[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Score against the amount of training data
# ----------------------------------------------------------------------------------------------------------------
def saturating_fit(
    sizes: Sequence[float], scores_by_size: Sequence[Sequence[float]], target: float, n_resamples: int = 1000,
    seed: int = 0,
) -> dict:  # fmt: skip
    """Fit score = a - b * size^-c (a saturating power law: a is the ceiling) to every seed's score at each size;
    95% percentile intervals by refitting on seeds resampled within each size. Also the size at which the fit
    reaches `target` (None where the ceiling a is below it). `scipy.optimize.curve_fit` does the fitting.

    What it cannot tell: the ceiling and the size for `target` are extrapolations past the largest size measured,
    valid only if the curve keeps its shape there (more data of the same kind, the same steps and recipe)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    point = _fit_power_law(sizes, [np.asarray(s, dtype=np.float64) for s in scores_by_size])
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(n_resamples):
        drawn = [rng.choice(np.asarray(s, dtype=np.float64), size=len(s)) for s in scores_by_size]
        refits.append(_fit_power_law(sizes, drawn))
    refits = np.array([r for r in refits if r is not None])

    def reach(params) -> float:
        a, b, c = params
        return float((b / (a - target)) ** (1 / c)) if a > target else math.inf

    needed = np.array([reach(p) for p in refits])
    return {
        "model": "score = a - b * size^-c",
        "a": float(point[0]), "b": float(point[1]), "c": float(point[2]),
        "a_interval": [float(np.percentile(refits[:, 0], 2.5)), float(np.percentile(refits[:, 0], 97.5))],
        "c_interval": [float(np.percentile(refits[:, 2], 2.5)), float(np.percentile(refits[:, 2], 97.5))],
        "target": target,
        "size_for_target": None if math.isinf(reach(point)) else reach(point),
        "size_for_target_interval": [  # None: out of reach in that share of refits
            float(q) if math.isfinite(q) else None for q in np.quantile(needed, [0.025, 0.975], method="inverted_cdf")
        ],
        "share_of_refits_reaching_target": float(np.isfinite(needed).mean()),
        "refits": len(refits),
    }  # fmt: skip


def _fit_power_law(sizes: np.ndarray, scores: list[np.ndarray]):
    from scipy.optimize import curve_fit

    x = np.concatenate([np.full(len(s), size) for size, s in zip(sizes, scores)])
    y = np.concatenate(scores)
    scale = sizes.max()

    def curve(size, a, b, c):
        return a - b * (size / scale) ** (-c)

    try:
        (a, b, c), _ = curve_fit(
            curve,
            x,
            y,
            p0=(y.max(), max(y.max() - y.min(), 1e-3), 0.5),
            bounds=([0.0, 0.0, 0.01], [1.0, 10.0, 5.0]),
            maxfev=20000,
            # tighter than the default 1e-8, which stops early on this flat optimum
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
        )
    except (RuntimeError, ValueError):  # no convergence on a degenerate resample
        return None
    return np.array([a, b * scale**c, c])  # b in units of size, not size / scale
