"""The report of a sweep, rendered from the committed per-point summaries only (so it re-renders identically).

RESULTS/report.json and report.md: per setting (the point without its seed) mean +- std over seeds and a 95%
t-interval of the mean, for every headline metric, on all languages and apart on the languages the setting trained
on (seen) and the XQuAD-R languages it never saw (unseen); convergence (the first periodic evaluation reaching 95%
of the run's last periodic multilingual mAP); paired bootstrap tests over question ids for the comparisons the
sweep names (`compare`), at every value of the other settings. Figures: each metric against each numeric axis with
a +-std band, metric by step per setting, mono vs multi mAP (the trade-off the method is about), and, when the points
recorded their parameter counts, each comparison's multi mAP gap against the model's parameters (total and without
the word embeddings; `gap_by_parameters` in report.json holds the plotted numbers).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from hbt_accel.atomic import write_atomic, write_json
from hbt_accel.evaluation.grid import language_view
from hbt_accel.evaluation.schema import HEADLINE, MULTI_MAP, RECALL_AT_1, RECALL_AT_10
from hbt_accel.sweeps.run import (
    BASE,
    SweepSpec,
    compared_side,
    compared_sweep,
    point_config,
    read_point_summary,
    setting_text,
    sweep_points,
)

REPORT_RESAMPLES = 1000  # bootstrap resamples of every interval in a sweep report

MLQA_R_LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")  # what a point trains on unless train_languages says


def load_summaries(spec: SweepSpec) -> list[dict]:
    """The summaries of the finished points, in sweep order."""
    found = []
    for point in sweep_points(spec):
        path = spec.results_root / f"{point.name}.json"
        if path.is_file():
            found.append(read_point_summary(path))
    return found


def setting_of(summary: dict) -> tuple:
    return tuple((k, json.dumps(v)) for k, v in summary["settings"].items() if k != "seed")


def seen_languages(summary: dict) -> list[str]:
    trained = summary["settings"].get("train_languages") or list(MLQA_R_LANGUAGES)
    return [lang for lang in summary["final"]["languages"] if lang in trained]


def convergence_step(evaluations: list[dict], share: float = 0.95) -> int | None:
    """The first evaluated step whose multi mAP reaches `share` of the last periodic evaluation's."""
    if not evaluations:
        return None
    target = share * evaluations[-1][MULTI_MAP.key]
    return next(e["step"] for e in evaluations if e[MULTI_MAP.key] >= target)


def curve_area(evaluations: list[dict]) -> float | None:
    """The mean multi mAP over training: the trapezoid area under the periodic curve over its step range (a curve
    that rises sooner has the larger area at the same end point). None with fewer than two evaluations."""
    if len(evaluations) < 2 or evaluations[-1]["step"] == evaluations[0]["step"]:
        return None
    steps = [e["step"] for e in evaluations]
    values = [e[MULTI_MAP.key] for e in evaluations]
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def convergence(runs: list[dict]) -> dict | None:
    """Over seeds: the step reaching 95% and 99% of the last periodic multi mAP, the area under the curve, the last
    periodic multi mAP, the step of the best one (the first, on a tie) and how far the last falls below it, and the
    steps evaluated. None when the runs have no curve."""
    curves = [r["evaluations"] for r in runs if len(r["evaluations"]) >= 2]
    if not curves:
        return None
    return {
        "steps_evaluated": [e["step"] for e in curves[0]],
        "step_95": describe([convergence_step(c, 0.95) for c in curves]),
        "step_99": describe([convergence_step(c, 0.99) for c in curves]),
        "curve_area": describe([curve_area(c) for c in curves]),
        "last_periodic_multi_map": describe([c[-1][MULTI_MAP.key] for c in curves]),
        "best_step": describe([max(c, key=lambda e: e[MULTI_MAP.key])["step"] for c in curves]),
        "best_minus_last": describe([max(e[MULTI_MAP.key] for e in c) - c[-1][MULTI_MAP.key] for c in curves]),
    }


