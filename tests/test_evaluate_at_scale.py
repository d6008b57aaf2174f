"""`recipes/evaluate.py --benchmark PATH` on a benchmark in its published layout: the official metric equals a
brute-force reference, a re-score encodes nothing, and a 2-process launch gives the same numbers."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from ir_measures import R, nDCG

from tests import test_published_benchmarks as published
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
WORDS = ["mto", "mlima", "kitabu", "shule", "mvua", "jua", "chakula", "maji", "nyumba", "gari", "mti", "ndege"]


def write_miracl_sw(root: Path, passages: int = 90) -> Path:
    """MIRACL's published layout, one language: topics + TREC qrels (judged 0 and 1) + a gzipped corpus shard."""
    rng = np.random.default_rng(0)
    base = root / "miracl-v1.0-sw"
    (base / "topics").mkdir(parents=True)
    (base / "qrels").mkdir(parents=True)
    docs = [
        {"docid": f"{i // 3}#{i % 3}", "title": f"Makala {i // 3}", "text": " ".join(rng.choice(WORDS, size=12))}
        for i in range(passages)
    ]
    queries = {str(q): " ".join(rng.choice(WORDS, size=4)) for q in range(1, 9)}
    topics = "".join(f"{qid}\t{text}\n" for qid, text in queries.items())
    (base / "topics" / "topics.miracl-v1.0-sw-dev.tsv").write_text(topics)
    qrels = [f"{qid}\tQ0\t{docs[int(qid) * 7 + j]['docid']}\t{int(j < 2)}\n" for qid in queries for j in range(3)]
    (base / "qrels" / "qrels.miracl-v1.0-sw-dev.tsv").write_text("".join(qrels))
    corpus = root / "miracl-corpus-v1.0-sw"
    corpus.mkdir()
    for shard, part in enumerate((docs[:50], docs[50:])):  # two shards, read in number order
        with gzip.open(corpus / f"docs-{shard}.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(doc) + "\n" for doc in part)
    return root


def evaluate(args: list[str], launch: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), *args]
    if launch:
        config = ["--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *config, str(free_port()), *command[1:]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = Path(args[args.index("--output_dir") + 1])
    return json.loads((output / "eval_results.json").read_text())


def reference(model_dir: Path, root: Path) -> dict[str, float]:
    """Brute force: every text encoded in one call, passages fp16-rounded like the chunks, scored by ir_measures."""
    from hbt_accel.evaluation.published import load_task
    from hbt_accel.models.dual_encoder import DualEncoder

    task = load_task(str(root), language="sw", split="dev")[0]
    encoder = DualEncoder.from_pretrained(model_dir)
    docids, texts = [], []
    for batch in task.corpus.batches():
        docids += batch.column("docid").to_pylist()
        texts += batch.column("text").to_pylist()
    passages = encoder.encode(texts, "passage", batch_size=64, bf16=False).astype(np.float16).astype(np.float32)
    queries = encoder.encode([text for _, text in task.queries], "query", batch_size=64, bf16=False)
    scores = queries @ passages.T  # (Q, N)
    run = {
        qid: {docids[j]: float(scores[i, j]) for j in range(len(docids))} for i, (qid, _) in enumerate(task.queries)
    }
    measures = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], task.qrels, run)
    return {"ndcg_at_10": measures[nDCG @ 10], "recall_at_100": measures[R @ 100]}


