"""Language-aware hard-negative mining: for every training query, passages the current model ranks high that are not
its answer in any language (docs/beyond_paper.md).

    candidates   every distinct answer and paragraph sentence of each training language of a corpus (`CandidatePool`)
    encode       the ONE encoder path of evaluation (`evaluation.encoding.encode_texts` -> `DualEncoder.encode`:
                 eval mode, length-sorted batches, bf16 option), split over the processes of a launch
    search       per language, a faiss `IndexFlatIP` over its candidates (cosine: embeddings are normalised)
    filter       per query (corpus, id, query language) drop: the id's answer in every language (a translation of the
                 positive) and those of ids sharing an answer text with it; any passage with the text of one of its
                 answers (`batches.passage_key`); candidates scoring above margin x the answer's score (NV-Retriever's
                 relative margin, against unlabelled positives), the answer in the candidate's language when the id
                 has one, else in the query's
    pick         round(k * same_language_share) best survivors in the query's language, the rest one at a time from
                 the other languages in a seeded round-robin (without a quota a cross-lingual query's negatives all
                 come from one language: FlagEmbedding #495); a language that runs short is filled from the others

Under data parallelism every rank encodes its share; the main process searches and picks, and broadcasts the result,
so every rank collates with the same negatives. `MinedNegatives.save` writes RUN/mined_negatives/step-<N>.json
(atomically) for resume and inspection.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hbt_accel.atomic import write_json
from hbt_accel.batches import parallel_id_key, passage_key
from hbt_accel.data import ParallelCorpus
from hbt_accel.evaluation.encoding import encode_texts

MINED_DIR = "mined_negatives"
FIRST_SEARCH_DEPTH = 64  # per language; a query that needs more survivors is searched again over the whole pool

QueryKey = tuple[int, str, str]  # (corpus index, example id, query language): what the collator looks negatives up by


@dataclass(frozen=True)
class MiningSettings:
    negatives_per_query: int
    same_language_share: float = 0.5
    margin: float = 0.95  # 0 = no margin filter
    seed: int = 0
    bf16: bool = False
    batch_size: int = 64


@dataclass
class CandidatePool:
    """The candidate passages of one language of one corpus: distinct texts in corpus order, and for each the ids
    whose answer in this language it is (empty for a sentence no question asks about)."""

    language: str
    texts: list[str] = field(default_factory=list)
    answer_of: list[tuple[str, ...]] = field(default_factory=list)

    @classmethod
    def of(cls, corpus: ParallelCorpus, language: str) -> CandidatePool:
        answers: dict[str, list[str]] = {}
        for example_id, by_language in corpus.examples.items():
            if language in by_language:
                example = by_language[language]
                answers.setdefault(example.positive, []).append(example_id)
                for negative in example.negatives:
                    answers.setdefault(negative, [])
        return cls(language, list(answers), [tuple(ids) for ids in answers.values()])


@dataclass(frozen=True)
class MinedPassage:
    language: str
    index: int  # into the CandidatePool texts of (corpus, language)
    score: float  # cosine with the query


@dataclass
class MinedNegatives:
    """The mined negatives of every training query, and the candidate texts they point into."""

    step: int
    settings: MiningSettings
    candidates: list[dict[str, list[str]]]  # corpus index -> language -> candidate texts
    picks: dict[QueryKey, list[MinedPassage]]
    stats: dict = field(default_factory=dict)

    def for_collator(self) -> dict[QueryKey, list[tuple[str, str]]]:
        """(corpus index, id, query language) -> [(language, text)]: what `PairCollator.mined_negatives` reads."""
        return {
            key: [(m.language, self.candidates[key[0]][m.language][m.index]) for m in mined]
            for key, mined in self.picks.items()
        }

    def describe(self) -> str:
        s = self.stats
        return (
            f"mined {self.settings.negatives_per_query} hard negatives for {len(self.picks):,} queries at step "
            f"{self.step}: {s['same_language_share']:.0%} in the query's language (asked "
            f"{self.settings.same_language_share:.0%}), {s['languages_per_query']:.1f} languages per query, "
            f"{s['queries_short']} queries short of {self.settings.negatives_per_query}, {s['margin_dropped']:.1%} of "
            f"the candidates looked at dropped by the margin; {s.get('seconds', 0):.0f} s"
        )

    # ---- the file ---------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        queries = [
            {
                "corpus": corpus_index,
                "id": example_id,
                "language": language,
                "negatives": [[m.language, m.index, round(m.score, 5)] for m in mined],
            }
            for (corpus_index, example_id, language), mined in self.picks.items()
        ]
        content = {
            "step": self.step,
            "settings": asdict(self.settings),
            "stats": self.stats,
            "candidates": self.candidates,
            "queries": queries,
        }
        return write_json(path, content)

    @classmethod
    def load(cls, path: str | Path) -> MinedNegatives:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        picks = {
            (query["corpus"], query["id"], query["language"]): [MinedPassage(*entry) for entry in query["negatives"]]
            for query in content["queries"]
        }
        settings = MiningSettings(**content["settings"])
        return cls(content["step"], settings, content["candidates"], picks, content["stats"])


def mined_file(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / MINED_DIR / f"step-{step}.json"


def last_mining_step(step: int, every: int) -> int:
    """The step whose mined negatives are in use after `step` optimizer steps (0: mined once, at the start)."""
    return (step // every) * every if every > 0 else 0


def same_language_count(negatives: int, share: float) -> int:
    """How many of `negatives` go to the query's language (half up: 5 x 0.5 -> 3)."""
    return int(math.floor(negatives * share + 0.5))


