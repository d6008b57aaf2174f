"""mMARCO, MIRACL, Mr. TyDi and MLDR training rows, read from the files as their authors publish them.

A `train_data` entry `KIND:PATH[?key=value&key=value]` names one of them; it is converted once into a
`CorpusStore` (`cache.open_or_build`) and re-opened from the cache after. Layouts read (as published):

    mmarco:DATA?languages=en,de&max_triples=N&negatives_per_query=K     (unicamp-dl/mmarco, `data/`)
        google/collections/{language}_collection.tsv        pid<TAB>text, no header, 8.8M lines per language
        google/queries/train/{language}_queries.train.tsv   qid<TAB>text
        triples.train.ids.small.tsv                         qid<TAB>pos_pid<TAB>neg_pid, one file for every language
      {language} is the spelled-out English name (english, german, chinese). DATA may also be the folder holding
      `data/`. Default: every language whose collection is present, every triple, 8 negatives per query. One
      id per qid (order of first appearance in the triples): positive = the pos_pid of its first triple, hard
      negatives = its distinct neg_pids in file order. Only the texts those rows use are kept.
    miracl:FOLDER?languages=sw,te&split=train&corpus=CORPUS_FOLDER      (miracl/miracl + miracl/miracl-corpus)
        miracl-v1.0-{l}/topics/topics.miracl-v1.0-{l}-{split}.tsv   qid<TAB>query
        miracl-v1.0-{l}/qrels/qrels.miracl-v1.0-{l}-{split}.tsv     TREC: qid<TAB>Q0<TAB>docid<TAB>relevance (0/1)
        miracl-corpus-v1.0-{l}/docs-{i}.jsonl.gz                    {"docid": "39#0", "title", "text"}
      The corpus folders sit in FOLDER unless `corpus=` names another. Default: every language with topics for
      the split, split `train`. A row per query: its first relevant (rel 1) passage is the positive, its judged
      non-relevant (rel 0) passages are the hard negatives. Queries with no relevant passage are skipped; how
      many goes into the store's description (meta.json `source`). Only judged passages are kept from the shards;
      judged passages the shards lack are left out with a warning (a query left with no relevant one is dropped).
    mrtydi:mrtydi-v1.1-{language}/train.jsonl.gz   (castorini/mr-tydi; {language} spelled out: swahili)
    mldr:mldr-v1.0-{l}/train.jsonl.gz              (Shitao/MLDR; passages have no title)
        {"query_id", "query", "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}
      PATH is the file or its folder; the language comes from the folder name, or from `?language=`. Positive =
      the first positive passage, hard negatives = the negative passages; rows with no positive are skipped (with
      a warning).

A passage's text is its title + " " + its text (MIRACL's protocol; Mr. TyDi likewise), the text alone where
there is no title (MLDR).

How each takes part in hybrid (X-X / X-Y) sampling: mMARCO is parallel (every qid and pid exists in every
language), so its ids are the qids, each with a row in every chosen language: those rows feed X-Y batches (and
X-X). MIRACL, Mr. TyDi and MLDR are monolingual: their ids are `{language}/{qid}`, one language each, so they
never collide across languages and only ever feed X-X batches.

Texts are stored once per language and rows point at them by index: an mMARCO passage used by many triples, or
a Mr. TyDi / MLDR passage that is a negative of many queries, costs one text and an integer per use.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hbt_accel.data.cache import file_fingerprint, open_or_build
from hbt_accel.data.jsonl import iter_jsonl
from hbt_accel.data.languages import CODE_OF_NAME, LANGUAGE_NAMES, language_code
from hbt_accel.data.published_files import arrow_jsonl_batches, passage_texts, read_topics, read_trec_qrels
from hbt_accel.data.store import CorpusStore, StoreWriter
from hbt_accel.errors import DataError, did_you_mean, require_file

RAW_KINDS = ("mmarco", "miracl", "mrtydi", "mldr")
OPTIONS = {
    "mmarco": ("languages", "max_triples", "negatives_per_query"),
    "miracl": ("languages", "split", "corpus"),
    "mrtydi": ("language",),
    "mldr": ("language",),
}
BATCH_ROWS = 8192  # rows per add_rows call: memory stays flat however long the file
BLOCK_BYTES = 64 << 20  # Arrow read block: few, large batches (each `is_in` call rebuilds its hash set)

MMARCO_TRIPLES = "triples.train.ids.small.tsv"
MMARCO_NEGATIVES_PER_QUERY = 8
MIRACL_SPLITS = ("train", "dev", "test-a")  # the splits MIRACL publishes qrels for
TRAIN_ROWS_FILE = "train.jsonl.gz"
TRAIN_ROWS_FOLDER = {"mrtydi": re.compile(r"mrtydi-v1\.1-([a-z]+)"), "mldr": re.compile(r"mldr-v1\.0-([a-z]+)")}
TRAIN_ROWS_LAYOUT = {"mrtydi": "mrtydi-v1.1-{language}/train.jsonl.gz", "mldr": "mldr-v1.0-{code}/train.jsonl.gz"}
TRAIN_ROWS_NAME = {"mrtydi": "Mr. TyDi", "mldr": "MLDR"}
PASSAGE_SCHEMA = pa.schema([("docid", pa.string()), ("title", pa.string()), ("text", pa.string())])


def is_raw_spec(source: str) -> bool:
    return ":" in source and source.split(":", 1)[0] in RAW_KINDS


def load(source: str, cache_dir: str = "") -> CorpusStore:
    """A raw-corpus spec -> its store. Every option and file is checked before anything heavy is read."""
    spec = parse_spec(source)
    loaders = {"mmarco": _load_mmarco, "miracl": _load_miracl, "mrtydi": _load_train_rows, "mldr": _load_train_rows}
    return loaders[spec.kind](spec, cache_dir)


# =====================================================================================================================
# The spec: KIND:PATH[?key=value&key=value]
# =====================================================================================================================
@dataclass(frozen=True)
class RawSpec:
    source: str
    kind: str
    path: Path
    options: dict[str, str]

    def languages(self, key: str) -> list[str] | None:
        """A comma-separated list of ISO codes or English names -> sorted codes (None when not given)."""
        if key not in self.options:
            return None
        where = f"{self.source}: option {key!r}"
        # "en,de", or "en+de" (a comma would split a comma-separated --train_data list; parse_qsl reads + as a space)
        codes = {language_code(part, where) for part in re.split(r"[,\s]+", self.options[key]) if part.strip()}
        if not codes:
            raise DataError(f"{where} is empty (expected language codes or names such as 'en,de')")
        return sorted(codes)

    def count(self, key: str, default: int | None, minimum: int) -> int | None:
        value = self.options.get(key)
        if value is None:
            return default
        if not (value.isascii() and value.isdigit()) or int(value) < minimum:
            raise DataError(f"{self.source}: option {key}={value!r} (expected a whole number >= {minimum})")
        return int(value)

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.options.get(key, default)
        if value not in allowed:
            expected = ", ".join(allowed)
            raise DataError(f"{self.source}: option {key}={value!r} (expected one of: {expected})")
        return value


def parse_spec(source: str) -> RawSpec:
    kind, _, rest = source.partition(":")
    if kind not in RAW_KINDS:
        raise DataError(f"{source}: unknown raw corpus {kind!r} (expected one of: {', '.join(RAW_KINDS)})")
    path, _, query = rest.partition("?")
    if not path.strip():
        raise DataError(f"{source}: no path after '{kind}:' (expected {kind}:PATH[?key=value&...])")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"{source}: options {query!r} are not key=value pairs joined by '&'") from None
    options: dict[str, str] = {}
    allowed = list(OPTIONS[kind])
    for key, value in pairs:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise DataError(f"{source}: unknown option {key!r} (expected one of: {', '.join(allowed)}){hint}")
        if key in options:
            raise DataError(f"{source}: option {key!r} given twice (expected it once)")
        options[key] = value
    return RawSpec(source, kind, Path(path).expanduser(), options)


def _require_folder(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found (expected {expected})")
    return path


# =====================================================================================================================
# mMARCO: one triples file of integer ids, parallel collections and queries per language
# =====================================================================================================================
@dataclass
class MmarcoFiles:
    triples: Path
    collections: dict[str, Path]  # language code -> {language}_collection.tsv
    queries: dict[str, Path]  # language code -> {language}_queries.train.tsv

    def all(self) -> list[Path]:
        return [self.triples, *self.collections.values(), *self.queries.values()]


@dataclass
class MmarcoPlan:
    """Which ids and texts the chosen triples need: the same for every language, since the corpus is parallel."""

    query_ids: np.ndarray  # (ids,) qids in order of first appearance in the triples
    positive_pids: np.ndarray  # (ids,) the pos_pid of each qid's first triple
    negative_counts: np.ndarray  # (ids,)
    negative_pids: np.ndarray  # distinct neg_pids, grouped by id, in file order within an id
    needed_pids: np.ndarray  # sorted: the passages any row uses


def _load_mmarco(spec: RawSpec, cache_dir: str) -> CorpusStore:
    files = _mmarco_files(spec)
    max_triples = spec.count("max_triples", None, 1)
    negatives_per_query = spec.count("negatives_per_query", MMARCO_NEGATIVES_PER_QUERY, 0)
    languages = list(files.collections)
    description = {
        "kind": "mmarco",
        "languages": languages,
        "max_triples": max_triples,
        "negatives_per_query": negatives_per_query,
        "files": [file_fingerprint(path) for path in files.all()],
    }

    def write(writer: StoreWriter) -> None:
        plan = _mmarco_plan(*_read_triples(files.triples, max_triples), negatives_per_query)
        for code in languages:
            _write_mmarco_language(writer, code, plan, files)

    return open_or_build(f"mmarco-{'-'.join(languages)}", description, write, cache_dir)


def _mmarco_files(spec: RawSpec) -> MmarcoFiles:
    root = _require_folder(spec.path, f"mMARCO's data/ folder, holding google/ and {MMARCO_TRIPLES}")
    data = root / "data" if (root / "data").is_dir() and not (root / "google").is_dir() else root
    triples = require_file(data / MMARCO_TRIPLES, "mMARCO's training triples, qid<TAB>pos_pid<TAB>neg_pid lines")
    languages = spec.languages("languages") or _mmarco_languages_present(data)
    collections, queries = {}, {}
    for code in languages:
        name = LANGUAGE_NAMES[code].lower()
        collections[code] = require_file(
            data / "google" / "collections" / f"{name}_collection.tsv",
            f"mMARCO's {LANGUAGE_NAMES[code]} passages, pid<TAB>text lines ({spec.source})",
        )
        queries[code] = require_file(
            data / "google" / "queries" / "train" / f"{name}_queries.train.tsv",
            f"mMARCO's {LANGUAGE_NAMES[code]} training queries, qid<TAB>text lines ({spec.source})",
        )
    return MmarcoFiles(triples, collections, queries)


def _mmarco_languages_present(data: Path) -> list[str]:
    folder = data / "google" / "collections"
    names = [path.name.removesuffix("_collection.tsv") for path in folder.glob("*_collection.tsv")]
    codes = sorted(CODE_OF_NAME[name] for name in names if name in CODE_OF_NAME)
    if not codes:
        raise DataError(f"{folder}: no {{language}}_collection.tsv files (expected e.g. english_collection.tsv)")
    return codes


def _read_triples(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `limit` triples (all when None) as three int64 arrays, reading no further than needed."""
    batches, count = [], 0
    for batch in _tsv_batches(path, {"qid": pa.int64(), "pos_pid": pa.int64(), "neg_pid": pa.int64()}):
        batches.append(batch)
        count += len(batch)
        if limit is not None and count >= limit:
            break
    if not batches:
        raise DataError(f"{path}: no triples (expected qid<TAB>pos_pid<TAB>neg_pid lines)")
    table = pa.Table.from_batches(batches).slice(0, limit)
    return tuple(table.column(name).to_numpy() for name in ("qid", "pos_pid", "neg_pid"))


