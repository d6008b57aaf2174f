"""Metrics against hand-computed toy pools (ties included), the grid on a hand-made benchmark, the LAReQA reader.

Every expected number below was worked out by hand in the comments next to it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hbt_accel.data import DataError, LanguagePool, RetrievalBenchmark, load_lareqa_benchmark, resolve_data_dir
from hbt_accel.evaluation import evaluate_grid
from hbt_accel.evaluation.grid import select_languages
from hbt_accel.evaluation.metrics import average_precision, rank_distance, recall_at_k, relevant_ranks

NAN = np.nan


# ---------------------------------------------------------------------------------------------------------------
# metrics.py on single queries
# ---------------------------------------------------------------------------------------------------------------
def test_single_relevant_rank_counts_tied_nonrelevant_items():
    scores = np.array([[0.9, 0.5, 0.7, 0.5]])  # relevant = column 1 (0.5): 0.9 and 0.7 above, column 3 tied
    ranks = relevant_ranks(scores, np.array([[0.5]]))
    assert ranks.tolist() == [[4.0]]  # 1 + 2 strictly higher + 1 tied non-relevant
    assert average_precision(ranks).tolist() == [0.25]
    assert recall_at_k(ranks, 1).tolist() == [0.0] and recall_at_k(ranks, 4).tolist() == [1.0]


def test_all_scores_equal_gives_the_worst_rank():
    ranks = relevant_ranks(np.full((1, 5), 0.3), np.array([[0.3]]))
    assert ranks.tolist() == [[5.0]]


def test_two_relevant_without_ties():
    scores = np.array([[0.9, 0.5, 0.3, 0.1]])  # relevant: 0.9 (rank 1) and 0.1 (two non-relevant above: rank 4)
    ranks = relevant_ranks(scores, np.array([[0.9, 0.1]]))
    assert ranks.tolist() == [[1.0, 4.0]]
    assert average_precision(ranks)[0] == pytest.approx((1 / 1 + 2 / 4) / 2)  # 0.75
    assert rank_distance(ranks).tolist() == [3.0]
    assert recall_at_k(ranks, 1).tolist() == [0.5]
    assert recall_at_k(ranks, 10).tolist() == [1.0]


def test_relevant_items_tied_with_each_other_and_with_a_nonrelevant_one():
    # columns: 0.8 (non-rel), 0.6 (rel), 0.6 (rel), 0.6 (non-rel), 0.2 (non-rel)
    scores = np.array([[0.8, 0.6, 0.6, 0.6, 0.2]])
    ranks = relevant_ranks(scores, np.array([[0.6, 0.6]]))
    # non-relevant with score >= 0.6: 0.8 and the tied 0.6 -> ranks 1 + 2 = 3 and 2 + 2 = 4
    assert sorted(ranks[0].tolist()) == [3.0, 4.0]
    assert average_precision(ranks)[0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert rank_distance(ranks).tolist() == [1.0]


def test_nan_padding_means_fewer_relevant_items():
    scores = np.array([[0.9, 0.5, 0.3, 0.1], [0.2, 0.4, 0.6, 0.8]])
    relevant = np.array([[0.9, 0.1], [0.4, NAN]])  # second query: one relevant item, 0.4 -> rank 3
    ranks = relevant_ranks(scores, relevant)
    assert ranks[0].tolist() == [1.0, 4.0]
    assert ranks[1, 0] == 3.0 and np.isnan(ranks[1, 1])
    np.testing.assert_allclose(average_precision(ranks), [0.75, 1 / 3])
    np.testing.assert_allclose(rank_distance(ranks), [3.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# The grid on a hand-made 2-language benchmark
# ---------------------------------------------------------------------------------------------------------------
class TableEncoder:
    """Looks vectors up by text. Candidate k of the union is the one-hot e_k, so a query vector IS its score row."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.encoded: list[tuple[str, str]] = []

    def encode(self, texts, kind="query", batch_size=64, bf16=False):
        self.encoded.extend((kind, text) for text in texts)
        return np.array([self.vectors[text] for text in texts], dtype=np.float32)


def _one_hot(k: int, n: int = 6) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


