"""LAReQA (XQuAD-R, MLQA-R): the evaluation pools, the held-out split, and the training rows built from them.

A `RetrievalBenchmark` is, per language, a pool of candidate sentences and the questions whose gold sentence sits
in that pool (the LAReQA protocol: the README, "Evaluation"). For training, each question -> gold sentence is one
row; the same question id in several languages is one example in several languages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hbt_accel.data.languages import validate_language
from hbt_accel.errors import DataError, did_you_mean

LAREQA_BENCHMARKS = {"xquad-r": "xquad-r", "mlqa-r": "mlqa-r"}
SPLITS = ("train", "validation")  # `mlqa-r:validation`: a benchmark name (or folder) with a split suffix
VALIDATION_SHARE = 0.15  # of the ids, held out for choosing settings
LAREQA_DOWNLOAD_HINT = (
    "get the LAReQA files (xquad-r/*.json from github.com/google-research-datasets/lareqa, mlqa-r/*.json as "
    "built in that paper) and point data_dir or HBT_DATA_DIR at the folder holding xquad-r/ and mlqa-r/"
)


# ----------------------------------------------------------------------------------------------------------------
# LAReQA (XQuAD-R, MLQA-R): one reader for evaluation pools and training pairs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LanguagePool:
    """One language of a LAReQA benchmark: candidate sentences and the questions answered among them."""

    language: str
    candidates: list[str]  # sentence texts, context[start:end] per sentence_breaks, file order
    question_ids: list[str]
    questions: list[str]
    gold: list[int]  # index into candidates of the sentence holding each question's answer_start
    context_of: list[int]  # candidate index -> paragraph index, so hard negatives can come from the same paragraph
    question_article: list[str] = field(default_factory=list)  # question index -> its article's title (clustering)


@dataclass
class RetrievalBenchmark:
    name: str
    pools: dict[str, LanguagePool]

    @property
    def languages(self) -> list[str]:
        return sorted(self.pools)


def resolve_data_dir(value: str | os.PathLike | None = None) -> Path:
    """The LAReQA folder: the given value, else $HBT_DATA_DIR, else ../shared/data/lareqa beside the checkout."""
    tried = []
    candidates = [value, os.environ.get("HBT_DATA_DIR")]
    checkout = Path(__file__).resolve().parents[2]
    candidates += [checkout.parent / "shared" / "data" / "lareqa", Path.cwd().parent / "shared" / "data" / "lareqa"]
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        tried.append(str(path))
        if path.is_dir():
            return path
        if candidate is value:  # an explicit value that does not exist is an error, not a reason to look elsewhere
            break
        if candidate == os.environ.get("HBT_DATA_DIR"):
            raise DataError(f"HBT_DATA_DIR={candidate}: no such folder (expected the one holding xquad-r/, mlqa-r/)")
    raise DataError(f"no LAReQA data directory found (looked in: {', '.join(tried)}); {LAREQA_DOWNLOAD_HINT}")


def is_validation_id(example_id: str) -> bool:
    """Whether an id is in the held-out 15%: a hash of the id, so every language of an id and every machine agree."""
    return hashlib.sha256(example_id.encode()).digest()[0] < VALIDATION_SHARE * 256


def split_name(name_or_path: str) -> tuple[str, str | None]:
    """`mlqa-r:validation` -> (`mlqa-r`, `validation`); anything without a known split suffix -> (itself, None)."""
    base, separator, split = str(name_or_path).rpartition(":")
    return (base, split) if separator and base and split in SPLITS else (str(name_or_path), None)


def shares_questions(train_data: Iterable[str], benchmark: str) -> bool:
    """Whether training on any of `train_data` sees questions that `benchmark` scores: the same LAReQA data (by name
    or folder name) unless one is the `:train` and the other the `:validation` side of the held-out split."""
    eval_base, eval_split = split_name(benchmark)
    for source in train_data:
        train_base, train_split = split_name(source)
        if Path(train_base).name == Path(eval_base).name and {train_split, eval_split} != {"train", "validation"}:
            return True
    return False


def is_lareqa_name(source: str) -> bool:
    """A LAReQA benchmark name, with or without a split suffix (as opposed to a path or a datasets id)."""
    return split_name(source)[0] in LAREQA_BENCHMARKS


def lareqa_files(name_or_path: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """language -> JSON file for a benchmark name (xquad-r, mlqa-r) or a folder of <lang>.json files."""
    if name_or_path in LAREQA_BENCHMARKS:
        folder = resolve_data_dir(data_dir) / LAREQA_BENCHMARKS[name_or_path]
    else:
        folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        if name_or_path not in LAREQA_BENCHMARKS and "/" not in name_or_path:  # a mistyped name, most likely
            known = ", ".join(LAREQA_BENCHMARKS)
            names = [f"{name}{suffix}" for name in LAREQA_BENCHMARKS for suffix in ("", *(f":{s}" for s in SPLITS))]
            hint = did_you_mean(name_or_path, names)
            raise DataError(
                f"{name_or_path}: not a benchmark name ({known}, optionally :train or :validation) nor a folder{hint}"
            )
        raise DataError(f"{folder}: benchmark folder not found; {LAREQA_DOWNLOAD_HINT}")
    files = {path.stem: path for path in sorted(folder.glob("*.json"))}
    if not files:
        raise DataError(f"{folder}: no <language>.json files found (expected e.g. en.json, de.json)")
    for language, path in files.items():
        validate_language(language, str(path))
    return files


def read_lareqa_pool(path: str | Path, language: str) -> LanguagePool:
    """Read one SQuAD-format file with `sentence_breaks` into a candidate pool and its questions."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (language {language!r})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f"{path}: missing field 'data' (expected SQuAD-format JSON with sentence_breaks)")
    pool = LanguagePool(language, [], [], [], [], [])
    paragraph_index = 0
    for article in document["data"]:
        for paragraph in article.get("paragraphs", ()):
            where = f"{path} paragraph {paragraph_index}"
            for key in ("context", "qas", "sentence_breaks"):
                if key not in paragraph:
                    raise DataError(f"{where}: missing field {key!r} (expected LAReQA format with sentence_breaks)")
            context, breaks = paragraph["context"], paragraph["sentence_breaks"]
            first = len(pool.candidates)
            # method.md: the candidate text is exactly context[start:end]; a stray space moved mAP by .015.
            pool.candidates.extend(context[start:end] for start, end in breaks)
            pool.context_of.extend([paragraph_index] * len(breaks))
            for qa in paragraph["qas"]:
                for key in ("id", "question", "answers"):
                    if key not in qa or (key == "answers" and not qa[key]):
                        raise DataError(f"{where}: a question lacks field {key!r} (expected SQuAD-format qas)")
                answer_start = qa["answers"][0]["answer_start"]
                sentence = next((k for k, (s, e) in enumerate(breaks) if s <= answer_start < e), None)
                if sentence is None:  # an answer in the gap between two breaks belongs to the sentence before it
                    sentence = max(k for k, (s, _) in enumerate(breaks) if s <= answer_start)
                pool.question_ids.append(qa["id"])
                pool.question_article.append(str(article.get("title", "")))
                pool.questions.append(qa["question"])
                pool.gold.append(first + sentence)
            paragraph_index += 1
    return pool


