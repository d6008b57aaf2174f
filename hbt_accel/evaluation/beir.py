"""BEIR-style retrieval scoring (MIRACL and friends): corpus.jsonl + queries.jsonl + qrels/<split>.tsv.

- corpus.jsonl: one `{"_id", "title", "text"}` per line; a passage is encoded as "title text" (title optional).
- queries.jsonl: one `{"_id", "text"}` per line; only queries that have qrels are scored.
- qrels tsv: header line, then `query-id <tab> corpus-id <tab> score` (score > 0 = relevant, graded allowed).
Retrieval is exact inner product through faiss (`IndexFlatIP`) by default; `index="ivf"` / `"hnsw"` are the
approximate options for millions of passages. nDCG@10, Recall@100 and MRR@10 come from `ir_measures`.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np

from hbt_accel.data import DataError, iter_jsonl
from hbt_accel.evaluation.encoding import encode_texts

BEIR_MEASURES = {"ndcg_at_10": "nDCG@10", "recall_at_100": "R@100", "mrr_at_10": "RR@10"}


def is_beir_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "corpus.jsonl").is_file()


def read_beir(folder: str | os.PathLike, split: str = "test"):
    """-> (corpus {id: text}, queries {id: text}, qrels {query id: {doc id: int grade}}), errors name the file."""
    folder = Path(folder)
    corpus = {}
    for row, where in _jsonl(folder / "corpus.jsonl", ("_id", "text")):
        title = str(row.get("title") or "").strip()
        corpus[str(row["_id"])] = f"{title} {row['text']}".strip() if title else str(row["text"])
    queries = {str(row["_id"]): str(row["text"]) for row, _ in _jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise DataError(f"{qrels_path}: file not found (BEIR layout: qrels/<split>.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = qrels_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        line_no = qrels_path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{qrels_path}:{line_no}: not UTF-8 text (byte {error.object[error.start]:#04x})") from None
    reader = csv.reader(lines, delimiter="\t")
    header = next(reader, None)
    if header is None or len(header) < 3:
        raise DataError(f"{qrels_path}: expected a header 'query-id<TAB>corpus-id<TAB>score'")
    for line_no, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) < 3:
            raise DataError(f"{qrels_path}:{line_no}: expected 3 tab-separated fields, got {len(row)}")
        query_id, doc_id, score = row[0], row[1], row[2]
        if query_id not in queries:
            raise DataError(f"{qrels_path}:{line_no}: query id {query_id!r} is not in queries.jsonl")
        if doc_id not in corpus:
            raise DataError(f"{qrels_path}:{line_no}: corpus id {doc_id!r} is not in corpus.jsonl")
        qrels.setdefault(query_id, {})[doc_id] = _grade(score, f"{qrels_path}:{line_no}")
    if not qrels:
        raise DataError(f"{qrels_path}: no relevance judgements")
    return corpus, queries, qrels


def _grade(score: str, where: str) -> int:
    try:
        return int(float(score))
    except ValueError:
        raise DataError(f"{where}: score {score!r} is not a number (expected an integer relevance grade)") from None


def _jsonl(path: Path, required: tuple[str, ...]):
    if not path.is_file():
        raise DataError(f"{path}: file not found (BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    for row, where in iter_jsonl(path):
        for key in required:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
        yield row, where


def build_index(embeddings: np.ndarray, index: str = "flat", nlist: int | None = None, nprobe: int = 32):
    """A faiss inner-product index over (N, d) float32 vectors: flat (exact), ivf or hnsw (approximate)."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = embeddings.shape[1]
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(len(embeddings))), len(embeddings) // 39 or 1))
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.train(embeddings)
        built.nprobe = min(nprobe, nlist)
    elif index == "hnsw":
        built = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = 128
    else:
        raise DataError(f"index: got {index!r}, expected one of flat, ivf, hnsw")
    built.add(embeddings)
    return built


def evaluate_beir(
    encoder,
    folder: str | os.PathLike,
    split: str = "test",
    batch_size: int = 64,
    bf16: bool = False,
    accelerator=None,
    index: str = "flat",
    top_k: int = 100,
) -> dict:
    """Encode corpus (kind="passage") and judged queries (kind="query") once, retrieve top_k, score with ir_measures.

    Returns {"ndcg_at_10", "recall_at_100", "mrr_at_10", "n_queries", "n_documents", "index", "benchmark",
    "precision", "seconds"}.
    """
    import ir_measures

    start = time.perf_counter()
    corpus, queries, qrels = read_beir(folder, split)
    doc_ids = list(corpus)
    query_ids = [qid for qid in queries if qid in qrels]
    doc_embeddings = encode_texts(encoder, [corpus[d] for d in doc_ids], "passage", batch_size, bf16, accelerator)
    query_embeddings = encode_texts(encoder, [queries[q] for q in query_ids], "query", batch_size, bf16, accelerator)
    searcher = build_index(doc_embeddings, index)
    scores, neighbours = searcher.search(query_embeddings, min(top_k, len(doc_ids)))  # (Q, k), (Q, k)
    run = {
        qid: {doc_ids[n]: float(s) for s, n in zip(row_scores, row_ids) if n >= 0}
        for qid, row_scores, row_ids in zip(query_ids, scores, neighbours)
    }
    measures = {key: ir_measures.parse_measure(name) for key, name in BEIR_MEASURES.items()}
    aggregate = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    results = {key: float(aggregate[measure]) for key, measure in measures.items()}
    results.update(
        benchmark=Path(folder).name,
        precision="bf16" if bf16 else "fp32",
        index=index,
        n_queries=len(query_ids),
        n_documents=len(doc_ids),
        seconds=time.perf_counter() - start,
    )
    return results
