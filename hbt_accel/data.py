"""Parallel corpora in one in-memory form, and the LAReQA evaluation pools.

Training data is a `ParallelCorpus`: example id -> language -> (query, positive, hard negatives). The same
id in two languages means "translations of one example", which is what X-Y batches are built from.
Evaluation data is a `RetrievalBenchmark`: per language, a pool of candidate sentences and the questions
whose gold sentence sits in that pool (LAReQA protocol, `../shared/notes/method.md`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hbt_accel.errors import DataError, did_you_mean

# ISO 639-1 codes of the languages multilingual encoders commonly cover; an unknown code is almost always a typo.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "ga": "Irish", "gl": "Galician", "gu": "Gujarati",
    "ha": "Hausa", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese",
    "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean", "ku": "Kurdish",
    "ky": "Kyrgyz", "la": "Latin", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "my": "Burmese",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "or": "Odia", "pa": "Punjabi", "pl": "Polish", "ps": "Pashto",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "su": "Sundanese",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish",
    "ug": "Uyghur", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "xh": "Xhosa",
    "yi": "Yiddish", "yo": "Yoruba", "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip

LAREQA_BENCHMARKS = {"xquad-r": "xquad-r", "mlqa-r": "mlqa-r"}
SPLITS = ("train", "validation")  # `mlqa-r:validation`: a benchmark name (or folder) with a split suffix
VALIDATION_SHARE = 0.15  # of the ids, held out for choosing settings
LAREQA_DOWNLOAD_HINT = (
    "get the LAReQA files (xquad-r/*.json from github.com/google-research-datasets/lareqa, mlqa-r/*.json as "
    "built in that paper) and point data_dir or HBT_DATA_DIR at the folder holding xquad-r/ and mlqa-r/"
)


def validate_language(code: str, where: str) -> str:
    """Return `code` if it is a known ISO 639-1 code, else raise naming `where` it came from."""
    if code not in LANGUAGE_NAMES:
        raise DataError(f"{where}: unknown language code {code!r} (expected an ISO 639-1 code such as 'en', 'de')")
    return code


# ----------------------------------------------------------------------------------------------------------------
# Training form
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairExample:
    query: str
    positive: str
    negatives: tuple[str, ...] = ()


@dataclass
class ParallelCorpus:
    """example id -> language -> PairExample. One id in several languages = translations of one example."""

    examples: dict[str, dict[str, PairExample]] = field(default_factory=dict)
    name: str = "corpus"

    def add(self, example_id: str, language: str, example: PairExample) -> None:
        self.examples.setdefault(example_id, {})[language] = example

    @property
    def languages(self) -> list[str]:
        return sorted({lang for by_lang in self.examples.values() for lang in by_lang})

    @property
    def num_pairs(self) -> int:
        return sum(len(by_lang) for by_lang in self.examples.values())

    def ids_in(self, language: str) -> list[str]:
        return [i for i, by_lang in self.examples.items() if language in by_lang]

    def multilingual_ids(self) -> list[str]:
        """Ids present in 2+ languages: the only ones an X-Y row can be built from."""
        return [i for i, by_lang in self.examples.items() if len(by_lang) >= 2]

    def merged(self, other: ParallelCorpus) -> ParallelCorpus:
        """Union of two corpora; ids are prefixed by corpus name so different corpora never collide."""
        out = ParallelCorpus(name=f"{self.name}+{other.name}")
        for corpus in (self, other):
            for example_id, by_lang in corpus.examples.items():
                out.examples[f"{corpus.name}/{example_id}"] = dict(by_lang)
        return out

    def summary_table(self):
        """A rich table: pairs per language and how many ids exist in 2+ languages."""
        from rich.table import Table

        table = Table(title=f"{self.name}: {len(self.examples):,} ids, {self.num_pairs:,} pairs")
        table.add_column("language")
        table.add_column("pairs", justify="right")
        table.add_column("ids also in another language", justify="right")
        for lang in self.languages:
            ids = self.ids_in(lang)
            shared = sum(len(self.examples[i]) >= 2 for i in ids)
            table.add_row(f"{lang} ({LANGUAGE_NAMES[lang]})", f"{len(ids):,}", f"{shared:,}")
        table.add_row("all", f"{self.num_pairs:,}", f"{len(self.multilingual_ids()):,} ids in 2+ languages")
        return table


DATA_FILE_TYPES = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}  # suffix -> datasets builder


def iter_jsonl(path: str | Path) -> Iterator[tuple[dict, str]]:
    """(row, "file:line") for each non-blank line of a JSON-lines file; bad JSON names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as handle:  # bytes, so a bad encoding is reported with its line
        for line_no, raw in enumerate(handle, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line")
            yield row, where


def read_jsonl_corpus(path: str | Path, name: str | None = None) -> ParallelCorpus:
    """Rows `{"id", "lang", "query", "positive", "negatives"?}`, one JSON object per line."""
    path = Path(path)
    corpus = ParallelCorpus(name=name or path.stem)
    for row, where in iter_jsonl(path):
        corpus.add(*_row_to_example(row, where))
    _require_nonempty(corpus, str(path))
    return corpus


def read_hf_corpus(
    name_or_path: str, columns: Mapping[str, str] | None = None, split: str = "train", name: str | None = None
) -> ParallelCorpus:
    """A `datasets` dataset (Hub id, local folder or data file) mapped through `columns` onto id/lang/query/..."""
    import datasets

    local = Path(name_or_path)
    if local.is_file():
        builder = DATA_FILE_TYPES.get(local.suffix)
        if builder is None:
            raise DataError(f"{local}: unsupported data file type {local.suffix!r} (jsonl, json, csv, parquet)")
        dataset = datasets.load_dataset(builder, data_files=str(local), split=split)
    elif local.is_dir() and (local / "dataset_info.json").exists():
        dataset = datasets.load_from_disk(str(local))
    else:
        dataset = datasets.load_dataset(name_or_path, split=split)
    columns = dict(columns or {})
    rename = {columns.get(key, key): key for key in ("id", "lang", "query", "positive", "negatives")}
    corpus = ParallelCorpus(name=name or local.stem or name_or_path)
    for index, row in enumerate(dataset):
        mapped = {target: row[source] for source, target in rename.items() if source in row}
        corpus.add(*_row_to_example(mapped, f"{name_or_path} row {index}", column_names=rename))
    _require_nonempty(corpus, name_or_path)
    return corpus


def _row_to_example(row: Mapping, where: str, column_names: Mapping[str, str] | None = None):
    """Validate one row; a missing field names the column the user must provide."""
    source_name = {v: k for k, v in (column_names or {}).items()}
    for key in ("id", "lang", "query", "positive"):
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: missing field {source_name.get(key, key)!r} (expected a non-empty value)")
    negatives = row.get("negatives") or ()
    if isinstance(negatives, str) or not all(isinstance(n, str) for n in negatives):
        raise DataError(f"{where}: field 'negatives' must be a list of strings")
    language = validate_language(str(row["lang"]), where)
    return str(row["id"]), language, PairExample(str(row["query"]), str(row["positive"]), tuple(negatives))


def _require_nonempty(corpus: ParallelCorpus, where: str) -> None:
    if not corpus.examples:
        raise DataError(f"{where}: no training examples found")


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
    checkout = Path(__file__).resolve().parents[1]
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
        )
    empty = [lang for lang, pool in pools.items() if not pool.question_ids]
    if empty:
        raise DataError(f"{benchmark.name}:{split}: no questions in {', '.join(empty)} on this side of the split")
    return RetrievalBenchmark(name=f"{benchmark.name}:{split}", pools=pools)