def describe(values: list[float]) -> dict:
    """mean, std (n-1) and a 95% t-interval of the mean over seeds."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "std": math.nan, "low": math.nan, "high": math.nan, "n": len(array)}
    std = float(array.std(ddof=1))
    low, high = mean, mean  # no spread over seeds: the interval is the point (scipy would warn on a zero scale)
    if std > 0:
        low, high = stats.t.interval(0.95, len(array) - 1, loc=mean, scale=std / math.sqrt(len(array)))
    return {"mean": mean, "std": std, "low": float(low), "high": float(high), "n": len(array)}


def spread(values: list[float]) -> dict:
    """median, min and max: for wall times, which are skewed by whatever shared the machine and cannot go below 0
    (a t-interval of three such times can)."""
    array = np.asarray(values, dtype=float)
    return {"median": float(np.median(array)), "min": float(array.min()), "max": float(array.max()), "n": len(array)}


def machines(summaries: list[dict]) -> list[dict]:
    """How many points ran on each device and precision, as recorded (the precision since it was recorded)."""
    counts = Counter((s.get("device", ""), _precision_text(s.get("precision"))) for s in summaries)
    return [
        {"device": device, "precision": precision, "points": n} for (device, precision), n in sorted(counts.items())
    ]


def _precision_text(precision: dict | None) -> str:
    if not precision:
        return "not recorded"
    return f"training {precision['training']}, evaluation {precision['evaluation']}"


RECALLS = (RECALL_AT_1, RECALL_AT_10)
REPORT_DIGITS = 12  # significant digits kept in report.json (see `rounded`)
# the power-law fit's optimum is flat: fits on two CPUs (or at tolerances 1e-12 and 1e-15) agree to ~1e-8 only
FIT_DIGITS = 4


def aggregate(summaries: list[dict], language_groups: dict[str, list[str]] | None = None) -> list[dict]:
    """One row per setting: its settings and, per metric and language group (seen, unseen, and the sweep's own
    `language_groups`), the over-seed statistics."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for summary in summaries:
        groups[setting_of(summary)].append(summary)
    rows = []
    for setting, runs in groups.items():
        row = {"settings": {k: json.loads(v) for k, v in setting}, "seeds": [r["settings"].get("seed") for r in runs]}
        for metric in HEADLINE + RECALLS:
            if all(metric.key in r["final"] for r in runs):
                row[metric.key] = describe([r["final"][metric.key] for r in runs])
        for group in ("seen", "unseen"):
            row[group] = _group_statistics(runs, lambda r, group=group: _group_languages(r, group))
        row["language_groups"] = {
            name: _group_statistics(runs, lambda r, languages=languages: languages)
            for name, languages in (language_groups or {}).items()
        }
        row["convergence"] = convergence(runs)
        row["train_seconds"] = spread([r["train_seconds"] for r in runs])
        row["parameters"] = runs[0].get("parameters") or {}  # one setting, one model: the seeds agree
        rows.append(row)
    return rows


def _group_statistics(runs: list[dict], languages_of) -> dict:
    """Over-seed statistics of mono / cross / multi mAP and rank distance on the languages `languages_of(run)`."""
    views = [language_view({**r, **r["final"]}, languages_of(r)) for r in runs]
    return {key: describe([v[key] for v in views]) for key in views[0]}


def _group_languages(summary: dict, group: str) -> list[str]:
    seen = seen_languages(summary)
    return seen if group == "seen" else [x for x in summary["final"]["languages"] if x not in seen]


def paired_tests(spec: SweepSpec, summaries: list[dict]) -> list[dict]:
    """For each `compare` entry, a minus b (seeds averaged) over the same question ids, with its two bootstrap
    intervals (`hierarchical`: seeds, then articles; and over question ids alone), `REPORT_RESAMPLES` each, a
    t-interval over seeds (`seed_t`, with 2+ seeds a side) and Holm p-values. Where both sides have a seed in
    common, only their common seeds count: the id-level interval resamples
    questions, not seeds, so one side's extra (lucky or unlucky) seed would otherwise read as a difference.

    {field, a, b}: the field's two values, at every value of the other settings (hybrid minus xy at each size).
    {a: {settings}, b: {settings}}: two listed points (seed aside), e.g. a feature switched on against the base
    recipe `{}`.
    """
    from hbt_accel.evaluation.grid import PerQueryScores
    from hbt_accel.evaluation.statistics import (
        hierarchical_difference,
        paired_difference,
        scored_articles,
        seed_t_difference,
    )

    tests, articles = [], {}
    for comparison in spec.compare:
        b_sweep = compared_sweep(comparison, "b", spec)
        label, groups = compared_runs(comparison, summaries, spec, b_sweep)
        roots = {"a": spec.results_root, "b": b_sweep.results_root}
        for rest, runs in groups.items():
            runs = common_seeds(runs)
            if runs["a"] and runs["b"]:
                scores = {
                    side: [PerQueryScores.load(roots[side] / f"{r['point']}.per_query.npz") for r in runs[side]]
                    for side in ("a", "b")
                }
                tests.append(
                    {
                        "comparison": label,
                        "at": {k: json.loads(v) for k, v in rest},
                        "seeds": [len(scores["a"]), len(scores["b"])],
                        "parameters": runs["a"][0].get("parameters") or {},  # of a's model; {} if not recorded
                        **paired_difference(scores["a"], scores["b"], REPORT_RESAMPLES),
                    }
                )
                benchmark = scores["a"][0].benchmark
                if benchmark not in articles:
                    articles[benchmark] = articles_of(benchmark)
                tests[-1]["hierarchical"] = hierarchical_difference(
                    scores["a"], scores["b"], articles[benchmark], REPORT_RESAMPLES
                )
                tests[-1]["articles"] = scored_articles(scores["a"][0].query_ids, articles[benchmark]) or None
                seed_t = seed_t_difference(*(_in_seed_order(runs[side], scores[side]) for side in ("a", "b")))
                if seed_t:
                    tests[-1]["seed_t"] = seed_t
    add_holm(tests)
    return tests


