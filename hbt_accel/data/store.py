"""The training corpus on disk: texts in Arrow, structure in small integer arrays, memory-mapped by every rank.

A store is one folder; every file in it is written once, by `StoreWriter`, and then only read:

    texts.arrow           Arrow IPC file, one string column `text`: every query and passage the rows point to
    ids.arrow             Arrow IPC file, one string column `id`: the example ids, in order of first appearance
    id_offsets.npy        int64 (ids + 1): the rows of id i are id_offsets[i] : id_offsets[i + 1]
    row_language.npy      int16 (rows): index into meta.json's `languages` (sorted codes), ascending within an id
    row_query.npy         int64 (rows): text index of the row's query
    row_positive.npy      int64 (rows): text index of the row's positive passage
    negative_offsets.npy  int64 (rows + 1): the hard negatives of row r are negative_texts[offsets[r] : offsets[r + 1]]
    negative_texts.npy    int64: text indices
    meta.json             written LAST: format, name, languages, counts, source, the size of every file above

A row is one (id, language): a query with its positive and hard negatives. One id in several languages means
translations of one example, which is what X-Y batches are built from. Texts are referenced by index, so a corpus
that shares passages between rows (mMARCO: one pid in many triples, in every language) stores each text once and
a hard negative costs 8 bytes. The page cache holds one copy of the files per machine, however many ranks read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hbt_accel.atomic import is_sealed, seal_folder
from hbt_accel.data.languages import LANGUAGE_NAMES, validate_language
from hbt_accel.errors import DataError

FORMAT = "hbt-accel corpus store v1"
META_FILE = "meta.json"  # atomic.SEAL_FILE: written last
ARRAY_FILES = ("id_offsets", "row_language", "row_query", "row_positive", "negative_offsets", "negative_texts")
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("lang", pa.string()),
        ("query", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
    ]
)  # what every row source is normalised to before it is written


# =====================================================================================================================
# Reading
# =====================================================================================================================
class CorpusStore:
    """The read interface every consumer uses (sampler, collator, mining, training, benchmarks).

    The sampler reads `id_offsets` and `row_language` (integers only); the collator reads the texts of one batch
    by row (`queries`, `positives`, `negatives_of`)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        self.name: str = self.meta["name"]
        self.languages: list[str] = self.meta["languages"]
        arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_FILES}
        self.id_offsets, self.row_language = arrays["id_offsets"], arrays["row_language"]
        self._row_query, self._row_positive = arrays["row_query"], arrays["row_positive"]
        self._negative_offsets, self._negative_texts = arrays["negative_offsets"], arrays["negative_texts"]
        self._texts = _ChunkedColumn(self.folder / "texts.arrow")
        self._ids = _ChunkedColumn(self.folder / "ids.arrow")
        self._language_index = {language: k for k, language in enumerate(self.languages)}
        self._id_index: dict[str, int] | None = None

    def __reduce__(self):
        # DataLoader workers started by spawn, and broadcasts, get the folder and map it again: never the arrays
        return (CorpusStore, (self.folder,))

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def num_ids(self) -> int:
        return len(self.id_offsets) - 1

    @property
    def num_pairs(self) -> int:
        """Rows: (id, language) pairs."""
        return len(self.row_language)

    # ---- ids and languages -------------------------------------------------------------------------------------
    def example_id(self, index: int) -> str:
        return self._ids.get([index])[0]

    def example_ids(self, indices: Sequence[int]) -> list[str]:
        return self._ids.get(indices)

    def index_of(self, example_id: str) -> int:
        """The index of an id (a dict built on first use: for tests, mining and small corpora)."""
        if self._id_index is None:
            self._id_index = {value: k for k, value in enumerate(self._ids.get(range(self.num_ids)))}
        return self._id_index[example_id]

    def languages_of(self, index: int) -> list[str]:
        start, end = self.id_offsets[index], self.id_offsets[index + 1]
        return [self.languages[k] for k in self.row_language[start:end]]

    def row(self, index: int, language: str) -> int:
        """The row of id `index` in `language` (the sampler only asks for languages the id has)."""
        start, end = int(self.id_offsets[index]), int(self.id_offsets[index + 1])
        code = self._language_index[language]
        offset = int(np.searchsorted(self.row_language[start:end], code))
        if start + offset >= end or self.row_language[start + offset] != code:
            raise KeyError(f"{self.name}: id {self.example_id(index)!r} has no row in {language!r}")
        return start + offset

    def answers(self, index: int) -> dict[str, str]:
        """language -> the id's positive passage in that language."""
        start, end = int(self.id_offsets[index]), int(self.id_offsets[index + 1])
        return dict(zip(self.languages_of(index), self.positives(range(start, end))))

    def rows_in(self, language: str) -> np.ndarray:
        """Every row in `language`, in id order (int64)."""
        return np.flatnonzero(np.asarray(self.row_language) == self._language_index[language])

    def ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The id index of each row (int64)."""
        return np.searchsorted(self.id_offsets, rows, side="right") - 1

    # ---- texts -------------------------------------------------------------------------------------------------
    def queries(self, rows: Sequence[int]) -> list[str]:
        return self._texts.get(self._row_query[np.asarray(rows, dtype=np.int64)])

    def positives(self, rows: Sequence[int]) -> list[str]:
        return self._texts.get(self._row_positive[np.asarray(rows, dtype=np.int64)])

    def negatives_of(self, row: int) -> list[str]:
        start, end = self._negative_offsets[row], self._negative_offsets[row + 1]
        return self._texts.get(self._negative_texts[start:end])

    def count_negatives(self, row: int) -> int:
        return int(self._negative_offsets[row + 1] - self._negative_offsets[row])

    def negative_texts_of(self, row: int, picks: Sequence[int]) -> list[str]:
        """The `picks`-th hard negatives of a row (positions into its list), fetching only those texts."""
        start = int(self._negative_offsets[row])
        return self._texts.get(self._negative_texts[start + np.asarray(picks, dtype=np.int64)])

    def id_blocks(self, max_rows: int = 1 << 22):
        """(first id, end id, first row, end row) of consecutive id ranges of about `max_rows` rows: per-row work in
        blocks keeps its temporary arrays small whatever the corpus size."""
        first_id = 0
        while first_id < self.num_ids:
            target = int(self.id_offsets[first_id]) + max_rows
            end_id = max(first_id + 1, int(np.searchsorted(self.id_offsets, target, side="right")) - 1)
            end_id = min(end_id, self.num_ids)
            yield first_id, end_id, int(self.id_offsets[first_id]), int(self.id_offsets[end_id])
            first_id = end_id

    def summary_table(self):
        """A rich table: pairs per language and how many ids exist in 2+ languages."""
        from rich.table import Table

        pairs = np.zeros(len(self.languages), dtype=np.int64)
        shared = np.zeros(len(self.languages), dtype=np.int64)
        multilingual_ids = 0
        for first_id, end_id, first_row, end_row in self.id_blocks():
            language = np.asarray(self.row_language[first_row:end_row])
            per_id = np.diff(self.id_offsets[first_id : end_id + 1])
            pairs += np.bincount(language, minlength=len(self.languages))
            shared += np.bincount(language[np.repeat(per_id >= 2, per_id)], minlength=len(self.languages))
            multilingual_ids += int(np.count_nonzero(per_id >= 2))
        table = Table(title=f"{self.name}: {self.num_ids:,} ids, {self.num_pairs:,} pairs")
        table.add_column("language")
        table.add_column("pairs", justify="right")
        table.add_column("ids also in another language", justify="right")
        for code, name in enumerate(self.languages):
            table.add_row(f"{name} ({LANGUAGE_NAMES[name]})", f"{int(pairs[code]):,}", f"{int(shared[code]):,}")
        table.add_row("all", f"{self.num_pairs:,}", f"{multilingual_ids:,} ids in 2+ languages")
        return table


class _ChunkedColumn:
    """The one column of an Arrow IPC file, memory-mapped, read by global row index without copying the column."""

    def __init__(self, path: Path):
        self.source = pa.memory_map(str(path))  # kept open: the column's buffers point into the mapping
        table = pa.ipc.open_file(self.source).read_all()
        self.chunks = table.column(0).chunks
        self.starts = np.cumsum([0] + [len(chunk) for chunk in self.chunks])  # (chunks + 1,)

    def get(self, indices: Iterable[int]) -> list[str]:
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        if len(indices) == 0:
            return []
        chunk_of = np.searchsorted(self.starts, indices, side="right") - 1
        local = indices - self.starts[chunk_of]
        if len(indices) <= 64:  # a batch's texts: element access beats building take() arrays
            return [self.chunks[c][i].as_py() for c, i in zip(chunk_of.tolist(), local.tolist())]
        out: list[str] = [""] * len(indices)
        for chunk in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk)
            texts = self.chunks[chunk].take(pa.array(local[where])).to_pylist()
            for position, text in zip(where.tolist(), texts):
                out[position] = text
        return out


def is_complete(folder: Path) -> bool:
    """A finished store: sealed in this format, every file at its recorded size (`atomic.is_sealed`)."""
    return is_sealed(folder, FORMAT)


# =====================================================================================================================
# Writing
# =====================================================================================================================
class StoreWriter:
    """Builds a store in `folder` (a temporary one: `cache.open_or_build` renames it once complete).

    Sources call `add_texts` and `add_rows` (texts shared between rows: mMARCO, MIRACL) or `add_row_batch` (one
    text per field of every row: JSONL, parquet, datasets). Rows may come in any order; `finish` groups them by id,
    sorts the languages within an id, and keeps the last row of a repeated (id, language), as a dict would."""

    def __init__(self, folder: str | os.PathLike, name: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._texts = _IpcWriter(self.folder / "texts.arrow", "text")
        self._row_ids = _IpcWriter(self.folder / "row_ids.tmp.arrow", "id")
        self._raw = {key: (self.folder / f"{key}.tmp.bin").open("wb") for key in _RAW_ROW_ARRAYS}
        self._language_codes: dict[str, int] = {}  # in order of arrival; remapped to sorted order in `finish`
        self.num_texts = self.num_rows = 0

    def restart(self) -> None:
        """Drop everything written so far (a source that must start over another way)."""
        self._texts.close()
        self._row_ids.close()
        for handle in self._raw.values():
            handle.close()
        self.__init__(self.folder, self.name)

    def add_texts(self, texts: pa.Array | Sequence[str]) -> int:
        """Append texts; returns the text index of the first."""
        first = self.num_texts
        array = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
        self._texts.write(array)
        self.num_texts += len(array)
        return first

    def add_rows(
        self,
        ids: pa.Array | Sequence[str],
        languages: pa.Array | Sequence[str] | str,
        query: np.ndarray,
        positive: np.ndarray,
        negative_counts: np.ndarray,
        negative_texts: np.ndarray,
    ) -> None:
        """Rows by text index: `negative_counts` (rows,) hard negatives each, `negative_texts` their text indices."""
        ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
        count = len(ids)
        if count == 0:
            return
        self._row_ids.write(ids)
        columns = {
            "language": self._language_column(languages, count),
            "query": np.asarray(query, dtype=np.int64),
            "positive": np.asarray(positive, dtype=np.int64),
            "negative_count": np.asarray(negative_counts, dtype=np.int64),
            "negative_text": np.asarray(negative_texts, dtype=np.int64),
        }
        for key, values in columns.items():
            values.tofile(self._raw[key])
        self.num_rows += count

    def add_row_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Rows in ROW_SCHEMA (validated by the source): each text stored once per field."""
        count = len(batch)
        negatives = batch.column("negatives")
        if isinstance(negatives, pa.ChunkedArray):
            negatives = negatives.combine_chunks()
        negatives = negatives.fill_null(pa.scalar([], pa.list_(pa.string()))) if negatives.null_count else negatives
        flat = pc.list_flatten(negatives)
        first = self.add_texts(
            pa.concat_arrays([_array(batch.column("query")), _array(batch.column("positive")), flat])
        )
        rows = np.arange(count, dtype=np.int64)
        self.add_rows(
            batch.column("id"),
            batch.column("lang"),
            first + rows,
            first + count + rows,
            pc.list_value_length(negatives).to_numpy(zero_copy_only=False),
            first + 2 * count + np.arange(len(flat), dtype=np.int64),
        )

    def _language_column(self, languages, count: int) -> np.ndarray:
        """Language codes -> provisional int16 codes (validated; remapped to the sorted order in `finish`)."""
        if isinstance(languages, str):
            return np.full(count, self._code(languages), dtype=np.int16)
        array = languages if isinstance(languages, (pa.Array, pa.ChunkedArray)) else pa.array(languages)
        encoded = pc.dictionary_encode(array)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        lookup = np.array([self._code(code) for code in encoded.dictionary.to_pylist()], dtype=np.int16)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]

    def _code(self, language: str) -> int:
        if language not in self._language_codes:
            validate_language(language, f"{self.name}: row language")
            self._language_codes[language] = len(self._language_codes)
        return self._language_codes[language]

    # ---- finishing ---------------------------------------------------------------------------------------------
    def finish(self, source: dict) -> Path:
        """Group rows by id, write the arrays and meta.json (last). Returns the folder."""
        self._texts.close()
        self._row_ids.close()
        for handle in self._raw.values():
            handle.close()
        if self.num_rows == 0:
            raise DataError(f"{self.name}: no training examples found")
        # memory-mapped, and each output written before the next is made: the peak is a few arrays of one row each
        raw = {key: _map(self.folder / f"{key}.tmp.bin", kind) for key, kind in _RAW_ROW_ARRAYS.items()}
        id_of_row, ids = self._id_indices()
        languages = sorted(self._language_codes)
        to_sorted = np.empty(len(languages), dtype=np.int16)
        to_sorted[[self._language_codes[code] for code in languages]] = np.arange(len(languages), dtype=np.int16)
        language = to_sorted[raw["language"]]
        order = _last_row_per_pair(id_of_row, language, len(languages))
        np.save(self.folder / "id_offsets.npy", np.searchsorted(id_of_row[order], np.arange(len(ids) + 1)))
        del id_of_row
        np.save(self.folder / "row_language.npy", language[order])
        del language
        for name, key in (("row_query", "query"), ("row_positive", "positive")):
            np.save(self.folder / f"{name}.npy", raw[key][order])
        negative_offsets, negative_texts = _regroup(raw["negative_count"], raw["negative_text"], order)
        np.save(self.folder / "negative_offsets.npy", negative_offsets)
        np.save(self.folder / "negative_texts.npy", negative_texts)
        del raw, negative_offsets, negative_texts
        _write_column(self.folder / "ids.arrow", "id", ids)
        for temporary in self.folder.glob("*.tmp.*"):
            temporary.unlink()
        meta = {
            "name": self.name,
            "languages": languages,
            "ids": len(ids),
            "rows": len(order),
            "texts": self.num_texts,
            "source": source,
        }
        seal_folder(self.folder, FORMAT, meta)
        return self.folder

    def _id_indices(self) -> tuple[np.ndarray, pa.Array]:
        """(per row its id index, the distinct ids): indices in order of first appearance, as a dict would give."""
        with pa.memory_map(str(self.folder / "row_ids.tmp.arrow")) as source:
            column = pa.ipc.open_file(source).read_all().column(0).combine_chunks()
            encoded = pc.dictionary_encode(column)
            del column
        return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


