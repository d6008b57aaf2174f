"""The Arrow corpus store: what conversion keeps, the cache's reuse and repair, and one-line errors on bad rows."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hbt_accel.data import DataError, load_training_corpus, store_from_rows
from hbt_accel.data.cache import cache_root, open_or_build
from hbt_accel.data.store import CorpusStore, is_complete

ROWS = [  # out of id order, a repeated (id, language), negatives of different lengths
    {"id": "b", "lang": "en", "query": "qb en", "positive": "pb en", "negatives": ["nb1", "nb2"]},
    {"id": "a", "lang": "de", "query": "qa de", "positive": "pa de", "negatives": []},
    {"id": "a", "lang": "en", "query": "qa en", "positive": "pa en", "negatives": ["na1"]},
    {"id": "b", "lang": "ar", "query": "qb ar", "positive": "pb ar"},
    {"id": "c", "lang": "en", "query": "qc en", "positive": "pc en", "negatives": ["nc1", "nc2", "nc3"]},
    {"id": "b", "lang": "en", "query": "qb en v2", "positive": "pb en v2", "negatives": ["nb3"]},  # replaces row 0
]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def contents(store: CorpusStore) -> list[tuple]:
    """Every row as (id, language, query, positive, negatives), in store order."""
    out = []
    for index in range(store.num_ids):
        for language in store.languages_of(index):
            row = store.row(index, language)
            out.append(
                (
                    store.example_id(index),
                    language,
                    *store.queries([row]),
                    *store.positives([row]),
                    store.negatives_of(row),
                )
            )
    return out


EXPECTED = [  # ids in order of first appearance, languages sorted within an id, the last (b, en) row kept
    ("b", "ar", "qb ar", "pb ar", []),
    ("b", "en", "qb en v2", "pb en v2", ["nb3"]),
    ("a", "de", "qa de", "pa de", []),
    ("a", "en", "qa en", "pa en", ["na1"]),
    ("c", "en", "qc en", "pc en", ["nc1", "nc2", "nc3"]),
]


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_rows_are_grouped_by_id_with_the_last_row_of_a_pair_kept(tmp_path, cache, gz):
    path = write_jsonl(tmp_path / ("rows.jsonl.gz" if gz else "rows.jsonl"), ROWS, gz=gz)
    store = load_training_corpus(str(path), cache_dir=cache)
    assert contents(store) == EXPECTED
    assert (store.num_ids, store.num_pairs, store.languages) == (3, 5, ["ar", "de", "en"])
    assert store.id_offsets.tolist() == [0, 2, 4, 5]
    assert store.rows_in("en").tolist() == [1, 3, 4]


def test_the_python_path_gives_the_same_store_as_the_arrow_path(tmp_path, cache):
    """Integer ids make Arrow's JSON reader give up (a number where text was declared); the Python reader takes
    over and must give the same rows."""
    numbered = [dict(row, id={"a": 1, "b": 2, "c": 3}[row["id"]]) for row in ROWS]
    store = load_training_corpus(str(write_jsonl(tmp_path / "numbered.jsonl", numbered)), cache_dir=cache)
    renamed = [(str({"a": 1, "b": 2, "c": 3}[row[0]]), *row[1:]) for row in EXPECTED]
    assert contents(store) == renamed


def test_parquet_csv_and_a_saved_dataset_with_a_column_mapping(tmp_path, cache):
    import datasets

    mapped = [
        {"qid": row["id"], "language": row["lang"], "question": row["query"], "answer": row["positive"]}
        for row in ROWS
    ]
    columns = {"id": "qid", "lang": "language", "query": "question", "positive": "answer"}
    pq.write_table(pa.Table.from_pylist(mapped), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(mapped).save_to_disk(str(tmp_path / "saved"))
    header = "qid,language,question,answer\n"
    (tmp_path / "rows.csv").write_text(
        header + "".join(f"{r['qid']},{r['language']},{r['question']},{r['answer']}\n" for r in mapped)
    )
    without_negatives = [(*row[:4], []) for row in EXPECTED]
    for source in ("rows.parquet", "rows.csv", "saved"):
        store = load_training_corpus(str(tmp_path / source), columns=columns, cache_dir=cache)
        assert contents(store) == without_negatives, source


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": "x", "lang": "en", "query": "q"}, r"bad\.jsonl:3: missing field 'positive'"),
        ({"id": "x", "lang": "en", "query": "  ", "positive": "p"}, r"bad\.jsonl:3: missing field 'query'"),
        ({"id": "x", "lang": "xx", "query": "q", "positive": "p"}, r"bad\.jsonl:3: unknown language code 'xx'"),
        (
            {"id": "x", "lang": "en", "query": "q", "positive": ["a", "b"]},
            r"bad\.jsonl:3: field 'positive' must be a string",
        ),
        ({"id": "x", "lang": "en", "query": "q", "positive": "p", "negatives": "n"}, r"'negatives' must be a list"),
    ],
)
def test_a_bad_row_is_one_line_naming_the_file_line_and_field(tmp_path, cache, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], line])
    with pytest.raises(DataError, match=message) as error:
        load_training_corpus(str(path), cache_dir=cache)
    assert "\n" not in str(error.value)
    assert not any(Path(cache).glob("*/meta.json")) and not list(Path(cache).glob(".*partial*"))  # nothing left


def test_bad_bytes_and_bad_json_name_their_line(tmp_path, cache):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: not UTF-8 text"):
        load_training_corpus(str(path), cache_dir=cache)
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: not valid JSON"):
        load_training_corpus(str(path), cache_dir=cache)


def test_a_bad_parquet_row_names_the_row(tmp_path, cache):
    rows = [dict(row, negatives=row.get("negatives", [])) for row in ROWS[:3]]
    rows[2]["lang"] = "english"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows\.parquet row 3: unknown language code 'english'"):
        load_training_corpus(str(tmp_path / "rows.parquet"), cache_dir=cache)


# ---------------------------------------------------------------- the cache
def test_a_second_open_reuses_the_store_and_a_changed_file_makes_a_new_one(tmp_path, cache):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = load_training_corpus(str(path), cache_dir=cache)
    written = (first.folder / "meta.json").stat().st_mtime_ns
    again = load_training_corpus(str(path), cache_dir=cache)
    assert again.folder == first.folder and (again.folder / "meta.json").stat().st_mtime_ns == written
    write_jsonl(path, ROWS[:5])  # (b, en) now only its first version
    changed = load_training_corpus(str(path), cache_dir=cache)
    assert changed.folder != first.folder and contents(changed)[1][2] == "qb en"


def test_a_truncated_store_is_rebuilt_not_used(tmp_path, cache):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    folder = load_training_corpus(str(path), cache_dir=cache).folder
    texts = folder / "texts.arrow"
    texts.write_bytes(texts.read_bytes()[:-100])  # a disk that filled up, a copy cut short
    assert not is_complete(folder)
    assert contents(load_training_corpus(str(path), cache_dir=cache)) == EXPECTED
    assert is_complete(folder)


def test_a_killed_conversion_leaves_no_store_and_its_partial_folder_is_cleared(tmp_path, cache):
    def dies_halfway(writer):
        writer.add_row_batch(_table(ROWS[1:2]))
        raise KeyboardInterrupt  # Ctrl-C mid-conversion

    with pytest.raises(KeyboardInterrupt):
        open_or_build("killed", {"kind": "test"}, dies_halfway, cache)
    assert list(Path(cache).iterdir()) == []
    # kill -9 leaves the partial folder behind: a dead pid's partial is removed by the next conversion
    dead = Path(cache) / f".killed-x.partial-{os.uname().nodename}-999999999"
    dead.mkdir()
    store = open_or_build("killed", {"kind": "test"}, lambda w: w.add_row_batch(_table(ROWS[1:2])), cache)
    assert store.num_pairs == 1 and is_complete(store.folder)


def _table(rows):
    from hbt_accel.data.store import ROW_SCHEMA

    return pa.Table.from_pylist([dict(row, negatives=row.get("negatives", [])) for row in rows], schema=ROW_SCHEMA)


def test_the_cache_root_follows_the_hugging_face_convention(monkeypatch, tmp_path):
    for variable in ("HBT_CORPUS_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    assert cache_root() == Path("~/.cache/huggingface/datasets/hbt_accel_corpora").expanduser()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_root() == tmp_path / "hf" / "datasets" / "hbt_accel_corpora"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    assert cache_root() == tmp_path / "ds" / "hbt_accel_corpora"
    monkeypatch.setenv("HBT_CORPUS_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"
    assert cache_root(str(tmp_path / "flag")) == tmp_path / "flag"  # the config field wins


def test_texts_shared_by_rows_are_stored_once(tmp_path):
    """A source with shared passages (mMARCO's pids) adds each text once and rows point at it."""

    def write(writer):
        first = writer.add_texts(["q1", "q2", "shared passage", "other passage"])
        writer.add_rows(["1", "2"], "en", np.array([0, 1]) + first, [first + 2, first + 2], [1, 1], [first + 3] * 2)

    store = open_or_build("shared", {"kind": "test"}, write, str(tmp_path))
    assert store.meta["texts"] == 4
    assert store.positives([0, 1]) == ["shared passage"] * 2 and store.negatives_of(1) == ["other passage"]


def test_store_from_rows_validates_like_a_file(tmp_path):
    with pytest.raises(DataError, match="corpus row 1: missing field 'positive'"):
        store_from_rows([ROWS[0], {"id": "x", "lang": "en", "query": "q"}], tmp_path / "s")