# =====================================================================================================================
# Mining
# =====================================================================================================================
def mine_hard_negatives(
    encoder,
    corpora: Sequence[ParallelCorpus],
    languages: Sequence[Sequence[str]],
    settings: MiningSettings,
    step: int = 0,
    accelerator=None,
) -> MinedNegatives:
    """Mine for every (id, language) query of every corpus among the candidates of that corpus's `languages`.

    Every rank of a launch must call this (each encodes its share); every rank returns the same `MinedNegatives`.
    `encoder`: anything with `.encode(texts, kind, batch_size, bf16) -> (N, d)` normalised float32 (a DualEncoder).
    """
    started = time.perf_counter()
    pools = [{lang: CandidatePool.of(corpus, lang) for lang in langs} for corpus, langs in zip(corpora, languages)]
    queries = [
        [(i, lang) for i, by_language in corpus.examples.items() for lang in langs if lang in by_language]
        for corpus, langs in zip(corpora, languages)
    ]
    query_texts = [corpora[c].examples[i][lang].query for c in range(len(corpora)) for i, lang in queries[c]]
    candidate_texts = [text for corpus_pools in pools for pool in corpus_pools.values() for text in pool.texts]
    encode = {"batch_size": settings.batch_size, "bf16": settings.bf16, "accelerator": accelerator}
    query_vectors = encode_texts(encoder, query_texts, "query", **encode)  # (Q, d)
    candidate_vectors = encode_texts(encoder, candidate_texts, "passage", **encode)  # (N, d)

    mined = None
    if accelerator is None or accelerator.is_main_process:
        picks, counters = {}, _Counters()
        query_offset, candidate_offset = 0, 0
        for corpus_index, corpus in enumerate(corpora):
            vectors_by_language = {}
            for lang, pool in pools[corpus_index].items():
                vectors_by_language[lang] = candidate_vectors[candidate_offset : candidate_offset + len(pool.texts)]
                candidate_offset += len(pool.texts)
            corpus_queries = queries[corpus_index]
            vectors = query_vectors[query_offset : query_offset + len(corpus_queries)]  # (Q_c, d)
            query_offset += len(corpus_queries)
            searcher = _CorpusSearch(corpus_index, corpus, pools[corpus_index], vectors_by_language, settings, step)
            searcher.search_first(vectors)
            for row, (example_id, language) in enumerate(corpus_queries):
                picks[corpus_index, example_id, language] = searcher.pick(row, example_id, language, vectors[row])
            counters.add(searcher.counters)
        candidates = [{lang: pool.texts for lang, pool in corpus_pools.items()} for corpus_pools in pools]
        stats = counters.summary(picks, settings.negatives_per_query) | {"seconds": time.perf_counter() - started}
        mined = MinedNegatives(step, settings, candidates, picks, stats)
    return _from_main_process(mined, accelerator)


def _from_main_process(mined: MinedNegatives | None, accelerator) -> MinedNegatives:
    if accelerator is None or accelerator.num_processes == 1:
        return mined
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([mined], from_process=0)[0]


@dataclass
class _Counters:
    looked_at: int = 0
    margin_dropped: int = 0

    def add(self, other: _Counters) -> None:
        self.looked_at += other.looked_at
        self.margin_dropped += other.margin_dropped

    def summary(self, picks: dict[QueryKey, list[MinedPassage]], negatives_per_query: int) -> dict:
        total = sum(len(mined) for mined in picks.values())
        same = sum(m.language == key[2] for key, mined in picks.items() for m in mined)
        return {
            "same_language_share": same / max(total, 1),
            "languages_per_query": float(np.mean([len({m.language for m in mined}) for mined in picks.values()]))
            if picks
            else 0.0,
            "queries_short": sum(len(mined) < negatives_per_query for mined in picks.values()),
            "margin_dropped": self.margin_dropped / max(self.looked_at, 1),
        }