def lareqa_training_corpus(benchmark: RetrievalBenchmark, hard_negatives: bool = True) -> ParallelCorpus:
    """Question -> gold sentence pairs; the hard negatives are the other sentences of the same paragraph."""
    corpus = ParallelCorpus(name=benchmark.name)
    for lang, pool in benchmark.pools.items():
        sentences_of: dict[int, list[str]] = {}
        for text, paragraph in zip(pool.candidates, pool.context_of):
            sentences_of.setdefault(paragraph, []).append(text)
        for question_id, question, gold in zip(pool.question_ids, pool.questions, pool.gold):
            positive = pool.candidates[gold]
            negatives = sentences_of[pool.context_of[gold]] if hard_negatives else ()
            negatives = tuple(text for text in negatives if text != positive)
            corpus.add(question_id, lang, PairExample(question, positive, negatives))
    return corpus


def load_training_corpus(
    source: str, data_dir: str = "", hard_negatives: bool = False, columns: Mapping[str, str] | None = None
) -> ParallelCorpus:
    """One `train_data` entry -> ParallelCorpus: a LAReQA name/folder, a .jsonl file, or a datasets id/path."""
    path = Path(source).expanduser()
    folder = Path(split_name(source)[0]).expanduser()  # a LAReQA folder may carry a split suffix too
    if is_lareqa_name(source) or (folder.is_dir() and any(folder.glob("*.json"))):
        benchmark = load_lareqa_benchmark(source, data_dir=data_dir or None)
        return lareqa_training_corpus(benchmark, hard_negatives=hard_negatives)
    if path.suffix in DATA_FILE_TYPES and not path.is_file():
        raise DataError(f"{path}: training data file not found (train_data)")
    if path.is_dir() and not any(
        p.suffix in DATA_FILE_TYPES or p.name == "dataset_info.json" for p in path.rglob("*")
    ):
        raise DataError(
            f"{path}: no training data in this folder (train_data: expected LAReQA <lang>.json files, a saved "
            f"dataset, or {', '.join(DATA_FILE_TYPES)} files)"
        )
    if path.suffix == ".jsonl":
        return read_jsonl_corpus(path)
    return read_hf_corpus(source, columns or {})