@pytest.mark.distributed
def test_miracl_layout_scores_like_brute_force_is_cached_and_agrees_under_a_launch(tmp_path, tiny_model_dir):
    root = write_miracl_sw(tmp_path / "miracl")
    common = ["--model", str(tiny_model_dir), "--benchmark", str(root), "--languages", "sw", "--split", "dev"]
    common += ["--precision", "no", "--chunk_rows", "32", "--cache_dir", str(tmp_path / "cache")]
    first = evaluate(common + ["--output_dir", str(tmp_path / "one")])
    task = first["tasks"][0]
    assert task["task"] == "miracl-sw-dev" and task["n_queries"] == 8
    assert task["protocol"]["corpus_size"] == 90 and task["protocol"]["precision"] == "fp32"
    assert task["protocol"]["passage_max_length"] == 128 and task["protocol"]["split"] == "dev"
    expected = reference(tiny_model_dir, root)
    for metric, value in expected.items():
        assert task[metric] == pytest.approx(value, abs=1e-4), metric
    assert task["encoded_passages_this_process"] == 90
    assert first["macro_average"]["ndcg_at_10"] == pytest.approx(task["ndcg_at_10"])

    again = evaluate(common + ["--output_dir", str(tmp_path / "again")])  # the same checkpoint: nothing encoded
    assert again["tasks"][0]["encoded_passages_this_process"] == 0
    assert again["tasks"][0]["ndcg_at_10"] == task["ndcg_at_10"]

    launched = common[:-1] + [str(tmp_path / "cache_launch"), "--output_dir", str(tmp_path / "launched")]
    two = evaluate(launched, launch=True)["tasks"][0]
    for metric in expected:
        assert two[metric] == pytest.approx(task[metric], abs=1e-4), metric
    chunks = sorted((tmp_path / "cache_launch" / "embeddings").glob("*/chunk-*.npy"))
    assert [np.load(chunk).shape[0] for chunk in chunks] == [32, 32, 26]  # each embedding written once
    assert two["encoded_passages_this_process"] == 58  # the main process wrote chunks 0 and 2, the other chunk 1


# ---------------------------------------------------------------------------------------------------------------
# A published benchmark as a training run's eval_benchmark
# ---------------------------------------------------------------------------------------------------------------
def test_capped_corpus_keeps_every_judged_passage_and_the_same_sample(tmp_path):
    from hbt_accel.evaluation.at_scale import task_passages
    from hbt_accel.evaluation.evaluator import capped_passages, capped_rows
    from hbt_accel.evaluation.published import load_task

    task = load_task(str(write_miracl_sw(tmp_path / "miracl")), language="sw", split="dev")[0]
    full = task_passages(task, tmp_path / "cache")
    judged = {docid for judgements in task.qrels.values() for docid in judgements}
    assert len(full) == 90 and len(judged) == 24
    capped = capped_passages(task, full, 40, tmp_path / "cache")
    docids = capped.docids(range(len(capped)))
    assert len(capped) == 40 and judged <= set(docids)  # the 24 judged + 16 drawn from the other 66
    assert capped_passages(task, full, 40, tmp_path / "cache").folder == capped.folder  # built once, then cached
    assert list(capped_rows(full, sorted(judged), 40)) == list(capped_rows(full, sorted(judged), 40))
    assert capped.texts_at([docids.index("2#1")]) == full.texts_at(full.rows_of(["2#1"]))  # judged: row 7
    assert len(capped_passages(task, full, 10, tmp_path / "cache")) == 24  # never drops a judged passage
    assert capped_passages(task, full, 0, tmp_path / "cache") is full
    assert capped_passages(task, full, 90, tmp_path / "cache") is full