def scoring_subset(spec: SweepSpec) -> str:
    """What the final scores cover, for every caption: the first N question ids, or the whole benchmark."""
    cfg = point_config(spec, sweep_points(spec)[0])
    ids = f"the first {cfg.final_eval_max_queries} question ids" if cfg.final_eval_max_queries else "every question"
    return f"{cfg.eval_benchmark}, {ids} in every language, against the complete candidate pools"


def recall_rows(spec: SweepSpec, summaries: list[dict]) -> list[dict]:
    """Per setting, R@1/5/10/20 per query language (over its single-language pools, from the per-query files) and
    per group: the sweep's `language_groups` (pretraining data) and, apart, trained vs never trained; over seeds."""
    from hbt_accel.evaluation.grid import PerQueryScores, recall_by_language

    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for summary in summaries:
        scores = PerQueryScores.load(spec.results_root / f"{summary['point']}.per_query.npz")
        by_setting[setting_of(summary)].append({"summary": summary, "recall": recall_by_language(scores)})
    rows = []
    for setting, runs in by_setting.items():
        languages = list(runs[0]["recall"])
        groups = {**(spec.language_groups or {}), "trained": None, "never trained": None}
        row = {"settings": {k: json.loads(v) for k, v in setting}, "per_language": {}, "groups": {}}
        for language in languages:
            row["per_language"][language] = _recall_stats(runs, lambda run, language=language: [language])
        for name, members in groups.items():
            row["groups"][name] = _recall_stats(
                runs, lambda run, name=name, members=members: _members(run, name, members)
            )
        rows.append(row)
    return rows


def _members(run: dict, group: str, members: list[str] | None) -> list[str]:
    if members is not None:
        return [m for m in members if m in run["recall"]]
    seen = seen_languages(run["summary"])
    return [x for x in run["recall"] if (x in seen) == (group == "trained")]


def _recall_stats(runs: list[dict], languages_of) -> dict:
    """{recall_at_k: over-seed statistics of the mean over the languages} (empty where a group has none)."""
    values = defaultdict(list)
    for run in runs:
        languages = languages_of(run)
        for key in run["recall"][languages[0]] if languages else {}:
            values[key].append(float(np.mean([run["recall"][x][key] for x in languages])))
    return {key: describe(v) for key, v in values.items()}


DATA_SIZE_TARGET = 0.68  # the multilingual mAP the data-size question asks about (docs/scaling.md)


def data_size_fits(spec: SweepSpec, summaries: list[dict]) -> list[dict]:
    """Per value of the other settings, multilingual mAP against training ids (train_id_fraction x the corpus's
    ids) fitted with a saturating power law, seeds resampled for the intervals; 3+ sizes needed."""
    from hbt_accel.evaluation.statistics import saturating_fit

    ids = training_ids(spec)
    by_rest: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        rest = tuple(
            (k, json.dumps(v)) for k, v in summary["settings"].items() if k not in ("seed", "train_id_fraction")
        )
        by_rest[rest][summary["settings"]["train_id_fraction"]].append(summary["final"][MULTI_MAP.key])
    fits = []
    for rest, by_fraction in by_rest.items():
        fractions = sorted(by_fraction)
        if len(fractions) < 3:
            continue
        sizes = [fraction * (ids or 1) for fraction in fractions]
        fit = saturating_fit(sizes, [by_fraction[f] for f in fractions], DATA_SIZE_TARGET)
        points = [
            {"train_id_fraction": f, "size": size, "scores": by_fraction[f]} for f, size in zip(fractions, sizes)
        ]
        fits.append({"at": {k: json.loads(v) for k, v in rest}, "size_unit": "ids" if ids else "fraction",
                     "points": points, **rounded(fit, FIT_DIGITS)})  # fmt: skip
    return fits


def training_ids(spec: SweepSpec) -> int | None:
    """The ids of the base recipe's training corpora (what train_id_fraction takes a share of); None if unreadable."""
    from hbt_accel.data import DataError, load_training_corpus

    cfg = point_config(spec, sweep_points(spec)[0])
    try:
        return sum(load_training_corpus(source, cfg.data_dir).num_ids for source in cfg.train_data)
    except DataError:
        return None


def articles_of(benchmark: str) -> dict[str, str]:
    """Question id -> article title of a LAReQA benchmark, from its files; {} when they cannot be read (each
    question is then its own cluster, and the report says there were no articles)."""
    from hbt_accel.data import DataError, article_of_question, load_lareqa_benchmark

    try:
        return article_of_question(load_lareqa_benchmark(benchmark))
    except DataError:
        return {}


def add_holm(tests: list[dict]) -> None:
    """Holm-adjusted p-values (`p_holm`) beside the raw ones: the family is every comparison of the report, per
    metric and per kind of interval. A bootstrap's raw p of 0 (no resample at or across 0) enters as its
    resolution, 2/n, so the adjusted values are upper bounds, never an adjusted 0."""
    from hbt_accel.evaluation.statistics import holm_adjusted, smallest_p_value

    resolution = smallest_p_value(REPORT_RESAMPLES)
    for key in (m.key for m in HEADLINE):
        for kind in ("ids", "hierarchical", "seed_t"):
            entries = tests if kind == "ids" else [t[kind] for t in tests if kind in t]
            raw = [e[key]["p_value"] for e in entries]
            if kind != "seed_t":
                raw = [resolution if p == 0 else p for p in raw]
            for entry, adjusted in zip(entries, holm_adjusted(raw)):
                entry[key]["p_holm"] = adjusted


