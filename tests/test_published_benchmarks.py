"""Readers of the published benchmark layouts (MIRACL, Mr. TyDi, MLDR, MKQA, BEIR) and their official metrics.

Fixtures are written into tmp_path in exactly the published layout (file names, gzip where published, TREC / TSV,
field names). The real files in ../shared/data/benchmark-samples (MIRACL and Mr. TyDi topics + qrels, Mr. TyDi
corpus lines, the whole BEIR nfcorpus) are read where they are, never copied; those tests skip when it is absent.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import ir_measures
import pytest
from ir_measures import AP, RR, R, nDCG

from hbt_accel.data import published_files
from hbt_accel.errors import DataError
from hbt_accel.evaluation import published
from hbt_accel.evaluation.published import (
    CorpusSource,
    answer_tokens,
    first_answer_rank,
    has_answer,
    load_task,
    macro_average,
    xtreme_r_map_at_20,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmark-samples"


def needs_samples(*parts: str) -> Path:
    path = SAMPLES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"benchmark samples absent: {path}")
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    """Plain or gzipped (by suffix) text, made with its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def all_passages(task) -> dict[str, str]:
    return {
        docid: text
        for batch in task.corpus.batches()
        for docid, text in zip(batch.column("docid").to_pylist(), batch.column("text").to_pylist())
    }


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# =====================================================================================================================
# MIRACL
# =====================================================================================================================
def write_miracl(root: Path, code: str = "sw", split: str = "dev") -> Path:
    base = root / f"miracl-v1.0-{code}"
    write_text(base / "topics" / f"topics.miracl-v1.0-{code}-{split}.tsv", "1\tswali moja\n2\tswali mbili\n3\tbila\n")
    qrels = "1\tQ0\td1#0\t1\n1\tQ0\td2#0\t0\n1\tQ0\td3#0\t1\n2\tQ0\td4#0\t1\n"
    write_text(base / "qrels" / f"qrels.miracl-v1.0-{code}-{split}.tsv", qrels)
    passages = [{"docid": f"d{i}#0", "title": f"Kichwa {i}", "text": f"maandishi {i}"} for i in range(1, 6)]
    write_jsonl(root / f"miracl-corpus-v1.0-{code}" / "docs-0.jsonl.gz", passages)
    return root


def test_miracl_layout_tasks_queries_qrels_and_protocol(tmp_path):
    write_miracl(tmp_path, "sw")
    write_miracl(tmp_path, "te")
    tasks = load_task(str(tmp_path))
    assert [task.name for task in tasks] == ["miracl-sw-dev", "miracl-te-dev"]
    task = load_task(str(tmp_path), language="sw")[0]
    assert task.queries == [("1", "swali moja"), ("2", "swali mbili")]  # topic 3 has no judgement: not scored
    assert task.qrels == {"1": {"d1#0": 1, "d2#0": 0, "d3#0": 1}, "2": {"d4#0": 1}}
    assert task.answers is None and task.depth == 100
    assert task.protocol["metrics"] == {"ndcg_at_10": "nDCG@10", "recall_at_100": "R@100"}
    assert task.protocol["topics_without_judgements"] == 1
    assert "not mteb's MIRACLRetrievalHardNegatives" in task.protocol["notes"]
    assert json.loads(json.dumps(task.protocol)) == task.protocol
    assert all_passages(task)["d1#0"] == "Kichwa 1 maandishi 1"  # title + " " + text
    assert load_task(str(tmp_path / "miracl-v1.0-te"))[0].name == "miracl-te-dev"  # the language folder itself


def test_miracl_corpus_elsewhere_and_test_a_split(tmp_path):
    write_miracl(tmp_path / "topics", "sw", split="test-a")
    (tmp_path / "topics" / "miracl-corpus-v1.0-sw").rename(tmp_path / "miracl-corpus-v1.0-sw")
    with pytest.raises(DataError, match="miracl-corpus-v1.0-sw: no docs"):
        load_task(str(tmp_path / "topics"), split="test-a")
    task = load_task(str(tmp_path / "topics"), split="test-a", corpus=str(tmp_path))[0]
    assert task.name == "miracl-sw-test-a"
    assert task.corpus.files == [tmp_path / "miracl-corpus-v1.0-sw" / "docs-0.jsonl.gz"]