def _train_on_miracl(tmp_path, tiny_model_dir, mlqa_slice, *extra: str):
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import train

    root = write_miracl_sw(tmp_path / "miracl")
    cfg = parse_config(
        [
            *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--num_layers", "1"),
            *("--output_dir", str(tmp_path / "run"), "--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "4"),
            *("--per_device_train_batch_size", "8", "--mixed_precision", "no", "--eval_precision", "no"),
            *("--query_max_length", "32", "--passage_max_length", "48", "--eval_benchmark", str(root)),
            *("--eval_languages", "sw", "--eval_split", "dev", "--eval_steps", "2", "--eval_corpus_passages", "40"),
            *extra,
        ]
    )
    return root, train(cfg)


def test_training_scores_a_miracl_layout_capped_during_and_full_at_the_end(tmp_path, tiny_model_dir, mlqa_slice):
    from hbt_accel.evaluation.at_scale import model_key, score_task
    from hbt_accel.evaluation.published import load_task
    from hbt_accel.models.dual_encoder import DualEncoder

    root, result = _train_on_miracl(tmp_path, tiny_model_dir, mlqa_slice, "--metric_for_best_model", "ndcg_at_10")
    out = result.output_dir
    # periodic points: the capped corpus (24 judged + 16 drawn), the benchmark's own metrics, a best checkpoint
    evaluations = result.summary.evaluations
    assert [e["step"] for e in evaluations] == [0, 2, 4]  # 4: the last step, on the capped corpus too
    assert all({"ndcg_at_10", "recall_at_100"} <= set(e) and e["n_queries"] == 8 for e in evaluations)
    periodic = json.loads((out / "checkpoint-2" / "eval_results.json").read_text())
    assert periodic["corpus"].startswith("capped corpus") and periodic["tasks"][0]["protocol"]["corpus_size"] == 40
    assert json.loads((out / "checkpoint-2" / "training_progress.json").read_text())["best_checkpoint"]
    assert not (out / ".periodic_embeddings").exists()  # the moving model's embeddings are scratch
    # the final model: the full corpus, the official metric equal to brute force
    final = result.results
    assert final["corpus"] == "full corpus" and final["tasks"][0]["protocol"]["corpus_size"] == 90
    for metric, value in reference(out, root).items():
        assert final[metric] == pytest.approx(value, abs=1e-4), metric
    card = (out / "README.md").read_text()
    assert "searched in the **full corpus**" in card and "capped corpus" in card and "miracl-sw-dev" in card
    # re-scoring the saved model (as recipes/evaluate.py --model RUN does) encodes nothing: cached by its weights
    encoder = DualEncoder.from_pretrained(out)
    task = load_task(str(root), language="sw", split="dev")[0]
    again = score_task(encoder, task, model_key(out, encoder, False), cache_dir=str(tmp_path / "cache"))
    assert again["encoded_passages_this_process"] == 0
    assert again["ndcg_at_10"] == pytest.approx(final["ndcg_at_10"], abs=1e-6)


def test_a_published_benchmark_needs_one_of_its_own_metrics_to_select_checkpoints(
    tmp_path, tiny_model_dir, mlqa_slice
):
    from hbt_accel.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"metric_for_best_model: got 'mean_map', expected one of ndcg_at_10, recall_at_100$"
    ):
        _train_on_miracl(tmp_path, tiny_model_dir, mlqa_slice)
    assert not (tmp_path / "run" / "train_summary.json").exists()


