"""Evaluation at scale: the sharded pipeline of `recipes/evaluate.py` on corpora in MIRACL's published layout.

    python benchmarks/eval_scale.py                        # 100k and 1M passages, 1 and 2 processes
    python benchmarks/eval_scale.py --passages 100000 --skip_real

A synthetic corpus is written in MIRACL's layout (`miracl-corpus-v1.0-sw/docs-{i}.jsonl.gz` shards of 100k
passages, `topics/topics.miracl-v1.0-sw-dev.tsv`, TREC `qrels/`), 1,000 queries with one relevant and one judged
non-relevant passage each, 40-word passages. A tiny random 2-layer encoder on the real XLM-R tokenizer does the
encoding, so the pipeline is measured rather than the model. Per corpus size and process count, each in fresh
processes:
- `peak_rss_mb_per_process`: the larger rank's peak RSS (VmHWM) over the whole first run;
- `encode_passages_per_s`: passages / the encode phase (chunks written to disk; the passage store built before);
- `encoder_only_passages_per_s`: the same encoder's `encode()` on the first 50k of the same texts in one call, in
  one process (the 2-process figure is the pipeline's total over both processes);
- `search_seconds`: exact top-100 search of the 1,000 queries over the corpus;
- `cached_rerun_seconds`: the same evaluation again (store and embeddings cached): it encodes nothing.
Then one real run: the embedded multilingual-e5-small on the real BEIR nfcorpus folder through the same pipeline,
against an in-memory reference (one array, faiss exact search). `--search_only` times `sharded.search` alone at the
issue's size, 1,000 queries over 1M random fp16 vectors of 384 dimensions in chunk files (`search_1m_384d`), and
merges it into the JSON.
Results: docs/benchmarks/eval_scale.json.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD_PASSAGES = 100_000
QUERIES = 1000
ENCODER_ONLY_TEXTS = 50_000
NFCORPUS = REPO.parent / "shared" / "data" / "benchmark-samples" / "beir" / "nfcorpus"


def write_corpus(root: Path, passages: int, seed: int = 0) -> Path:
    """MIRACL's published layout for one language (sw), written once per size (a marker file is written last)."""
    import numpy as np

    marker = root / "complete"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    vocabulary = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(5000)
    ]
    texts = [" ".join(rng.choice(vocabulary, size=39)) for _ in range(4096)]
    corpus = root / "miracl-corpus-v1.0-sw"
    corpus.mkdir(parents=True)
    for shard, start in enumerate(range(0, passages, SHARD_PASSAGES)):
        with gzip.open(corpus / f"docs-{shard}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as handle:
            for i in range(start, min(passages, start + SHARD_PASSAGES)):
                handle.write(f'{{"docid": "{i // 4}#{i % 4}", "title": "Makala {i // 4}", ')
                handle.write(f'"text": "{texts[(i * 7919) % 4096]} {i}"}}\n')
    base = root / "miracl-v1.0-sw"
    (base / "topics").mkdir(parents=True)
    (base / "qrels").mkdir(parents=True)
    picks = rng.choice(passages, size=(QUERIES, 2), replace=False)
    topics = "".join(f"{q}\t{' '.join(rng.choice(vocabulary, size=6))}\n" for q in range(QUERIES))
    (base / "topics" / "topics.miracl-v1.0-sw-dev.tsv").write_text(topics)
    qrels = "".join(
        f"{q}\tQ0\t{good // 4}#{good % 4}\t1\n{q}\tQ0\t{bad // 4}#{bad % 4}\t0\n"
        for q, (good, bad) in enumerate(picks)
    )
    (base / "qrels" / "qrels.miracl-v1.0-sw-dev.tsv").write_text(qrels)
    marker.write_text(str(passages))
    return root


# =====================================================================================================================
# Measurements in their own processes
# =====================================================================================================================
def evaluate_worker(argv: list[str], out_dir: str) -> None:
    """recipes/evaluate.py in this process (one rank of a launch, or alone), then this rank's peak RSS."""
    from data_scale import peak_rss_mb  # benchmarks/ is this script's folder: the first entry of sys.path

    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO / "recipes" / "evaluate.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclass looks its module up while being made
    spec.loader.exec_module(recipe)
    recipe.run_cli(recipe.main, recipe.EvaluateArguments, argv)
    rank = int(os.environ.get("RANK", 0))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def encoder_only(root: str, model: str) -> dict:
    """The encoder alone on the first ENCODER_ONLY_TEXTS passages of the same corpus, one call, one process."""
    from hbt_accel.evaluation.published import load_task
    from hbt_accel.models.dual_encoder import DualEncoder

    texts: list[str] = []
    for batch in load_task(root, language="sw", split="dev")[0].corpus.batches():
        texts += batch.column("text").to_pylist()
        if len(texts) >= ENCODER_ONLY_TEXTS:
            break
    texts = texts[:ENCODER_ONLY_TEXTS]
    encoder = DualEncoder.from_pretrained(model)
    started = time.perf_counter()
    encoder.encode(texts, "passage", batch_size=64, bf16=False)
    return {"encoder_only_passages_per_s": len(texts) / (time.perf_counter() - started)}


def real_run(model: str, cache: str) -> dict:
    """The embedded model on the real nfcorpus BEIR folder: the sharded pipeline against an in-memory reference
    (every passage encoded in one array, faiss exact search, the same task's scorer)."""
    from hbt_accel.evaluation.at_scale import model_key, score_task
    from hbt_accel.evaluation.published import load_task
    from hbt_accel.models.bundled_e5 import resolve_model_path
    from hbt_accel.models.dual_encoder import DualEncoder

    encoder = DualEncoder.from_pretrained(model)
    task = load_task(str(NFCORPUS), split="test")[0]
    started = time.perf_counter()
    sharded = score_task(encoder, task, model_key(resolve_model_path(model), encoder, False), cache_dir=cache)
    sharded["wall_seconds"] = time.perf_counter() - started
    keep = ("ndcg_at_10", "recall_at_100", "n_queries", "seconds", "encode_seconds", "search_seconds", "wall_seconds")
    return {
        "sharded": {key: sharded[key] for key in keep if key in sharded} | {"protocol": sharded["protocol"]},
        "in_memory_reference": in_memory_reference(encoder, task),
    }


def in_memory_reference(encoder, task) -> dict:
    import faiss
    import numpy as np

    started = time.perf_counter()
    batches = list(task.corpus.batches())
    docids = [docid for batch in batches for docid in batch.column("docid").to_pylist()]
    texts = [text for batch in batches for text in batch.column("text").to_pylist()]
    passages = encoder.encode(texts, "passage", batch_size=64, bf16=False)
    queries = encoder.encode([text for _, text in task.queries], "query", batch_size=64, bf16=False)
    index = faiss.IndexFlatIP(passages.shape[1])
    index.add(np.ascontiguousarray(passages, dtype=np.float32))
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), task.depth)
    run = {
        qid: [(docids[r], float(v)) for v, r in zip(query_scores, query_rows) if r >= 0]
        for (qid, _), query_scores, query_rows in zip(task.queries, scores, rows)
    }
    results = task.score(run)
    return {key: results[key] for key in ("ndcg_at_10", "recall_at_100")} | {"seconds": time.perf_counter() - started}


