"""Sharded corpus encoding and exact search (hbt_accel.evaluation.sharded): brute-force agreement, the caches, a
killed encode that resumes, and 2 gloo processes that each encode only their chunks and agree with 1 process."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch.multiprocessing as mp

from hbt_accel.atomic import is_sealed
from hbt_accel.evaluation.sharded import (
    EMBEDDINGS_FORMAT,
    CorpusProgress,
    EmbeddingShards,
    approximate_search,
    encode_corpus,
    open_passages,
    search,
)
from tests.conftest import free_port, join_gloo_world
from tests.distributed_eval_script import HashEncoder

WORLD = 2
KEY = {"weights": "fake-sha", "max_length": 128, "pooling": "mean", "bf16": False}


class CountingEncoder:
    """HashEncoder's vectors (deterministic per text) with counts of texts, forwards (batches) and calls; raises
    on call number `fail_on_call` (1-based), like a job killed mid-encode."""

    def __init__(self, fail_on_call: int | None = None, dim: int = 32):
        self.vectors = HashEncoder(dim=dim)
        self.fail_on_call = fail_on_call
        self.texts = self.forwards = self.calls = 0

    def encode(self, texts, kind="query", batch_size=64, bf16=False):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        self.texts += len(texts)
        self.forwards += -(-len(texts) // batch_size)
        return self.vectors.encode(texts, kind=kind)


def passage_texts(count: int) -> list[str]:
    return [f"passage {i} about topic {i % 7} and thing {i % 3}" for i in range(count)]


def passage_batches(count: int, batch_rows: int = 7):
    texts = passage_texts(count)
    for start in range(0, count, batch_rows):
        rows = range(start, min(start + batch_rows, count))
        docids = pa.array([f"doc-{i}" for i in rows], pa.string())
        yield pa.record_batch([docids, pa.array(texts[start : start + len(rows)])], names=["docid", "text"])


def toy_passages(cache_dir, count: int = 50, accelerator=None, calls: list | None = None):
    def batches():
        if calls is not None:
            calls.append(1)
        return passage_batches(count)

    return open_passages("toy corpus", {"count": count}, batches, cache_dir=cache_dir, accelerator=accelerator)


def assembled(shards: EmbeddingShards) -> np.ndarray:
    return np.concatenate([np.asarray(shards.chunk(c), dtype=np.float32) for c in range(shards.num_chunks)])


# ---------------------------------------------------------------------------------------- exact search vs brute force
def shards_from(vectors: np.ndarray, folder, chunk_rows: int) -> EmbeddingShards:
    folder.mkdir(parents=True, exist_ok=True)
    shards = EmbeddingShards(folder, len(vectors), vectors.shape[1], chunk_rows)
    for chunk in range(shards.num_chunks):
        start, stop = shards.chunk_bounds(chunk)
        np.save(shards.chunk_path(chunk), vectors[start:stop])
    return shards


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by score, equal scores to the lower row, -inf / -1 padding."""
    scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    top_scores = np.full((len(queries), k), -np.inf)
    top_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for q, line in enumerate(scores):
        order = np.lexsort((np.arange(len(vectors)), -line))[:k]
        top_scores[q, : len(order)], top_rows[q, : len(order)] = line[order], order
    return top_scores, top_rows