@pytest.mark.distributed
def test_a_miracl_layout_scored_during_zero3_training_equals_brute_force(tmp_path, tiny_model_dir, mlqa_slice):
    """Under ZeRO-3 every forward gathers parameters from both ranks: the one corpus chunk is encoded by rank 0 while
    rank 1 runs the same number of dummy forwards, or the run would hang. The scores equal one process's."""
    root, out = write_miracl_sw(tmp_path / "miracl"), tmp_path / "run"
    args = [
        *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)),
        *("--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "4", "--per_device_train_batch_size", "8"),
        *("--mixed_precision", "no", "--eval_precision", "no", "--query_max_length", "32"),
        *("--passage_max_length", "48", "--eval_benchmark", str(root), "--eval_languages", "sw"),
        *("--eval_steps", "2", "--eval_corpus_passages", "40", "--metric_for_best_model", "recall_at_100"),
    ]
    config = ["--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml")]
    command = [sys.executable, "-m", "accelerate.commands.launch", *config, "--main_process_port", str(free_port())]
    command += [str(REPO / "recipes" / "train_hybrid.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    final = json.loads((out / "eval_results.json").read_text())
    assert final["corpus"] == "full corpus" and final["tasks"][0]["protocol"]["corpus_size"] == 90
    for metric, value in reference(out, root).items():
        assert final[metric] == pytest.approx(value, abs=1e-4), metric


LAYOUTS = {  # benchmark -> (fixture writer, the path to score, its --corpus, its language)
    "miracl": (lambda root: published.write_miracl(root), "", "", "sw"),
    "mrtydi": (lambda root: published.write_mrtydi(root), "", "", "sw"),
    "mldr": (lambda root: published.write_mldr(root), "", "", "ar"),
    "beir": (lambda root: published.write_beir(root / "toy"), "toy", "", ""),
    "mkqa": (lambda root: published.write_mkqa(root), "mkqa.jsonl.gz", "nq", "de"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_published_layout_scores_through_the_evaluator_like_brute_force(layout, tmp_path, tiny_model_dir):
    """What `recipes/evaluate.py --benchmark PATH` runs (evaluator -> passage store -> fp16 chunks -> exact search
    -> the official metric) equals ranking every passage of the corpus at once, for each published layout."""
    from hbt_accel.evaluation.evaluator import EvaluationSpec, open_evaluator
    from hbt_accel.evaluation.published import load_task
    from hbt_accel.models.dual_encoder import DualEncoder

    write, inner, corpus, language = LAYOUTS[layout]
    write(tmp_path)
    path, corpus = str(tmp_path / inner), str(tmp_path / corpus) if corpus else ""
    spec = EvaluationSpec(path, (language,) if language else (), corpus=corpus, cache_dir=str(tmp_path / "cache"))
    encoder = DualEncoder.from_pretrained(tiny_model_dir)
    results = open_evaluator(spec).score(encoder, None, final=True, model_dir=tiny_model_dir)
    task = load_task(path, language=language or None, corpus=corpus or None)[0]
    expected = brute_force(task, encoder)
    assert results["benchmark"] == task.protocol["benchmark"] and results["corpus"] == "full corpus"
    for metric in task.metrics:
        assert results[metric] == pytest.approx(expected[metric], abs=1e-6), metric
        assert results["tasks"][0][metric] == results[metric]  # one task: the macro average is that task


def brute_force(task, encoder) -> dict:
    passages = published.all_passages(task)
    docids = list(passages)
    vectors = encoder.encode([passages[d] for d in docids], "passage").astype(np.float16).astype(np.float32)
    scores = encoder.encode([text for _, text in task.queries], "query") @ vectors.T  # (Q, N)
    run = {
        qid: sorted(zip(docids, row.tolist()), key=lambda hit: -hit[1])[: task.depth]
        for (qid, _), row in zip(task.queries, scores)
    }
    return task.score(run, passage_text=lambda ids: [passages[d] for d in ids])


def test_a_capped_lareqa_pool_keeps_the_scored_questions_gold_sentences_and_a_fixed_sample():
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation.evaluator import capped_pools
    from hbt_accel.evaluation.grid import select_question_ids

    full = load_lareqa_benchmark("xquad-r", languages=["en", "de"])
    capped = capped_pools(full, 10, 40)
    wanted = select_question_ids(full, full.languages, 10)
    for language, pool in capped.pools.items():
        original = full.pools[language]
        assert set(pool.question_ids) == {qid for qid in original.question_ids if qid in wanted}
        assert len(pool.candidates) == 40 < len(original.candidates)
        gold_text = {qid: original.candidates[g] for qid, g in zip(original.question_ids, original.gold)}
        assert all(pool.candidates[g] == gold_text[qid] for qid, g in zip(pool.question_ids, pool.gold))
        assert set(pool.candidates) <= set(original.candidates)
    assert capped_pools(full, 10, 40).pools["de"].candidates == capped.pools["de"].candidates  # the same sample
    assert capped_pools(full, 10, 100_000) is full and capped_pools(full, 10, 0) is full


def test_a_periodic_evaluation_says_full_corpus_when_the_cap_exceeds_it(tmp_path, tiny_model_dir):
    from hbt_accel.evaluation.evaluator import EvaluationSpec, open_evaluator
    from hbt_accel.models.dual_encoder import DualEncoder

    root = write_miracl_sw(tmp_path / "miracl")  # 90 passages
    encoder = DualEncoder.from_pretrained(tiny_model_dir)
    for cap, corpus, size in ((40, "capped corpus", 40), (1000, "full corpus", 90)):
        spec = EvaluationSpec(str(root), ("sw",), split="dev", corpus_passages=cap, cache_dir=str(tmp_path / "c"))
        results = open_evaluator(spec).score(encoder, None, final=False, scratch_dir=tmp_path / "run")
        assert results["corpus"].startswith(corpus) and results["tasks"][0]["protocol"]["corpus_size"] == size