def load_lareqa_benchmark(
    name_or_path: str, languages: Iterable[str] | None = None, data_dir: str | os.PathLike | None = None
) -> RetrievalBenchmark:
    """XQuAD-R / MLQA-R (by name, from the data dir) or a folder of LAReQA files, optionally a language subset.

    A `:train` / `:validation` suffix (`mlqa-r:validation`) keeps one side of the held-out split (`select_split`).
    """
    name_or_path, split = split_name(name_or_path)
    files = lareqa_files(name_or_path, data_dir)
    wanted = list(languages) if languages else list(files)
    missing = [lang for lang in wanted if lang not in files]
    if missing:
        folder = next(iter(files.values())).parent
        raise DataError(f"{folder}: no file for language(s) {', '.join(missing)} (has {', '.join(files)})")
    pools = {lang: read_lareqa_pool(files[lang], lang) for lang in wanted}
    benchmark = RetrievalBenchmark(name=Path(name_or_path).name, pools=pools)
    return select_split(benchmark, split) if split else benchmark


def select_split(benchmark: RetrievalBenchmark, split: str) -> RetrievalBenchmark:
    """One side of the held-out split (`is_validation_id`).

    train: the questions of the other 85% of ids, over the whole pool (their same-paragraph negatives stay).
    validation: the held-out questions against the sentences of their own paragraphs only; a smaller pool than the
    full file, so scores run higher than on XQuAD-R, but every setting is compared on the same pools.
    """
    held_out = split == "validation"
    pools = {}
    for lang, pool in benchmark.pools.items():
        keep = [k for k, qid in enumerate(pool.question_ids) if is_validation_id(qid) == held_out]
        if held_out:
            paragraphs = {pool.context_of[pool.gold[k]] for k in keep}
            columns = [c for c, paragraph in enumerate(pool.context_of) if paragraph in paragraphs]
        else:
            columns = list(range(len(pool.candidates)))
        new_column = {c: n for n, c in enumerate(columns)}
        pools[lang] = LanguagePool(
            lang,
            [pool.candidates[c] for c in columns],
            [pool.question_ids[k] for k in keep],
            [pool.questions[k] for k in keep],
            [new_column[pool.gold[k]] for k in keep],
            [pool.context_of[c] for c in columns],
            [pool.question_article[k] for k in keep] if pool.question_article else [],
        )
    empty = [lang for lang, pool in pools.items() if not pool.question_ids]
    if empty:
        raise DataError(f"{benchmark.name}:{split}: no questions in {', '.join(empty)} on this side of the split")
    return RetrievalBenchmark(name=f"{benchmark.name}:{split}", pools=pools)


def article_of_question(benchmark: RetrievalBenchmark) -> dict[str, str]:
    """Question id -> the title of its article (any language's file names it; the ids are shared), for bootstraps
    that resample whole articles: questions on one passage are not independent."""
    found: dict[str, str] = {}
    english_first = sorted(benchmark.pools.values(), key=lambda pool: pool.language != "en")
    for pool in english_first:  # MLQA-R's titles are per language: one language's title names an id's article
        for question_id, title in zip(pool.question_ids, pool.question_article):
            if title:
                found.setdefault(question_id, title)
    return found


def lareqa_training_rows(benchmark: RetrievalBenchmark, hard_negatives: bool = True) -> Iterator[dict]:
    """Question -> gold sentence rows; the hard negatives are the other sentences of the same paragraph."""
    for lang, pool in benchmark.pools.items():
        sentences_of: dict[int, list[str]] = {}
        for text, paragraph in zip(pool.candidates, pool.context_of):
            sentences_of.setdefault(paragraph, []).append(text)
        for question_id, question, gold in zip(pool.question_ids, pool.questions, pool.gold):
            positive = pool.candidates[gold]
            negatives = sentences_of[pool.context_of[gold]] if hard_negatives else ()
            negatives = [text for text in negatives if text != positive]
            yield {"id": question_id, "lang": lang, "query": question, "positive": positive, "negatives": negatives}
