"""Score a model on a benchmark in its published layout at any corpus size: MIRACL, Mr. TyDi, MLDR, MKQA.

task      `published.load_task`: which queries count, the corpus files, the official metric and protocol
passages  `sharded.open_passages`: the corpus converted once into a memory-mapped Arrow store (cached)
encode    `sharded.encode_corpus`: each process encodes its own chunks to fp16 files on disk; cached by the
          model's weights, its encoder settings and the precision, so a second split, metric or re-score of the
          same checkpoint encodes nothing, and a killed encode resumes at its last finished chunk
search    `sharded.search`: exact inner product chunk by chunk, top-k merged across processes (no process holds
          the corpus's texts or embeddings); queries are few and go through `encoding.encode_texts`
score     `RetrievalTask.score` on the run; the result names its protocol (benchmark, split, corpus size,
          metric and cutoff, passage format, max length, precision)
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hbt_accel.data.cache import file_fingerprint
from hbt_accel.errors import ConfigError
from hbt_accel.evaluation.encoding import encode_texts
from hbt_accel.evaluation.published import RetrievalTask
from hbt_accel.evaluation.sharded import PassageStore, approximate_search, encode_corpus, open_passages, search

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json", "hbt_encoder.json", "adapter_config.json")


def model_key(model_path: str | Path, encoder, bf16: bool) -> dict:
    """What makes a corpus's embeddings these: the weight files (size and modification time), the encoder settings
    (pooling, prefixes, max lengths) and the precision."""
    folder = Path(model_path)
    files = sorted(p for pattern in WEIGHT_FILES for p in folder.glob(pattern)) if folder.is_dir() else []
    weights = [file_fingerprint(p) for p in files] or [{"name": str(model_path)}]  # a Hub id: its name
    return {"weights": weights, "settings": asdict(encoder.settings), "bf16": bf16}


def score_task(
    encoder,
    task: RetrievalTask,
    key: dict,
    *,
    cache_dir: str = "",
    batch_size: int = 64,
    bf16: bool = False,
    accelerator=None,
    chunk_rows: int = 16384,
    passages: PassageStore | None = None,
    index: str = "flat",
) -> dict:
    """One task: its metrics, its protocol, how many passages this call encoded and the seconds of each phase.
    `passages`: the store to search (a capped corpus: `evaluator.capped_passages`); default the task's corpus.
    `index`: flat = exact search over every process's chunks; ivf / hnsw = a faiss index in one process, with its
    recall@100 against exact search on a sample of the queries in the protocol."""
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    passages = passages or task_passages(task, cache_dir, accelerator)
    store_seconds = lap()
    shards = encode_corpus(
        encoder, passages, key=key, cache_dir=cache_dir, chunk_rows=chunk_rows, batch_size=batch_size, bf16=bf16,
        accelerator=accelerator,
    )  # fmt: skip
    encode_seconds = lap()
    texts = [text for _, text in task.queries]
    queries = encode_texts(encoder, texts, "query", batch_size, bf16, accelerator)  # (Q, d)
    lap()
    scores, rows, how = _search(shards, queries, task.depth, index, accelerator)  # (Q, k) each
    search_seconds = lap()
    run, row_of = _run(task, passages, scores, rows)
    results = task.score(run, passage_text=lambda doc_ids: passages.texts_at([row_of[d] for d in doc_ids]))
    protocol = task.protocol | {
        "corpus_size": len(passages),
        "passage_max_length": encoder.settings.passage_max_length,
        "query_max_length": encoder.settings.query_max_length,
        "precision": "bf16" if bf16 else "fp32",
        "embeddings": "float16",
        "search": how,
    }
    return {
        "task": task.name,
        **results,
        "protocol": protocol,
        "encoded_passages_this_process": shards.encoded_now,
        "passage_store_seconds": store_seconds,
        "encode_seconds": encode_seconds,
        "search_seconds": search_seconds,
        "seconds": clock[-1] - clock[0] + lap(),
    }


def _search(shards, queries: np.ndarray, k: int, index: str, accelerator) -> tuple[np.ndarray, np.ndarray, str]:
    if index == "flat":
        return *search(shards, queries, k=k, accelerator=accelerator), "exact inner product"
    if accelerator is not None and accelerator.num_processes > 1:
        raise ConfigError(f"index {index}: an approximate index is built in one process; run without a launch")
    found = approximate_search(shards, queries, k, index)
    return found.scores, found.indices, f"faiss {index}, recall@100 vs exact {found.recall_at_100_vs_exact:.4f}"


def task_passages(task: RetrievalTask, cache_dir: str = "", accelerator=None) -> PassageStore:
    """The task's whole corpus as a passage store (converted the first time, then opened from the cache)."""
    identity = {"files": task.corpus.fingerprint(), "format": task.protocol.get("passage_format")}
    return open_passages(task.name.rsplit("-", 1)[0], identity, task.corpus.batches, cache_dir, accelerator)


def _run(task: RetrievalTask, passages, scores: np.ndarray, rows: np.ndarray):
    """The run {query id: [(doc id, score)] best first} and doc id -> passage row for the hits."""
    hit_rows = np.unique(rows[rows >= 0])
    row_of = dict(zip(passages.docids(hit_rows), hit_rows.tolist()))
    docid_of = {row: docid for docid, row in row_of.items()}
    run = {}
    for (query_id, _), query_scores, query_rows in zip(task.queries, scores, rows):
        run[query_id] = [(docid_of[r], float(s)) for s, r in zip(query_scores, query_rows.tolist()) if r >= 0]
    return run, row_of