# =====================================================================================================================
# The driver
# =====================================================================================================================
def child(args: list[str], launch: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    if launch:
        env["OMP_NUM_THREADS"] = "1"
        config = str(REPO / "accelerate_configs" / "cpu_ddp.yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *command[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:3])} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
    return result


def evaluate_once(root: Path, model: Path, cache: Path, work: Path, processes: int) -> tuple[dict, float]:
    """(the task's results, the larger rank's peak RSS) of one evaluation."""
    out = work / "evaluate_out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [
        "--model",
        str(model),
        "--benchmark",
        str(root),
        "--languages",
        "sw",
        "--split",
        "dev",
        "--precision",
        "no",
    ]
    argv += ["--cache_dir", str(cache), "--output_dir", str(out / "results")]
    child(["--measure", "evaluate", "--out", str(out), "--", *argv], launch=processes > 1)
    task = json.loads((out / "results" / "eval_results.json").read_text())["tasks"][0]
    peaks = [json.loads((out / f"rank{r}.json").read_text())["peak_rss_mb"] for r in range(processes)]
    return task, max(peaks)


def measure(root: Path, passages: int, processes: int, model: Path, work: Path, encoder_rate: float) -> dict:
    cache = work / f"cache_{passages}_{processes}"
    shutil.rmtree(cache, ignore_errors=True)
    first, peak = evaluate_once(root, model, cache, work, processes)
    again, _ = evaluate_once(root, model, cache, work, processes)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "passages": passages,
        "processes": processes,
        "peak_rss_mb_per_process": round(peak, 1),
        "encode_passages_per_s": round(passages / first["encode_seconds"], 1),
        "encoder_only_passages_per_s": round(encoder_rate, 1),
        "passage_store_seconds": round(first["passage_store_seconds"], 2),
        "encode_seconds": round(first["encode_seconds"], 2),
        "search_seconds": round(first["search_seconds"], 3),
        "first_run_seconds": round(first["seconds"], 2),
        "cached_rerun_seconds": round(again["seconds"], 2),
        "cached_rerun_encoded_passages": again["encoded_passages_this_process"],
        "ndcg_at_10": first["ndcg_at_10"],
        "ndcg_at_10_rerun": again["ndcg_at_10"],
    }


