"""Retrieval benchmarks read from their PUBLISHED files, each scored with its OFFICIAL metric(s).

`load_task(path, language=, split=, corpus=)` recognises the layout and returns one `RetrievalTask` per language.
A task holds the scored queries, their judgements (qrels, or answer strings for MKQA), a `CorpusSource` that
streams the passages as Arrow batches (never the whole corpus in memory), and a JSON-able `protocol` saying what
a number means. Encoding and search are someone else's: `task.score(run)` takes a run
`{query id: [(doc id, score), ...]}` (best first) and returns the official metric(s) averaged over the queries.

Layouts read (as published):

    MIRACL (miracl/miracl + miracl/miracl-corpus)             splits dev (default), test-a, train
        miracl-v1.0-{l}/topics/topics.miracl-v1.0-{l}-{split}.tsv   qid<TAB>query
        miracl-v1.0-{l}/qrels/qrels.miracl-v1.0-{l}-{split}.tsv     TREC qid Q0 docid rel (0 = judged non-relevant)
        miracl-corpus-v1.0-{l}/docs-{i}.jsonl.gz                    {"docid", "title", "text"} (here, or in corpus=)
      nDCG@10 and Recall@100 per language (Pyserini: trec_eval -c -m ndcg_cut.10 / -m recall.100).
    Mr. TyDi (Pyserini's names)                               splits test (default), dev, train
        topics/topics.mrtydi-v1.1-{xx}.{split}.txt.gz               gzipped qid<TAB>query
        qrels/qrels.mrtydi-v1.1-{xx}.{split}.txt                    TREC
        mrtydi-1.1/{xx}/corpus.jsonl.gz or mrtydi-v1.1-{language}/corpus.jsonl.gz   {"docid", "title", "text"}
      MRR@100 and Recall@100 (Pyserini: trec_eval -c -M 100 -m recip_rank -m recall.100).
    MLDR (Shitao/MLDR)                                        splits test (default), dev, train
        mldr-v1.0-{l}/corpus.jsonl.gz                               {"docid", "text"}
        mldr-v1.0-{l}/{split}.jsonl.gz                              {"query_id", "query", "positive_passages", ...}
        qrels/qrels.mldr-v1.0-{l}-{split}.tsv                       TREC (optional: else the rows' passages judge)
      nDCG@10 (FlagEmbedding: trec_eval -c -m ndcg_cut.10); the passage max length must be reported with it.
    MKQA, BGE-M3's protocol (FlagEmbedding C_MTEB/MKQA)
        mkqa.jsonl.gz   {"example_id", "query", "queries": {lang: text}, "answers": {lang: [{"type", "text", ...}]}}
        corpus= a BEIR folder (BEIR-NQ): corpus.jsonl(.gz) {"_id", "title", "text"}
      Recall@20 and Recall@100: a query counts when one of its top-k passages contains an answer string.
    BEIR folder                                               split test (default), or any qrels/{split}.tsv
        corpus.jsonl, queries.jsonl, qrels/{split}.tsv (header line; CRLF and graded relevance allowed)
      nDCG@10, Recall@100 and MRR@10 (BEIR's own evaluation).

A passage is title + " " + text (the text alone where the title is empty); MLDR has no titles. Metrics over qrels
come from `ir_measures`; MKQA's answer matcher and XTREME-R's LAReQA mAP@20 are written here (no library has them).
Every bad input is one `DataError` line naming the file (and line) and what was expected.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from hbt_accel.data.cache import file_fingerprint
from hbt_accel.data.jsonl import iter_jsonl
from hbt_accel.data.languages import LANGUAGE_NAMES, language_code
from hbt_accel.data.published_files import (
    arrow_jsonl_batches,
    passage_texts,
    read_topics,
    read_trec_qrels,
    relevance_grade,
    text_lines,
)
from hbt_accel.errors import DataError, did_you_mean, require_file

Run = Mapping[str, Sequence[tuple[str, float]]]
PassageText = Callable[[list[str]], list[str]]

DEPTH = 100  # hits every metric here needs (Recall@100, MRR@100); FlagEmbedding searches 1,000 but scores <= 100
PASSAGE_FORMAT = "title + ' ' + text (the text alone where the title is empty)"
PASSAGE_SCHEMA = pa.schema([("docid", pa.string()), ("text", pa.string())])
PYTHON_BATCH_ROWS = 4096

MIRACL_SPLITS = ("dev", "test-a", "train")
MRTYDI_SPLITS = ("test", "dev", "train")
MLDR_SPLITS = ("test", "dev", "train")
MIRACL_METRICS = {"ndcg_at_10": "nDCG@10", "recall_at_100": "R@100"}
MRTYDI_METRICS = {"mrr_at_100": "RR@100", "recall_at_100": "R@100"}
MLDR_METRICS = {"ndcg_at_10": "nDCG@10"}
BEIR_MEASURES = {"ndcg_at_10": "nDCG@10", "recall_at_100": "R@100", "mrr_at_10": "RR@10"}
MKQA_CUTOFFS = (20, 100)
# FlagEmbedding C_MTEB/MKQA/README.md: "We filter questions which types are `unanswerable`, `binary` and
# `long-answer`. Finally we get 6,619 questions for every language." (MKQA spells the last one long_answer.)
MKQA_DROPPED_TYPES = ("unanswerable", "binary", "long_answer")
MKQA_FILES = ("mkqa.jsonl.gz", "mkqa.jsonl")
BEIR_CORPUS_FILES = ("corpus.jsonl", "corpus.jsonl.gz")
LAYOUTS = (
    "MIRACL: miracl-v1.0-{l}/topics/topics.miracl-v1.0-{l}-{split}.tsv + qrels/, corpus miracl-corpus-v1.0-{l}/; "
    "Mr. TyDi: topics/topics.mrtydi-v1.1-{xx}.{split}.txt.gz + qrels/qrels.mrtydi-v1.1-{xx}.{split}.txt; "
    "MLDR: mldr-v1.0-{l}/corpus.jsonl.gz + {split}.jsonl.gz; "
    "MKQA: mkqa.jsonl.gz (with corpus= a BEIR folder); "
    "BEIR: corpus.jsonl + queries.jsonl + qrels/{split}.tsv"
)


# =====================================================================================================================
# The corpus: passages streamed as Arrow batches
# =====================================================================================================================
class _NotArrowReadable(Exception):
    """A batch Arrow read but cannot hand over as is (a missing field): the Python reader names the line."""


@dataclass
class CorpusSource:
    """The passages of JSON-lines files (.gz read as such), streamed in file order then line order."""

    files: list[Path]
    id_field: str = "docid"
    title_field: str | None = "title"  # None: the passages have no title (MLDR)
    text_field: str = "text"

    def fingerprint(self) -> list[dict]:
        """Path, size and mtime of every file: what identifies the corpus without reading it."""
        return [file_fingerprint(path) for path in self.files]

    def batches(self, rows: int = 8192) -> Iterator[pa.RecordBatch]:
        """Batches of `rows` passages (the last may be shorter), columns docid and text, always in the same order."""
        if rows < 1:
            raise ValueError(f"rows: got {rows}, expected a whole number >= 1")
        file_batches = (batch for path in self.files for batch in self._file_batches(path))
        yield from _rebatch(file_batches, rows)

    def _file_batches(self, path: Path) -> Iterator[pa.RecordBatch]:
        done = 0
        try:
            for batch in arrow_jsonl_batches(path, self._source_schema()):
                passages = self._passages(batch)
                done += len(passages)
                yield passages
        except (pa.ArrowException, _NotArrowReadable):
            # Arrow names no line and refuses what Python reads (integer ids, a line longer than a block): the
            # Python reader picks up after the rows already handed over and names the line of a real fault.
            yield from self._python_batches(path, skip=done)

    def _source_schema(self) -> pa.Schema:
        names = [self.id_field, self.text_field] + ([self.title_field] if self.title_field else [])
        return pa.schema([(name, pa.string()) for name in names])

    def _passages(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        batch.validate(full=True)  # Arrow's JSON reader lets bad UTF-8 through; this raises ArrowInvalid on it
        docid, text = batch.column(self.id_field), batch.column(self.text_field)
        if docid.null_count or text.null_count:
            raise _NotArrowReadable
        if self.title_field:
            text = passage_texts(batch.column(self.title_field), text)
        return pa.RecordBatch.from_arrays([docid, text], schema=PASSAGE_SCHEMA)

    def _python_batches(self, path: Path, skip: int) -> Iterator[pa.RecordBatch]:
        docids, texts = [], []
        for number, (row, where) in enumerate(iter_jsonl(path)):
            if number < skip:
                continue
            docids.append(self._docid(row, where))
            texts.append(self._text(row, where))
            if len(docids) == PYTHON_BATCH_ROWS:
                yield pa.RecordBatch.from_pydict({"docid": docids, "text": texts}, schema=PASSAGE_SCHEMA)
                docids, texts = [], []
        if docids:
            yield pa.RecordBatch.from_pydict({"docid": docids, "text": texts}, schema=PASSAGE_SCHEMA)

    def _docid(self, row: dict, where: str) -> str:
        value = row.get(self.id_field)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise DataError(f"{where}: expected a string {self.id_field!r} (the passage id), got {value!r}")
        return str(value)

    def _text(self, row: dict, where: str) -> str:
        text = row.get(self.text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a string {self.text_field!r} (the passage text), got {text!r}")
        title = row.get(self.title_field) if self.title_field else None
        if title is not None and not isinstance(title, str):
            raise DataError(f"{where}: expected a string {self.title_field!r} (the passage title), got {title!r}")
        return passage_text(title, text)


def passage_text(title: str | None, text: str) -> str:
    """The text a passage is encoded (and MKQA-matched) as: title + " " + text, the text alone without a title."""
    return f"{title} {text}" if title else text


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Exactly `rows` rows a batch (the last may be shorter), whatever the sizes coming in: batch boundaries then
    depend on `rows` alone, not on Arrow's block size or the shard files."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        start = 0
        while start < len(batch):
            take = min(rows - count, len(batch) - start)
            pending.append(batch.slice(start, take))
            count, start = count + take, start + take
            if count == rows:
                yield _concat(pending)
                pending, count = [], 0
    if count:
        yield _concat(pending)


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts, schema=PASSAGE_SCHEMA).combine_chunks().to_batches()[0]


# =====================================================================================================================
# The task and its scoring
# =====================================================================================================================
@dataclass
class RetrievalTask:
    """One benchmark x language x split: what to encode, which queries count, and how a run is scored."""

    name: str
    protocol: dict
    queries: list[tuple[str, str]]
    qrels: dict[str, dict[str, int]] | None
    answers: dict[str, list[str]] | None
    corpus: CorpusSource
    depth: int

    def score(self, run: Run, passage_text: PassageText | None = None) -> dict[str, float]:
        """The official metric(s), each averaged over the scored queries (one missing from the run scores 0),
        plus "n_queries". MKQA needs `passage_text(doc_ids) -> texts` to look for the answers in the hits."""
        per_query = self.score_per_query(run, passage_text)
        results = {key: sum(values[key] for values in per_query.values()) / len(per_query) for key in self.metrics}
        results["n_queries"] = len(per_query)
        return results

    def score_per_query(self, run: Run, passage_text: PassageText | None = None) -> dict[str, dict[str, float]]:
        """{query id: {metric: value}} for every scored query, in `queries` order."""
        if self.answers is not None:
            return self._answer_recall_per_query(run, passage_text)
        return self._ir_measures_per_query(run)

    @property
    def metrics(self) -> list[str]:
        return list(self.protocol["metrics"])

    def _ir_measures_per_query(self, run: Run) -> dict[str, dict[str, float]]:
        import ir_measures

        measures = {key: ir_measures.parse_measure(name) for key, name in self.protocol["metrics"].items()}
        key_of = {measure: key for key, measure in measures.items()}
        per_query = {qid: dict.fromkeys(measures, 0.0) for qid, _ in self.queries}  # trec_eval -c: absent = 0
        ranked = {qid: _rank_scores(hits) for qid, hits in run.items() if qid in per_query and hits}
        if ranked:
            for metric in ir_measures.iter_calc(list(measures.values()), self.qrels, ranked):
                per_query[metric.query_id][key_of[metric.measure]] = float(metric.value)
        return per_query

    def _answer_recall_per_query(self, run: Run, passage_text: PassageText | None) -> dict[str, dict[str, float]]:
        if passage_text is None:
            raise DataError(f"{self.name}: scoring needs passage_text(doc_ids) -> texts (a hit holds an answer)")
        per_query = {}
        for qid, _ in self.queries:
            doc_ids = _unique_ids(run.get(qid, ()))[: max(MKQA_CUTOFFS)]
            texts = list(passage_text(doc_ids)) if doc_ids else []
            if len(texts) != len(doc_ids):
                raise DataError(f"{self.name}: passage_text gave {len(texts)} texts for {len(doc_ids)} doc ids")
            rank = first_answer_rank(self.answers[qid], texts)
            per_query[qid] = {f"recall_at_{k}": float(rank is not None and rank < k) for k in MKQA_CUTOFFS}
        return per_query


def _unique_ids(hits: Iterable[tuple[str, float]]) -> list[str]:
    return list(dict.fromkeys(str(doc_id) for doc_id, _ in hits))


def _rank_scores(hits: Iterable[tuple[str, float]]) -> dict[str, float]:
    """The run's own order as strictly falling scores: trec_eval would re-sort tied scores by doc id, so the list
    order (best first) is made the ranking that is scored. A repeated doc id keeps its first place."""
    doc_ids = _unique_ids(hits)
    return {doc_id: float(len(doc_ids) - rank) for rank, doc_id in enumerate(doc_ids)}


def macro_average(results: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The unweighted mean over languages (tasks) of each metric they all report, plus "n_languages": how MIRACL,
    Mr. TyDi, MLDR and MKQA averages are published (every language weighs the same, whatever its query count)."""
    values = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not values:
        raise ValueError("macro_average: no results to average")
    keys = [
        key
        for key, value in values[0].items()
        if key != "n_queries" and isinstance(value, (int, float)) and all(key in result for result in values)
    ]
    averaged = {key: sum(float(result[key]) for result in values) / len(values) for key in keys}
    averaged["n_languages"] = len(values)
    return averaged