def toy_benchmark(with_english_only_question: bool = False):
    # union columns: E0 E1 E2 (en pool) D0 D1 D2 (de pool); golds: q1 -> E0 / D1, q2 -> E2 / D0, q3 -> E1 (en only)
    en = LanguagePool("en", ["E0", "E1", "E2"], ["q1", "q2"], ["en q1", "en q2"], [0, 2], [0, 0, 0])
    de = LanguagePool("de", ["D0", "D1", "D2"], ["q1", "q2"], ["de q1", "de q2"], [1, 0], [0, 0, 0])
    vectors = {name: _one_hot(k) for k, name in enumerate(["E0", "E1", "E2", "D0", "D1", "D2"])}
    vectors.update(
        {
            "en q1": [0.9, 0.5, 0.1, 0.3, 0.8, 0.2],
            "en q2": [0.4, 0.4, 0.4, 0.7, 0.1, 0.6],
            "de q1": [0.2, 0.6, 0.3, 0.5, 0.5, 0.9],
            "de q2": [0.1, 0.2, 0.3, 0.3, 0.6, 0.1],
            "en q3": [0.1, 0.9, 0.0, 0.0, 0.0, 0.95],
        }
    )
    if with_english_only_question:
        en.question_ids.append("q3")
        en.questions.append("en q3")
        en.gold.append(1)
    return RetrievalBenchmark("toy", {"en": en, "de": de}), TableEncoder(vectors)


def test_grid_against_hand_computed_values():
    benchmark, encoder = toy_benchmark()
    results = evaluate_grid(encoder, benchmark, languages=["en", "de"], block_size=3)  # blocks cross languages
    # single pairs (rank of the gold in the one-language pool):
    #   en q1: en pool E0=.9 -> 1; de pool D1=.8 -> 1        en q2: en pool E2=.4 tied with E0,E1 -> 3; de D0=.7 -> 1
    #   de q1: de pool D1=.5, D2=.9 above, D0 tied -> 3; en pool E0=.2 lowest -> 3
    #   de q2: de pool D0=.3, D1=.6 above -> 2; en pool E2=.3 highest -> 1
    assert results["grid"] == pytest.approx(
        {"en-en": 2 / 3, "en-de": 1.0, "de-de": (1 / 3 + 1 / 2) / 2, "de-en": 2 / 3}
    )
    assert results["mono_map"] == pytest.approx((2 / 3 + 5 / 12) / 2)
    assert results["cross_map"] == pytest.approx((1.0 + 2 / 3) / 2)
    # multilingual (union of 6): en q1 ranks 1,2 (AP 1, dist 1); en q2: .7 -> 1, .4 after E0,E1,D2 -> 5 (AP .7, 4)
    #   de q1: .5 after E1,D0,D2 -> 4, .2 after all 4 non-rel -> 6 (AP (1/4+2/6)/2, dist 2)
    #   de q2: two relevant tied at .3, D1 above -> 2 and 3 (AP (1/2+2/3)/2, dist 1)
    assert results["multi_map_per_language"] == pytest.approx(
        {"en": 0.85, "de": ((1 / 4 + 2 / 6) + (1 / 2 + 2 / 3)) / 4}
    )
    assert results["multi_map"] == pytest.approx((0.85 + 0.4375) / 2)
    assert results["rank_distance_per_language"] == pytest.approx({"en": 2.5, "de": 1.5})
    assert results["rank_distance"] == pytest.approx(2.0)
    assert results["grid_recall_at_1"] == pytest.approx({"en-en": 0.5, "en-de": 1.0, "de-de": 0.0, "de-en": 0.5})
    assert results["recall_at_1"] == pytest.approx(0.5)
    assert results["recall_at_10"] == 1.0
    assert results["languages"] == ["en", "de"] and results["n_queries"] == 4
    # every question and every candidate encoded exactly once, with the right kind
    assert sorted(encoder.encoded) == sorted(
        [("query", q) for q in ["en q1", "en q2", "de q1", "de q2"]]
        + [("passage", c) for c in ["E0", "E1", "E2", "D0", "D1", "D2"]]
    )