class _CorpusSearch:
    """Per-language flat inner-product indexes over one corpus's candidates, and the per-query filter and pick."""

    def __init__(self, corpus_index, corpus, pools, vectors_by_language, settings: MiningSettings, step: int):
        import faiss

        self.corpus_index, self.corpus, self.pools, self.settings, self.step = (
            corpus_index,
            corpus,
            pools,
            settings,
            step,
        )
        self.languages = sorted(pools)
        self.vectors = vectors_by_language  # language -> (N_lang, d)
        self.indexes = {}
        for lang in self.languages:
            index = faiss.IndexFlatIP(self.vectors[lang].shape[1])
            index.add(np.ascontiguousarray(self.vectors[lang], dtype=np.float32))
            self.indexes[lang] = index
        self.keys = {lang: [passage_key(text) for text in pools[lang].texts] for lang in self.languages}
        self.position = {lang: {text: k for k, text in enumerate(pools[lang].texts)} for lang in self.languages}
        self.top: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.counters = _Counters()

    def search_first(self, queries: np.ndarray) -> None:
        """Every query (Q, d) against every language at once, FIRST_SEARCH_DEPTH deep; `pick` goes deeper if needed."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        for lang, index in self.indexes.items():
            self.top[lang] = index.search(queries, min(FIRST_SEARCH_DEPTH, index.ntotal))  # scores, ids: (Q, depth)

    def pick(self, row: int, example_id: str, language: str, query: np.ndarray) -> list[MinedPassage]:
        """The negatives of query `row` (vector (d,)): the same-language quota first, then the round-robin."""
        wanted = self.settings.negatives_per_query
        chosen: set[int] = set()  # passage keys already picked (one text in two languages counts once)
        survivors = {lang: self._survivors(row, example_id, language, lang, query, chosen) for lang in self.languages}
        same = _take(survivors[language], same_language_count(wanted, self.settings.same_language_share))
        others = [lang for lang in self.languages if lang != language]
        seed = [self.settings.seed, self.step, parallel_id_key(self.corpus_index, example_id)]
        rng = np.random.default_rng(seed + [self.languages.index(language)])
        order = [others[k] for k in rng.permutation(len(others))]
        picked = same + _round_robin([survivors[lang] for lang in order], wanted - len(same))
        if len(picked) < wanted:  # the other languages ran dry: more of the query's own
            picked += _take(survivors[language], wanted - len(picked))
        return picked

    def _survivors(
        self, row: int, example_id: str, query_language: str, language: str, query: np.ndarray, chosen: set[int]
    ) -> Iterator[MinedPassage]:
        """Candidates of `language` by falling score that pass the filters; a yielded one counts as picked."""
        answers = self.corpus.examples[example_id]
        related = self._related_ids(example_id)
        answer_keys = {passage_key(example.positive) for example in answers.values()}
        threshold = np.inf
        if self.settings.margin > 0:
            reference = language if language in answers else query_language
            answer_vector = self.vectors[reference][self.position[reference][answers[reference].positive]]
            threshold = self.settings.margin * float(query @ answer_vector)
        for index, score in self._ranked(row, language, query):
            key = self.keys[language][index]
            if key in answer_keys or key in chosen or related.intersection(self.pools[language].answer_of[index]):
                continue
            self.counters.looked_at += 1
            if score > threshold:
                self.counters.margin_dropped += 1
                continue
            chosen.add(key)
            yield MinedPassage(language, index, score)

    def _ranked(self, row: int, language: str, query: np.ndarray) -> Iterator[tuple[int, float]]:
        """(candidate index, score) by falling score: the first search's list, then the rest of the pool."""
        scores, indices = self.top[language]
        seen = set()
        for candidate, score in zip(indices[row].tolist(), scores[row].tolist()):
            seen.add(candidate)
            yield candidate, score
        index = self.indexes[language]
        if len(seen) < index.ntotal:
            scores, indices = index.search(np.ascontiguousarray(query[None, :], dtype=np.float32), index.ntotal)
            for candidate, score in zip(indices[0].tolist(), scores[0].tolist()):
                if candidate not in seen:
                    yield candidate, score

    def _related_ids(self, example_id: str) -> set[str]:
        """The id and every id sharing an answer text with it in some language (their answers are its answers)."""
        related = {example_id}
        for lang, example in self.corpus.examples[example_id].items():
            if lang in self.position:
                related.update(self.pools[lang].answer_of[self.position[lang][example.positive]])
        return related


def _take(survivors: Iterator[MinedPassage], count: int) -> list[MinedPassage]:
    return [passage for _, passage in zip(range(count), survivors)] if count > 0 else []


def _round_robin(sources: list[Iterator[MinedPassage]], count: int) -> list[MinedPassage]:
    """One from each source in turn until `count` are taken or every source is spent."""
    picked, live = [], list(sources)
    while len(picked) < count and live:
        for source in list(live):
            passage = next(source, None)
            if passage is None:
                live.remove(source)
                continue
            picked.append(passage)
            if len(picked) == count:
                break
    return picked