# =====================================================================================================================
# XTREME-R's LAReQA metric
# =====================================================================================================================
def xtreme_r_map_at_20(ranked_relevance: Sequence[Sequence[bool]], num_relevant: Sequence[int]) -> float:
    """XTREME-R's LAReQA mAP@20: per query, the precision at each relevant candidate in the top 20, summed and
    divided by min(#relevant, 20); then ONE mean over all queries of the pooled multilingual candidate set.

    As google-research/xtreme third_party/utils_lareqa.py (`average_precision_at_k`, called with k=20). This is NOT
    the HBT paper's mono / cross / multi mAP (full-ranking AP per language setting): the two are not comparable.
    `ranked_relevance[q]` is the relevance of query q's ranked candidates, best first (no candidate twice).
    """
    if len(ranked_relevance) != len(num_relevant):
        raise ValueError(f"got {len(ranked_relevance)} rankings but {len(num_relevant)} relevant counts")
    if not num_relevant:
        raise ValueError("xtreme_r_map_at_20: no queries")
    return sum(_average_precision_at(r, n, 20) for r, n in zip(ranked_relevance, num_relevant)) / len(num_relevant)


def _average_precision_at(relevance: Sequence[bool], num_relevant: int, k: int) -> float:
    if num_relevant < 1:
        raise ValueError(f"a query with {num_relevant} relevant candidates (expected at least 1)")
    hits, total = 0, 0.0
    for rank, relevant in enumerate(relevance[:k], 1):
        if relevant:
            hits += 1
            total += hits / rank
    if hits > num_relevant:
        raise ValueError(f"{hits} relevant candidates in the top {k}, more than num_relevant={num_relevant}")
    return total / min(num_relevant, k)