def test_pairs_where_the_pool_lacks_the_id_skip_that_query():
    benchmark, encoder = toy_benchmark(with_english_only_question=True)
    results = evaluate_grid(encoder, benchmark, languages=["en", "de"])
    # en q3: gold E1=.9 is the best of the en pool (rank 1); in the union D2=.95 is above it (rank 2, AP 1/2, dist 0)
    assert results["grid_n_queries"] == {"en-en": 3, "en-de": 2, "de-de": 2, "de-en": 2}
    assert results["grid"]["en-en"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert results["grid"]["en-de"] == pytest.approx(1.0)  # q3 has no relevant item in de: not counted
    assert results["multi_map_per_language"]["en"] == pytest.approx((1 + 0.7 + 0.5) / 3)
    assert results["rank_distance_per_language"]["en"] == pytest.approx((1 + 4 + 0) / 3)


def test_max_queries_takes_the_first_ids_in_every_language():
    benchmark, encoder = toy_benchmark()
    results = evaluate_grid(encoder, benchmark, max_queries=1)
    assert results["n_queries"] == 2 and results["n_queries_per_language"] == {"de": 1, "en": 1}
    assert results["grid"]["en-en"] == 1.0 and results["grid"]["de-de"] == pytest.approx(1 / 3)  # q1 only
    assert results["n_candidates"] == 6  # the pools stay whole


def test_unknown_language_is_a_one_line_error():
    benchmark, _ = toy_benchmark()
    with pytest.raises(DataError, match="no language fr"):
        select_languages(benchmark, "en,fr")


# ---------------------------------------------------------------------------------------------------------------
# The LAReQA reader (hbt_accel.data) as the grid uses it
# ---------------------------------------------------------------------------------------------------------------
def _paragraph(context: str, breaks, qas):
    return {
        "context": context,
        "sentence_breaks": breaks,
        "sentences": [context[s:e] + " " for s, e in breaks],
        "qas": qas,
    }


def test_gold_sentence_mapping_on_a_hand_made_file(tmp_path):
    first = "Alpha one. Beta two. Gamma three."
    second = "Delta four. Epsilon five."
    document = {
        "data": [
            {
                "paragraphs": [
                    _paragraph(
                        first,
                        [[0, 10], [11, 20], [21, 33]],
                        [{"id": "a", "question": "Which gamma?", "answers": [{"text": "three", "answer_start": 27}]}],
                    ),
                    _paragraph(
                        second,
                        [[0, 11], [12, 25]],
                        [{"id": "b", "question": "Which delta?", "answers": [{"text": "four", "answer_start": 6}]}],
                    ),
                ]
            }
        ]
    }
    (tmp_path / "en.json").write_text(json.dumps(document), encoding="utf-8")
    pool = load_lareqa_benchmark(str(tmp_path)).pools["en"]
    assert pool.gold == [2, 3]  # answer_start 27 is in sentence 2 of paragraph 0; 6 in sentence 0 of paragraph 1
    assert pool.candidates == ["Alpha one.", "Beta two.", "Gamma three.", "Delta four.", "Epsilon five."]  # no " "
    assert pool.question_ids == ["a", "b"]


def test_missing_language_file_and_missing_fields_name_the_file(tmp_path):
    (tmp_path / "en.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": []}]}]}))
    with pytest.raises(DataError, match=r"en\.json.*sentence_breaks"):
        load_lareqa_benchmark(str(tmp_path))
    with pytest.raises(DataError, match="no file for language.*de"):
        load_lareqa_benchmark(str(tmp_path), languages=["de"])


def _has_data(name: str) -> bool:
    try:
        return (resolve_data_dir() / name).is_dir()
    except DataError:
        return False


XQUAD_CANDIDATES = {
    "ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
    "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196,
}  # fmt: skip


@pytest.mark.skipif(not _has_data("xquad-r"), reason="XQuAD-R files not found")
def test_xquad_r_counts():
    benchmark = load_lareqa_benchmark("xquad-r")
    assert benchmark.languages == sorted(XQUAD_CANDIDATES)
    assert {lang: len(pool.candidates) for lang, pool in benchmark.pools.items()} == XQUAD_CANDIDATES
    assert sum(XQUAD_CANDIDATES.values()) == 13014
    assert all(len(pool.question_ids) == 1190 for pool in benchmark.pools.values())
    assert len({tuple(pool.question_ids) for pool in benchmark.pools.values()}) == 1  # same ids, same order


@pytest.mark.skipif(not _has_data("mlqa-r"), reason="MLQA-R files not found")
def test_mlqa_r_counts_and_grid_pairs():
    benchmark = load_lareqa_benchmark("mlqa-r")
    assert sum(len(pool.question_ids) for pool in benchmark.pools.values()) == 4199
    assert len({qid for pool in benchmark.pools.values() for qid in pool.question_ids}) == 1148
    results = evaluate_grid(_ConstantEncoder(), benchmark)
    cross = [key for key in results["grid"] if key.split("-")[0] != key.split("-")[1]]
    assert len(results["grid"]) == 49 and len(cross) == 42  # every MLQA-R language pair shares some ids