def _in_seed_order(runs: list[dict], scores: list) -> list:
    """The per-query scores of `runs` sorted by seed: the t-test pairs a's k-th run with b's."""
    return [score for _, score in sorted(zip(runs, scores), key=lambda pair: pair[0]["settings"].get("seed", 0))]


def common_seeds(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Both sides' runs restricted to the seeds they share; unchanged when they share none."""
    seeds = [{r["settings"].get("seed") for r in runs[side]} for side in ("a", "b")]
    shared = seeds[0] & seeds[1]
    if not shared:
        return runs
    return {side: [r for r in runs[side] if r["settings"].get("seed") in shared] for side in ("a", "b")}


def compared_runs(
    comparison: dict, summaries: list[dict], spec: SweepSpec, b_sweep: SweepSpec
) -> tuple[str, dict[tuple, dict]]:
    """(the comparison's label, other settings -> {"a": [summaries], "b": [summaries]}); b's summaries are
    `b_sweep`'s (`compared_sweep`: this sweep unless the entry names another)."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"a": [], "b": []})
    if b_sweep is spec:
        pools = [(("a", "b"), summaries)]
    else:
        pools = [(("a",), summaries), (("b",), load_summaries(b_sweep))]
    for sides, pool in pools:
        for summary in pool:
            side, at = compared_side(comparison, summary["settings"], sides)
            if side:
                groups[at][side].append(summary)
    if "field" in comparison:
        a, b = setting_text(comparison["a"]), setting_text(comparison["b"])
        return f"{comparison['field']}: {a} minus {b}", groups
    a, b = _setting_label(comparison["a"]), _setting_label(comparison["b"])
    if b_sweep is not spec:
        b = f"{'the same' if b == a else b} in sweep {b_sweep.name}"
    return f"{a} minus {b}", groups


def _setting_label(settings: dict) -> str:
    return ", ".join(f"{k} {_shown(v)}" for k, v in settings.items()) or "the base recipe"


def _shown(value) -> str:
    """A setting's value in a label: as in point names, but an empty text visible (`query_prefix ""`)."""
    return '""' if value == "" else setting_text(value)


def parameter_gaps(tests: list[dict], metric: str = MULTI_MAP.key) -> list[dict]:
    """Per comparison, its paired difference in `metric` (with the 95% bootstrap interval) at each parameter count,
    the smallest model first: the numbers of gap_by_parameters.png. Tests without parameter counts are left out."""
    series: dict[str, list] = defaultdict(list)
    for test in tests:
        counts = test.get("parameters")
        if counts:
            gap = {key: test[metric][key] for key in ("difference", "low", "high")}
            sizes = {key: counts[key] for key in ("total", "without_word_embeddings")}
            series[test["comparison"]].append({"at": test["at"], **sizes, **gap})
    return [
        {"comparison": name, "metric": metric, "points": sorted(points, key=lambda p: p["total"])}
        for name, points in series.items()
    ]


# =====================================================================================================================
# Rendering
# =====================================================================================================================
def write_report(spec: SweepSpec) -> list[Path]:
    summaries = load_summaries(spec)
    root = spec.results_root
    rows = aggregate(summaries, spec.language_groups)
    tests = paired_tests(spec, summaries)
    report = {"sweep": spec.name, "points_finished": len(summaries), "points": len(sweep_points(spec))}
    report.update(settings=rows, paired_tests=tests, gap_by_parameters=parameter_gaps(tests))
    report["recall_by_language"] = recall_rows(spec, summaries)
    report["ran_on"] = machines(summaries)
    if "train_id_fraction" in spec.axes:
        report["data_size_fit"] = data_size_fits(spec, summaries)
    report = rounded(report)
    paths = [write_json(root / "report.json", report)]
    paths.append(write_atomic(root / "report.md", render_markdown(spec, report)))
    paths += write_figures(spec, rows, summaries)
    if any(len({p["total"] for p in series["points"]}) > 1 for series in report["gap_by_parameters"]):  # a curve
        paths.append(_gap_by_parameters(spec, report["gap_by_parameters"]))
    return paths


def rounded(value, digits: int = REPORT_DIGITS):
    """Every float to `digits` significant digits: sums over the same numbers differ in the last bits from one CPU
    to another (the SIMD width sets numpy's summation order), and report.json should re-render identically on any
    CPU. Almost always it then does: two values a bit apart still round apart when they straddle a rounding step."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def _absent(value: float | None) -> bool:
    """NaN in a report being built, null in one read back from report.json."""
    return value is None or math.isnan(value)


def _cell(stats: dict | None, digits: int) -> str:
    if not stats or _absent(stats["mean"]):
        return "-"
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}" if not _absent(stats["std"]) else ""
    text = text or f"{stats['mean']:.{digits}f}"
    if not _absent(stats["low"]):
        text += f" [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"
    return text


def _minutes_cell(seconds: dict) -> str:
    median = f"{seconds['median'] / 60:.1f}"
    return median if seconds["n"] < 2 else f"{median} ({seconds['min'] / 60:.1f}-{seconds['max'] / 60:.1f})"


def _machines_line(ran_on: list[dict]) -> str:
    if not ran_on:
        return "No point has finished yet."
    where = "; ".join(f"{m['device']}, precision {m['precision']}: {m['points']}" for m in ran_on)
    return f"Points per machine and precision: {where}. Training minutes: median (min-max) over seeds, wall time."


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _parameters_cell(counts: dict) -> str:
    if not counts:
        return "-"
    return f"{_millions(counts['total'])} ({_millions(counts['without_word_embeddings'])} w/o word emb.)"


def setting_fields(spec: SweepSpec) -> list[str]:
    """The fields the sweep varies: its axes, or every field its listed points set."""
    return list(spec.axes) or sorted({k for point in spec.points for k in point})


def render_markdown(spec: SweepSpec, report: dict) -> str:
    axes = ([BASE] if spec.bases else []) + setting_fields(spec)
    sized = any(row["parameters"] for row in report["settings"])
    size_header = ["parameters"] if sized else []
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"{report['points_finished']} of {report['points']} points finished. Each cell: mean ± std over seeds "
        "[95% t-interval of the mean]. Rendered by `python recipes/sweep.py --config ... --report` from the "
        f"per-point summaries in this folder. Scored on {scoring_subset(spec)}.",
        "",
        _machines_line(report["ran_on"]),
        "",
        "| "
        + " | ".join(
            [
                *axes,
                *size_header,
                "seeds",
                *(m.label for m in HEADLINE),
                "unseen multi mAP",
                "converged at step",
                "training minutes",
            ]
        )
        + " |",
        "|---" * (len(axes) + len(size_header) + 4 + len(HEADLINE)) + "|",
    ]
    for row in report["settings"]:
        cells = [_setting_cell(row["settings"], axis) for axis in axes]
        cells += [_parameters_cell(row["parameters"])] * sized + [str(len(row["seeds"]))]
        cells += [_cell(row[m.key], m.digits) for m in HEADLINE]
        cells += [_cell(row["unseen"]["multi_map"], 3), _cell((row["convergence"] or {}).get("step_95"), 0)]
        cells.append(_minutes_cell(row["train_seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _data_size_lines(report.get("data_size_fit", []))
    lines += _convergence_lines(axes, report["settings"])
    lines += _recall_group_lines(axes, report.get("recall_by_language", []))
    tests = report["paired_tests"]
    if any("hierarchical" in test for test in tests):
        articles = next((t["articles"] for t in tests if t.get("articles")), None)
        lines += ["", _hierarchical_caption(articles, len(tests)), ""]
        lines += _tests_table(tests, sized, size_header, lambda test: test["hierarchical"])
    seed_tests = [test for test in tests if "seed_t" in test]
    if seed_tests:
        lines += ["", SEED_T_CAPTION, ""]
        lines += _tests_table(seed_tests, sized, size_header, lambda test: test["seed_t"], _t_test_p_value)
    if tests:
        lines += ["", "For comparison, the narrower interval of earlier reports: paired bootstrap over question ids "
                  "only (1,000 resamples; the seeds both sides have, averaged; retraining noise and the clustering of "
                  "questions by article left out):", ""]  # fmt: skip
        lines += _tests_table(tests, sized, size_header, lambda test: test)
    return "\n".join(lines + _recall_and_groups_table(axes, report["settings"], spec.language_groups)) + "\n"


def _convergence_lines(axes: list[str], rows: list[dict]) -> list[str]:
    """Convergence per setting, read off the periodic multi mAP curve (its own subset, not the final scoring)."""
    rows = [row for row in rows if row.get("convergence")]
    if not rows:
        return []
    steps = ", ".join(str(step) for step in rows[0]["convergence"]["steps_evaluated"])
    lines = ["", f"Convergence, on the periodic evaluations' multi mAP (steps {steps}; the subset of the periodic "
             "evaluation, not the final scoring): the first evaluated step reaching 95% and 99% of the run's last "
             "periodic score, and the area under the curve (the mean multi mAP over training; higher = learned "
             "sooner at the same end); the step of the best periodic score and how far the last one falls below "
             "it (the best of many noisy scores sits above the last by chance alone, so a small positive value does "
             "not show a decline). Mean ± std over seeds [95% t-interval].", "",
             "| " + " | ".join([*axes, "95% at step", "99% at step", "area under the curve", "last periodic multi",
                                "best at step", "best minus last"])
             + " |", "|---" * (len(axes) + 6) + "|"]  # fmt: skip
    for row in rows:
        found = row["convergence"]
        cells = [_setting_cell(row["settings"], axis) for axis in axes]
        cells += [_cell(found["step_95"], 0), _cell(found["step_99"], 0), _cell(found["curve_area"], 3)]
        cells.append(_cell(found["last_periodic_multi_map"], 3))
        cells += [_cell(found["best_step"], 0), _cell(found["best_minus_last"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _recall_group_lines(axes: list[str], rows: list[dict]) -> list[str]:
    """R@1 / R@10 per language group (single-language pools; mean ± std over seeds); report.json has R@1/5/10/20
    for every language."""
    if not rows:
        return []
    groups = list(rows[0]["groups"])
    lines = ["", "Recall per language group, single-language pools (R@1 / R@10, mean over the group's query "
             "languages; groups by pretraining data, and apart by whether training saw the language):", "",
             "| " + " | ".join([*axes, *groups]) + " |", "|---" * (len(axes) + len(groups)) + "|"]  # fmt: skip
    for row in rows:
        cells = [_setting_cell(row["settings"], axis) for axis in axes]
        for group in groups:
            stats = row["groups"][group]
            cells.append(f"{stats['recall_at_1']['mean']:.3f} / {stats['recall_at_10']['mean']:.3f}" if stats else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _data_size_lines(fits: list[dict]) -> list[str]:
    if not fits:
        return []
    lines = ["", f"Multilingual mAP against training data, fitted per setting as {fits[0]['model']} over every seed "
             "(95% intervals: seeds resampled within each size, refitted 1,000 times). The size for the target is an "
             "extrapolation past the largest size measured: it holds only if the curve keeps its shape there.", "",
             f"| at | sizes | ceiling a | exponent c | size for multi mAP {DATA_SIZE_TARGET} |",
             "|---|---|---|---|---|"]  # fmt: skip
    for fit in fits:
        at = _setting_label(fit["at"]) if fit["at"] else "-"
        sizes = " / ".join(f"{p['size']:,.0f}" for p in fit["points"]) + f" {fit['size_unit']}"
        low, high = fit["size_for_target_interval"]
        reach = "out of reach (ceiling below)" if fit["size_for_target"] is None else f"{fit['size_for_target']:,.0f}"
        reach += f" [{'-' if low is None else f'{low:,.0f}'}, {'out of reach' if high is None else f'{high:,.0f}'}]"
        a, c = fit["a_interval"], fit["c_interval"]
        # the FIT_DIGITS kept in report.json, no fewer: rounding them again could move the last digit shown
        lines.append(f"| {at} | {sizes} | {fit['a']:.4g} [{a[0]:.4g}, {a[1]:.4g}] | {fit['c']:.4g} [{c[0]:.4g}, "
                     f"{c[1]:.4g}] | {reach} |")  # fmt: skip
    return lines


def _hierarchical_caption(articles: int | None, comparisons: int) -> str:
    from hbt_accel.evaluation.statistics import format_p_value

    clusters = f"whole articles ({articles} among the scored questions)" if articles else "question ids"
    return (
        "Gaps, a minus b, with the hierarchical bootstrap (the default interval): "
        f"{REPORT_RESAMPLES:,} resamples, each drawing seeds with replacement (by seed index, the same draw for both "
        f"sides), then {clusters} with replacement; 95% percentile interval, two-sided p "
        f"({format_p_value(0, REPORT_RESAMPLES)}: no resample at or across 0, below the smallest p "
        f"{REPORT_RESAMPLES:,} resamples can show; its Holm p is then an upper bound, ≤). {comparisons} comparisons "
        f"x {len(HEADLINE)} metrics are reported: p (Holm) is adjusted for the comparisons of this report, per "
        "metric; the raw p alone overstates how sure a single gap is when many are read."
    )


SEED_T_CAPTION = (
    "The same gaps with a t-interval over seeds, where both sides have 2 or more: each seed's headline number on the "
    "scored questions, paired by seed when both sides have the same seeds (Welch's t-test otherwise); 95% interval, "
    "two-sided p, Holm over this table. It leaves question sampling out, but it widens with few seeds where the "
    "bootstrap's seed draw cannot: drawing 3 seeds with replacement draws the lowest one three times 1 time in 27, "
    "more than the 2.5% tail, so that draw's 95% interval never reaches past the lowest and highest seed. Where "
    "this interval crosses 0 and the hierarchical one does not, retraining noise has not been ruled out."
)


def _t_test_p_value(p_value: float) -> str:
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def _bootstrap_p_value(p_value: float) -> str:
    from hbt_accel.evaluation.statistics import format_p_value

    return format_p_value(p_value, REPORT_RESAMPLES)


def _tests_table(
    tests: list[dict], sized: bool, size_header: list[str], interval, p_text=_bootstrap_p_value
) -> list[str]:
    lines = ["| comparison | at | " + " | ".join([*size_header, *(m.label for m in HEADLINE)]) + " |"]
    lines += ["|---|---|" + "---|" * (len(size_header) + len(HEADLINE))]
    for test in tests:
        cells = [_parameters_cell(test.get("parameters") or {})] * sized
        for m in HEADLINE:
            stats = interval(test)[m.key]
            p_value = p_text(stats["p_value"])
            bound = "≤" if stats["p_value"] == 0 else "="  # a raw 0 entered Holm as 2/n: its adjusted p is a bound
            holm_p = stats.get("p_holm")
            holm = "" if holm_p is None else " (Holm p<0.001)" if holm_p < 0.001 else f" (Holm p{bound}{holm_p:.3f})"
            cells.append(f"{m.format_difference(stats)} {p_value}{holm}")
        at = _setting_label(test["at"]) if test["at"] else "-"
        lines.append(f"| {test['comparison']} | {at} | " + " | ".join(cells) + " |")
    return lines


def _recall_and_groups_table(axes: list[str], rows: list[dict], language_groups: dict) -> list[str]:
    """R@1 / R@10 and, per language group of the sweep, the group's mono and multi mAP."""
    if not rows or not all(m.key in row for m in RECALLS for row in rows):
        return []
    group_headers = [f"{name}: {metric}" for name in language_groups for metric in ("mono mAP", "multi mAP")]
    lines = ["", "Recall and language groups (" + _groups_text(language_groups) + "):", ""]
    lines += ["| " + " | ".join([*axes, *(m.label for m in RECALLS), *group_headers]) + " |"]
    lines += ["|---" * (len(axes) + len(RECALLS) + len(group_headers)) + "|"]
    for row in rows:
        cells = [_setting_cell(row["settings"], axis) for axis in axes]
        cells += [_cell(row[m.key], m.digits) for m in RECALLS]
        groups = row["language_groups"]
        cells += [_cell(groups[name][key], 3) for name in language_groups for key in ("mono_map", "multi_map")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setting_cell(settings: dict, axis: str) -> str:
    """A point's value of one axis as a table cell; '·' where the point leaves the field at its base recipe's value."""
    if axis not in settings:
        return "·"
    return setting_text(settings[axis]) or "[]"


def _groups_text(language_groups: dict) -> str:
    return "; ".join(f"{name} = {', '.join(langs)}" for name, langs in language_groups.items()) or "none defined"


def write_figures(spec: SweepSpec, rows: list[dict], summaries: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for axis, position in _plotted_settings(spec, rows).items():
        lines = _lines_along(rows, axis, position)
        figure, panels = plt.subplots(1, len(HEADLINE), figsize=(4 * len(HEADLINE), 3.5))
        for metric, panel in zip(HEADLINE, panels):
            for label, line in lines.items():
                xs = [x for x, _ in line]
                means = np.array([r[metric.key]["mean"] for _, r in line])
                stds = np.nan_to_num(np.array([r[metric.key]["std"] for _, r in line]))
                panel.plot(xs, means, marker="o", label=label or None)
                panel.fill_between(xs, means - stds, means + stds, alpha=0.2)
            panel.set_xlabel(axis)
            if position is len:  # a count: its label says so, its ticks are whole numbers
                panel.set_xlabel(f"number of {axis}")
                panel.xaxis.set_major_locator(MaxNLocator(integer=True))
            panel.set_title(metric.label, fontsize=9)
            panel.grid(alpha=0.3)
        if any(lines):
            panels[0].legend(fontsize=7)
        paths.append(_save(figure, spec.results_root / f"metrics_by_{axis}.png"))
    paths.append(_pareto(spec, rows))
    paths.append(_by_step(spec, summaries))
    return paths


def _value(value):
    return value


def _plotted_settings(spec: SweepSpec, rows: list[dict]) -> dict:
    """The settings a curve can run along, each with how a value becomes its x: a numeric axis by its value, a setting
    that every point lists (train_languages) by the list's length. Listed points count only where every point sets
    the field to one of 2+ values."""
    plotted = {}
    for field in setting_fields(spec):
        values = [row["settings"].get(field) for row in rows]
        if None in values or (len({json.dumps(v) for v in values}) < 2 and not spec.axes):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            plotted[field] = _value
        elif all(isinstance(v, list) for v in values):
            plotted[field] = len
    return plotted


def _lines_along(rows: list[dict], axis: str, position) -> dict[str, list]:
    """Rows grouped by the other settings, each group sorted along `axis` (x = `position(value)`): one line per
    group. Along a list's length, a group whose lists are not all prefixes of one another (two language orders) is
    one line per order, each labelled with its longest list."""
    lines: dict[str, list] = defaultdict(list)
    for row in rows:
        rest = plot_label(row["settings"], leave_out=axis)
        lines[rest].append((position(row["settings"][axis]), row))
    if position is len:
        lines = {label: line for rest, points in lines.items() for label, line in _orders(rest, axis, points).items()}
    return {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items()}


def _orders(rest: str, axis: str, points: list) -> dict[str, list]:
    """Split points along a list's length into chains where each list starts with the one before (an order)."""

    def listed(point) -> list:
        return point[1]["settings"][axis]

    def starts_with(point, start) -> bool:
        return listed(point)[: len(listed(start))] == listed(start)

    chains: list[list] = []
    for point in sorted(points, key=lambda p: p[0]):
        extends = [chain for chain in chains if starts_with(point, chain[-1])]
        if extends:
            extends[0].append(point)
            continue
        # a new order: it still starts from the longest point it shares (the English-only point of both orders)
        shared = [p for chain in chains for p in chain if starts_with(point, p)]
        chains.append([max(shared, key=lambda p: p[0]), point] if shared else [point])
    if len(chains) == 1:
        return {rest: points}
    return {", ".join(filter(None, [rest, "+".join(listed(chain[-1]))])): chain for chain in chains}


def plot_label(settings: dict, leave_out: str = "") -> str:
    """A figure's label for a setting: `k=v, ...`, a list as `en,de` (as in point names)."""
    return ", ".join(f"{k}={_shown(v)}" for k, v in settings.items() if k != leave_out)


def _pareto(spec: SweepSpec, rows: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    for row in rows:
        mono, multi = row["mono_map"], row["multi_map"]
        axes.errorbar(
            mono["mean"], multi["mean"], xerr=np.nan_to_num(mono["std"]), yerr=np.nan_to_num(multi["std"]), fmt="o"
        )
        axes.annotate(plot_label(row["settings"]), (mono["mean"], multi["mean"]), fontsize=6)
    axes.set_xlabel("monolingual mAP")
    axes.set_ylabel("multilingual mAP")
    axes.grid(alpha=0.3)
    return _save(figure, spec.results_root / "mono_vs_multi.png")


def _by_step(spec: SweepSpec, summaries: list[dict]) -> Path:
    """Per setting, mean ± std over seeds by step: the periodic multi mAP (left) and the logged training loss, the
    mean over each logging window (right; points run before the loss was windowed logged single steps: left out)."""
    import matplotlib.pyplot as plt

    runs_by_setting: dict[str, list[dict]] = defaultdict(list)
    for summary in sorted(summaries, key=_setting_order):
        runs_by_setting[plot_label(summary["settings"], leave_out="seed")].append(summary)
    figure, (score_panel, loss_panel) = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in runs_by_setting.items():
        _mean_curve(score_panel, [[(e["step"], e[MULTI_MAP.key]) for e in r["evaluations"]] for r in runs], label)
        windowed = [[(e["step"], e["loss"]) for e in r.get("loss_curve", []) if "steps_in_loss" in e] for r in runs]
        _mean_curve(loss_panel, windowed, label)
    score_panel.set_ylabel(f"{MULTI_MAP.label} (periodic subset)")
    loss_panel.set_ylabel("training loss (mean over each logging window)")
    for panel, missing in ((score_panel, "no periodic evaluation"), (loss_panel, "no windowed loss curve kept")):
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
        if panel.lines:
            panel.legend(fontsize=6)
        else:
            panel.text(0.5, 0.5, f"{missing} for these points", ha="center", fontsize=8)
    return _save(figure, spec.results_root / "multi_map_by_step.png")


def _setting_order(summary: dict) -> list[tuple]:
    """Numbers in numeric order (2 before 10), anything else by its JSON text after them."""
    return [
        (k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v)))
        for k, v in summary["settings"].items()
    ]


def _mean_curve(panel, curves: list[list[tuple]], label: str) -> None:
    """One line at the steps every non-empty curve has, with a ±1 std band over the curves."""
    curves = [dict(curve) for curve in curves if curve]
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    if not steps:
        return
    values = np.array([[curve[step] for step in steps] for curve in curves], dtype=float)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
    panel.plot(steps, mean, marker=".", label=f"{label} ({len(curves)} seeds)" if label else f"{len(curves)} seeds")
    panel.fill_between(steps, mean - std, mean + std, alpha=0.2)


def _gap_by_parameters(spec: SweepSpec, gaps: list[dict]) -> Path:
    """Each comparison's gap (a minus b, 95% paired bootstrap interval) against parameters without the word
    embeddings (left) and in total (right), in millions."""
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for panel, size, label in zip(
        panels, ("without_word_embeddings", "total"), ("parameters without word embeddings", "parameters in total")
    ):
        for series in gaps:
            points = sorted(series["points"], key=lambda p: p[size])
            xs = np.array([p[size] for p in points]) / 1e6
            ys = np.array([p["difference"] for p in points])
            below = [p["difference"] - p["low"] for p in points]
            above = [p["high"] - p["difference"] for p in points]
            errors = np.array([below, above])  # (2, n): matplotlib's asymmetric error bars
            panel.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=series["comparison"])
            for x, y, point in zip(xs, ys, points):  # which setting each point is (a depth, a base)
                panel.annotate(plot_label(point["at"]), (x, y), fontsize=6)
        panel.axhline(0.0, color="grey", linewidth=0.8)
        panel.set_xlabel(f"{label} (millions)")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel(f"{MULTI_MAP.label} difference (95% paired CI)")
    panels[0].legend(fontsize=7)
    return _save(figure, spec.results_root / "gap_by_parameters.png")


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})  # no version stamp: re-renders match
    plt.close(figure)
    return write_atomic(path, buffer.getvalue())
