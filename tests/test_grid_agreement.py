"""The grid scorer against an independent one (trec_eval through pytrec_eval), the BEIR scorer against hand-computed
numbers, and 2-process encoding against a single process.

`trec_eval_scores` re-ranks the SAME embeddings in float64 and lets trec_eval compute AP. trec_eval breaks ties by
docno (descending); relevant documents are named "0:<col>" and the others "1:<col>" so its tie order is the one our
scorer documents (non-relevant first). Documents scored below the worst relevant one cannot change AP, so each run
holds only the documents scoring at or above it (keeps the dicts small; exact, not an approximation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from hbt_accel.data import DataError, load_lareqa_benchmark, resolve_data_dir
from hbt_accel.evaluation import encode_benchmark, evaluate_grid, score_encoded
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_eval_script import HashEncoder  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _has_xquad() -> bool:
    try:
        return (resolve_data_dir() / "xquad-r").is_dir()
    except DataError:
        return False


needs_xquad = pytest.mark.skipif(not _has_xquad(), reason="XQuAD-R files not found")


def trec_eval_scores(encoded, pairs: list[tuple[str, str]] | None = None):
    """-> (grid {"x-y": map}, multi {x: map}, rank distance {x: mean}) computed independently of `metrics.py`."""
    languages, offsets = encoded.languages, encoded.candidate_offsets
    queries = encoded.query_embeddings.astype(np.float64)
    candidates = encoded.candidate_embeddings.astype(np.float64)
    pairs = pairs if pairs is not None else [(x, y) for x in languages for y in languages]
    grid, multi, distance = {}, {}, {}
    for i, query_lang in enumerate(languages):
        rows = np.flatnonzero(encoded.query_language == i)
        scores = queries[rows] @ candidates.T  # (n, N)
        gold = encoded.gold_columns[rows]  # (n, L)
        settings = [(pool_lang, [languages.index(pool_lang)]) for q, pool_lang in pairs if q == query_lang]
        settings.append(("*", list(range(len(languages)))))
        for name, pool_languages in settings:
            qrels, run, spans = {}, {}, []
            for r in range(len(rows)):
                relevant = {int(gold[r, j]) for j in pool_languages if gold[r, j] >= 0}
                if not relevant:
                    continue
                columns = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in pool_languages])
                row = scores[r, columns]
                threshold = min(scores[r, c] for c in relevant)
                keep = columns[row >= threshold]
                qid = f"q{r}"
                qrels[qid] = {f"0:{c}": 1 for c in relevant}
                run[qid] = {(f"0:{c}" if c in relevant else f"1:{c}"): float(scores[r, c]) for c in keep}
                if name == "*":  # positions in trec_eval's order: score descending, then docno descending
                    ranked = sorted(run[qid].items(), key=lambda item: (item[1], item[0]), reverse=True)
                    positions = [k + 1 for k, (doc, _) in enumerate(ranked) if doc.startswith("0:")]
                    spans.append(max(positions) - min(positions))
            if not qrels:
                continue
            per_query = pytrec_eval.RelevanceEvaluator(qrels, {"map"}).evaluate(run)
            value = float(np.mean([m["map"] for m in per_query.values()]))
            if name == "*":
                multi[query_lang], distance[query_lang] = value, float(np.mean(spans))
            else:
                grid[f"{query_lang}-{name}"] = value
    return grid, multi, distance


@needs_xquad
def test_grid_equals_trec_eval_on_an_xquad_subset():
    benchmark = load_lareqa_benchmark("xquad-r", languages=["en", "de", "zh"])
    encoded = encode_benchmark(HashEncoder(), benchmark, max_queries=150)
    ours = score_encoded(encoded, block_size=64)
    grid, multi, distance = trec_eval_scores(encoded)
    assert len(ours["grid"]) == 9 and set(ours["grid"]) == set(grid)
    for key, value in grid.items():
        assert ours["grid"][key] == pytest.approx(value, abs=1e-6), key
    for lang in ("en", "de", "zh"):
        assert ours["multi_map_per_language"][lang] == pytest.approx(multi[lang], abs=1e-6)
        assert ours["rank_distance_per_language"][lang] == pytest.approx(distance[lang], abs=1e-6)
    assert ours["mono_map"] == pytest.approx(np.mean([grid[f"{x}-{x}"] for x in ("en", "de", "zh")]), abs=1e-6)
    assert 0.05 < ours["mono_map"] < 1  # the fake encoder is weak but not random: the test can tell them apart


# ---------------------------------------------------------------------------------------------------------------
# BEIR-style scorer
# ---------------------------------------------------------------------------------------------------------------
class OneHotEncoder:
    """Passage d_k -> e_k; a query's vector is its score row over (d1, d2, d3, d4)."""

    QUERIES = {"first query": [0.9, 0.8, 0.1, 0.5], "second query": [0.2, 0.3, 0.4, 0.95], "unjudged": [1, 0, 0, 0]}
    settings = types.SimpleNamespace(query_max_length=8, passage_max_length=8)  # what a result's protocol reports

    def encode(self, texts, kind="query", batch_size=64, bf16=False):
        if kind == "passage":
            return np.eye(4, dtype=np.float32)[[int(t[-1]) - 1 for t in texts]]
        return np.array([self.QUERIES[t] for t in texts], dtype=np.float32)


