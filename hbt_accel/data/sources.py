"""Every `train_data` entry -> a `CorpusStore`, through one conversion path (`cache.open_or_build`).

Sources:
- a LAReQA name or folder (`mlqa-r`, `mlqa-r:train`, a folder of <lang>.json): question -> gold sentence rows;
- a row file `{id, lang, query, positive, negatives?}`: `.jsonl` / `.jsonl.gz` (streamed by Arrow's JSON reader),
  `.csv`, `.parquet`;
- a `datasets` dataset: a `save_to_disk` folder, a `.json` file or a `load_dataset` spec; `train_data_columns` maps
  its column names onto id / lang / query / positive / negatives;
- the published raw layouts of mMARCO, MIRACL, Mr. TyDi and MLDR (`hbt_accel.data.raw_corpora`), as
  `mmarco:FOLDER?languages=en,de&max_triples=1000000` and the like.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hbt_accel.data import raw_corpora
from hbt_accel.data.cache import file_fingerprint, open_or_build
from hbt_accel.data.jsonl import iter_jsonl
from hbt_accel.data.languages import LANGUAGE_NAMES, validate_language
from hbt_accel.data.lareqa import (
    is_lareqa_name,
    lareqa_files,
    lareqa_training_rows,
    load_lareqa_benchmark,
    split_name,
)
from hbt_accel.data.published_files import arrow_jsonl_batches
from hbt_accel.data.store import ROW_SCHEMA, CorpusStore, StoreWriter
from hbt_accel.errors import DataError

ROW_FIELDS = ("id", "lang", "query", "positive", "negatives")
ROW_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".parquet")
DATASETS_FILE_SUFFIXES = (".json",)  # JSON arrays or lines: `datasets`' json builder reads both
BATCH_ROWS = 8192  # rows per record batch written (text chunks stay small, memory stays flat)


def load_training_corpus(
    source: str,
    data_dir: str = "",
    hard_negatives: bool = False,
    columns: Mapping[str, str] | None = None,
    cache_dir: str = "",
) -> CorpusStore:
    """One `train_data` entry -> its store (converted on first use, re-opened from the cache after)."""
    if raw_corpora.is_raw_spec(source):
        return raw_corpora.load(source, cache_dir)
    path = Path(source).expanduser()
    folder = Path(split_name(source)[0]).expanduser()  # a LAReQA folder may carry a split suffix too
    saved_dataset = (folder / "dataset_info.json").is_file()  # a save_to_disk folder holds .json files too
    if is_lareqa_name(source) or (folder.is_dir() and not saved_dataset and any(folder.glob("*.json"))):
        return _lareqa_store(source, data_dir, hard_negatives, cache_dir)
    if _suffix(path) in ROW_FILE_SUFFIXES + DATASETS_FILE_SUFFIXES and not path.is_file():
        raise DataError(f"{path}: training data file not found (train_data)")
    if path.is_dir() and not any(
        _suffix(p) in ROW_FILE_SUFFIXES + DATASETS_FILE_SUFFIXES or p.name == "dataset_info.json"
        for p in path.rglob("*")
    ):
        raise DataError(
            f"{path}: no training data in this folder (train_data: expected LAReQA <lang>.json files, a saved "
            f"dataset, or {', '.join(ROW_FILE_SUFFIXES + DATASETS_FILE_SUFFIXES)} files)"
        )
    rename = _rename(columns)
    if path.is_file() and _suffix(path) in ROW_FILE_SUFFIXES:
        description = {"kind": "rows", "file": file_fingerprint(path), "columns": rename}
        return open_or_build(_stem(path), description, lambda w: _write_row_file(path, rename, w), cache_dir)
    return _datasets_store(source, rename, cache_dir)


def store_from_rows(rows: Iterable[Mapping], folder: str | Path, name: str = "corpus") -> CorpusStore:
    """A store written straight into `folder` from rows `{id, lang, query, positive, negatives?}` (no cache): for
    corpora built in code, and tests."""
    writer = StoreWriter(folder, name)
    validated = (row_from_mapping(row, f"{name} row {k}") for k, row in enumerate(rows))
    for batch in _batched(validated, BATCH_ROWS):
        writer.add_row_batch(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
    writer.finish({"kind": "rows in memory"})
    return CorpusStore(folder)


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".jsonl.gz") else path.suffix


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def _rename(columns: Mapping[str, str] | None) -> dict[str, str]:
    """target field -> the source's column name."""
    return {key: (columns or {}).get(key, key) for key in ROW_FIELDS}


