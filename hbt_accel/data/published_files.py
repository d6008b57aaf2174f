"""The text formats benchmarks publish, read one way for training (raw_corpora) and evaluation (published):
TREC topics and qrels line by line (a fault names its file:line), JSON lines streamed by Arrow, a passage's title
joined to its text."""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hbt_accel.errors import DataError

JSON_BLOCK_BYTES = 16 << 20  # Arrow's JSON block must hold a whole line


def arrow_jsonl_batches(path: Path, schema: pa.Schema, block_bytes: int | None = None) -> Iterator[pa.RecordBatch]:
    """A JSON-lines file (.gz read as such) streamed by Arrow as `schema`; other fields are ignored. Arrow stops at
    the first value of another type, naming no line: callers fall back to `jsonl.iter_jsonl` or say so."""
    import pyarrow.json as pa_json

    read = pa_json.ReadOptions(block_size=block_bytes or JSON_BLOCK_BYTES)
    parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    yield from pa_json.open_json(str(path), read_options=read, parse_options=parse)


def passage_texts(title: pa.Array, text: pa.Array) -> pa.Array:
    """title + " " + text, the text alone where the title is empty or missing."""
    title, text = pc.fill_null(title, ""), pc.fill_null(text, "")
    return pc.if_else(pc.equal(pc.utf8_length(title), 0), text, pc.binary_join_element_wise(title, text, " "))


def text_lines(path: Path) -> Iterator[tuple[str, str]]:
    """("file:line", the line without its ending) for each non-blank line; .gz is read as such."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    byte = f"byte {raw[error.start]:#04x} at column {error.start + 1}"
                    raise DataError(f"{where}: not UTF-8 text ({byte})") from None
                if line.strip():
                    yield where, line
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None


def read_topics(path: Path) -> dict[str, str]:
    """qid<TAB>query lines -> {qid: query}, file order."""
    topics: dict[str, str] = {}
    for where, line in text_lines(path):
        qid, tab, text = line.partition("\t")
        if not tab or not qid.strip() or not text.strip():
            raise DataError(f"{where}: expected qid<TAB>query (got {line[:80]!r})")
        if qid in topics:
            raise DataError(f"{where}: query id {qid!r} appears twice (expected one line per query)")
        topics[qid] = text
    return topics


def read_trec_qrels(
    path: Path, topics: Mapping[str, str] | None = None, topics_path: Path | None = None
) -> dict[str, dict[str, int]]:
    """TREC `qid Q0 docid grade` lines -> {qid: {docid: grade}}, file order; with `topics`, every qid must have
    one."""
    qrels: dict[str, dict[str, int]] = {}
    for where, line in text_lines(path):
        fields = line.split()
        if len(fields) != 4:
            raise DataError(f"{where}: expected 4 fields qid Q0 docid relevance, got {len(fields)} ({line[:80]!r})")
        qid, _, docid, grade = fields
        if topics is not None and qid not in topics:
            raise DataError(f"{where}: query id {qid!r} has no topic in {topics_path}")
        qrels.setdefault(qid, {})[docid] = relevance_grade(grade, where)
    if not qrels:
        raise DataError(f"{path}: no relevance judgements (expected qid Q0 docid relevance lines)")
    return qrels


def relevance_grade(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise DataError(f"{where}: relevance {value!r} is not an integer grade (expected 0, 1, 2, ...)")
    return int(number)