class _ConstantEncoder:
    def encode(self, texts, kind="query", batch_size=64, bf16=False):
        return np.ones((len(texts), 4), dtype=np.float32) / 2


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------
def test_reports_hold_the_grid_numbers(tmp_path):
    import csv
    import io

    from rich.console import Console

    from hbt_accel.evaluation import print_report, write_reports

    benchmark, encoder = toy_benchmark()
    results = evaluate_grid(encoder, benchmark, languages=["en", "de"])
    paths = write_reports(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval_results.json",
        "grid.csv",
        "grid_heatmap.png",
    ]
    saved = json.loads(paths["json"].read_text())
    assert saved["grid"] == pytest.approx(results["grid"]) and saved["mono_map"] == pytest.approx(results["mono_map"])
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert {(r["query_lang"], r["pool_lang"]): float(r["map"]) for r in rows} == pytest.approx(
        {("en", "en"): 2 / 3, ("en", "de"): 1.0, ("de", "de"): 5 / 12, ("de", "en"): 2 / 3}, abs=1e-6
    )
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=120)
    print_report(results, console=console)
    text = console.export_text()
    assert "0.417" in text and "0.5417" in text  # the de-de cell (5/12) and mono_map (13/24)


def test_checkpoints_of_a_run_sorted_by_step_with_the_model_in_either_place(tmp_path):
    from hbt_accel.run_record import find_checkpoints, model_folder

    for name in ("checkpoint-2/model", "checkpoint-10", "checkpoint-3", ".tmp-checkpoint-4/model"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoint-2" / "model" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-10" / "config.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-4" / "model" / "config.json").write_text("{}")  # a save in progress
    found = find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-3", "checkpoint-10"]  # by step, not by name
    assert [model_folder(p) for p in found] == [tmp_path / "checkpoint-2" / "model", None, tmp_path / "checkpoint-10"]


def test_progress_line_prints_at_most_every_interval(capsys):
    from hbt_accel.evaluation.encoding import ProgressLine

    times = iter([0.0, 5.0, 15.0, 20.0, 31.0])
    line = ProgressLine("passage", every=15.0, clock=lambda: next(times))
    line(10, 100)  # t=5: too soon
    line(40, 100)  # t=15: printed
    line(50, 100)  # t=20: 5 s after the last line
    line(90, 100)  # t=31: printed
    assert capsys.readouterr().out.splitlines() == [
        "encoding passage texts: 40/100 (3 texts/s, about 22s left)",
        "encoding passage texts: 90/100 (3 texts/s, about 3s left)",
    ]


# ---------------------------------------------------------------------------------------------------------------
# The held-out split (`mlqa-r:train` / `mlqa-r:validation`) that settings are chosen on
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _has_data("mlqa-r"), reason="MLQA-R files not found")
def test_validation_split_holds_out_whole_ids_with_their_own_paragraphs():
    full = load_lareqa_benchmark("mlqa-r")
    train, validation = load_lareqa_benchmark("mlqa-r:train"), load_lareqa_benchmark("mlqa-r:validation")
    assert (train.name, validation.name) == ("mlqa-r:train", "mlqa-r:validation")
    ids = {
        split: {q for p in b.pools.values() for q in p.question_ids} for split, b in [("t", train), ("v", validation)]
    }
    assert not ids["t"] & ids["v"]  # an id is on one side in every language
    assert len(ids["t"]) + len(ids["v"]) == 1148
    assert 0.10 < len(ids["v"]) / 1148 < 0.20  # the 15% share, by a hash of the id
    for lang, pool in validation.pools.items():
        whole = full.pools[lang]
        gold_text = {q: whole.candidates[g] for q, g in zip(whole.question_ids, whole.gold)}
        assert [pool.candidates[g] for g in pool.gold] == [gold_text[q] for q in pool.question_ids]
        paragraphs = {pool.context_of[g] for g in pool.gold}
        assert set(pool.context_of) == paragraphs  # only the held-out questions' own paragraphs
        assert len(pool.candidates) == sum(p in paragraphs for p in whole.context_of)
    assert all(len(train.pools[lang].candidates) == len(full.pools[lang].candidates) for lang in full.pools)


@pytest.mark.skipif(not _has_data("mlqa-r"), reason="MLQA-R files not found")
def test_training_on_the_train_split_never_sees_a_validation_id():
    from hbt_accel.data import is_validation_id, load_training_corpus

    corpus = load_training_corpus("mlqa-r:train", hard_negatives=True)
    ids = corpus.example_ids(range(corpus.num_ids))
    assert ids and not any(is_validation_id(example_id) for example_id in ids)
    held_out = load_training_corpus("mlqa-r:validation")
    held_out_ids = held_out.example_ids(range(held_out.num_ids))
    assert held_out_ids and all(is_validation_id(example_id) for example_id in held_out_ids)


def test_a_mistyped_split_is_a_one_line_error():
    with pytest.raises(DataError, match=r"mlqa-r:valid: not a benchmark name .*did you mean 'mlqa-r:validation'"):
        load_lareqa_benchmark("mlqa-r:valid")