# =====================================================================================================================
# LAReQA
# =====================================================================================================================
def _lareqa_store(source: str, data_dir: str, hard_negatives: bool, cache_dir: str) -> CorpusStore:
    base, split = split_name(source)
    files = lareqa_files(base, data_dir or None)
    description = {
        "kind": "lareqa",
        "split": split,
        "hard_negatives": hard_negatives,
        "files": [file_fingerprint(path) for path in files.values()],
    }

    def write(writer: StoreWriter) -> None:
        benchmark = load_lareqa_benchmark(source, data_dir=data_dir or None)
        rows = list(lareqa_training_rows(benchmark, hard_negatives))
        for start in range(0, len(rows), BATCH_ROWS):
            writer.add_row_batch(pa.Table.from_pylist(rows[start : start + BATCH_ROWS], schema=ROW_SCHEMA))

    name = Path(base).name + (f"_{split}" if split else "")
    return open_or_build(name, description, write, cache_dir)


# =====================================================================================================================
# Row files: JSONL (Arrow's streaming JSON reader, with a line-exact Python path for errors), CSV, parquet
# =====================================================================================================================
def _write_row_file(path: Path, rename: dict[str, str], writer: StoreWriter) -> None:
    suffix = _suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        try:
            for batch in _arrow_jsonl_batches(path, rename):
                writer.add_row_batch(normalise_rows(batch, rename, lambda row: f"{path} row {row + 1}"))
            return
        except (pa.ArrowException, DataError):
            # Arrow stops at the first surprise (a number where text was, a list for a string, a bad line) and
            # names no line. The Python reader finds the exact line, or converts types Arrow would not (int ids).
            writer.restart()
        for rows in _batched(_python_jsonl_rows(path, rename), BATCH_ROWS):
            writer.add_row_batch(pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
        return
    for start, batch in _arrow_file_batches(path):
        writer.add_row_batch(normalise_rows(batch, rename, lambda row, start=start: f"{path} row {start + row + 1}"))


def _arrow_jsonl_batches(path: Path, rename: dict[str, str]) -> Iterator[pa.RecordBatch]:
    types = {"id": pa.string(), "lang": pa.string(), "query": pa.string(), "positive": pa.string()}
    schema = pa.schema(
        [(rename[key], kind) for key, kind in types.items()] + [(rename["negatives"], pa.list_(pa.string()))]
    )
    yield from arrow_jsonl_batches(path, schema, block_bytes=4 << 20)


def _python_jsonl_rows(path: Path, rename: dict[str, str]) -> Iterator[dict]:
    for row, where in iter_jsonl(path):
        yield row_from_mapping({key: row.get(source) for key, source in rename.items()}, where, rename)


def _arrow_file_batches(path: Path) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row number, batch) of a CSV or parquet file, streamed."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH_ROWS)
    else:
        import pyarrow.csv as pa_csv

        text = pa_csv.ConvertOptions(strings_can_be_null=False, column_types={"id": pa.string(), "lang": pa.string()})
        batches = pa_csv.open_csv(str(path), convert_options=text)
    start = 0
    for batch in batches:
        yield start, batch
        start += len(batch)


def row_from_mapping(row: Mapping, where: str, rename: Mapping[str, str] | None = None) -> dict:
    """One validated row in ROW_SCHEMA's fields; a bad field is named as the user's column."""
    column = dict(rename or {})
    for key in ("id", "lang", "query", "positive"):
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: missing field {column.get(key, key)!r} (expected a non-empty value)")
    for key in ("query", "positive"):
        if not isinstance(row[key], str):
            kind = type(row[key]).__name__
            raise DataError(f"{where}: field {column.get(key, key)!r} must be a string (got a {kind})")
    negatives = row.get("negatives") or ()
    if isinstance(negatives, str) or not all(isinstance(n, str) for n in negatives):
        raise DataError(f"{where}: field {column.get('negatives', 'negatives')!r} must be a list of strings")
    language = validate_language(str(row["lang"]), where)
    return {
        "id": str(row["id"]),
        "lang": language,
        "query": row["query"],
        "positive": row["positive"],
        "negatives": list(negatives),
    }


