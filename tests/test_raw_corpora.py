"""Raw-corpus loaders (hbt_accel.data.raw_corpora) on fixtures in the exact published layouts.

mMARCO, Mr. TyDi and MLDR rows are written here; MIRACL's topics and qrels are the real dev files of
../shared/data/benchmark-samples (copied into tmp_path at test time), with a corpus shard written for the docids
they judge. Mr. TyDi passages are the real sample corpus lines of the same folder.
"""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest

from hbt_accel.data import raw_corpora
from hbt_accel.data.sources import load_training_corpus
from hbt_accel.errors import DataError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmark-samples"


@pytest.fixture(autouse=True)
def corpus_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HBT_CORPUS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows_of(store, language: str) -> dict[str, tuple[str, str, list[str]]]:
    """id -> (query, positive, negatives) of every id's row in `language`."""
    rows = {}
    for index in range(store.num_ids):
        row = store.row(index, language)
        rows[store.example_id(index)] = (store.queries([row])[0], store.positives([row])[0], store.negatives_of(row))
    return rows


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def message(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text  # errors are one line
    return text


# =====================================================================================================================
# mMARCO
# =====================================================================================================================
MMARCO_NAMES = {"en": "english", "de": "german", "zh": "chinese"}
PIDS = range(12)
QIDS = (100, 101, 102, 103, 104, 105)
# qid, pos_pid, neg_pid. 101 repeats neg 5, and its last triple has another positive (10) that must not be used.
TRIPLES = [
    (101, 1, 5),
    (102, 2, 6),
    (101, 1, 7),
    (101, 1, 5),
    (103, 3, 8),
    (101, 1, 9),
    (104, 4, 5),
    (100, 0, 6),
    (102, 2, 9),
    (101, 10, 6),
]
EXPECTED_IDS = ["101", "102", "103", "104", "100"]  # order of first appearance, not numeric
EXPECTED = {101: (1, [5, 7, 9, 6]), 102: (2, [6, 9]), 103: (3, [8]), 104: (4, [5]), 100: (0, [6])}
NEEDED_PIDS = 10  # 0-9: pid 10 (a later positive) and 11 (never used) are not stored


def passage(code: str, pid: int) -> str:
    return f'{code} passage {pid}: "quoted", with a comma'  # bare quotes: the TSV has no quoting


def query(code: str, qid: int) -> str:
    return f"{code} query {qid}?"


def write_mmarco(root: Path, names: dict[str, str] = MMARCO_NAMES, skip: tuple[str, int] | None = None) -> Path:
    """mMARCO's repository layout under `root` (the folder holding data/). `skip` = (file name, id) leaves out
    one line of that file."""
    data = root / "data"
    for code, name in names.items():
        collection = data / "google" / "collections" / f"{name}_collection.tsv"
        queries = data / "google" / "queries" / "train" / f"{name}_queries.train.tsv"
        lines = {
            collection: [(pid, passage(code, pid)) for pid in reversed(PIDS)],  # not in id order
            queries: [(qid, query(code, qid)) for qid in QIDS],
        }
        for path, pairs in lines.items():
            kept = [f"{i}\t{text}\n" for i, text in pairs if skip != (path.name, i)]
            write_text(path, "".join(kept))
    write_text(data / "triples.train.ids.small.tsv", "".join(f"{q}\t{p}\t{n}\n" for q, p, n in TRIPLES))
    return root


def test_mmarco_rows_are_parallel_and_point_at_shared_texts(tmp_path):
    root = write_mmarco(tmp_path / "mMARCO")
    store = raw_corpora.load(f"mmarco:{root / 'data'}?languages=en,german")  # a code and a name

    assert store.languages == ["de", "en"]
    assert [store.example_id(i) for i in range(store.num_ids)] == EXPECTED_IDS
    assert all(store.languages_of(i) == ["de", "en"] for i in range(store.num_ids))
    for code in ("de", "en"):
        rows = rows_of(store, code)
        for qid, (pid, negatives) in EXPECTED.items():
            assert rows[str(qid)] == (query(code, qid), passage(code, pid), [passage(code, n) for n in negatives])
    # every needed passage and query once per language; unused ones (pid 10, 11, qid 105) not at all
    assert store.meta["texts"] == 2 * (NEEDED_PIDS + len(EXPECTED))
    assert store.meta["source"]["negatives_per_query"] == 8


def test_a_raw_spec_survives_the_command_line(tmp_path):
    """--train_data is comma-separated on the command line: languages join with '+' there, or the list is JSON."""
    from hbt_accel.config import parse_config

    root = write_mmarco(tmp_path / "mMARCO")
    plus = parse_config(["--train_data", f"mmarco:{root}?languages=en+german,mlqa-r", "--eval_benchmark", ""])
    assert plus.train_data == [f"mmarco:{root}?languages=en+german", "mlqa-r"]
    assert raw_corpora.load(plus.train_data[0]).languages == ["de", "en"]
    listed = parse_config(["--train_data", f'["mmarco:{root}?languages=en,de", "mlqa-r"]', "--eval_benchmark", ""])
    assert listed.train_data == [f"mmarco:{root}?languages=en,de", "mlqa-r"]


def test_mmarco_negatives_cap_and_triples_cut(tmp_path):
    root = write_mmarco(tmp_path / "mMARCO")

    capped = rows_of(raw_corpora.load(f"mmarco:{root}?languages=en&negatives_per_query=2"), "en")  # repo root
    assert capped["101"][2] == [passage("en", 5), passage("en", 7)]
    assert capped["102"][2] == [passage("en", 6), passage("en", 9)]
    assert capped["103"][2] == [passage("en", 8)]

    cut = raw_corpora.load(f"mmarco:{root}?languages=en,de&max_triples=4")  # triples 101/1/5, 102/2/6, 101/1/7
    assert [cut.example_id(i) for i in range(cut.num_ids)] == ["101", "102"]
    assert rows_of(cut, "de")["101"] == (query("de", 101), passage("de", 1), [passage("de", 5), passage("de", 7)])
    assert rows_of(cut, "de")["102"][2] == [passage("de", 6)]
    assert cut.meta["texts"] == 2 * (5 + 2)  # pids 1, 2, 5, 6, 7 and qids 101, 102, per language


def test_mmarco_default_languages_and_cache_reopen(tmp_path, corpus_cache):
    root = write_mmarco(tmp_path / "mMARCO")
    spec = f"mmarco:{root}"
    store = load_training_corpus(spec)  # the path every train_data entry takes
    assert store.languages == ["de", "en", "zh"]  # every collection present
    assert store.meta["texts"] == 3 * (NEEDED_PIDS + len(EXPECTED))
    written = {path.name: path.stat().st_mtime_ns for path in store.folder.iterdir()}

    again = raw_corpora.load(spec)
    assert again.folder == store.folder
    assert {path.name: path.stat().st_mtime_ns for path in again.folder.iterdir()} == written  # not rewritten
    assert [p.name for p in corpus_cache.iterdir()] == [store.folder.name]

    other = raw_corpora.load(f"{spec}?negatives_per_query=1")  # an option that changes the content: a new store
    assert other.folder != store.folder


def test_a_run_trains_on_mmarco_beside_a_jsonl_file_as_its_weights_say(
    tiny_model_dir, mlqa_slice, xlmr_tokenizer, tmp_path
):
    """`--train_data mmarco:ROOT,FILE --train_data_weights 1,0`: every batch comes from mMARCO's store. Word embeddings
    train sparsely, so the rows that move are the tokens of the texts trained on: mMARCO's move, and no token found
    only in the JSONL file moves beyond weight decay (a bound of a tenth of the learning rate)."""
    from safetensors.torch import load_file

    from tests.test_train import train_here

    root = write_mmarco(tmp_path / "mMARCO")
    learning_rate, out = 1e-3, tmp_path / "run"
    train_here(
        *("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--eval_benchmark", ""),
        *("--train_data", f"mmarco:{root}?languages=en+de,{mlqa_slice}", "--train_data_weights", "1,0"),
        *("--per_device_train_batch_size", "4", "--max_steps", "6", "--mixed_precision", "no"),
        *("--learning_rate", str(learning_rate)),
    )
    word = "embeddings.word_embeddings.weight"
    moved = (load_file(out / "model.safetensors")[word] - load_file(tiny_model_dir / "model.safetensors")[word]).abs()
    moved_rows = set((moved.amax(dim=1) > learning_rate / 10).nonzero().flatten().tolist())

    def tokens(texts) -> set[int]:
        return {token for text in texts for token in xlmr_tokenizer(text)["input_ids"]}

    mmarco = tokens([passage(code, pid) for code in ("en", "de") for pid in PIDS])
    mmarco |= tokens([query(code, qid) for code in ("en", "de") for qid in QIDS] + ["query: ", "passage: "])
    rows = [json.loads(line) for line in mlqa_slice.read_text().splitlines()]
    jsonl = tokens([value for row in rows for value in row.values() if isinstance(value, str)])
    assert moved_rows & (mmarco - jsonl)  # the texts of mMARCO's store trained
    assert moved_rows <= mmarco  # and nothing else: no batch came from the JSONL file


def test_mmarco_missing_ids_name_the_file_and_id(tmp_path):
    root = write_mmarco(tmp_path / "a", skip=("german_collection.tsv", 7))
    with pytest.raises(DataError) as error:
        raw_corpora.load(f"mmarco:{root}?languages=de")
    assert "german_collection.tsv: passage id 7 not found" in message(error)

    root = write_mmarco(tmp_path / "b", skip=("chinese_queries.train.tsv", 104))
    with pytest.raises(DataError) as error:
        raw_corpora.load(f"mmarco:{root}?languages=en,zh")
    assert "chinese_queries.train.tsv: query id 104 not found" in message(error)


# =====================================================================================================================
# MIRACL
# =====================================================================================================================
def read_topics(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.rstrip("\n").split("\t", 1)) for line in path.read_text(encoding="utf-8").splitlines(True)]