@pytest.mark.parametrize("k", [3, 20, 60])  # within a chunk, more than a chunk (16), more than the corpus (50)
def test_search_equals_brute_force_on_random_vectors(tmp_path, k):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    shards = shards_from(vectors, tmp_path / "shards", chunk_rows=16)
    scores, rows = search(shards, queries, k, block_rows=5)  # blocks that do not divide the chunks
    expected_scores, expected_rows = brute_force(queries, vectors, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and scores.shape == rows.shape == (7, k)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)
    if k > 50:
        assert (rows[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()


@pytest.mark.parametrize("k", [4, 20, 60])
def test_equal_scores_go_to_the_lower_row_whatever_the_blocks(tmp_path, k):
    # small integers: every score is exact in float32 and most of them are tied, negatives included
    rng = np.random.default_rng(2)
    vectors = rng.integers(-2, 3, size=(50, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(9, 4)).astype(np.float32)
    shards = shards_from(vectors, tmp_path / "shards", chunk_rows=16)
    expected_scores, expected_rows = brute_force(queries, vectors, k)
    for block_rows in (3, 16):
        scores, rows = search(shards, queries, k, block_rows=block_rows)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_search_returns_global_rows_and_measures_its_recall(tmp_path, index):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    shards = shards_from(vectors.astype(np.float16), tmp_path / "shards", chunk_rows=128)
    result = approximate_search(shards, queries, k=120, index=index, sample=30)  # every query sampled
    _, exact = search(shards, queries, 100)
    overlap = [len(set(truth) & set(found[:100])) / 100 for truth, found in zip(exact, result.indices)]
    assert result.recall_at_100_vs_exact == pytest.approx(np.mean(overlap)) and result.recall_at_100_vs_exact > 0.8
    found = result.indices >= 0
    true_scores = np.take_along_axis(queries @ vectors.astype(np.float16).astype(np.float32).T, result.indices, 1)
    np.testing.assert_allclose(result.scores[found], true_scores[found], atol=1e-4)
    assert np.isneginf(result.scores[~found]).all()


# -------------------------------------------------------------------------------------------------- passage store
def test_passage_store_reads_by_index_and_is_built_once(tmp_path):
    calls = []
    passages = toy_passages(tmp_path, calls=calls)
    texts = passage_texts(50)
    assert len(passages) == 50 and calls == [1]
    assert passages.texts(0, 50) == texts and passages.texts(5, 16) == texts[5:16]  # across input batches of 7
    assert passages.texts(48, 60) == texts[48:]
    assert passages.docids([49, 0, 13, 7]) == ["doc-49", "doc-0", "doc-13", "doc-7"]
    again = toy_passages(tmp_path, calls=calls)
    assert again.folder == passages.folder and calls == [1]  # re-opened, batches not read again


def test_passage_texts_read_across_the_files_record_batches(tmp_path, monkeypatch):
    """The sequential pass reads texts.arrow batch by batch (not mapped): ranges across batch borders still match."""
    from hbt_accel.data.store import _IpcWriter

    monkeypatch.setattr(_IpcWriter, "FLUSH_BYTES", 200)  # a record batch every few texts
    passages = toy_passages(tmp_path)
    texts = passage_texts(50)
    assert len(passages._texts.chunks) > 5
    for start, stop in ((0, 50), (3, 29), (17, 18), (40, 80), (49, 50)):
        assert passages.texts(start, stop) == texts[start:stop], (start, stop)
    assert passages.texts_at([49, 0, 22]) == [texts[49], texts[0], texts[22]]


def test_a_truncated_passage_file_is_not_sealed_and_is_rebuilt(tmp_path):
    calls = []
    folder = toy_passages(tmp_path, calls=calls).folder
    with open(folder / "texts.arrow", "r+b") as handle:
        handle.truncate(os.path.getsize(folder / "texts.arrow") - 10)
    assert not is_sealed(folder, "hbt-accel passage store v1")
    rebuilt = toy_passages(tmp_path, calls=calls)
    assert calls == [1, 1] and rebuilt.texts(0, 50) == passage_texts(50)


# ---------------------------------------------------------------------------------------------- encoding and caches
def test_encoded_chunks_equal_the_encoder_and_a_second_call_encodes_nothing(tmp_path):
    passages = toy_passages(tmp_path)
    reference = HashEncoder(dim=32).encode(passage_texts(50), kind="passage")
    encoder = CountingEncoder()
    shards = encode_corpus(encoder, passages, key=KEY, cache_dir=tmp_path, chunk_rows=16, batch_size=4, log=print)
    assert (shards.num_passages, shards.dim, shards.num_chunks, shards.encoded_now) == (50, 32, 4, 50)
    assert encoder.texts == 50 and encoder.forwards == 4 + 4 + 4 + 1  # no dummy forwards in one process
    assert shards.chunk(0).dtype == np.float16 and is_sealed(shards.folder, EMBEDDINGS_FORMAT)
    np.testing.assert_allclose(assembled(shards), reference, atol=2e-3)

    cached_encoder = CountingEncoder()
    cached = encode_corpus(cached_encoder, passages, key=KEY, cache_dir=tmp_path, chunk_rows=16)
    assert cached.folder == shards.folder and cached.encoded_now == 0 and cached_encoder.calls == 0
    assert (cached.num_passages, cached.dim, cached.chunk_rows) == (50, 32, 16)

    other = encode_corpus(CountingEncoder(), passages, key={**KEY, "bf16": True}, cache_dir=tmp_path, chunk_rows=16)
    assert other.folder != shards.folder and other.encoded_now == 50
    exact = encode_corpus(CountingEncoder(), passages, key=KEY, cache_dir=tmp_path, chunk_rows=16, dtype="float32")
    assert exact.folder not in (shards.folder, other.folder)
    np.testing.assert_array_equal(assembled(exact), reference)


def test_a_stop_request_is_checked_once_per_round_of_chunks(tmp_path):
    """Training's stop check (a collective) runs between the chunks of a corpus encode, not only between the
    batches of `encode_texts`: a stop raised there ends the encode with the finished chunks kept."""
    from hbt_accel.evaluation.encoding import between_batches

    class Stop(Exception):
        pass

    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:  # the third round: chunks 0 and 1 are on disk
            raise Stop

    passages = toy_passages(tmp_path)
    with between_batches(check), pytest.raises(Stop):
        encode_corpus(CountingEncoder(), passages, key=KEY, cache_dir=tmp_path, chunk_rows=16, batch_size=4)
    resumed = encode_corpus(CountingEncoder(), passages, key=KEY, cache_dir=tmp_path, chunk_rows=16, batch_size=4)
    assert resumed.encoded_now == 50 - 2 * 16  # chunks 2 and 3 only


def test_a_killed_encode_resumes_with_only_the_missing_chunks(tmp_path):
    passages = toy_passages(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        encode_corpus(CountingEncoder(fail_on_call=3), passages, key=KEY, cache_dir=tmp_path, chunk_rows=16)
    folder = next((tmp_path / "embeddings").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-000000.npy", "chunk-000001.npy"]
    assert not is_sealed(folder, EMBEDDINGS_FORMAT)
    (folder / ".chunk-000002.npy.abc123.tmp").write_bytes(b"half a chunk")  # a kill in the middle of a write

    encoder = CountingEncoder()
    shards = encode_corpus(encoder, passages, key=KEY, cache_dir=tmp_path, chunk_rows=16)
    assert shards.folder == folder and shards.encoded_now == 50 - 32 and encoder.texts == 18
    assert is_sealed(folder, EMBEDDINGS_FORMAT) and not list(folder.glob(".*.tmp"))
    reference = HashEncoder(dim=32).encode(passage_texts(50), kind="passage")
    np.testing.assert_allclose(assembled(shards), reference, atol=2e-3)


def test_progress_prints_at_most_every_interval_with_speed_and_time_left():
    lines, now = [], [0.0]
    progress = CorpusProgress(1000, already_done=100, every=15, log=lines.append, enabled=True, clock=lambda: now[0])
    now[0] = 10.0
    progress.update(300)
    assert lines == []
    now[0] = 20.0
    progress.update(500)  # 400 new texts in 20 s: 20 texts/s, 500 left -> 25 s
    now[0] = 30.0
    progress.update(600)
    assert lines == ["encoding passages: 500/1,000 texts (20 texts/s, about 25s left)"]


# ----------------------------------------------------------------------------------- 2 gloo processes vs 1 process
QUERY_SEED, QUERY_COUNT = 5, 6


def toy_queries(dim: int = 32) -> np.ndarray:
    queries = np.random.default_rng(QUERY_SEED).standard_normal((QUERY_COUNT, dim)).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _sharded_worker(rank: int, port: int, out_dir: str) -> None:
    join_gloo_world(rank, WORLD, port)
    from hbt_accel.distributed import make_accelerator

    accelerator = make_accelerator()
    passages = toy_passages(os.path.join(out_dir, "cache"), count=20, accelerator=accelerator)
    encoder = CountingEncoder()
    shards = encode_corpus(
        encoder, passages, key=KEY, cache_dir=os.path.join(out_dir, "cache"), chunk_rows=8, batch_size=4,
        accelerator=accelerator,
    )  # fmt: skip
    results = {k: search(shards, toy_queries(), k, accelerator=accelerator, block_rows=3) for k in (5, 25)}
    report = {
        "texts": encoder.texts,
        "forwards": encoder.forwards,
        "encoded_now": shards.encoded_now,
        "results": {k: [scores.tolist(), rows.tolist()] for k, (scores, rows) in results.items()},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    accelerator.end_training()


@pytest.mark.distributed
def test_two_processes_encode_their_own_chunks_and_search_like_one(tmp_path):
    mp.spawn(_sharded_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # 20 passages in chunks of 8: rank 0 encodes chunks 0 and 2 (8 + 4 texts), rank 1 chunk 1 (8 texts)
    assert [r["encoded_now"] for r in ranks] == [12, 8]
    # 2 + 1 batches against 2: rank 1 runs one dummy forward (one text) so that both run 3 (ZeRO-3 would hang)
    assert [r["forwards"] for r in ranks] == [3, 3] and [r["texts"] for r in ranks] == [12, 8 + 1]

    single_cache = tmp_path / "single"
    passages = toy_passages(single_cache, count=20)
    single = encode_corpus(CountingEncoder(), passages, key=KEY, cache_dir=single_cache, chunk_rows=8)
    assert single.encoded_now == 20
    for k in (5, 25):
        expected_scores, expected_rows = search(single, toy_queries(), k)
        for rank in ranks:
            scores, rows = rank["results"][str(k)]
            np.testing.assert_array_equal(np.array(rows), expected_rows)
            np.testing.assert_allclose(np.array(scores, dtype=np.float32), expected_scores, rtol=0, atol=1e-4)
    # the launch sealed its folder: a single process re-uses it without encoding
    launched_cache = tmp_path / "cache"
    reused = encode_corpus(
        CountingEncoder(), toy_passages(launched_cache, count=20), key=KEY, cache_dir=launched_cache, chunk_rows=8
    )
    assert reused.encoded_now == 0
