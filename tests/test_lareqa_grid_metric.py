"""The `evaluate` metric module gives exactly `evaluate_grid`'s numbers on a small benchmark, from shuffled inputs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from hbt_accel.data import LanguagePool, RetrievalBenchmark
from hbt_accel.evaluation import evaluate_grid
from hbt_accel.evaluation.hf_metric import lareqa_grid_path

KEYS = ("mono_map", "cross_map", "multi_map", "rank_distance", "recall_at_1", "recall_at_10", "n_queries")
DICT_KEYS = ("grid", "grid_recall_at_1", "grid_recall_at_10", "multi_map_per_language", "rank_distance_per_language")


class HashEncoder:
    """Deterministic unit vectors from a text's hash, plus a shared 'topic' direction per question id (q1, q2...)."""

    def encode(self, texts, kind, batch_size=64, bf16=False):
        out = []
        for text in texts:
            seed = int(hashlib.md5(f"{kind}:{text}".encode()).hexdigest()[:8], 16)
            vector = np.random.default_rng(seed).normal(size=16)
            topic = int(text.split("#")[1]) if "#" in text else 0  # "... #3" leans towards direction 3
            vector[topic] += 2.0
            out.append(vector / np.linalg.norm(vector))
        return np.asarray(out, dtype=np.float32)


def pool(lang: str, ids: list[str], gold: list[int], n_candidates: int) -> LanguagePool:
    candidates = [f"{lang} sentence {i} #{i % 5}" for i in range(n_candidates)]
    questions = [f"{lang} question {qid} #{int(qid[1:]) % 5}" for qid in ids]
    return LanguagePool(lang, candidates, ids, questions, gold, context_of=[0] * n_candidates)


def small_benchmark() -> RetrievalBenchmark:
    # MLQA-like: "de" lacks q3 and q4; in "en" q1 and q2 share one gold sentence (index 1)
    return RetrievalBenchmark(
        "toy",
        {
            "en": pool("en", ["q1", "q2", "q3", "q4"], [1, 1, 3, 4], 6),
            "de": pool("de", ["q1", "q2"], [0, 2], 4),
            "th": pool("th", ["q1", "q2", "q3", "q4"], [4, 0, 1, 2], 5),
        },
    )


def metric_inputs(benchmark: RetrievalBenchmark, encoder, seed: int = 0) -> tuple[dict, dict]:
    """Flat inputs in a scrambled order: candidates of all languages interleaved, queries shuffled."""
    rng = np.random.default_rng(seed)
    cand_texts, cand_langs, gold_ids, gold_rows_local = [], [], [], []
    for lang, p in benchmark.pools.items():
        for qid, g in zip(p.question_ids, p.gold):
            gold_ids.append(qid)
            gold_rows_local.append((lang, g))
        cand_texts += p.candidates
        cand_langs += [lang] * len(p.candidates)
    local_index = {}
    for row, (lang, text) in enumerate(zip(cand_langs, cand_texts)):
        local_index[(lang, benchmark.pools[lang].candidates.index(text))] = row
    perm = rng.permutation(len(cand_texts))  # new position -> old row
    new_row = {old: new for new, old in enumerate(perm)}
    candidates = encoder.encode([cand_texts[i] for i in perm], "passage")
    pool_kwargs = {
        "candidate_embeddings": candidates,
        "candidate_languages": [cand_langs[i] for i in perm],
        "gold_question_ids": gold_ids,
        "gold_indices": [new_row[local_index[key]] for key in gold_rows_local],
        "languages": benchmark.languages,
    }
    q_texts = [(lang, qid, q) for lang, p in benchmark.pools.items() for qid, q in zip(p.question_ids, p.questions)]
    order = rng.permutation(len(q_texts))
    queries = {
        "query_embeddings": encoder.encode([q_texts[i][2] for i in order], "query"),
        "query_languages": [q_texts[i][0] for i in order],
        "query_ids": [q_texts[i][1] for i in order],
    }
    return queries, pool_kwargs


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(lareqa_grid_path())


def test_metric_matches_evaluate_grid(metric):
    benchmark, encoder = small_benchmark(), HashEncoder()
    expected = evaluate_grid(encoder, benchmark)
    queries, pool_kwargs = metric_inputs(benchmark, encoder)
    half = len(queries["query_ids"]) // 2
    metric.add_batch(**{k: v[:half] for k, v in queries.items()})  # two batches, as an eval loop would add them
    metric.add_batch(**{k: v[half:] for k, v in queries.items()})
    got = metric.compute(**pool_kwargs)

    assert got["languages"] == expected["languages"] == ["de", "en", "th"]
    assert set(got["grid"]) == set(expected["grid"])
    assert "de-de" in got["grid"] and len(got["grid"]) == 9  # every pair has queries (q1, q2 exist everywhere)
    assert got["grid_n_queries"]["en-de"] == 2 and got["grid_n_queries"]["en-th"] == 4
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    for key in DICT_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    assert 0 < got["multi_map"] < 1 and got["rank_distance"] > 0  # a case where the numbers could be wrong


def test_metric_rejects_inconsistent_inputs(metric):
    queries = {
        "query_embeddings": np.eye(2, 4, dtype=np.float32),
        "query_languages": ["en", "fr"],
        "query_ids": ["a", "b"],
    }
    pool_kwargs = {
        "candidate_embeddings": np.eye(3, 4, dtype=np.float32),
        "candidate_languages": ["en", "en", "de"],
        "gold_question_ids": ["a"],
        "gold_indices": [0],
    }
    with pytest.raises(ValueError, match=r"query languages \['fr'\] have no candidates"):
        metric.compute(**queries, **pool_kwargs)
    queries["query_languages"] = ["en", "en"]
    with pytest.raises(ValueError, match="two gold sentences"):
        metric.compute(**queries, **{**pool_kwargs, "gold_question_ids": ["a", "a"], "gold_indices": [0, 1]})