_RAW_ROW_ARRAYS = {
    "language": np.int16,
    "query": np.int64,
    "positive": np.int64,
    "negative_count": np.int64,
    "negative_text": np.int64,
}


def _map(path: Path, kind) -> np.ndarray:
    return np.memmap(path, dtype=kind, mode="r") if path.stat().st_size else np.zeros(0, dtype=kind)


def _last_row_per_pair(id_of_row: np.ndarray, language: np.ndarray, num_languages: int) -> np.ndarray:
    """Row numbers sorted by (id, language), keeping only the last row written for each pair."""
    pair = id_of_row * num_languages + language  # (rows,) int64: one sort key
    order = np.argsort(pair, kind="stable")  # stable: later rows last within a pair
    sorted_pair = pair[order]
    del pair
    last = np.ones(len(order), dtype=bool)
    last[:-1] = sorted_pair[1:] != sorted_pair[:-1]
    return order[last]


def _regroup(counts: np.ndarray, texts: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The variable-length negative lists of rows `order`, in that order: (offsets (rows + 1,), texts)."""
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    new_counts = counts[order]
    offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
    # for each output position: its row's old start + its position within the row
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], new_counts)
    return offsets, texts[np.repeat(starts[order], new_counts) + within]


class _IpcWriter:
    """One string column appended to an Arrow IPC file, in record batches of about FLUSH_BYTES: few batches, so
    opening the file touches few pages (each batch's metadata is read at open)."""

    FLUSH_BYTES = 64 << 20

    def __init__(self, path: Path, column: str):
        self.schema = pa.schema([(column, pa.string())])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)
        self.pending: list[pa.Array] = []
        self.pending_bytes = 0

    def write(self, array) -> None:
        array = _array(array)
        if array.type != pa.string():
            array = array.cast(pa.string())
        self.pending.append(array)
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_batch(pa.record_batch([pa.concat_arrays(self.pending)], schema=self.schema))
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()


def _write_column(path: Path, column: str, values: pa.Array) -> None:
    writer = _IpcWriter(path, column)
    for start in range(0, len(values), 1 << 20):  # slices of 1M strings: a batch must stay under 2 GB
        writer.write(values.slice(start, 1 << 20))
    if len(values) == 0:
        writer.write(pa.array([], pa.string()))
    writer.close()


def _array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