def _write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{k}", "title": "" if k % 2 else "T", "text": f"doc {k}"} for k in range(1, 5)]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    queries = [{"_id": f"q{k}", "text": t} for k, t in enumerate(OneHotEncoder.QUERIES, 1)]
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\nq1\td3\t1\nq2\td4\t2\n")
    return folder


def score_beir(folder: Path, cache: Path, index: str = "flat", depth: int | None = None) -> dict:
    """A BEIR folder through the path `recipes/evaluate.py --benchmark` takes (passage store, shards, search)."""
    import dataclasses

    from hbt_accel.evaluation.at_scale import score_task
    from hbt_accel.evaluation.published import load_task

    task = load_task(str(folder))[0]
    task = dataclasses.replace(task, depth=depth) if depth else task
    return score_task(OneHotEncoder(), task, {"weights": [{"name": "one-hot"}]}, cache_dir=cache, index=index)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_beir_metrics_against_hand_computed_values(tmp_path, index):
    folder = _write_beir(tmp_path / "toy")
    results = score_beir(folder, tmp_path / "cache", index)
    # q1 ranking d1 .9, d2 .8 (rel), d4 .5, d3 .1 (rel): DCG = 1/log2(3) + 1/log2(5), IDCG = 1 + 1/log2(3), RR = 1/2
    # q2: d4 (grade 2) first: nDCG 1, RR 1. q3 has no judgements and is not scored.
    ndcg_q1 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert results["ndcg_at_10"] == pytest.approx((ndcg_q1 + 1) / 2, abs=1e-3)  # fp16 embeddings: 1e-3
    assert results["mrr_at_10"] == pytest.approx(0.75)
    assert results["recall_at_100"] == pytest.approx(1.0)
    assert results["n_queries"] == 2 and results["protocol"]["corpus_size"] == 4
    assert results["protocol"]["search"].startswith("exact" if index == "flat" else f"faiss {index}")
    # only the top 2 retrieved: q1 keeps d2 alone -> recall 1/2, DCG 1/log2(3)
    top2 = score_beir(folder, tmp_path / "cache", index, depth=2)
    assert top2["recall_at_100"] == pytest.approx(0.75)
    assert top2["ndcg_at_10"] == pytest.approx((1 / np.log2(3) / (1 + 1 / np.log2(3)) + 1) / 2, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------
@needs_xquad
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_process_encoding_equals_single_process(tmp_path):
    output = tmp_path / "dist.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(TESTS / "distributed_eval_script.py"), str(output), "en,de,zh", "101",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = json.loads(output.read_text())

    benchmark = load_lareqa_benchmark("xquad-r", languages=["en", "de", "zh"])
    single = evaluate_grid(HashEncoder(), benchmark, max_queries=101, block_size=100)
    texts = 3 * 101 + sum(len(pool.candidates) for pool in benchmark.pools.values())
    assert distributed["num_processes"] == 2
    # each text is encoded by one rank; ranks encode EQUAL counts (ZeRO-3 needs the same number of forwards), so a
    # shorter shard repeats one text: at most one extra per encoding pass (questions, candidates)
    rank0, rank1 = distributed["encoded_per_rank"]
    assert rank0 == rank1
    assert texts <= rank0 + rank1 <= texts + 2
    for key in ("mono_map", "cross_map", "multi_map", "rank_distance", "recall_at_1", "recall_at_10"):
        assert distributed[key] == single[key], key
    assert distributed["grid"] == single["grid"]


# ---------------------------------------------------------------------------------------------------------------
# The real embedded model (slow: a few minutes on 2 cores)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_xquad
def test_embedded_model_agrees_with_trec_eval():
    from hbt_accel.models.dual_encoder import DualEncoder

    encoder = DualEncoder.from_pretrained("embedded")
    benchmark = load_lareqa_benchmark("xquad-r", languages=["en", "de"])
    encoded = encode_benchmark(encoder, benchmark, max_queries=40)
    ours = score_encoded(encoded)
    grid, multi, _ = trec_eval_scores(encoded)
    for key, value in grid.items():
        assert ours["grid"][key] == pytest.approx(value, abs=1e-6), key
    for lang, value in multi.items():
        assert ours["multi_map_per_language"][lang] == pytest.approx(value, abs=1e-6)
    assert ours["mono_map"] > 0.6  # multilingual-e5-small: ~0.77-0.8 on these questions


@pytest.mark.parametrize(
    ("qrels", "message"),
    [
        (b"query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"qrels/test.tsv:2: relevance 'high' is not an integer grade"),
        (
            b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td\xff2\t1\n",
            r"qrels/test.tsv:3: not UTF-8 text \(byte 0xff at column 5\)",
        ),
        (
            b"query-id\tcorpus-id\tscore\nq9\td1\t1\n",
            r"qrels/test.tsv:2: query id 'q9' has no query in .*queries.jsonl",
        ),
    ],
)
def test_bad_beir_qrels_are_one_line_naming_the_line(tmp_path, qrels, message):
    from hbt_accel.evaluation.published import load_task

    folder = _write_beir(tmp_path / "toy")
    (folder / "qrels" / "test.tsv").write_bytes(qrels)
    with pytest.raises(DataError, match=message):
        load_task(str(folder))
