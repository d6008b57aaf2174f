"""The headline metrics of a LAReQA evaluation: their names, which way is better, how they are shown.

Reports, the model card, the best-checkpoint tracker, the training summary and the benchmarks all read this list;
nothing else spells out "rank distance: lower is better".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hbt_accel.errors import ConfigError


@dataclass(frozen=True)
class Metric:
    key: str  # the key in evaluate_grid's results
    label: str  # how a person reads it
    model_index_type: str  # the Hub model-index metric type
    higher_is_better: bool = True
    digits: int = 3  # decimals shown in tables and cards

    def format(self, value: float, extra_digits: int = 0) -> str:
        digits = self.digits + extra_digits
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    def format_difference(self, test: dict) -> str:
        """A paired test's {difference, low, high} of this metric as '+0.012 [0.004, 0.020]'."""
        return f"{test['difference']:+.{self.digits}f} [{self.format(test['low'])}, {self.format(test['high'])}]"

    def best(self, values: Iterable[float]) -> float | None:
        finite = [v for v in values if v is not None and not math.isnan(v)]
        if not finite:
            return None
        return max(finite) if self.higher_is_better else min(finite)


MONO_MAP = Metric("mono_map", "monolingual mAP", "map")
CROSS_MAP = Metric("cross_map", "cross-lingual mAP", "map")
MULTI_MAP = Metric("multi_map", "multilingual mAP", "map")
RANK_DISTANCE = Metric(
    "rank_distance", "rank distance (language bias, lower is better)", "rank_distance", False, digits=1
)
RECALL_AT_1 = Metric("recall_at_1", "R@1 (single-pair settings)", "recall_at_1")
RECALL_AT_10 = Metric("recall_at_10", "R@10 (single-pair settings)", "recall_at_10")

METRICS = (MONO_MAP, CROSS_MAP, MULTI_MAP, RANK_DISTANCE, RECALL_AT_1, RECALL_AT_10)
BY_KEY = {metric.key: metric for metric in METRICS}
# The four numbers a comparison of two models is about (the paper's table columns).
HEADLINE = (MONO_MAP, CROSS_MAP, MULTI_MAP, RANK_DISTANCE)
HEADLINE_KEYS = tuple(metric.key for metric in HEADLINE)
MAP_KEYS = ("mono_map", "cross_map", "multi_map")
# metric_for_best_model may also name this: the mean of the three mAPs.
MEAN_MAP = "mean_map"

# The official metrics of the benchmarks in their published layouts (evaluation.published): a training run scored
# on one of them selects its best checkpoint by one of these, macro-averaged over its languages.
NDCG_AT_10 = Metric("ndcg_at_10", "nDCG@10", "ndcg_at_10")
RECALL_AT_20 = Metric("recall_at_20", "R@20", "recall_at_20")
RECALL_AT_100 = Metric("recall_at_100", "R@100", "recall_at_100")
MRR_AT_10 = Metric("mrr_at_10", "MRR@10", "mrr_at_10")
MRR_AT_100 = Metric("mrr_at_100", "MRR@100", "mrr_at_100")
RETRIEVAL_METRICS = (NDCG_AT_10, RECALL_AT_20, RECALL_AT_100, MRR_AT_10, MRR_AT_100)
ANY_BY_KEY = {metric.key: metric for metric in (*METRICS, *RETRIEVAL_METRICS)}


def summary_of(results: Mapping) -> dict:
    """Every metric of one evaluation and its query count: a point of a metric-by-step curve, a table row."""
    return {key: results[key] for key in (*ANY_BY_KEY, "n_queries") if key in results}


def selection_score(results: Mapping, name: str) -> float:
    """`results` reduced to one number where higher is better, for picking the best checkpoint by `name`."""
    if name == MEAN_MAP:
        return sum(results[key] for key in MAP_KEYS) / len(MAP_KEYS)
    value = results[name]
    return value if ANY_BY_KEY[name].higher_is_better else -value


def check_selection_metric(name: str, available: Iterable[str] | None = None) -> str:
    """Fail before training, not after the first evaluation, on a metric_for_best_model that does not exist, or
    (with `available`: what the evaluation benchmark reports) one that this benchmark does not report."""
    allowed = [MEAN_MAP, *BY_KEY] if available is None else list(available)
    if name not in allowed:
        raise ConfigError(f"metric_for_best_model: got {name!r}, expected one of {', '.join(allowed)}")
    return name
