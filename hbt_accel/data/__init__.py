"""Training corpora behind a narrow read interface, stored as Arrow + integer arrays on disk; and the LAReQA pools.

    sources.py      every `train_data` entry (LAReQA, JSONL / CSV / parquet rows, a `datasets` dataset, the raw
                    layouts of raw_corpora.py) -> one conversion path -> a CorpusStore
    raw_corpora.py  mMARCO, MIRACL train, Mr. TyDi and MLDR train rows, read from their published files
    cache.py        where stores live (the Hugging Face cache convention), converted once, renamed when complete
    store.py        CorpusStore (what sampler, collator, mining and training read) and StoreWriter
    lareqa.py       XQuAD-R / MLQA-R evaluation pools, the held-out split, LAReQA training rows
    languages.py    language codes and names

Nothing outside this package reads a corpus's files: the sampler works on `CorpusStore.id_offsets` and
`row_language` (integers), the collator fetches the texts of one batch by row.
"""

from hbt_accel.data.jsonl import iter_jsonl
from hbt_accel.data.languages import LANGUAGE_NAMES, language_code, validate_language
from hbt_accel.data.lareqa import (
    LAREQA_BENCHMARKS,
    LanguagePool,
    RetrievalBenchmark,
    article_of_question,
    is_lareqa_name,
    is_validation_id,
    lareqa_files,
    lareqa_training_rows,
    load_lareqa_benchmark,
    read_lareqa_pool,
    resolve_data_dir,
    select_split,
    shares_questions,
    split_name,
)
from hbt_accel.data.sources import load_training_corpus, row_from_mapping, store_from_rows
from hbt_accel.data.store import CorpusStore, StoreWriter
from hbt_accel.errors import DataError

__all__ = [
    "LANGUAGE_NAMES",
    "LAREQA_BENCHMARKS",
    "CorpusStore",
    "DataError",
    "LanguagePool",
    "RetrievalBenchmark",
    "StoreWriter",
    "is_lareqa_name",
    "is_validation_id",
    "iter_jsonl",
    "language_code",
    "lareqa_files",
    "article_of_question",
    "lareqa_training_rows",
    "load_lareqa_benchmark",
    "load_training_corpus",
    "read_lareqa_pool",
    "resolve_data_dir",
    "row_from_mapping",
    "select_split",
    "shares_questions",
    "split_name",
    "store_from_rows",
    "validate_language",
]