def test_ndcg_and_recall_by_hand_and_against_ir_measures(tmp_path):
    task = load_task(str(write_miracl(tmp_path)))[0]
    run = {"1": [("d2#0", 9.0), ("d1#0", 8.0), ("d5#0", 7.0), ("d3#0", 6.0)]}  # query 2 absent from the run
    # q1: DCG = 0 + 1/log2(3) + 0 + 1/log2(5); ideal = 1 + 1/log2(3) -> 0.6509; q2 scores 0 (trec_eval -c).
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    per_query = task.score_per_query(run)
    assert per_query["1"]["ndcg_at_10"] == pytest.approx(ndcg_q1)
    assert per_query["2"] == {"ndcg_at_10": 0.0, "recall_at_100": 0.0}
    results = task.score(run)
    assert results["ndcg_at_10"] == pytest.approx(ndcg_q1 / 2)
    assert results["recall_at_100"] == pytest.approx((2 / 2 + 0) / 2)  # q1 finds both relevant, q2 none
    assert results["n_queries"] == 2
    direct = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], task.qrels, {"1": {d: s for d, s in run["1"]}})
    assert results["ndcg_at_10"] == pytest.approx(direct[nDCG @ 10])
    assert results["recall_at_100"] == pytest.approx(direct[R @ 100])