def _mmarco_plan(qid: np.ndarray, pos: np.ndarray, neg: np.ndarray, negatives_per_query: int) -> MmarcoPlan:
    query_ids, first_triple, id_of_triple = _number_by_first_appearance(qid)
    negative_rows = _first_distinct_negatives(id_of_triple, neg, negatives_per_query)
    positive_pids, negative_pids = pos[first_triple], neg[negative_rows]
    return MmarcoPlan(
        query_ids=query_ids,
        positive_pids=positive_pids,
        negative_counts=np.bincount(id_of_triple[negative_rows], minlength=len(query_ids)).astype(np.int64),
        negative_pids=negative_pids,
        needed_pids=np.unique(np.concatenate([positive_pids, negative_pids])),
    )


def _number_by_first_appearance(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values in order of first appearance, the row each first appears at, each row's number)."""
    unique, first_row, inverse = np.unique(values, return_index=True, return_inverse=True)  # numbered sorted
    appearance = np.argsort(first_row)
    number = np.empty_like(appearance)
    number[appearance] = np.arange(len(appearance))
    return unique[appearance], first_row[appearance], number[inverse.reshape(-1)]


def _first_distinct_negatives(id_of_triple: np.ndarray, neg: np.ndarray, cap: int) -> np.ndarray:
    """Triple rows holding each id's first `cap` distinct neg_pids: grouped by id, file order within an id."""
    order = np.lexsort((np.arange(len(neg)), neg, id_of_triple))  # by id, then neg_pid, then file order
    sorted_id, sorted_neg = id_of_triple[order], neg[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (sorted_id[1:] != sorted_id[:-1]) | (sorted_neg[1:] != sorted_neg[:-1])
    rows = order[first]
    rows = rows[np.lexsort((rows, id_of_triple[rows]))]  # back to file order within each id
    ids = id_of_triple[rows]
    position_in_id = np.arange(len(rows)) - np.searchsorted(ids, ids)
    return rows[position_in_id < cap]


def _write_mmarco_language(writer: StoreWriter, code: str, plan: MmarcoPlan, files: MmarcoFiles) -> None:
    passages = _store_texts_of(writer, files.collections[code], plan.needed_pids, "passage")
    queries = _store_texts_of(writer, files.queries[code], np.unique(plan.query_ids), "query")
    ids = pa.array(plan.query_ids).cast(pa.string())
    negative_offsets = np.concatenate([[0], np.cumsum(plan.negative_counts)])
    for start in range(0, len(ids), BATCH_ROWS):
        end = min(start + BATCH_ROWS, len(ids))
        writer.add_rows(
            ids.slice(start, end - start),
            code,
            queries.lookup(plan.query_ids[start:end]),
            passages.lookup(plan.positive_pids[start:end]),
            plan.negative_counts[start:end],
            passages.lookup(plan.negative_pids[negative_offsets[start] : negative_offsets[end]]),
        )


@dataclass
class TextIndex:
    """Integer ids -> the text index each was stored at."""

    ids: np.ndarray  # sorted
    text_index: np.ndarray

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.text_index[np.searchsorted(self.ids, ids)]


def _store_texts_of(writer: StoreWriter, path: Path, wanted: np.ndarray, what: str) -> TextIndex:
    """Stream an `id<TAB>text` file, store the texts of the `wanted` ids (sorted) only; every one must be there."""
    value_set = pa.array(wanted, pa.int64())
    found_ids, found_index = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for batch in _tsv_batches(path, {"id": pa.int64(), "text": pa.string()}):
        hits = batch.filter(pc.is_in(batch.column("id"), value_set=value_set))
        if len(hits):
            first = writer.add_texts(hits.column("text"))
            found_ids.append(hits.column("id").to_numpy())
            found_index.append(first + np.arange(len(hits), dtype=np.int64))
    ids, first_line = np.unique(np.concatenate(found_ids), return_index=True)  # a repeated id: its first line
    missing = np.setdiff1d(wanted, ids, assume_unique=True)
    if len(missing):
        raise DataError(
            f"{path}: {what} id {missing[0]} not found ({len(missing)} of the {len(wanted)} ids the chosen triples "
            "use are missing; expected every id in every language, as mMARCO is parallel)"
        )
    return TextIndex(ids, np.concatenate(found_index)[first_line])


def _tsv_batches(path: Path, column_types: dict[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    """A header-less TSV file, streamed. No quoting: mMARCO's texts hold bare quote characters."""
    import pyarrow.csv as pa_csv

    read = pa_csv.ReadOptions(column_names=list(column_types), block_size=BLOCK_BYTES)
    parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False)
    convert = pa_csv.ConvertOptions(column_types=column_types, strings_can_be_null=False)
    try:
        yield from pa_csv.open_csv(str(path), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as error:
        columns = "<TAB>".join(column_types)
        raise DataError(f"{path}: expected {columns} lines ({str(error).splitlines()[0]})") from None


# =====================================================================================================================
# MIRACL: topics + TREC qrels per language, passages streamed from the corpus shards
# =====================================================================================================================
@dataclass
class MiraclFiles:
    topics: Path
    qrels: Path
    shards: list[Path]


@dataclass
class JudgedQuery:
    qid: str
    text: str
    positives: list[str]  # docids judged relevant, qrels order
    negatives: list[str]  # docids judged non-relevant


def _load_miracl(spec: RawSpec, cache_dir: str) -> CorpusStore:
    split = spec.choice("split", "train", MIRACL_SPLITS)
    files = _miracl_files(spec, split)
    queries, skipped = {}, {}
    for code, paths in files.items():
        queries[code], skipped[code] = _judged_queries(paths)
    description = {
        "kind": "miracl",
        "split": split,
        "languages": list(files),
        "files": [file_fingerprint(p) for paths in files.values() for p in (paths.topics, paths.qrels, *paths.shards)],
        "queries_without_relevant_passage": skipped,  # skipped: nothing to train towards
    }

    def write(writer: StoreWriter) -> None:
        missing = {code: _write_miracl_language(writer, code, files[code].shards, queries[code]) for code in files}
        _warn_missing_passages(spec, missing)

    return open_or_build(f"miracl-{split}-{'-'.join(files)}", description, write, cache_dir)


def _miracl_files(spec: RawSpec, split: str) -> dict[str, MiraclFiles]:
    folder = _require_folder(spec.path, "the folder holding MIRACL's miracl-v1.0-{language}/ folders")
    corpus_root = Path(spec.options["corpus"]).expanduser() if "corpus" in spec.options else folder
    languages = spec.languages("languages") or _miracl_languages_present(folder, split)
    files = {}
    for code in languages:
        base = folder / f"miracl-v1.0-{code}"
        topics = base / "topics" / f"topics.miracl-v1.0-{code}-{split}.tsv"
        qrels = base / "qrels" / f"qrels.miracl-v1.0-{code}-{split}.tsv"
        corpus = corpus_root / f"miracl-corpus-v1.0-{code}"
        require_file(topics, f"MIRACL's {split} topics, qid<TAB>query lines ({spec.source})")
        require_file(qrels, f"MIRACL's {split} qrels, qid<TAB>Q0<TAB>docid<TAB>relevance lines ({spec.source})")
        shards = sorted(corpus.glob("docs-*.jsonl.gz"), key=_shard_number)
        if not shards:
            raise DataError(f"{corpus}: no docs-*.jsonl.gz shards (expected MIRACL's {code} corpus, {spec.source})")
        files[code] = MiraclFiles(topics, qrels, shards)
    return files


def _miracl_languages_present(folder: Path, split: str) -> list[str]:
    found = re.compile(rf"topics\.miracl-v1\.0-([a-z]+)-{re.escape(split)}\.tsv")
    codes = sorted(
        match.group(1)
        for path in folder.glob(f"miracl-v1.0-*/topics/topics.miracl-v1.0-*-{split}.tsv")
        if (match := found.fullmatch(path.name)) and match.group(1) in LANGUAGE_NAMES
    )
    if not codes:
        raise DataError(
            f"{folder}: no miracl-v1.0-{{language}}/topics/topics.miracl-v1.0-{{language}}-{split}.tsv "
            "(expected MIRACL's topics and qrels folders here, or name the languages with ?languages=)"
        )
    return codes


def _shard_number(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.name)
    return (int(digits[-1]) if digits else -1, path.name)


def _judged_queries(files: MiraclFiles) -> tuple[list[JudgedQuery], int]:
    """The topics with at least one relevant passage, in topics order, and how many have none (skipped)."""
    judged = read_trec_qrels(files.qrels)  # qid -> docid -> relevance, file order
    queries, skipped = [], 0
    for qid, text in read_topics(files.topics).items():
        positives = [docid for docid, relevance in judged.get(qid, {}).items() if relevance > 0]
        negatives = [docid for docid, relevance in judged.get(qid, {}).items() if relevance <= 0]
        if positives:
            queries.append(JudgedQuery(qid, text, positives, negatives))
        else:
            skipped += 1
    return queries, skipped


def _write_miracl_language(writer: StoreWriter, code: str, shards: list[Path], queries: list[JudgedQuery]) -> dict:
    """Rows of one language; returns what the corpus lacked: {"passages": n, "queries": n}."""
    wanted = sorted({docid for query in queries for docid in query.positives + query.negatives})
    passage_index = _store_judged_passages(writer, shards, wanted)
    rows = RowBuffer(writer, code)
    dropped_queries = 0
    for query in queries:
        positives = [passage_index[docid] for docid in query.positives if docid in passage_index]
        if not positives:
            dropped_queries += 1
            continue
        negatives = [passage_index[docid] for docid in query.negatives if docid in passage_index]
        rows.add(f"{code}/{query.qid}", rows.text(query.text), positives[0], negatives)
    rows.flush()
    return {"passages": len(wanted) - len(passage_index), "queries": dropped_queries}


def _store_judged_passages(writer: StoreWriter, shards: list[Path], wanted: list[str]) -> dict[str, int]:
    """Stream the corpus shards, storing only the judged passages (title + " " + text); docid -> text index."""
    value_set = pa.array(wanted, pa.string())
    passage_index: dict[str, int] = {}
    for shard in shards:
        for batch in _jsonl_batches(shard, PASSAGE_SCHEMA):
            hits = batch.filter(pc.is_in(batch.column("docid"), value_set=value_set))
            if not len(hits):
                continue
            first = writer.add_texts(passage_texts(hits.column("title"), hits.column("text")))
            for offset, docid in enumerate(hits.column("docid").to_pylist()):
                passage_index.setdefault(docid, first + offset)
        if len(passage_index) == len(wanted):  # the rest of the shards hold nothing judged
            break
    return passage_index


def _jsonl_batches(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """A JSON-lines file streamed by Arrow; a value of another type is one line naming the file."""
    try:
        yield from arrow_jsonl_batches(path, schema)
    except pa.ArrowInvalid as error:
        fields, reason = ", ".join(schema.names), str(error).splitlines()[0]
        raise DataError(f"{path}: expected JSON lines with string fields {fields} ({reason})") from None


def _warn_missing_passages(spec: RawSpec, missing: dict[str, dict]) -> None:
    lacking = {code: counts for code, counts in missing.items() if counts["passages"]}
    if lacking:
        detail = "; ".join(
            f"{code}: {counts['passages']:,} judged passages absent, {counts['queries']:,} queries dropped for want "
            "of a relevant one"
            for code, counts in lacking.items()
        )
        warnings.warn(f"{spec.source}: the corpus shards lack judged passages ({detail})", stacklevel=2)


# =====================================================================================================================
# Mr. TyDi and MLDR: train.jsonl.gz rows with their passages inline
# =====================================================================================================================
def _load_train_rows(spec: RawSpec, cache_dir: str) -> CorpusStore:
    path, code = _train_rows_file(spec)
    description = {"kind": spec.kind, "language": code, "file": file_fingerprint(path)}

    def write(writer: StoreWriter) -> None:
        skipped = _write_train_rows(writer, path, code)
        if skipped:
            warnings.warn(f"{path}: {skipped:,} rows without a positive passage were skipped", stacklevel=2)

    return open_or_build(f"{spec.kind}-{code}-{path.name.split('.')[0]}", description, write, cache_dir)


def _train_rows_file(spec: RawSpec) -> tuple[Path, str]:
    """(the rows file, its language code): PATH or PATH/train.jsonl.gz; the language from ?language= or the folder."""
    layout = TRAIN_ROWS_LAYOUT[spec.kind]
    path = spec.path / TRAIN_ROWS_FILE if spec.path.is_dir() else spec.path
    require_file(path, f"{TRAIN_ROWS_NAME[spec.kind]}'s training rows, {layout}, or its folder ({spec.source})")
    if "language" in spec.options:
        return path, language_code(spec.options["language"], f"{spec.source}: option 'language'")
    match = TRAIN_ROWS_FOLDER[spec.kind].fullmatch(path.parent.name)
    if not match:
        raise DataError(
            f"{spec.source}: cannot tell the language from the folder name {path.parent.name!r} (expected a folder "
            f"named as in {layout}, or the option ?language=)"
        )
    return path, language_code(match.group(1), f"{spec.source}: folder {path.parent.name!r}")


def _write_train_rows(writer: StoreWriter, path: Path, code: str) -> int:
    """Rows `{query_id, query, positive_passages, negative_passages}` -> rows by text index; returns how many
    rows had no positive passage (skipped). A passage seen again (by docid) reuses its stored text."""
    rows = RowBuffer(writer, code)
    skipped = 0
    for row, where in iter_jsonl(path):
        query_id, query = row.get("query_id"), row.get("query")
        if query_id is None or not isinstance(query, str) or not query.strip():
            raise DataError(f"{where}: expected a 'query_id' and a non-empty string 'query'")
        positives = _passages(row, "positive_passages", where)
        if not positives:
            skipped += 1
            continue
        negatives = _passages(row, "negative_passages", where)
        positive = rows.text(positives[0][1], positives[0][0])
        rows.add(f"{code}/{query_id}", rows.text(query), positive, [rows.text(t, key) for key, t in negatives])
    rows.flush()
    return skipped


def _passages(row: dict, field: str, where: str) -> list[tuple[str | None, str]]:
    """(docid, title + " " + text) of each passage in `field`."""
    passages = row.get(field) or []
    if not isinstance(passages, list):
        raise DataError(f"{where}: field {field!r} must be a list of passages")
    out = []
    for passage in passages:
        if not isinstance(passage, dict) or not isinstance(passage.get("text"), str):
            raise DataError(f"{where}: each passage of {field!r} must be an object with a string 'text'")
        title, text, docid = passage.get("title") or "", passage["text"], passage.get("docid")
        out.append((None if docid is None else str(docid), f"{title} {text}" if title else text))
    return out


# =====================================================================================================================
# Rows by text index, written in batches
# =====================================================================================================================
class RowBuffer:
    """Rows of one language by text index. `text` hands out the index a text will have once flushed (this buffer
    is the writer's only source of texts meanwhile), storing a keyed text (a docid) only once."""

    def __init__(self, writer: StoreWriter, language: str):
        self.writer, self.language = writer, language
        self.index_of_key: dict[str, int] = {}
        self.texts: list[str] = []
        self._clear_rows()

    def _clear_rows(self) -> None:
        self.ids: list[str] = []
        self.query: list[int] = []
        self.positive: list[int] = []
        self.negative_counts: list[int] = []
        self.negatives: list[int] = []

    def text(self, text: str, key: str | None = None) -> int:
        if key is not None and key in self.index_of_key:
            return self.index_of_key[key]
        index = self.writer.num_texts + len(self.texts)
        self.texts.append(text)
        if key is not None:
            self.index_of_key[key] = index
        return index

    def add(self, example_id: str, query: int, positive: int, negatives: list[int]) -> None:
        self.ids.append(example_id)
        self.query.append(query)
        self.positive.append(positive)
        self.negative_counts.append(len(negatives))
        self.negatives.extend(negatives)
        if len(self.ids) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.texts:
            self.writer.add_texts(self.texts)
            self.texts = []
        if self.ids:
            arrays = [np.asarray(values, dtype=np.int64) for values in (self.query, self.positive)]
            counts, negatives = np.asarray(self.negative_counts, np.int64), np.asarray(self.negatives, np.int64)
            self.writer.add_rows(self.ids, self.language, *arrays, counts, negatives)
            self._clear_rows()
