"""Corpus encoding and exact search whose memory grows with the number of processes, not with the corpus.

`encoding.encode_texts` gathers every embedding into every rank: fine for a benchmark grid, impossible for a corpus
of millions of passages. Here nothing is gathered but top-k lists:

- `open_passages` keeps the corpus as two memory-mapped Arrow IPC columns (`docid`, `text`) in a sealed cache folder,
  built once from any iterator of record batches.
- `encode_corpus` cuts the corpus into chunks of `chunk_rows` passages; chunk c is encoded by rank c % world and
  written atomically as `chunk-{c:06d}.npy` (fp16 by default). Chunks on disk are never encoded again, so a killed
  encode resumes, and a complete folder is sealed and re-used without a single forward.
- `search` is exact inner product: each rank scans its own chunks block by block, keeps a running top-k, and the
  ranks merge their (Q, k) lists. Ties go to the lower passage row, so the result is the same at any world size.
- `approximate_search` builds a faiss IVF or HNSW index and says how much recall@100 it costs against `search`.

Folders: `<cache root>/passages/<name>-<fingerprint>/` and `<cache root>/embeddings/<name>-<fingerprint>/`, the cache
root of `hbt_accel.data.cache`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from hbt_accel.atomic import is_sealed, seal_folder, write_atomic
from hbt_accel.data.cache import _slug, build_once, cache_root, fingerprint
from hbt_accel.data.store import _ChunkedColumn, _IpcWriter
from hbt_accel.errors import DataError
from hbt_accel.evaluation.encoding import run_between_batches, time_left

PASSAGES_FORMAT = "hbt-accel passage store v1"
EMBEDDINGS_FORMAT = "hbt-accel embedding shards v1"
PROGRESS_SECONDS = 15.0
DUMMY_TEXT = "."  # what a rank with fewer batches encodes to keep step with the others
# Keys pack (score, row) into one int64, so rows must fit in 32 bits (4.29 billion passages).
ROW_LIMIT = 2**32 - 1
QUERY_GROUP_ELEMENTS = 1 << 24  # queries x candidates scored at once: bounds search memory to a few hundred MB
SAMPLE_SEED = 0


def _print_now(line: str) -> None:
    print(line, flush=True)  # a log file written through a pipe must show progress as it happens


# =====================================================================================================================
# Passages
# =====================================================================================================================
class PassageStore:
    """A corpus on disk: `docids.arrow` and `texts.arrow` (one string column each), memory-mapped, read by row."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.name: str = self.meta["name"]
        self._docids = _ChunkedColumn(self.folder / "docids.arrow")
        self._texts = _ChunkedColumn(self.folder / "texts.arrow")  # mapped: a search's hits, by row
        self._batch_reader = None  # plain reads for the sequential pass (`texts`), opened on first use
        self._cached_batch: tuple[int, pa.Array] | None = None

    def __reduce__(self):
        # spawned workers and broadcasts get the folder and map it again, never the columns
        return (PassageStore, (self.folder,))

    def _record_batch(self, index: int) -> pa.Array:
        """Record batch `index` of texts.arrow read into memory (not mapped: a pass over a mapped corpus would leave
        every page it read resident in this process); the last one is kept, the pass reads them in order."""
        if self._cached_batch is None or self._cached_batch[0] != index:
            if self._batch_reader is None:
                self._batch_reader = pa.ipc.open_file(pa.OSFile(str(self.folder / "texts.arrow")))
            self._cached_batch = (index, self._batch_reader.get_batch(index).column(0))
        return self._cached_batch[1]

    def __len__(self) -> int:
        return int(self.meta["passages"])

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of rows start..stop-1, read from the file batch by batch (memory stays one batch)."""
        start, stop = max(0, start), min(len(self), stop)
        starts, texts = self._texts.starts, []
        for batch in range(int(np.searchsorted(starts, start, side="right")) - 1, len(starts) - 1):
            if starts[batch] >= stop:
                break
            first, last = max(start, starts[batch]) - starts[batch], min(stop, starts[batch + 1]) - starts[batch]
            texts += self._record_batch(batch).slice(first, last - first).to_pylist()
        return texts

    def docids(self, indices: Iterable[int]) -> list[str]:
        return self._docids.get(indices)

    def texts_at(self, indices: Iterable[int]) -> list[str]:
        """The texts of the given rows (a search's hits)."""
        return self._texts.get(indices)

    def rows_of(self, docids: Iterable[str]) -> np.ndarray:
        """The sorted rows whose doc id is in `docids` (ids not in the corpus are skipped), one record batch of the
        docid column at a time."""
        import pyarrow.compute as pc

        wanted = pa.array(sorted(set(docids)), type=pa.string())
        found = [
            np.flatnonzero(pc.is_in(chunk, value_set=wanted).to_numpy(zero_copy_only=False)) + start
            for chunk, start in zip(self._docids.chunks, self._docids.starts)
        ]
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def open_passages(
    name: str,
    description: dict,
    batches_fn: Callable[[], Iterable[pa.RecordBatch]],
    cache_dir: str | os.PathLike = "",
    accelerator=None,
) -> PassageStore:
    """The passage store keyed by `description` (JSON-able: e.g. the source files' `file_fingerprint`s), built by
    writing `batches_fn()` (record batches with string columns `docid` and `text`) the first time only.

    Under a launch the local main process of each machine builds while the others wait, then they open it."""
    root = cache_root(cache_dir) / "passages"
    keyed = {"passages_format": PASSAGES_FORMAT, "source": description}

    def build(partial: Path) -> None:
        _write_passages(partial, name, description, batches_fn())

    def complete(folder: Path) -> bool:
        return is_sealed(folder, PASSAGES_FORMAT)

    if accelerator is None:
        return PassageStore(build_once(root, name, keyed, build, complete))
    with accelerator.local_main_process_first():
        return PassageStore(build_once(root, name, keyed, build, complete))


def _write_passages(folder: Path, name: str, description: dict, batches: Iterable[pa.RecordBatch]) -> None:
    docids, texts = _IpcWriter(folder / "docids.arrow", "docid"), _IpcWriter(folder / "texts.arrow", "text")
    count = 0
    try:
        for batch in batches:
            docids.write(_string_column(batch, "docid"))
            texts.write(_string_column(batch, "text"))
            count += batch.num_rows
    finally:
        docids.close()
        texts.close()
    seal_folder(folder, PASSAGES_FORMAT, {"name": name, "passages": count, "source": description})


def _string_column(batch: pa.RecordBatch, name: str) -> pa.Array:
    if name not in batch.schema.names:
        raise DataError(f"passage batches need columns docid and text; got {batch.schema.names}")
    column = batch.column(name)
    if column.null_count:
        raise DataError(f"passage batches: {column.null_count} null value(s) in column {name!r}")
    return column


# =====================================================================================================================
# Embedding shards
# =====================================================================================================================
@dataclasses.dataclass(frozen=True)
class EmbeddingShards:
    """The embeddings of a corpus as `chunk-{c:06d}.npy` files of `chunk_rows` rows (the last may be shorter).

    `encoded_now` is how many passages THIS process encoded in the call that returned it (0 on a cache hit)."""

    folder: Path
    num_passages: int
    dim: int
    chunk_rows: int
    encoded_now: int = 0

    @property
    def num_chunks(self) -> int:
        return -(-self.num_passages // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """(first row, one past the last row) of a chunk, in passage rows."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_passages)

    def chunk_path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npy"

    def chunk(self, chunk: int) -> np.ndarray:
        """(rows, dim) fp16 or fp32, memory-mapped: reading it costs page cache, not process memory."""
        return np.load(self.chunk_path(chunk), mmap_mode="r")

    def chunks_of_rank(self, rank: int, world: int) -> range:
        return range(rank, self.num_chunks, world)

    def chunk_is_on_disk(self, chunk: int) -> bool:
        """A finished chunk: written atomically, so it exists whole or not at all; the shape check catches a file
        from another layout."""
        start, stop = self.chunk_bounds(chunk)
        shape = _saved_shape(self.chunk_path(chunk))
        return shape is not None and shape[0] == stop - start

    @classmethod
    def open_sealed(cls, folder: Path) -> EmbeddingShards:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(folder, meta["num_passages"], meta["dim"], meta["chunk_rows"], encoded_now=0)


@dataclasses.dataclass(frozen=True)
class _EncodeSettings:
    batch_size: int
    bf16: bool
    dtype: str


def embeddings_folder(
    passages: PassageStore,
    key: dict,
    cache_dir: str | os.PathLike = "",
    chunk_rows: int = 16384,
    dtype: str = "float16",
) -> Path:
    """Where the embeddings of `passages` under `key` live: the key, the corpus, the precision and the layout
    all go into the fingerprint, so any change gives a new folder."""
    identity = {
        "embeddings_format": EMBEDDINGS_FORMAT,
        "key": key,
        "passages": {"store": passages.folder.name, "count": len(passages)},
        "dtype": dtype,
        "chunk_rows": chunk_rows,
    }
    return cache_root(cache_dir) / "embeddings" / f"{_slug(passages.name)}-{fingerprint(identity)}"


def encode_corpus(
    encoder,
    passages: PassageStore,
    *,
    key: dict,
    cache_dir: str | os.PathLike = "",
    chunk_rows: int = 16384,
    batch_size: int = 64,
    bf16: bool = False,
    dtype: str = "float16",
    accelerator=None,
    log: Callable[[str], None] = _print_now,
    progress_every: float = PROGRESS_SECONDS,
) -> EmbeddingShards:
    """Encode `passages` (kind="passage") into chunk files, each chunk by one rank; re-use or resume what is on disk.

    `key` (JSON-able) names what makes these embeddings: the weights' fingerprint, the encoder settings (max length,
    pooling, prefixes), bf16. Every rank must call this; every rank runs the same number of forwards (ZeRO-3)."""
    if chunk_rows < 1 or dtype not in ("float16", "float32"):
        raise ValueError(f"chunk_rows must be >= 1 and dtype float16 or float32; got {chunk_rows}, {dtype!r}")
    if len(passages) >= ROW_LIMIT:
        raise DataError(f"{passages.name}: {len(passages):,} passages; at most {ROW_LIMIT - 1:,} are supported")
    folder = embeddings_folder(passages, key, cache_dir, chunk_rows, dtype)
    if all(_gather_ints(accelerator, [is_sealed(folder, EMBEDDINGS_FORMAT)])[:, 0]):
        return EmbeddingShards.open_sealed(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = EmbeddingShards(folder, len(passages), dim=0, chunk_rows=chunk_rows)
    settings = _EncodeSettings(batch_size, bf16, dtype)
    started = time.perf_counter()
    encoded, dim = _encode_rounds(encoder, passages, layout, settings, accelerator, log, progress_every)
    totals = _gather_ints(accelerator, [dim, encoded])
    dim = int(totals[:, 0].max()) or _probe_dim(encoder, bf16)  # an empty corpus has no chunk to read it from
    shards = dataclasses.replace(layout, dim=dim, encoded_now=encoded)
    meta = {"name": passages.name, "num_passages": len(passages), "dim": dim, "chunk_rows": chunk_rows}
    _seal_when_complete(shards, {**meta, "dtype": dtype, "key": key}, accelerator, log)
    if _is_main(accelerator):
        seconds = time.perf_counter() - started
        log(f"encoded {int(totals[:, 1].sum()):,} of {len(passages):,} passages in {seconds:.0f}s -> {folder}")
    return shards


def _encode_rounds(encoder, passages, layout, settings, accelerator, log, progress_every) -> tuple[int, int]:
    """Round r: rank i encodes chunk r * world + i unless it is on disk. Returns (passages encoded, dim or 0)."""
    rank, world = _rank_and_world(accelerator)
    my_chunks = layout.chunks_of_rank(rank, world)
    done = sum(_rows(layout, c) for c in my_chunks if layout.chunk_is_on_disk(c))
    already_done = int(_gather_ints(accelerator, [done])[:, 0].sum())
    progress = CorpusProgress(len(passages), already_done, progress_every, log, _is_main(accelerator))
    try:
        return _encode_my_chunks(encoder, passages, layout, settings, accelerator, progress, done)
    finally:
        progress.close()


def _encode_my_chunks(encoder, passages, layout, settings, accelerator, progress, done: int) -> tuple[int, int]:
    rank, world = _rank_and_world(accelerator)
    encoded = dim = 0
    for round_index in range(-(-layout.num_chunks // world)):
        chunk = round_index * world + rank
        todo = chunk < layout.num_chunks and not layout.chunk_is_on_disk(chunk)
        forwards = -(-_rows(layout, chunk) // settings.batch_size) if todo else 0
        # one small collective per round: the most forwards any rank runs, and how far the whole corpus is
        table = _gather_ints(accelerator, [forwards, done])
        progress.base = int(table[:, 1].sum())
        run_between_batches()  # once per round, the same on every rank: a stop request ends a long corpus encode
        if todo:
            dim = _encode_chunk(encoder, passages, layout, chunk, settings, progress)
            encoded, done = encoded + _rows(layout, chunk), done + _rows(layout, chunk)
        _run_dummy_forwards(encoder, int(table[:, 0].max()) - forwards, settings.bf16)
        if chunk < layout.num_chunks and not dim:
            dim = _saved_shape(layout.chunk_path(chunk))[1]
    return encoded, dim


def _rows(layout: EmbeddingShards, chunk: int) -> int:
    start, stop = layout.chunk_bounds(chunk)
    return max(0, stop - start)


def _encode_chunk(encoder, passages, layout, chunk, settings, progress) -> int:
    """Encode and write one chunk; the texts and embeddings are dropped on return. Returns the embedding size."""
    start, stop = layout.chunk_bounds(chunk)
    texts = passages.texts(start, stop)
    extra = {}
    if "progress" in inspect.signature(encoder.encode).parameters:
        extra["progress"] = lambda done, _total: progress.update(progress.base + done)
    embeddings = encoder.encode(texts, kind="passage", batch_size=settings.batch_size, bf16=settings.bf16, **extra)
    embeddings = np.asarray(embeddings, dtype=np.float32).astype(settings.dtype, copy=False)
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    write_atomic(layout.chunk_path(chunk), buffer.getvalue())  # temp + rename: never half a chunk on disk
    progress.update(progress.base + len(texts))
    return embeddings.shape[1]


def _run_dummy_forwards(encoder, count: int, bf16: bool) -> None:
    """Forwards whose output is thrown away: under ZeRO-3 a forward gathers parameters from every rank, so a rank
    that ran fewer forwards than the others would leave them waiting forever."""
    for _ in range(count):
        encoder.encode([DUMMY_TEXT], kind="passage", batch_size=1, bf16=bf16)


def _probe_dim(encoder, bf16: bool) -> int:
    return int(np.asarray(encoder.encode([DUMMY_TEXT], kind="passage", batch_size=1, bf16=bf16)).shape[1])


def _seal_when_complete(shards: EmbeddingShards, meta: dict, accelerator, log) -> None:
    """The main process seals the folder once every chunk is there (after every rank has written its own)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if _is_main(accelerator):
        missing = [c for c in range(shards.num_chunks) if not shards.chunk_is_on_disk(c)]
        if missing:
            # e.g. a cache folder that is not shared between machines: each rank still searches its own chunks
            log(f"not sealing {shards.folder}: {len(missing)} chunk(s) not visible from the main process")
        else:
            for leftover in shards.folder.glob(".chunk-*.tmp"):  # from killed encodes: every rank is done writing
                leftover.unlink(missing_ok=True)
            seal_folder(shards.folder, EMBEDDINGS_FORMAT, meta)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank returns a folder in the same state


def _saved_shape(path: Path) -> tuple[int, ...] | None:
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None


class CorpusProgress:
    """Texts done / total, texts/s and time left, on the main process: a rich bar in a terminal, else (a log file)
    at most one plain line every `every` seconds.

    `base` is the count done by all ranks at the start of the current round; chunks found on disk do not count
    towards the speed."""

    def __init__(self, total: int, already_done: int, every: float, log, enabled: bool, clock=time.perf_counter):
        self.total, self.already_done, self.every, self.log, self.enabled = total, already_done, every, log, enabled
        self.clock = clock
        self.start = self.last = clock()
        self.base = already_done
        self.bar = self._terminal_bar() if enabled and log is _print_now else None

    def _terminal_bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not Console().is_terminal:
            return None
        bar = Progress(
            TextColumn("encoding passages"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )  # fmt: skip
        self.task = bar.add_task("encode", total=self.total, completed=self.already_done, rate="")
        bar.start()
        return bar

    def update(self, done: int) -> None:
        now = self.clock()
        rate = (done - self.already_done) / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, rate=f"{rate:,.0f} texts/s")
            return
        if not self.enabled or now - self.last < self.every:
            return
        self.last = now
        left = time_left((self.total - done) / rate) if rate > 0 else "unknown time"
        self.log(f"encoding passages: {done:,}/{self.total:,} texts ({rate:,.0f} texts/s, about {left} left)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# =====================================================================================================================
# Exact search
# =====================================================================================================================
def search(
    shards: EmbeddingShards, queries: np.ndarray, k: int = 1000, *, accelerator=None, block_rows: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k -> (scores (Q, k) float32, passage rows (Q, k) int64), best first.

    Each rank scans only its chunks (c % world == rank); under a launch every rank must pass the same queries and k,
    the ranks' lists are merged, and every rank returns the same result. Equal scores go to the lower row. Missing
    places (k > corpus) hold -inf and -1 (faiss pads with -3.4e38 instead of -inf)."""
    if k < 1 or block_rows < 1:
        raise ValueError(f"k and block_rows must be >= 1; got {k}, {block_rows}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or (queries.shape[1] != shards.dim and len(queries)):
        raise ValueError(f"queries must be (Q, {shards.dim}); got {queries.shape}")
    rank, world = _rank_and_world(accelerator)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for chunk in shards.chunks_of_rank(rank, world):
        scores, rows = _search_chunk(shards, chunk, queries, scores, rows, block_rows)
    if world > 1:
        scores, rows = _merge_over_ranks(scores, rows, accelerator)
    return _best_first(scores, rows)


def _search_chunk(shards, chunk, queries, scores, rows, block_rows) -> tuple[np.ndarray, np.ndarray]:
    """Fold one chunk into the running top-k, `block_rows` passages at a time (cast to float32 per block)."""
    k = scores.shape[1]
    start, _ = shards.chunk_bounds(chunk)
    vectors = shards.chunk(chunk)
    group = max(1, QUERY_GROUP_ELEMENTS // (k + block_rows))
    for offset in range(0, len(vectors), block_rows):
        block = np.asarray(vectors[offset : offset + block_rows], dtype=np.float32)
        for first in range(0, len(queries), group):
            part = slice(first, first + group)
            block_scores, block_rows_found = _block_top_k(queries[part] @ block.T, k, start + offset)
            merged_scores = np.concatenate([scores[part], block_scores], axis=1)
            merged_rows = np.concatenate([rows[part], block_rows_found], axis=1)
            scores[part], rows[part] = _keep_best(merged_scores, merged_rows, k)
    return scores, rows


def _block_top_k(block_scores: np.ndarray, k: int, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each line of one block's (group, width) scores and their rows, under the one-key order.

    A float partition picks them (10x cheaper than building int64 keys for every candidate); a line whose k-th
    score is tied with a candidate left out is picked again by key, so the lower row wins there too."""
    width = block_scores.shape[1]
    row_ids = np.arange(first_row, first_row + width, dtype=np.int64)
    if width <= k:
        return block_scores, np.broadcast_to(row_ids, block_scores.shape)
    picked = np.argpartition(block_scores, width - k, axis=1)[:, width - k :]
    picked_scores = np.take_along_axis(block_scores, picked, axis=1)
    kth = picked_scores.min(axis=1, keepdims=True)
    tied = (block_scores == kth).sum(axis=1) != (picked_scores == kth).sum(axis=1)
    if tied.any():
        keys = _order_keys(block_scores[tied], np.broadcast_to(row_ids, (int(tied.sum()), width)))
        picked[tied] = np.argpartition(keys, width - k, axis=1)[:, width - k :]
        picked_scores[tied] = np.take_along_axis(block_scores[tied], picked[tied], axis=1)
    return picked_scores, picked + first_row


def _merge_over_ranks(scores: np.ndarray, rows: np.ndarray, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (Q, k) lists -> the top-k of their union, identical on every rank."""
    import torch

    world, (count, k) = accelerator.num_processes, scores.shape
    gathered = []
    for array in (scores, rows):
        tensor = accelerator.gather(torch.from_numpy(np.ascontiguousarray(array)).to(accelerator.device))
        # (W * Q, k) in rank order -> (Q, W * k): each query's candidates from every rank side by side
        gathered.append(tensor.cpu().numpy().reshape(world, count, k).transpose(1, 0, 2).reshape(count, world * k))
    return _keep_best(gathered[0], gathered[1], k)


def _keep_best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each line of (Q, m) candidates, in no particular order (sorting waits for the end)."""
    width = scores.shape[1]
    if width <= k:
        return scores, rows
    keep = np.argpartition(_order_keys(scores, rows), width - k, axis=1)[:, width - k :]
    return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)


def _best_first(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(_order_keys(scores, rows), axis=1)[:, ::-1]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _order_keys(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 keys that order candidates by score, then by lower row, then padding (row -1) last.

    One integer order makes the selection a total order: the result does not depend on which block or rank a
    candidate came from. High 32 bits: the float's bits made monotone; low 32 bits: ROW_LIMIT - row."""
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into 0.0
    monotone = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    row_rank = np.where(rows < 0, 0, ROW_LIMIT - rows)
    return (monotone << 32) | row_rank


# =====================================================================================================================
# Approximate search
# =====================================================================================================================
class ApproximateResult(NamedTuple):
    scores: np.ndarray  # (Q, k) float32, -inf where fewer than k were found
    indices: np.ndarray  # (Q, k) int64 passage rows, -1 where fewer than k were found
    recall_at_100_vs_exact: float  # share of the exact top-100 the index finds, on a sample of queries


def approximate_search(
    shards: EmbeddingShards, queries: np.ndarray, k: int, index: str = "ivf", sample: int = 200, nprobe: int = 32
) -> ApproximateResult:
    """Top-k through a faiss `ivf` or `hnsw` index (parameters in `_empty_index`), and what it costs.

    Unlike `search`, this holds EVERY vector in float32 in one process (faiss's flat storage inside the index), so
    it is for corpora that fit in memory. Recall@100 against `search` is measured on `sample` random queries."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    built = _approximate_index(shards, index, nprobe)
    scores, rows = built.search(queries, k)
    scores[rows < 0] = -np.inf  # faiss pads with -3.4e38; `search` pads with -inf
    return ApproximateResult(scores, rows.astype(np.int64), _recall_at_100(built, shards, queries, sample))


def _approximate_index(shards: EmbeddingShards, kind: str, nprobe: int):
    """A trained faiss index filled chunk by chunk (no second full copy of the vectors)."""
    if shards.num_passages == 0:
        raise DataError(f"{shards.folder}: no passages to index")
    lists = max(1, min(int(4 * np.sqrt(shards.num_passages)), shards.num_passages // 39 or 1))
    # faiss trains an IVF quantizer on at most 256 vectors per list; other kinds need no training
    training = _sample_vectors(shards, min(shards.num_passages, 256 * lists) if kind == "ivf" else 0)
    built = _empty_index(kind, shards.dim, training, lists, nprobe)
    for chunk in range(shards.num_chunks):  # the rows in passage order
        built.add(np.ascontiguousarray(shards.chunk(chunk), dtype=np.float32))
    return built


def _empty_index(kind: str, dim: int, training: np.ndarray, nlist: int, nprobe: int):
    """A faiss inner-product index with no vectors yet: flat (exact), ivf (its quantizer trained on `training`) or
    hnsw (approximate)."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.train(np.ascontiguousarray(training, dtype=np.float32))
        built.nprobe = min(nprobe, nlist)
        return built
    if kind == "hnsw":
        built = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = 128
        return built
    raise DataError(f"index: got {kind!r}, expected one of flat, ivf, hnsw")


def _sample_vectors(shards: EmbeddingShards, count: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(shards.num_passages, count, replace=False))
    parts = [np.zeros((0, shards.dim), dtype=np.float32)]
    for chunk in range(shards.num_chunks):
        start, stop = shards.chunk_bounds(chunk)
        local = rows[(rows >= start) & (rows < stop)] - start
        if len(local):
            parts.append(np.asarray(shards.chunk(chunk)[local], dtype=np.float32))
    return np.concatenate(parts)


def _recall_at_100(built, shards: EmbeddingShards, queries: np.ndarray, sample: int) -> float:
    if len(queries) == 0 or sample < 1:
        return float("nan")
    picked = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(queries), min(sample, len(queries)), replace=False))
    _, exact = search(shards, queries[picked], 100)
    _, approximate = built.search(queries[picked], 100)
    found = [_overlap(truth, guess) for truth, guess in zip(exact, approximate)]
    return float(np.mean(found))


def _overlap(truth: Sequence[int], guess: Sequence[int]) -> float:
    wanted = {int(row) for row in truth if row >= 0}
    return len(wanted & {int(row) for row in guess}) / len(wanted) if wanted else 1.0


# =====================================================================================================================
# Processes
# =====================================================================================================================
def _rank_and_world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def _gather_ints(accelerator, values: Sequence[int]) -> np.ndarray:
    """(world, len(values)) int64: every rank's `values`, rank order (no collective in a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return np.asarray([values], dtype=np.int64)
    import torch

    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=accelerator.device)
    return accelerator.gather(tensor).cpu().numpy().reshape(accelerator.num_processes, len(values))


__all__ = [
    "ApproximateResult",
    "CorpusProgress",
    "EmbeddingShards",
    "PassageStore",
    "approximate_search",
    "embeddings_folder",
    "encode_corpus",
    "open_passages",
    "search",
]