def test_run_order_is_the_ranking_and_a_repeated_doc_keeps_its_first_place(tmp_path):
    task = load_task(str(write_miracl(tmp_path)))[0]
    tied = {"1": [("d2#0", 1.0), ("d1#0", 1.0)]}  # trec_eval would put d2 first by doc id anyway; order decides
    assert task.score_per_query(tied)["1"]["ndcg_at_10"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    repeated = {"1": [("d1#0", 3.0), ("d1#0", 2.0), ("d3#0", 1.0)]}
    assert task.score_per_query(repeated)["1"]["ndcg_at_10"] == pytest.approx(1.0)


def test_miracl_real_topics_and_qrels(tmp_path):
    samples = needs_samples("miracl")
    qrels_sw = list(ir_measures.read_trec_qrels(str(samples / "miracl-v1.0-sw/qrels/qrels.miracl-v1.0-sw-dev.tsv")))
    judged_6 = {}
    for qrel in qrels_sw:
        if qrel.query_id == "6":
            judged_6[qrel.doc_id] = qrel.relevance
    for code in ("ar", "en", "sw", "te", "th"):  # a corpus shard in the published form for the judged docids
        rows = [{"docid": docid, "title": "t", "text": "x"} for docid in judged_6]
        write_jsonl(tmp_path / f"miracl-corpus-v1.0-{code}" / "docs-0.jsonl.gz", rows)
    tasks = load_task(str(samples), corpus=str(tmp_path))
    assert {task.name: len(task.queries) for task in tasks} == {
        "miracl-ar-dev": 2896,
        "miracl-en-dev": 799,
        "miracl-sw-dev": 482,
        "miracl-te-dev": 828,
        "miracl-th-dev": 733,
    }
    task = load_task(str(samples), language="sw", corpus=str(tmp_path))[0]
    assert task.queries[0] == ("6", "Bandari kubwa nchini Kenya iko wapi?")
    assert task.qrels["6"] == judged_6 and judged_6["32589#0"] == 1 and judged_6["33690#3"] == 0
    best_first = sorted(judged_6, key=lambda docid: -judged_6[docid])
    run = {"6": [(docid, float(-rank)) for rank, docid in enumerate(best_first)]}
    assert task.score_per_query(run)["6"] == {"ndcg_at_10": pytest.approx(1.0), "recall_at_100": 1.0}
    direct = ir_measures.calc_aggregate(
        [nDCG @ 10, R @ 100], qrels_sw, {"6": {docid: 100.0 - rank for rank, docid in enumerate(best_first)}}
    )
    results = task.score(run)
    assert results["ndcg_at_10"] == pytest.approx(direct[nDCG @ 10]) == pytest.approx(1 / 482)
    assert results["recall_at_100"] == pytest.approx(direct[R @ 100])


# =====================================================================================================================
# Mr. TyDi
# =====================================================================================================================
def write_mrtydi(root: Path, corpus_path: str = "mrtydi-v1.1-swahili/corpus.jsonl.gz") -> Path:
    write_text(root / "topics" / "topics.mrtydi-v1.1-sw.test.txt.gz", "10\tswali la kwanza\n11\tswali la pili\n")
    write_text(root / "qrels" / "qrels.mrtydi-v1.1-sw.test.txt", "10\tQ0\t5#0\t1\n11\tQ0\t6#1\t1\n")
    passages = [{"docid": f"{i}#0", "title": "Kichwa", "text": f"maandishi {i} "} for i in range(1, 8)]
    write_jsonl(root / corpus_path, passages)
    return root


@pytest.mark.parametrize("corpus_path", ["mrtydi-v1.1-swahili/corpus.jsonl.gz", "mrtydi-1.1/sw/corpus.jsonl.gz"])
def test_mrtydi_layout_and_mrr_by_hand(tmp_path, corpus_path):
    task = load_task(str(write_mrtydi(tmp_path, corpus_path)))[0]
    assert task.name == "mrtydi-sw-test"
    assert task.queries == [("10", "swali la kwanza"), ("11", "swali la pili")]
    assert task.protocol["metrics"] == {"mrr_at_100": "RR@100", "recall_at_100": "R@100"}
    assert task.corpus.files == [tmp_path / corpus_path]
    run = {"10": [("1#0", 3.0), ("2#0", 2.0), ("5#0", 1.0)], "11": [("1#0", 1.0)]}
    # q10: first relevant at rank 3 -> RR 1/3; q11: none -> 0. MRR = (1/3 + 0) / 2; Recall@100 = (1 + 0) / 2.
    results = task.score(run)
    assert results["mrr_at_100"] == pytest.approx(1 / 6)
    assert results["recall_at_100"] == pytest.approx(0.5)
    direct = ir_measures.calc_aggregate(
        [RR @ 100], task.qrels, {q: {d: s for d, s in hits} for q, hits in run.items()}
    )
    assert results["mrr_at_100"] == pytest.approx(direct[RR @ 100])


def test_mrtydi_real_topics_qrels_and_corpus_lines():
    samples = needs_samples("mrtydi")
    corpus = samples / "sample_docs"
    task = load_task(str(samples), language="th", corpus=str(corpus))[0]
    assert task.name == "mrtydi-th-test" and len(task.queries) == 1190
    assert task.qrels["5060"] == {"545#0": 1}
    passages = all_passages(task)
    assert list(passages) == ["1#0", "545#0", "545#1", "545#2"]  # the 4 real lines, file order
    assert passages["545#0"].startswith("ดาราศาสตร์ ดาราศาสตร์ คือ")  # title + " " + text
    run = {"5060": [("545#1", 2.0), ("545#0", 1.0)]}
    assert task.score_per_query(run)["5060"] == {"mrr_at_100": 0.5, "recall_at_100": 1.0}
    real_qrels = list(ir_measures.read_trec_qrels(str(samples / "qrels" / "qrels.mrtydi-v1.1-th.test.txt")))
    direct = ir_measures.calc_aggregate([RR @ 100], real_qrels, {"5060": {"545#1": 2.0, "545#0": 1.0}})
    assert task.score(run)["mrr_at_100"] == pytest.approx(direct[RR @ 100]) == pytest.approx(0.5 / 1190)


def test_mrtydi_real_train_split_consistent_subset():
    samples = needs_samples("mrtydi")
    task = load_task(str(samples), language="bn", split="train", corpus=str(samples / "sample_docs"))[0]
    passages = all_passages(task)
    run = {qid: [(docid, 1.0)] for qid in ("224", "949", "1206") for docid in task.qrels[qid]}
    assert all(docid in passages for hits in run.values() for docid, _ in hits)
    per_query = task.score_per_query(run)
    assert [per_query[qid]["mrr_at_100"] for qid in ("224", "949", "1206")] == [1.0, 1.0, 1.0]
    swahili = load_task(str(samples), language="sw", split="dev", corpus=str(samples / "sample_docs"))[0]
    assert all_passages(swahili)["2#0"].endswith("u. ")  # Mr. TyDi passages keep their trailing space


# =====================================================================================================================
# MLDR
# =====================================================================================================================
def write_mldr(root: Path, with_qrels: bool = True) -> Path:
    base = root / "mldr-v1.0-ar"
    write_jsonl(base / "corpus.jsonl.gz", [{"docid": f"doc-ar-{i}", "text": f"نص طويل {i}"} for i in range(1, 4)])
    rows = [
        {"query_id": "q-ar-1", "query": "سؤال 1", "positive_passages": [{"docid": "doc-ar-1", "text": "نص"}]},
        {"query_id": "q-ar-2", "query": "سؤال 2", "positive_passages": [{"docid": "doc-ar-3", "text": "نص"}]},
    ]
    write_jsonl(base / "test.jsonl.gz", [{**row, "negative_passages": []} for row in rows])
    if with_qrels:
        write_text(root / "qrels" / "qrels.mldr-v1.0-ar-test.tsv", "q-ar-1 Q0 doc-ar-1 1\nq-ar-2 Q0 doc-ar-3 1\n")
    return root


@pytest.mark.parametrize("with_qrels", [True, False])
def test_mldr_layout_with_or_without_the_qrels_file(tmp_path, with_qrels):
    task = load_task(str(write_mldr(tmp_path, with_qrels)))[0]
    assert task.name == "mldr-ar-test"
    assert task.queries == [("q-ar-1", "سؤال 1"), ("q-ar-2", "سؤال 2")]
    assert task.qrels == {"q-ar-1": {"doc-ar-1": 1}, "q-ar-2": {"doc-ar-3": 1}}
    assert "passage_max_length" in task.protocol and task.protocol["passage_max_length"] is None
    assert all_passages(task)["doc-ar-2"] == "نص طويل 2"  # no title in MLDR
    # q1: the relevant document at rank 2 -> nDCG@10 = (1/log2(3)) / 1; q2 at rank 1 -> 1.
    results = task.score({"q-ar-1": [("doc-ar-2", 2.0), ("doc-ar-1", 1.0)], "q-ar-2": [("doc-ar-3", 1.0)]})
    assert results == {"ndcg_at_10": pytest.approx((1 / math.log2(3) + 1) / 2), "n_queries": 2}
    assert load_task(str(tmp_path / "mldr-v1.0-ar"))[0].name == "mldr-ar-test"


# =====================================================================================================================
# BEIR
# =====================================================================================================================
def write_beir(folder: Path, qrels: str = "query-id\tcorpus-id\tscore\r\nq1\td1\t2\r\nq1\td2\t1\r\n") -> Path:
    write_jsonl(
        folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "T" if i < 3 else "", "text": f"t{i}"} for i in (1, 2, 3)]
    )
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "unjudged"}])
    write_text(folder / "qrels" / "test.tsv", qrels)
    return folder