def normalise_rows(table: pa.RecordBatch | pa.Table, rename: Mapping[str, str], where) -> pa.Table:
    """A batch of the user's columns -> ROW_SCHEMA, checked column-wise; `where(row)` names a bad row."""
    columns = {}
    for key in ("id", "lang", "query", "positive"):
        source = rename[key]
        if source not in table.column_names:
            raise DataError(f"{where(0)}: missing field {source!r} (columns: {', '.join(table.column_names)})")
        column = _column(table, source)
        if key in ("id", "lang") and (pa.types.is_integer(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise DataError(f"{where(0)}: field {source!r} must be text (got {column.type})")
        column = column.cast(pa.string())
        blank = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
        _raise_at_first(
            blank, lambda row, source=source: f"{where(row)}: missing field {source!r} (expected a non-empty value)"
        )
        columns[key] = column
    _check_languages(columns["lang"], where)
    columns["negatives"] = _negatives(table, rename["negatives"], where)
    return pa.table(columns, schema=ROW_SCHEMA)


def _column(table, name: str) -> pa.Array:
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _negatives(table, source: str, where) -> pa.Array:
    empty_lists = pa.array([[]] * len(table), pa.list_(pa.string()))
    if source not in table.column_names:
        return empty_lists
    column = _column(table, source)
    if column.null_count == len(column):
        return empty_lists
    value_type = getattr(column.type, "value_type", None)
    if value_type is None or not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        raise DataError(f"{where(0)}: field {source!r} must be a list of strings (got {column.type})")
    column = column.cast(pa.list_(pa.string()))
    if pc.list_flatten(column).null_count:
        raise DataError(f"{where(0)}: field {source!r} must be a list of strings (found a null item)")
    return column


def _check_languages(languages: pa.Array, where) -> None:
    unknown = [code for code in pc.unique(languages).to_pylist() if code not in LANGUAGE_NAMES]
    if unknown:
        _raise_at_first(
            pc.equal(languages, unknown[0]),
            lambda row: (
                f"{where(row)}: unknown language code {unknown[0]!r} (expected an ISO 639-1 code such as 'en', 'de')"
            ),
        )


def _raise_at_first(mask: pa.Array, message) -> None:
    if pc.any(mask).as_py():
        raise DataError(message(int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])))


def _batched(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# =====================================================================================================================
# `datasets` datasets: a save_to_disk folder, a .json file or a load_dataset spec
# =====================================================================================================================
def _datasets_store(source: str, rename: dict[str, str], cache_dir: str) -> CorpusStore:
    local = Path(source).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        identity = {"folder": [file_fingerprint(p) for p in files]}
    elif local.is_file():
        identity = {"file": file_fingerprint(local)}
    else:  # a Hub id or a datasets spec: its own cache decides what is current; the spec is the identity
        identity = {"spec": source}
    description = {"kind": "datasets", **identity, "columns": rename}

    def write(writer: StoreWriter) -> None:
        dataset = _load_dataset(source)
        start = 0
        for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
            writer.add_row_batch(normalise_rows(table, rename, lambda row, s=start: f"{source} row {s + row}"))
            start += len(table)

    return open_or_build(_stem(local) or source, description, write, cache_dir)


def _load_dataset(name_or_path: str, split: str = "train"):
    import datasets

    local = Path(name_or_path).expanduser()
    if local.is_file():
        return datasets.load_dataset("json", data_files=str(local), split=split)
    if local.is_dir() and (local / "dataset_info.json").exists():
        return datasets.load_from_disk(str(local))
    return datasets.load_dataset(name_or_path, split=split)