def search_384d(work: Path, passages: int = 1_000_000, dim: int = 384, chunk_rows: int = 16384) -> dict:
    """`sharded.search` of 1,000 queries, top 100, over `passages` random unit fp16 vectors in chunk files."""
    import numpy as np

    from hbt_accel.evaluation.sharded import EmbeddingShards, search

    folder = work / "search_384d"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = EmbeddingShards(folder, passages, dim, chunk_rows)
    rng = np.random.default_rng(0)
    for chunk in range(shards.num_chunks):
        start, stop = shards.chunk_bounds(chunk)
        vectors = rng.standard_normal((stop - start, dim), dtype=np.float32)
        np.save(
            shards.chunk_path(chunk), (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
        )
    queries = rng.standard_normal((QUERIES, dim), dtype=np.float32)
    started = time.perf_counter()
    search(shards, queries / np.linalg.norm(queries, axis=1, keepdims=True), k=100)
    seconds = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    return {"passages": passages, "dim": dim, "queries": QUERIES, "k": 100, "processes": 1, "search_seconds": seconds}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work_dir", default="/tmp/hbt_eval_scale")
    parser.add_argument("--skip_real", action="store_true", help="no run of the embedded model on nfcorpus")
    parser.add_argument("--search_only", action="store_true", help="only the 1M x 384 search, merged into --output")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "eval_scale.json"))
    parser.add_argument("--measure", choices=("evaluate", "encoder_only", "real"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure == "evaluate":
        return evaluate_worker(args.rest, args.out)
    if args.measure:
        figures = (
            encoder_only(args.root, args.model) if args.measure == "encoder_only" else real_run(args.model, args.out)
        )
        print(json.dumps(figures))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_scale import tiny_model

    from hbt_accel.atomic import write_json
    from hbt_accel.models.precision import machine_description

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.search_only:
        results = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
        results["search_1m_384d"] = search_384d(work) | {
            "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(results["search_1m_384d"]))
        write_json(args.output, results)
        return
    model = tiny_model(work / "tiny_model")
    results: dict = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    for passages in args.passages:
        root = write_corpus(work / f"miracl_{passages}", passages)
        rate_output = child(["--measure", "encoder_only", "--root", str(root), "--model", str(model)]).stdout
        encoder_rate = json.loads(rate_output.strip().splitlines()[-1])["encoder_only_passages_per_s"]
        for processes in args.processes:
            figures = measure(root, passages, processes, model, work, encoder_rate)
            results["runs"].append(figures)
            print(json.dumps(figures), flush=True)
    if not args.skip_real and NFCORPUS.is_dir():
        cache = work / "cache_real"
        shutil.rmtree(cache, ignore_errors=True)
        real = child(["--measure", "real", "--model", "embedded", "--out", str(cache)]).stdout
        results["real_nfcorpus_embedded_e5_small"] = json.loads(real.strip().splitlines()[-1])
        print(json.dumps(results["real_nfcorpus_embedded_e5_small"]), flush=True)
    write_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