def test_beir_fixture_graded_crlf_and_hand_metrics(tmp_path):
    task = load_task(str(write_beir(tmp_path / "toy")))[0]
    assert task.name == "beir-toy-test" and task.queries == [("q1", "first")]
    assert task.qrels == {"q1": {"d1": 2, "d2": 1}}
    assert all_passages(task) == {"d1": "T t1", "d2": "T t2", "d3": "t3"}
    # Run d3, d2, d1: DCG = 0 + 1/log2(3) + 2/log2(4) = 1.6309; ideal = 2 + 1/log2(3) = 2.6309 (gain = grade).
    results = task.score({"q1": [("d3", 3.0), ("d2", 2.0), ("d1", 1.0)]})
    ideal = 2 + 1 / math.log2(3)
    assert results["ndcg_at_10"] == pytest.approx((1 / math.log2(3) + 1) / ideal)
    assert results["mrr_at_10"] == pytest.approx(1 / 2) and results["recall_at_100"] == 1.0


def read_beir_directly(folder: Path):
    """The BEIR files read the plain way (json per line, csv with a header), for comparison."""
    import csv

    def rows(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    corpus = {row["_id"]: (row.get("title", "") + " " + row["text"]).strip() for row in rows(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in rows(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as handle:
        for qid, docid, score in list(csv.reader(handle, delimiter="\t"))[1:]:
            qrels.setdefault(qid, {})[docid] = int(score)
    return corpus, queries, qrels


def test_beir_real_nfcorpus_matches_its_files_and_ir_measures():
    folder = needs_samples("beir", "nfcorpus")
    task = load_task(str(folder))[0]
    corpus, queries, qrels = read_beir_directly(folder)
    assert task.qrels == qrels and len(task.queries) == 323
    assert [qid for qid, _ in task.queries] == [qid for qid in queries if qid in qrels]
    passages = all_passages(task)
    assert len(passages) == 3633 and set(passages) == set(corpus)
    assert all(" ".join(passages[docid].split()) == " ".join(text.split()) for docid, text in corpus.items())
    perfect = {qid: sorted(judged, key=lambda docid: (-judged[docid], docid)) for qid, judged in qrels.items()}
    reverse = {qid: ranked[::-1] + ["MED-10", "MED-14"] for qid, ranked in perfect.items()}
    for ranked in (perfect, reverse):
        run = {
            qid: [(docid, float(len(docs) - rank)) for rank, docid in enumerate(docs)] for qid, docs in ranked.items()
        }
        results = task.score(run)
        direct = ir_measures.calc_aggregate([nDCG @ 10, R @ 100, RR @ 10], qrels, {q: dict(h) for q, h in run.items()})
        assert results["ndcg_at_10"] == pytest.approx(direct[nDCG @ 10])
        assert results["recall_at_100"] == pytest.approx(direct[R @ 100])
        assert results["mrr_at_10"] == pytest.approx(direct[RR @ 10])
    assert task.score({q: [(d, 1.0) for d in docs] for q, docs in perfect.items()})["ndcg_at_10"] == pytest.approx(1)


# =====================================================================================================================
# MKQA (BGE-M3's protocol)
# =====================================================================================================================
def mkqa_row(example_id: int, english: str, answers: list[dict]) -> dict:
    queries = {"en": english, "de": f"de: {english}", "zh_cn": f"zh: {english}"}
    return {"example_id": example_id, "query": english, "queries": queries, "answers": {"en": answers, "de": answers}}


def write_mkqa(root: Path) -> Path:
    rows = [
        mkqa_row(
            1, "who painted the mona lisa", [{"type": "entity", "text": "Leonardo da Vinci", "aliases": ["Leo"]}]
        ),
        mkqa_row(2, "what is love", [{"type": "unanswerable", "text": None}]),
        mkqa_row(3, "is water wet", [{"type": "binary", "text": "yes"}]),
        mkqa_row(4, "why is the sky blue", [{"type": "long_answer", "text": None}]),
        mkqa_row(5, "when did apollo 11 land", [{"type": "date", "text": "1969", "aliases": []}]),
        mkqa_row(6, "who founded roc nation", [{"type": "entity", "text": "Jay-Z", "aliases": ["Shawn Carter"]}]),
    ]
    write_jsonl(root / "mkqa.jsonl.gz", rows)
    passages = [
        {"_id": "p1", "title": "Mona Lisa", "text": "The portrait was painted by Leonardo da Vinci."},
        {"_id": "p2", "title": "Apollo 11", "text": "Apollo 11 landed on the Moon in July 1969."},
        {"_id": "p3", "title": "Roc Nation", "text": "The rapper Jay\u2013Z founded it."},  # en dash in the passage
    ]
    filler = [{"_id": f"f{i}", "title": "", "text": f"a party for everyone {i}"} for i in range(120)]
    write_jsonl(root / "nq" / "corpus.jsonl", passages + filler)
    return root


def test_mkqa_answer_matcher_hand_cases():
    assert answer_tokens("Jay-Z") == ("jay", "-", "z")
    assert has_answer(["Café"], "Le CAFE\u0301 de Flore")  # NFC answer, NFD + upper-case passage
    assert not has_answer(["café"], "the cafe is open")  # the accent stays part of the token
    assert has_answer(["U.S."], "served in the u.s. army")
    assert not has_answer(["U.S."], "served in the us army")
    assert not has_answer(["art"], "a great party")  # a partial token is no match
    assert has_answer(["art"], "modern art, today")
    assert has_answer(["Jay-Z"], "Jay\u2013Z founded it")  # passage dashes are unified, as FlagEmbedding does
    assert has_answer(["football"], "foot\u00adball")  # the soft hyphen is dropped from passages
    assert has_answer(["da Vinci"], "Leonardo da\nVinci")
    assert not has_answer(["Leonardo da Vinci"], "Leonardo da")
    assert not has_answer(["  "], "anything at all")  # an answer with no token matches nothing
    assert first_answer_rank(["x"], ["a", "b x", "x"]) == 1 and first_answer_rank(["x"], ["a"]) is None


def test_mkqa_type_filter_languages_and_answers(tmp_path):
    write_mkqa(tmp_path)
    tasks = load_task(str(tmp_path), corpus=str(tmp_path / "nq"))
    assert [task.name for task in tasks] == ["mkqa-de", "mkqa-en", "mkqa-zh_cn"]
    task = load_task(str(tmp_path / "mkqa.jsonl.gz"), language="de", corpus=str(tmp_path / "nq"))[0]
    assert task.queries == [("1", "de: who painted the mona lisa"), ("5", "de: when did apollo 11 land"),
                            ("6", "de: who founded roc nation")]  # fmt: skip
    assert task.answers == {"1": ["Leonardo da Vinci", "Leo"], "5": ["1969"], "6": ["Jay-Z", "Shawn Carter"]}
    assert task.qrels is None and "(3 of 6" in task.protocol["filter"]
    assert "English answers" in task.protocol["answers"]
    with pytest.raises(DataError, match="zh_cn"):
        load_task(str(tmp_path), language="zh", corpus=str(tmp_path / "nq"))


def test_mkqa_recall_at_20_and_100_on_a_toy_run(tmp_path):
    write_mkqa(tmp_path)
    task = load_task(str(tmp_path), language="de", corpus=str(tmp_path / "nq"))[0]
    passages = all_passages(task)
    filler = [f"f{i}" for i in range(120)]
    run = {
        "1": [("p1", 1.0)] + [(f, 0.0) for f in filler],  # answer at rank 1
        "5": [(f, 0.0) for f in filler[:49]] + [("p2", -1.0)],  # answer at rank 50: in the top 100, not the top 20
        "6": [(f, 0.0) for f in filler[:100]] + [("p3", -1.0)],  # answer at rank 101: too late
    }
    per_query = task.score_per_query(run, lambda ids: [passages[i] for i in ids])
    assert per_query == {
        "1": {"recall_at_20": 1.0, "recall_at_100": 1.0},
        "5": {"recall_at_20": 0.0, "recall_at_100": 1.0},
        "6": {"recall_at_20": 0.0, "recall_at_100": 0.0},
    }
    results = task.score(run, lambda ids: [passages[i] for i in ids])
    assert results == {"recall_at_20": pytest.approx(1 / 3), "recall_at_100": pytest.approx(2 / 3), "n_queries": 3}
    with pytest.raises(DataError, match="passage_text"):
        task.score(run)


# =====================================================================================================================
# XTREME-R's LAReQA mAP@20 and the macro average
# =====================================================================================================================
def test_xtreme_r_map_at_20_by_hand():
    first = [True, False, True] + [False] * 17  # AP = (1/1 + 2/3) / min(2, 20) = 0.8333
    late = [False] * 20 + [True]  # the only relevant one at rank 21: 0
    many = [True] * 20  # 25 relevant, the top 20 all relevant: 20 / min(25, 20) = 1 (trec_eval's AP@20 says 0.8)
    value = xtreme_r_map_at_20([first, late, many], [2, 1, 25])
    assert value == pytest.approx(((1 + 2 / 3) / 2 + 0 + 1) / 3)
    qrels = {"q": {f"r{i}": 1 for i in range(25)}}
    run = {"q": {f"r{i}": 100.0 - i for i in range(20)}}
    assert ir_measures.calc_aggregate([AP @ 20], qrels, run)[AP @ 20] == pytest.approx(0.8)  # the divisor differs
    with pytest.raises(ValueError, match="at least 1"):
        xtreme_r_map_at_20([[True]], [0])


def test_macro_average_weighs_every_language_the_same():
    results = {
        "miracl-sw-dev": {"ndcg_at_10": 0.5, "n_queries": 482},
        "miracl-te-dev": {"ndcg_at_10": 0.7, "n_queries": 1},
    }
    assert macro_average(results) == {"ndcg_at_10": pytest.approx(0.6), "n_languages": 2}


# =====================================================================================================================
# Streaming the corpus
# =====================================================================================================================
def test_corpus_batches_are_bounded_ordered_and_deterministic(tmp_path):
    folder = tmp_path / "miracl-corpus-v1.0-sw"
    write_jsonl(folder / "docs-10.jsonl.gz", [{"docid": "c", "title": "", "text": "3"}])
    write_jsonl(folder / "docs-2.jsonl.gz", [{"docid": d, "title": "T", "text": d} for d in ("a", "b")])
    write_jsonl(folder / "docs-0.jsonl.gz", [{"docid": d, "text": d} for d in ("x", "y", "z", "w")])
    source = CorpusSource(published._miracl_shards(tmp_path, "sw"))
    assert [path.name for path in source.files] == ["docs-0.jsonl.gz", "docs-2.jsonl.gz", "docs-10.jsonl.gz"]
    batches = list(source.batches(rows=2))
    assert [len(batch) for batch in batches] == [2, 2, 2, 1]
    assert [batch.schema.names for batch in batches][0] == ["docid", "text"]
    ids = [docid for batch in batches for docid in batch.column("docid").to_pylist()]
    assert ids == ["x", "y", "z", "w", "a", "b", "c"]
    assert [b.to_pylist() for b in source.batches(rows=2)] == [b.to_pylist() for b in batches]
    assert [len(batch) for batch in source.batches(rows=3)] == [3, 3, 1]
    assert len(source.fingerprint()) == 3 and {"size", "mtime_ns"} <= set(source.fingerprint()[0])


def test_corpus_falls_back_to_python_mid_file_and_for_integer_ids(tmp_path, monkeypatch):
    rows = [{"docid": f"d{i}", "title": "T" if i % 2 else "", "text": "x" * (7 * i)} for i in range(30)]
    source = CorpusSource([write_jsonl(tmp_path / "corpus.jsonl", rows)])
    monkeypatch.setattr(published_files, "JSON_BLOCK_BYTES", 200)  # Arrow stops at a line straddling two blocks
    ids = [docid for batch in source.batches(rows=4) for docid in batch.column("docid").to_pylist()]
    assert ids == [f"d{i}" for i in range(30)]  # each passage once, in order, across the switch
    numbered = CorpusSource([write_jsonl(tmp_path / "ints.jsonl", [{"_id": 7, "text": "seven"}])], id_field="_id")
    assert [batch.to_pylist() for batch in numbered.batches()] == [[{"docid": "7", "text": "seven"}]]


def test_corpus_faults_name_the_file_and_line(tmp_path):
    bad_bytes = b'{"docid": "a", "text": "ok"}\n{"docid": "b", "text": "caf\xe9"}\n'
    shard = write_text(tmp_path / "docs-0.jsonl.gz", bad_bytes)
    with pytest.raises(DataError, match=f"{shard}:2: not UTF-8") as excinfo:
        list(CorpusSource([shard]).batches())
    one_line_error(excinfo)
    no_text = write_jsonl(tmp_path / "docs-1.jsonl.gz", [{"docid": "a", "text": "ok"}, {"docid": "b", "title": "T"}])
    with pytest.raises(DataError, match=f"{no_text}:2: expected a string 'text'"):
        list(CorpusSource([no_text]).batches())


# =====================================================================================================================
# Errors: one line each, naming the file (and line)
# =====================================================================================================================
def test_missing_files_are_named(tmp_path):
    root = write_miracl(tmp_path / "m")
    with pytest.raises(DataError, match="topics.miracl-v1.0-sw-test-a.tsv: not found") as excinfo:
        load_task(str(root), language="sw", split="test-a")
    one_line_error(excinfo)
    (root / "miracl-v1.0-sw/qrels/qrels.miracl-v1.0-sw-dev.tsv").unlink()
    with pytest.raises(DataError, match="qrels.miracl-v1.0-sw-dev.tsv: not found"):
        load_task(str(root))
    mrtydi = write_mrtydi(tmp_path / "t", "elsewhere/corpus.jsonl.gz")
    with pytest.raises(DataError, match="no Mr. TyDi corpus for 'sw'.*mrtydi-v1.1-swahili/corpus.jsonl.gz"):
        load_task(str(mrtydi))
    mldr = write_mldr(tmp_path / "l")
    (mldr / "mldr-v1.0-ar" / "test.jsonl.gz").unlink()
    with pytest.raises(DataError, match="mldr-v1.0-ar/test.jsonl.gz: not found"):
        load_task(str(mldr))
    write_mkqa(tmp_path / "k")
    with pytest.raises(DataError, match="needs corpus="):
        load_task(str(tmp_path / "k"))
    with pytest.raises(DataError, match=r"qrels/dev.tsv: file not found.*splits present: test"):
        load_task(str(write_beir(tmp_path / "b")), split="dev")


@pytest.mark.parametrize(
    ("qrels", "line", "message"),
    [
        ("1\tQ0\td1#0\t1\n1\tQ0\td2#0\n", 2, "expected 4 fields"),
        ("1\tQ0\td1#0\thigh\n", 1, "relevance 'high' is not an integer grade"),
        ("1\tQ0\td1#0\t1\n2\tQ0\td4#0\t1\n99\tQ0\td4#0\t1\n", 3, "query id '99' has no topic in .*topics"),
        ("1\tQ0\td1#0\t1\n1\tQ0\td\xe9\t1\n", 2, "not UTF-8"),
    ],
)
def test_bad_trec_qrels_lines(tmp_path, qrels, line, message):
    root = write_miracl(tmp_path)
    path = root / "miracl-v1.0-sw/qrels/qrels.miracl-v1.0-sw-dev.tsv"
    path.write_bytes(qrels.encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}:{line}: {message}") as excinfo:
        load_task(str(root))
    one_line_error(excinfo)


def test_bad_topics_and_beir_qrels(tmp_path):
    root = write_miracl(tmp_path / "m")
    topics = root / "miracl-v1.0-sw/topics/topics.miracl-v1.0-sw-dev.tsv"
    topics.write_bytes(b"1\tswali\n2\tsw\xe1li\n")
    with pytest.raises(DataError, match=f"{topics}:2: not UTF-8"):
        load_task(str(root))
    topics.write_bytes(b"1\tswali\n2 no tab here\n")
    with pytest.raises(DataError, match=f"{topics}:2: expected qid<TAB>query"):
        load_task(str(root))
    beir = write_beir(tmp_path / "b", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(DataError, match="test.tsv:2: relevance 'high'"):
        load_task(str(beir))
    write_beir(beir, "query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(DataError, match="test.tsv:2: query id 'q9' has no query in .*queries.jsonl"):
        load_task(str(beir))
    write_beir(beir, "q1\td1\t1\n")
    with pytest.raises(DataError, match="test.tsv:1: expected the header"):
        load_task(str(beir))


def test_unrecognised_layout_lists_the_layouts(tmp_path):
    (tmp_path / "something.txt").write_text("hello")
    with pytest.raises(DataError, match="no benchmark layout recognised") as excinfo:
        load_task(str(tmp_path))
    message = one_line_error(excinfo)
    assert all(name in message for name in ("MIRACL", "Mr. TyDi", "MLDR", "MKQA", "BEIR"))
    with pytest.raises(DataError, match="not a MIRACL split"):
        load_task(str(write_miracl(tmp_path / "m")), split="test-b")