# =====================================================================================================================
# MKQA's answer matcher (FlagEmbedding C_MTEB/MKQA/utils/evaluation.py `has_answer`, after contriever / DPR)
# =====================================================================================================================
# Written here: no library ships it. Passages are normalised first as FlagEmbedding's corpus loader does
# (C_MTEB/MKQA/utils/normalize_text.py, from ChemDataExtractor); answers are not. `regex` is a dependency of
# transformers, so it is always installed.
_TOKEN_PATTERN = r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]"
_DELETED = "\u0001\u0002\u0003\u0004\u0005\u0006\u0007\u0008\u000e\u000f" + "".join(map(chr, range(0x11, 0x1C)))
_PUNCTUATION = {
    **dict.fromkeys(_DELETED + "\u00ad"),  # control characters and the soft hyphen go (they would split a word)
    **dict.fromkeys("\u000b\u000c\u0085", " "),
    **dict.fromkeys("\u2010\u2011\u2043\u2012\u2013\u2014\u2015\u2212\uff0d\u207b", "-"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f", '"'),
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u055a\ua78b\ua78c\uff07`\u00b4\u2032\u2035", "'"),
    **{"\u2033": "''", "\u2036": "''", "\u2034": "'''", "\u2037": "'''", "\u2057": "''''", "\u2026": "..."},
    **dict.fromkeys("\u2044\u2215", "/"),
}
_PUNCTUATION_TABLE = str.maketrans(_PUNCTUATION)
_tokenizer = None


def _token_regex():
    global _tokenizer
    if _tokenizer is None:
        import regex

        _tokenizer = regex.compile(_TOKEN_PATTERN, flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
    return _tokenizer


def answer_tokens(text: str) -> tuple[str, ...]:
    """NFD-normalised, tokenised with [\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}], each token lower-cased."""
    return tuple(token.lower() for token in _token_regex().findall(unicodedata.normalize("NFD", text)))


def passage_tokens(text: str) -> tuple[str, ...]:
    """A passage's tokens: dashes, quotes, slashes and ellipses unified first (FlagEmbedding's `normalize_text`)."""
    return answer_tokens(text.translate(_PUNCTUATION_TABLE).lower())


def has_answer(answers: Iterable[str], passage: str) -> bool:
    """Whether the passage holds any answer as a contiguous token sequence ("art" is not found in "party")."""
    return _holds_any([answer_tokens(answer) for answer in answers], passage_tokens(passage))


def first_answer_rank(answers: Iterable[str], passages: Sequence[str]) -> int | None:
    """The 0-based rank of the first passage holding an answer, None when none does."""
    wanted = [answer_tokens(answer) for answer in answers]
    for rank, passage in enumerate(passages):
        if _holds_any(wanted, passage_tokens(passage)):
            return rank
    return None


def _holds_any(answers: list[tuple[str, ...]], tokens: tuple[str, ...]) -> bool:
    # An answer with no token is skipped: FlagEmbedding's loop would count it as found in every passage.
    return any(answer and _contains(tokens, answer) for answer in answers)


def _contains(tokens: tuple[str, ...], answer: tuple[str, ...]) -> bool:
    first, size = answer[0], len(answer)
    return any(tokens[start : start + size] == answer for start, token in enumerate(tokens) if token == first)


# =====================================================================================================================
# The entry point: which layout is this?
# =====================================================================================================================
def load_task(
    path: str, *, language: str | None = None, split: str | None = None, corpus: str | None = None
) -> list[RetrievalTask]:
    """The tasks of the benchmark at `path` (one per language, or `language`'s only), its layout recognised from
    the file names; `corpus` names the folder holding the corpus where it lives apart (MIRACL, Mr. TyDi) or the
    BEIR folder MKQA is scored against."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: not found (expected a benchmark in one of these layouts: {LAYOUTS})")
    kind, root, folder_language = _recognise(root)
    if folder_language and language and language_code(language, f"{root}: language") != folder_language:
        raise DataError(f"{root}: language={language!r} but the folder holds {folder_language!r}")
    corpus_path = Path(corpus).expanduser() if corpus else None
    return LOADERS[kind](root, language or folder_language, split, corpus_path)


def recognised_kind(path: str) -> str | None:
    """The benchmark whose published layout `path` has (miracl, mrtydi, mldr, mkqa, beir), or None."""
    try:
        return _recognise(Path(path).expanduser())[0] if Path(path).expanduser().exists() else None
    except DataError:
        return None


def _recognise(root: Path) -> tuple[str, Path, str | None]:
    """(kind, the folder or file it reads from, the language a per-language folder implies)."""
    if root.is_file():
        if root.name in MKQA_FILES:
            return "mkqa", root, None
        raise DataError(f"{root}: not a benchmark file (expected mkqa.jsonl.gz, or a folder: {LAYOUTS})")
    for name in MKQA_FILES:
        if (root / name).is_file():
            return "mkqa", root / name, None
    if (root / "queries.jsonl").is_file() and any((root / name).is_file() for name in BEIR_CORPUS_FILES):
        return "beir", root, None
    for kind, pattern in (("miracl", r"miracl-v1\.0-([a-z]+)"), ("mldr", r"mldr-v1\.0-([a-z]+)")):
        if match := re.fullmatch(pattern, root.name):
            return kind, root.parent, match.group(1)
    if any(root.glob("miracl-v1.0-*/topics/topics.miracl-v1.0-*.tsv")):
        return "miracl", root, None
    if any(root.glob("topics/topics.mrtydi-v1.1-*.txt*")):
        return "mrtydi", root, None
    if any(root.glob("mldr-v1.0-*/corpus.jsonl.gz")):
        return "mldr", root, None
    raise DataError(f"{root}: no benchmark layout recognised (expected one of: {LAYOUTS})")


def _choose_split(split: str | None, allowed: tuple[str, ...], benchmark: str) -> str:
    chosen = split or allowed[0]
    if chosen not in allowed:
        hint = did_you_mean(chosen, list(allowed))
        raise DataError(f"split {chosen!r}: not a {benchmark} split (expected one of: {', '.join(allowed)}){hint}")
    return chosen


def _choose_languages(language: str | None, present: list[str], where: str, what: str) -> list[str]:
    """Every language present, or the one asked for (its files are then checked one by one, naming the missing)."""
    if language is not None:
        return [language_code(language, f"{where}: language")]
    if not present:
        raise DataError(f"{where}: no {what} found (expected {LAYOUTS})")
    return present


def _protocol(benchmark: str, split: str, language: str | None, corpus: CorpusSource, **extra) -> dict:
    return {
        "benchmark": benchmark,
        "split": split,
        "language": language,
        "corpus_files": [str(path) for path in corpus.files],
        "passage_format": PASSAGE_FORMAT,
        "depth": DEPTH,
        **extra,
    }


def _judged_queries(topics: Mapping[str, str], qrels: Mapping[str, dict]) -> list[tuple[str, str]]:
    """The topics with judgements, in topics order: the queries that are scored (trec_eval -c averages over
    the judged queries)."""
    return [(qid, text) for qid, text in topics.items() if qid in qrels]


# =====================================================================================================================
# MIRACL
# =====================================================================================================================
def _load_miracl(root: Path, language: str | None, split: str | None, corpus: Path | None) -> list[RetrievalTask]:
    split = _choose_split(split, MIRACL_SPLITS, "MIRACL")
    present = sorted(
        match.group(1)
        for path in root.glob(f"miracl-v1.0-*/topics/topics.miracl-v1.0-*-{split}.tsv")
        if (match := re.fullmatch(rf"topics\.miracl-v1\.0-([a-z]+)-{re.escape(split)}\.tsv", path.name))
    )
    languages = _choose_languages(language, present, str(root), f"MIRACL {split} topics")
    return [_miracl_task(root, code, split, corpus or root) for code in languages]


def _miracl_task(root: Path, code: str, split: str, corpus_root: Path) -> RetrievalTask:
    base = root / f"miracl-v1.0-{code}"
    topics_path = require_file(base / "topics" / f"topics.miracl-v1.0-{code}-{split}.tsv", "MIRACL topics")
    qrels_path = require_file(base / "qrels" / f"qrels.miracl-v1.0-{code}-{split}.tsv", "MIRACL qrels, TREC")
    topics = read_topics(topics_path)
    qrels = read_trec_qrels(qrels_path, topics, topics_path)
    source = CorpusSource(_miracl_shards(corpus_root, code))
    protocol = _protocol(
        "MIRACL v1.0",
        split,
        code,
        source,
        metrics=MIRACL_METRICS,
        relevance="qrels grade > 0 is relevant; judged 0 and unjudged passages are not",
        official="Pyserini: trec_eval -c -m ndcg_cut.10 and -m recall.100, per language; macro average over languages",
        notes="monolingual (queries and passages in the same language); the full corpus, not mteb's "
        "MIRACLRetrievalHardNegatives subset (2.45M passages, at most 1,000 queries a language): a different number",
        topics_without_judgements=len(topics) - len(qrels),
    )
    queries = _judged_queries(topics, qrels)
    return RetrievalTask(f"miracl-{code}-{split}", protocol, queries, qrels, None, source, DEPTH)


def _miracl_shards(corpus_root: Path, code: str) -> list[Path]:
    folder_name = f"miracl-corpus-v1.0-{code}"
    folder = corpus_root if corpus_root.name == folder_name else corpus_root / folder_name
    shards = sorted(folder.glob("docs-*.jsonl.gz"), key=_shard_number)
    if not shards:
        raise DataError(f"{folder}: no docs-*.jsonl.gz shards (expected MIRACL's {code} corpus, miracl/miracl-corpus)")
    return shards


def _shard_number(path: Path) -> tuple[int, str]:
    """docs-2 before docs-10: shards in their number order, the fixed order the corpus is read in."""
    digits = re.findall(r"\d+", path.name)
    return (int(digits[-1]) if digits else -1, path.name)


# =====================================================================================================================
# Mr. TyDi (Pyserini's topics and qrels; corpus from castorini/mr-tydi-corpus or Anserini's layout)
# =====================================================================================================================
def _load_mrtydi(root: Path, language: str | None, split: str | None, corpus: Path | None) -> list[RetrievalTask]:
    split = _choose_split(split, MRTYDI_SPLITS, "Mr. TyDi")
    pattern = rf"topics\.mrtydi-v1\.1-([a-z]+)\.{re.escape(split)}\.txt(\.gz)?"
    present = sorted({match.group(1) for path in root.glob("topics/*") if (match := re.fullmatch(pattern, path.name))})
    languages = _choose_languages(language, present, str(root), f"Mr. TyDi {split} topics")
    return [_mrtydi_task(root, code, split, corpus or root) for code in languages]


def _mrtydi_task(root: Path, code: str, split: str, corpus_root: Path) -> RetrievalTask:
    stem = f"topics.mrtydi-v1.1-{code}.{split}.txt"
    topics_path = root / "topics" / f"{stem}.gz"
    topics_path = topics_path if topics_path.is_file() else require_file(root / "topics" / stem, "qid<TAB>query")
    qrels_path = require_file(root / "qrels" / f"qrels.mrtydi-v1.1-{code}.{split}.txt", "TREC qid Q0 docid rel")
    topics = read_topics(topics_path)
    qrels = read_trec_qrels(qrels_path, topics, topics_path)
    source = CorpusSource([_mrtydi_corpus(corpus_root, code)])
    protocol = _protocol(
        "Mr. TyDi v1.1",
        split,
        code,
        source,
        metrics=MRTYDI_METRICS,
        relevance="qrels grade > 0 is relevant",
        official="Pyserini: trec_eval -c -M 100 -m recip_rank -m recall.100, per language",
        notes="monolingual; mteb's MrTidyRetrieval reports nDCG@10 instead: not the same number",
    )
    queries = _judged_queries(topics, qrels)
    return RetrievalTask(f"mrtydi-{code}-{split}", protocol, queries, qrels, None, source, DEPTH)


def _mrtydi_corpus(corpus_root: Path, code: str) -> Path:
    if corpus_root.is_file():
        return corpus_root
    name = LANGUAGE_NAMES[code].lower()
    candidates = [
        corpus_root / "mrtydi-1.1" / code / "corpus.jsonl.gz",
        corpus_root / f"mrtydi-v1.1-{name}" / "corpus.jsonl.gz",
        corpus_root / code / "corpus.jsonl.gz",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(path) for path in candidates)
    raise DataError(f"{corpus_root}: no Mr. TyDi corpus for {code!r} (expected one of: {tried}; or corpus=FOLDER)")


# =====================================================================================================================
# MLDR
# =====================================================================================================================
def _load_mldr(root: Path, language: str | None, split: str | None, corpus: Path | None) -> list[RetrievalTask]:
    split = _choose_split(split, MLDR_SPLITS, "MLDR")
    present = sorted(
        match.group(1)
        for path in root.glob("mldr-v1.0-*")
        if (match := re.fullmatch(r"mldr-v1\.0-([a-z]+)", path.name)) and path.is_dir()
    )
    languages = _choose_languages(language, present, str(root), "mldr-v1.0-{language} folders")
    return [_mldr_task(root, code, split, corpus or root) for code in languages]


def _mldr_task(root: Path, code: str, split: str, corpus_root: Path) -> RetrievalTask:
    base = root / f"mldr-v1.0-{code}"
    rows_path = require_file(base / f"{split}.jsonl.gz", '{"query_id", "query", "positive_passages"} rows')
    corpus_path = require_file(corpus_root / f"mldr-v1.0-{code}" / "corpus.jsonl.gz", '{"docid", "text"} lines')
    topics, row_qrels = _read_mldr_rows(rows_path)
    qrels_path = root / "qrels" / f"qrels.mldr-v1.0-{code}-{split}.tsv"
    qrels = read_trec_qrels(qrels_path, topics, rows_path) if qrels_path.is_file() else row_qrels
    source = CorpusSource([corpus_path], title_field=None)
    protocol = _protocol(
        "MLDR v1.0",
        split,
        code,
        source,
        metrics=MLDR_METRICS,
        passage_format="text (MLDR documents have no title)",
        passage_max_length=None,  # the pipeline fills it in: the score means nothing without it
        qrels_source=str(qrels_path) if qrels_path.is_file() else f"{rows_path} positive/negative passages",
        official="FlagEmbedding C_MTEB/MLDR: trec_eval -c -m ndcg_cut.10, per language",
        notes="monolingual; whole documents (avg ~4.7k tokens; BGE-M3 encodes up to 8,192): report "
        "passage_max_length with the score",
    )
    queries = _judged_queries(topics, qrels)
    return RetrievalTask(f"mldr-{code}-{split}", protocol, queries, qrels, None, source, DEPTH)


def _read_mldr_rows(path: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """({qid: query}, {qid: {docid: 1 for positives, 0 for negatives}}) from MLDR's split rows."""
    topics: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for row, where in iter_jsonl(path):
        qid, query = row.get("query_id"), row.get("query")
        if qid is None or not isinstance(query, str) or not query.strip():
            raise DataError(f"{where}: expected a 'query_id' and a non-empty string 'query'")
        topics[str(qid)] = query
        judged = {docid: 0 for docid in _passage_ids(row, "negative_passages", where)}
        judged.update({docid: 1 for docid in _passage_ids(row, "positive_passages", where)})
        if judged:
            qrels[str(qid)] = judged
    return topics, qrels


def _passage_ids(row: dict, field: str, where: str) -> list[str]:
    passages = row.get(field) or []
    if not isinstance(passages, list) or not all(isinstance(p, dict) and p.get("docid") for p in passages):
        raise DataError(f"{where}: field {field!r} must be a list of passages with a 'docid'")
    return [str(passage["docid"]) for passage in passages]


# =====================================================================================================================
# MKQA, as BGE-M3 evaluates it
# =====================================================================================================================
@dataclass
class _MkqaQuestions:
    texts: dict[str, dict[str, str]]  # language -> {qid: query}, file order
    answers: dict[str, list[str]]  # qid -> English answer texts and aliases
    dropped: int  # questions whose English answer is unanswerable, binary or long_answer


def _load_mkqa(path: Path, language: str | None, split: str | None, corpus: Path | None) -> list[RetrievalTask]:
    if split not in (None, "test"):
        raise DataError(f"split {split!r}: MKQA has one split (expected 'test')")
    if corpus is None:
        raise DataError(f"{path}: MKQA needs corpus= the BEIR folder it is scored against (BEIR-NQ, corpus.jsonl)")
    source = CorpusSource([_beir_corpus_file(corpus)], id_field="_id")
    questions = _read_mkqa(path)
    languages = sorted(questions.texts)
    if language is not None:
        if language not in questions.texts:
            hint = did_you_mean(language, languages)
            raise DataError(f"{path}: no MKQA queries in {language!r} (present: {', '.join(languages)}){hint}")
        languages = [language]
    return [_mkqa_task(path, code, questions, source) for code in languages]


def _mkqa_task(path: Path, code: str, questions: _MkqaQuestions, source: CorpusSource) -> RetrievalTask:
    protocol = _protocol(
        "MKQA",
        "test",
        code,
        source,
        metrics={f"recall_at_{k}": f"answer Recall@{k}" for k in MKQA_CUTOFFS},
        mkqa_file=str(path),
        metric_definition="a query counts at k when one of its top-k passages contains an answer string "
        "(RocketQA's QA recall): passages NFD-normalised, lower-cased, tokenised with "
        "[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}], the answer matched as a contiguous token sequence",
        answers="the English answers (text + aliases) for every query language: the corpus is English "
        "(inferred: FlagEmbedding's processed qa_data files are not in its public code)",
        filter=f"questions with an English answer of type {', '.join(MKQA_DROPPED_TYPES)} dropped "
        f"({questions.dropped} of {questions.dropped + len(questions.answers)}; BGE-M3 reports 6,619 kept)",
        official="FlagEmbedding C_MTEB/MKQA: exact inner-product search, 1,000 hits, Recall@20 and Recall@100",
        notes="queries in the query language, passages from the English BEIR-NQ corpus (2,681,468); mteb's "
        "MKQARetrieval retrieves answer strings instead: not comparable",
    )
    queries = list(questions.texts[code].items())
    return RetrievalTask(f"mkqa-{code}", protocol, queries, None, questions.answers, source, DEPTH)


def _read_mkqa(path: Path) -> _MkqaQuestions:
    texts: dict[str, dict[str, str]] = {}
    answers: dict[str, list[str]] = {}
    dropped = 0
    for row, where in iter_jsonl(path):
        qid, queries, english = _mkqa_fields(row, where)
        strings = _answer_strings(english, where)
        if any(answer.get("type") in MKQA_DROPPED_TYPES for answer in english) or not strings:
            dropped += 1
            continue
        _check_same_languages(queries, texts, where)
        answers[qid] = strings
        for code, text in queries.items():
            texts.setdefault(code, {})[qid] = text
    if not answers:
        raise DataError(f"{path}: no answerable MKQA question (expected mkqa.jsonl.gz rows with English answers)")
    return _MkqaQuestions(texts, answers, dropped)


def _mkqa_fields(row: dict, where: str) -> tuple[str, dict[str, str], list[dict]]:
    qid, queries, answers = row.get("example_id"), row.get("queries"), row.get("answers")
    if qid is None or not isinstance(queries, dict) or not isinstance(answers, dict):
        raise DataError(f"{where}: expected 'example_id', 'queries' {{lang: text}} and 'answers' {{lang: [...]}}")
    english = answers.get("en")
    if not isinstance(english, list) or not all(isinstance(answer, dict) for answer in english):
        raise DataError(f"{where}: expected 'answers' to hold an 'en' list of answer objects")
    if not all(isinstance(text, str) and text.strip() for text in queries.values()):
        raise DataError(f"{where}: every query in 'queries' must be a non-empty string")
    return str(qid), queries, english


def _answer_strings(answers: list[dict], where: str) -> list[str]:
    """Every answer's text and aliases (FlagEmbedding's and CORA's MKQA conversion keep both), first seen first."""
    strings = []
    for answer in answers:
        aliases = answer.get("aliases") or []
        if not isinstance(aliases, list):
            raise DataError(f"{where}: an answer's 'aliases' must be a list of strings")
        strings += [text for text in [answer.get("text"), *aliases] if isinstance(text, str) and text.strip()]
    return list(dict.fromkeys(strings))


def _check_same_languages(queries: dict[str, str], texts: dict[str, dict[str, str]], where: str) -> None:
    """Every kept question in the same languages: each language's task then scores the same questions."""
    if texts and set(queries) != set(texts):
        missing = ", ".join(sorted(set(texts) ^ set(queries)))
        raise DataError(f"{where}: 'queries' languages differ from the questions before ({missing})")


# =====================================================================================================================
# BEIR folders
# =====================================================================================================================
def _load_beir(folder: Path, language: str | None, split: str | None, corpus: Path | None) -> list[RetrievalTask]:
    if corpus is not None:
        raise DataError(f"{folder}: corpus= is not used for a BEIR folder (its corpus.jsonl is the corpus)")
    split = split or "test"
    queries_path = folder / "queries.jsonl"
    topics = _read_beir_queries(queries_path)
    qrels = _read_beir_qrels(_beir_qrels_file(folder, split), topics, queries_path)
    source = CorpusSource([_beir_corpus_file(folder)], id_field="_id")
    protocol = _protocol(
        f"BEIR {folder.name}",
        split,
        language,
        source,
        metrics=dict(BEIR_MEASURES),
        relevance="qrels score > 0 is relevant; nDCG uses the grade as gain",
        official="BEIR / mteb: pytrec_eval nDCG@10 (main score), Recall@100, MRR@10",
    )
    queries = _judged_queries(topics, qrels)
    return [RetrievalTask(f"beir-{folder.name}-{split}", protocol, queries, qrels, None, source, DEPTH)]


def _beir_corpus_file(folder: Path) -> Path:
    if folder.is_file() and folder.name in BEIR_CORPUS_FILES:
        return folder
    for name in BEIR_CORPUS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no corpus.jsonl (expected a BEIR folder: corpus.jsonl with _id, title, text)")


def _beir_qrels_file(folder: Path, split: str) -> Path:
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        present = ", ".join(sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))) or "none"
        raise DataError(f"{path}: file not found (BEIR layout qrels/{{split}}.tsv; splits present: {present})")
    return path


def _read_beir_queries(path: Path) -> dict[str, str]:
    require_file(path, 'BEIR queries, {"_id", "text"} lines')
    topics: dict[str, str] = {}
    for row, where in iter_jsonl(path):
        qid, text = row.get("_id"), row.get("text")
        if qid is None or not isinstance(text, str):
            raise DataError(f"{where}: expected a string '_id' and a string 'text'")
        topics[str(qid)] = text
    return topics


def _read_beir_qrels(path: Path, topics: Mapping[str, str], queries_path: Path) -> dict[str, dict[str, int]]:
    """A header line, then query-id<TAB>corpus-id<TAB>score lines (as BEIR's GenericDataLoader reads them)."""
    qrels: dict[str, dict[str, int]] = {}
    for number, (where, line) in enumerate(text_lines(path)):
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{where}: expected 3 tab-separated fields query-id corpus-id score, got {len(fields)}")
        if number == 0:
            _check_header(fields, where)
            continue
        qid, docid, grade = fields
        if qid not in topics:
            raise DataError(f"{where}: query id {qid!r} has no query in {queries_path}")
        qrels.setdefault(qid, {})[docid] = relevance_grade(grade, where)
    if not qrels:
        raise DataError(f"{path}: no relevance judgements after the header")
    return qrels


def _check_header(fields: list[str], where: str) -> None:
    if re.fullmatch(r"-?\d+(\.0*)?", fields[2].strip()):
        raise DataError(f"{where}: expected the header query-id<TAB>corpus-id<TAB>score (this line is a judgement)")


LOADERS = {"miracl": _load_miracl, "mrtydi": _load_mrtydi, "mldr": _load_mldr, "mkqa": _load_mkqa, "beir": _load_beir}