def read_qrels(path: Path) -> dict[str, list[tuple[str, int]]]:
    judged: dict[str, list[tuple[str, int]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _, docid, relevance = line.split("\t")
        judged.setdefault(qid, []).append((docid, int(relevance)))
    return judged


def miracl_doc(docid: str) -> dict:
    return {"docid": docid, "title": f"Kichwa {docid}", "text": f"Maandishi ya {docid}."}


def miracl_passage(docid: str) -> str:
    return f"Kichwa {docid} Maandishi ya {docid}."  # title + " " + text


def test_miracl_real_dev_topics_and_qrels(tmp_path):
    real = SAMPLES / "miracl" / "miracl-v1.0-sw"
    if not real.is_dir():
        pytest.skip(f"benchmark samples missing: {real}")
    folder = tmp_path / "miracl"
    shutil.copytree(real, folder / "miracl-v1.0-sw")
    topics = read_topics(real / "topics" / "topics.miracl-v1.0-sw-dev.tsv")
    judged = read_qrels(real / "qrels" / "qrels.miracl-v1.0-sw-dev.tsv")
    # queries whose judged passages no other query judges, so the corpus below gives exactly these rows
    judges = Counter(d for pairs in judged.values() for d, _ in pairs)
    alone = [qid for qid, _ in topics if all(judges[d] == 1 for d, _ in judged[qid])]
    kept, dropped = alone[:3], alone[3]  # `dropped`: only its non-relevant passages are in the corpus: no row
    docids = [d for qid in kept for d, _ in judged[qid]] + [d for d, rel in judged[dropped] if rel == 0]
    half = len(docids) // 2
    corpus = folder / "miracl-corpus-v1.0-sw"
    write_jsonl_gz(corpus / "docs-0.jsonl.gz", [miracl_doc(d) for d in docids[:half]])
    write_jsonl_gz(corpus / "docs-1.jsonl.gz", [miracl_doc(d) for d in docids[half:]] + [miracl_doc("999999#0")])

    all_judged = {d for pairs in judged.values() for d, _ in pairs}
    absent = len(all_judged - set(docids))
    pattern = rf"sw: {absent:,} judged passages absent, {len(topics) - 3:,} queries dropped"
    with pytest.warns(UserWarning, match=pattern):
        store = raw_corpora.load(f"miracl:{folder}?languages=sw&split=dev")

    assert store.languages == ["sw"]
    assert [store.example_id(i) for i in range(store.num_ids)] == [f"sw/{qid}" for qid in kept]
    rows = rows_of(store, "sw")
    text_of = dict(topics)
    for qid in kept:
        relevant = [d for d, rel in judged[qid] if rel == 1]
        non_relevant = [d for d, rel in judged[qid] if rel == 0]
        assert rows[f"sw/{qid}"] == (
            text_of[qid],
            miracl_passage(relevant[0]),
            list(map(miracl_passage, non_relevant)),
        )
    assert store.meta["texts"] == len(set(docids)) + len(kept)  # judged passages only, each once
    assert store.meta["source"]["queries_without_relevant_passage"] == {"sw": 0}


def test_miracl_train_defaults_and_queries_without_relevant_passage(tmp_path):
    folder, corpora = tmp_path / "miracl", tmp_path / "miracl-corpus"
    te = folder / "miracl-v1.0-te"
    write_text(te / "topics" / "topics.miracl-v1.0-te-train.tsv", "1\tప్రశ్న ఒకటి\n2\tప్రశ్న రెండు\n3\tప్రశ్న మూడు\n")
    qrels = [
        ("1", "10#0", 1),
        ("1", "10#1", 0),
        ("2", "11#0", 0),
        ("3", "12#0", 1),
        ("3", "12#1", 1),
        ("3", "10#1", 0),
    ]
    write_text(te / "qrels" / "qrels.miracl-v1.0-te-train.tsv", "".join(f"{q}\tQ0\t{d}\t{r}\n" for q, d, r in qrels))
    th = folder / "miracl-v1.0-th"
    write_text(th / "topics" / "topics.miracl-v1.0-th-train.tsv", "7\tคำถาม\n")
    write_text(th / "qrels" / "qrels.miracl-v1.0-th-train.tsv", "7\tQ0\t5#2\t1\n")
    write_text(folder / "miracl-v1.0-sw" / "topics" / "topics.miracl-v1.0-sw-dev.tsv", "1\tswali\n")  # not train
    te_docs = [{"docid": d, "title": "శీర్షిక", "text": f"పాఠం {d}"} for d in ("10#0", "10#1", "11#0", "12#0", "12#1")]
    write_jsonl_gz(corpora / "miracl-corpus-v1.0-te" / "docs-0.jsonl.gz", te_docs)
    write_jsonl_gz(
        corpora / "miracl-corpus-v1.0-th" / "docs-0.jsonl.gz", [{"docid": "5#2", "title": "", "text": "ข้อความ"}]
    )

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every judged passage is there: nothing to warn about
        store = raw_corpora.load(f"miracl:{folder}?corpus={corpora}")

    assert store.languages == ["te", "th"]  # the languages with train topics
    assert [store.example_id(i) for i in range(store.num_ids)] == ["te/1", "te/3", "th/7"]
    assert store.queries([store.row(1, "te")]) == ["ప్రశ్న మూడు"]
    assert store.positives([store.row(1, "te")]) == ["శీర్షిక పాఠం 12#0"]  # the first relevant one
    assert store.negatives_of(store.row(1, "te")) == ["శీర్షిక పాఠం 10#1"]  # 12#1 is relevant: not a negative
    assert store.positives([store.row(2, "th")]) == ["ข้อความ"]  # no title: the text alone
    assert store.meta["source"]["queries_without_relevant_passage"] == {"te": 1, "th": 0}
    assert store.meta["source"]["split"] == "train"


# =====================================================================================================================
# Mr. TyDi and MLDR
# =====================================================================================================================
def test_mrtydi_train_rows(tmp_path):
    sample = SAMPLES / "mrtydi" / "sample_docs" / "mrtydi-1.1" / "sw" / "corpus.jsonl.gz"
    if not sample.is_file():
        pytest.skip(f"benchmark samples missing: {sample}")
    with gzip.open(sample, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle]
    folder = tmp_path / "mrtydi-v1.1-swahili"
    rows = [
        {
            "query_id": "17",
            "query": "Akiolojia ni nini?",
            "positive_passages": [docs[0]],
            "negative_passages": docs[1:3],
        },
        {
            "query_id": "29",
            "query": "Pompei iko wapi?",
            "positive_passages": [docs[3]],
            "negative_passages": [docs[1]],
        },
        {"query_id": "31", "query": "Swali bila jibu", "positive_passages": [], "negative_passages": [docs[2]]},
    ]
    write_jsonl_gz(folder / "train.jsonl.gz", rows)

    with pytest.warns(UserWarning, match="1 rows without a positive passage"):
        store = raw_corpora.load(f"mrtydi:{folder}")

    def text(doc: dict) -> str:
        return f"{doc['title']} {doc['text']}"

    assert store.languages == ["sw"]
    assert [store.example_id(i) for i in range(store.num_ids)] == ["sw/17", "sw/29"]
    by_id = rows_of(store, "sw")
    assert by_id["sw/17"] == ("Akiolojia ni nini?", text(docs[0]), [text(docs[1]), text(docs[2])])
    assert by_id["sw/29"] == ("Pompei iko wapi?", text(docs[3]), [text(docs[1])])
    assert by_id["sw/17"][1].startswith("Akiolojia Akiolojia (kutoka")  # the real title, a space, the real text
    assert store.meta["texts"] == 4 + 2  # docs[1] is a negative twice: stored once
    assert raw_corpora.load(f"mrtydi:{folder / 'train.jsonl.gz'}").folder == store.folder  # the file itself


def test_mldr_train_rows_have_no_title(tmp_path):
    folder = tmp_path / "mldr-v1.0-ar"
    docs = {f"doc-ar-{k}": f"وثيقة طويلة رقم {k}." for k in range(1, 4)}

    def passages(*docids: str) -> list[dict]:
        return [{"docid": docid, "text": docs[docid]} for docid in docids]

    rows = [
        {"query_id": "q-ar-1", "query": "سؤال أول", "positive_passages": passages("doc-ar-1"),
         "negative_passages": passages("doc-ar-2", "doc-ar-3")},
        {"query_id": "q-ar-2", "query": "سؤال ثان", "positive_passages": passages("doc-ar-2"),
         "negative_passages": passages("doc-ar-1")},
    ]  # fmt: skip
    path = write_jsonl_gz(folder / "train.jsonl.gz", rows)

    store = raw_corpora.load(f"mldr:{path}")
    assert store.languages == ["ar"]
    by_id = rows_of(store, "ar")
    assert by_id["ar/q-ar-1"] == ("سؤال أول", docs["doc-ar-1"], [docs["doc-ar-2"], docs["doc-ar-3"]])
    assert by_id["ar/q-ar-2"] == ("سؤال ثان", docs["doc-ar-2"], [docs["doc-ar-1"]])
    assert store.meta["texts"] == 3 + 2

    renamed = tmp_path / "my-copy" / "train.jsonl.gz"
    renamed.parent.mkdir()
    shutil.copy(path, renamed)
    assert raw_corpora.load(f"mldr:{renamed.parent}?language=arabic").languages == ["ar"]


# =====================================================================================================================
# Specs and their errors
# =====================================================================================================================
def test_is_raw_spec():
    assert raw_corpora.is_raw_spec("mmarco:/data/mmarco?languages=en")
    assert raw_corpora.is_raw_spec("mldr:mldr-v1.0-ar")
    assert not raw_corpora.is_raw_spec("mlqa-r:train")
    assert not raw_corpora.is_raw_spec("rows.jsonl.gz")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # option errors come before any file is looked at (nowhere/ does not exist)
        ("mmarco:{tmp}/nowhere?langs=en", "unknown option 'langs' (expected one of: languages, max_triples"),
        ("mmarco:{tmp}/nowhere?langs=en", "did you mean 'languages'?"),
        ("mmarco:{tmp}/nowhere?languages=en&languages=de", "option 'languages' given twice"),
        ("mmarco:{tmp}/nowhere?languages", "are not key=value pairs"),
        ("mrtydi:{tmp}/nowhere?split=dev", "unknown option 'split' (expected one of: language)"),
        ("miracl:{tmp}/nowhere?split=test-b", "option split='test-b' (expected one of: train, dev, test-a)"),
        ("mmarco:{tmp}/mMARCO?max_triples=0", "option max_triples='0' (expected a whole number >= 1)"),
        ("mmarco:{tmp}/mMARCO?negatives_per_query=many", "option negatives_per_query='many'"),
        ("mmarco:{tmp}/mMARCO?languages=en,klingon", "option 'languages': unknown language code 'klingon'"),
        ("mmarco:", "no path after 'mmarco:'"),
        # missing files name the path and what belongs there
        ("mmarco:{tmp}/nowhere", "nowhere: folder not found (expected mMARCO's data/ folder"),
        ("mmarco:{tmp}/mMARCO?languages=fr", "french_collection.tsv: not found (expected mMARCO's French passages"),
        ("miracl:{tmp}/miracl?languages=sw", "topics.miracl-v1.0-sw-train.tsv: not found (expected MIRACL's train"),
        ("miracl:{tmp}/miracl?languages=te", "miracl-corpus-v1.0-te: no docs-*.jsonl.gz shards"),
        ("mrtydi:{tmp}/mrtydi-v1.1-swahili", "swahili/train.jsonl.gz: not found (expected Mr. TyDi's training rows"),
        ("mldr:{tmp}/mldr-v1.0-ar/train.jsonl.gz", "mldr-v1.0-ar/train.jsonl.gz: not found (expected MLDR's training"),
        ("mldr:{tmp}/elsewhere/train.jsonl.gz", "cannot tell the language from the folder name 'elsewhere'"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path, spec, expected):
    write_mmarco(tmp_path / "mMARCO", names={"en": "english"})
    te = tmp_path / "miracl" / "miracl-v1.0-te"
    write_text(te / "topics" / "topics.miracl-v1.0-te-train.tsv", "1\tప్రశ్న\n")
    write_text(te / "qrels" / "qrels.miracl-v1.0-te-train.tsv", "1\tQ0\t1#0\t1\n")
    write_jsonl_gz(tmp_path / "elsewhere" / "train.jsonl.gz", [])
    (tmp_path / "mrtydi-v1.1-swahili").mkdir()
    source = spec.format(tmp=tmp_path)
    with pytest.raises(DataError) as error:
        raw_corpora.load(source)
    assert expected in message(error)
    if "nowhere" in spec and "not found" not in expected:
        assert source in message(error)  # option errors name the spec
