"""Language-aware hard-negative mining: for every training query, passages the current model ranks high that are not
its answer in any language (docs/beyond_paper.md).

    candidates   every distinct answer and paragraph sentence of each training language of a corpus (`CandidatePool`)
    encode       the ONE encoder path of evaluation (`evaluation.encoding.encode_texts` -> `DualEncoder.encode`:
                 eval mode, length-sorted batches, bf16 option), split over the processes of a launch
    search       per language, a faiss `IndexFlatIP` over its candidates (cosine: embeddings are normalised)
    filter       per query (corpus, id, query language) drop: the id's answer in every language (a translation of the
                 positive) and those of ids sharing an answer text with it; any passage with the text of one of its
                 answers (`data.collate.passage_key`); candidates scoring above margin x the answer's score
                 (NV-Retriever's relative margin, against unlabelled positives), the answer in the candidate's
                 language when the id has one, else in the query's
    pick         round(k * same_language_share) best survivors in the query's language, the rest one at a time from
                 the other languages in a seeded round-robin (without a quota a cross-lingual query's negatives all
                 come from one language: FlagEmbedding #495); a language that runs short is filled from the others

Under data parallelism every rank encodes its share; the main process searches and picks, and broadcasts the result,
so every rank collates with the same negatives. `MinedNegatives.save` writes RUN/mined_negatives/step-<N>.json
(atomically) for resume and inspection. A run mines through `start_negatives` (the starting weights, or the resumed
step's file) and `refresh_negatives` (every mining_every_steps), which hand the result to its collator.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hbt_accel.atomic import write_json
from hbt_accel.data import CorpusStore
from hbt_accel.data.collate import parallel_id_key, passage_key
from hbt_accel.evaluation.encoding import encode_texts
from hbt_accel.training.session import Session

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
    def of(cls, corpus: CorpusStore, language: str) -> CandidatePool:
        answers: dict[str, list[str]] = {}
        rows = corpus.rows_in(language)
        example_ids = corpus.example_ids(corpus.ids_of_rows(rows))
        for row, example_id, positive in zip(rows.tolist(), example_ids, corpus.positives(rows)):
            answers.setdefault(positive, []).append(example_id)
            for negative in corpus.negatives_of(row):
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

    def margin_warning(self, worst_share: float = 0.9) -> str | None:
        """A line when the margin dropped most candidates: the negatives then come from far down the list. Models
        trained at a low temperature (the e5 family) score everything close together: the untrained embedded model
        drops 99.3% of what it looks at with margin 0.95 on MLQA-R (docs/beyond_paper.md)."""
        dropped = self.stats["margin_dropped"]
        if self.settings.margin <= 0 or dropped <= worst_share:
            return None
        return (
            f"warning: mining_margin {self.settings.margin} dropped {dropped:.1%} of the candidates looked at, so the "
            "mined negatives are far from the top of the list; this model's scores sit too close together for that "
            "margin (raise it toward 1, or set 0 to rely on the id and text exclusions alone)"
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
    corpora: Sequence[CorpusStore],
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
    query_rows = [_query_rows(corpus, langs) for corpus, langs in zip(corpora, languages)]
    queries = [
        list(
            zip(corpus.example_ids(corpus.ids_of_rows(rows)), [corpus.languages[k] for k in corpus.row_language[rows]])
        )
        for corpus, rows in zip(corpora, query_rows)
    ]
    query_texts = [text for corpus, rows in zip(corpora, query_rows) for text in corpus.queries(rows)]
    query_vectors, candidate_vectors = _encode(encoder, query_texts, pools, queries, settings, accelerator)
    mined = None
    if accelerator is None or accelerator.is_main_process:
        picks, counters = {}, _Counters()
        for corpus_index, corpus in enumerate(corpora):
            vectors = candidate_vectors[corpus_index], query_vectors[corpus_index]
            searcher = _CorpusSearch(corpus_index, corpus, pools[corpus_index], *vectors, settings, step)
            for row, (example_id, language) in enumerate(queries[corpus_index]):
                picks[corpus_index, example_id, language] = searcher.pick(row, example_id, language)
            counters.add(searcher.counters)
        candidates = [{lang: pool.texts for lang, pool in corpus_pools.items()} for corpus_pools in pools]
        stats = counters.summary(picks, settings.negatives_per_query) | {"seconds": time.perf_counter() - started}
        mined = MinedNegatives(step, settings, candidates, picks, stats)
    return _from_main_process(mined, accelerator)


def _query_rows(corpus: CorpusStore, languages: Sequence[str]) -> np.ndarray:
    """The rows of `corpus` in `languages`: the queries to mine for, by id and then language."""
    wanted = np.isin(np.arange(len(corpus.languages)), [corpus.languages.index(lang) for lang in languages])
    return np.flatnonzero(wanted[np.asarray(corpus.row_language)])


def _encode(encoder, query_texts, pools, queries, settings: MiningSettings, accelerator):
    """-> (per corpus the query vectors (Q_c, d), per corpus and language the candidate vectors (N_lang, d)).

    Two encode calls in all (queries, candidates), so the length-sorted batches span every corpus and language."""
    candidate_texts = [text for corpus_pools in pools for pool in corpus_pools.values() for text in pool.texts]
    options = {"batch_size": settings.batch_size, "bf16": settings.bf16, "accelerator": accelerator}
    query_vectors = encode_texts(encoder, query_texts, "query", **options)  # (Q, d)
    candidate_vectors = encode_texts(encoder, candidate_texts, "passage", **options)  # (N, d)
    query_parts = np.split(query_vectors, np.cumsum([len(q) for q in queries])[:-1])
    sizes = [len(pool.texts) for corpus_pools in pools for pool in corpus_pools.values()]
    candidate_parts = iter(np.split(candidate_vectors, np.cumsum(sizes)[:-1]))
    by_language = [{lang: next(candidate_parts) for lang in corpus_pools} for corpus_pools in pools]
    return query_parts, by_language


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
        languages = [len({m.language for m in mined}) for mined in picks.values()]
        return {
            "same_language_share": same / max(total, 1),
            "languages_per_query": sum(languages) / max(len(languages), 1),
            "queries_short": sum(len(mined) < negatives_per_query for mined in picks.values()),
            "margin_dropped": self.margin_dropped / max(self.looked_at, 1),
        }


@dataclass
class _Exclusion:
    """What one query's negatives may not be: an answer of these ids, these texts, or a text already picked."""

    ids: set[str]
    texts: set[int]  # passage keys of the query's answers in every language
    picked: set[int]  # passage keys picked so far (one text in two languages counts once)


class _CorpusSearch:
    """One corpus: a flat inner-product index per language over its candidates, every query searched in each at
    once (FIRST_SEARCH_DEPTH deep, deeper for a query that needs it), and the per-query filter and pick."""

    def __init__(
        self, corpus_index: int, corpus: CorpusStore, pools, candidate_vectors, query_vectors, settings, step
    ):
        import faiss

        self.corpus_index, self.corpus, self.pools = corpus_index, corpus, pools
        self.settings, self.step = settings, step
        self.languages = sorted(pools)
        self.vectors = candidate_vectors  # language -> (N_lang, d)
        self.queries = np.ascontiguousarray(query_vectors, dtype=np.float32)  # (Q_c, d)
        self.keys = {lang: [passage_key(text) for text in pools[lang].texts] for lang in self.languages}
        self.position = {lang: {text: k for k, text in enumerate(pools[lang].texts)} for lang in self.languages}
        self.indexes, self.top = {}, {}
        for lang in self.languages:
            index = faiss.IndexFlatIP(self.queries.shape[1])
            index.add(np.ascontiguousarray(self.vectors[lang], dtype=np.float32))
            self.indexes[lang] = index
            self.top[lang] = index.search(self.queries, min(FIRST_SEARCH_DEPTH, index.ntotal))  # (Q_c, depth) x 2
        self.counters = _Counters()

    def pick(self, row: int, example_id: str, language: str) -> list[MinedPassage]:
        """The negatives of query `row`: the same-language quota first, then the round-robin over the others."""
        wanted = self.settings.negatives_per_query
        answers = self.corpus.answers(self.corpus.index_of(example_id))  # language -> positive text
        exclusion = _Exclusion(self._related_ids(example_id, answers), set(), set())
        exclusion.texts.update(passage_key(text) for text in answers.values())
        survivors = {
            lang: self._survivors(row, lang, self._threshold(row, answers, lang, language), exclusion)
            for lang in self.languages
        }
        same = _take(survivors[language], same_language_count(wanted, self.settings.same_language_share))
        others = [lang for lang in self.languages if lang != language]
        seed = [self.settings.seed, self.step, parallel_id_key(self.corpus_index, example_id)]
        rng = np.random.default_rng(seed + [self.languages.index(language)])
        order = [others[k] for k in rng.permutation(len(others))]
        picked = same + _round_robin([survivors[lang] for lang in order], wanted - len(same))
        if len(picked) < wanted:  # the other languages ran dry: more of the query's own
            picked += _take(survivors[language], wanted - len(picked))
        return picked

    def _threshold(self, row: int, answers: dict, language: str, query_language: str) -> float:
        """margin x the score of the answer in `language` (in the query's language when the id lacks that one)."""
        if self.settings.margin <= 0:
            return np.inf
        reference = language if language in answers else query_language
        answer_vector = self.vectors[reference][self.position[reference][answers[reference]]]  # (d,)
        return self.settings.margin * float(self.queries[row] @ answer_vector)

    def _survivors(self, row: int, language: str, threshold: float, exclusion: _Exclusion) -> Iterator[MinedPassage]:
        """Candidates of `language` by falling score that pass the filters; a yielded one counts as picked."""
        for index, score in self._ranked(row, language):
            key = self.keys[language][index]
            if key in exclusion.texts or key in exclusion.picked:
                continue
            if exclusion.ids.intersection(self.pools[language].answer_of[index]):
                continue
            self.counters.looked_at += 1
            if score > threshold:
                self.counters.margin_dropped += 1
                continue
            exclusion.picked.add(key)
            yield MinedPassage(language, index, score)

    def _ranked(self, row: int, language: str) -> Iterator[tuple[int, float]]:
        """(candidate index, score) by falling score: the first search's list, then the rest of the pool."""
        scores, indices = self.top[language]
        seen = set()
        for candidate, score in zip(indices[row].tolist(), scores[row].tolist()):
            seen.add(candidate)
            yield candidate, score
        index = self.indexes[language]
        if len(seen) < index.ntotal:
            scores, indices = index.search(self.queries[row : row + 1], index.ntotal)  # (1, N_lang) each
            for candidate, score in zip(indices[0].tolist(), scores[0].tolist()):
                if candidate not in seen:
                    yield candidate, score

    def _related_ids(self, example_id: str, answers: dict[str, str]) -> set[str]:
        """The id and every id sharing an answer text with it in some language (their answers are its answers)."""
        related = {example_id}
        for lang, text in answers.items():
            if lang in self.position:
                related.update(self.pools[lang].answer_of[self.position[lang][text]])
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


# ==================================================================================================================
# The run's negatives: mined at start and every mining_every_steps, handed to the collator
# ==================================================================================================================
def start_negatives(session: Session) -> None:
    """Mine with the starting weights; on resume, load the negatives the uninterrupted run used at this step (mining
    again with later weights would give other ones), or mine with the resumed weights if that file is gone."""
    cfg, step = session.cfg, session.progress.global_step
    if not cfg.hard_negative_mining:
        return
    run_folder = session.resumed_from.parent if session.resumed_from else session.output_dir  # the checkpoint's run
    path = mined_file(run_folder, last_mining_step(step, cfg.mining_every_steps))
    if step > 0 and path.is_file():
        mined = MinedNegatives.load(path)
        if session.accelerator.is_main_process and run_folder.resolve() != session.output_dir.resolve():
            mined.save(mined_file(session.output_dir, mined.step))  # this run's folder resumes on its own later
        use_negatives(session, mined, f"loaded from {path}")
        return
    if step > 0:
        session.console.print(f"{path} is missing: mining again with the resumed weights")
    elif session.accelerator.is_main_process:  # a fresh run: no file of an earlier run in this folder may be resumed
        shutil.rmtree(session.output_dir / MINED_DIR, ignore_errors=True)
    mine_negatives(session)


def refresh_negatives(session: Session) -> None:
    """After optimizer step N: mine again when N is a multiple of mining_every_steps (and not the last step)."""
    cfg, step = session.cfg, session.progress.global_step
    every = cfg.mining_every_steps if cfg.hard_negative_mining else 0
    if every and step % every == 0 and step < session.plan.max_steps:
        mine_negatives(session)


def mine_negatives(session: Session) -> None:
    """Every rank encodes its share; the main process picks and writes RUN/mined_negatives/step-<N>.json."""
    cfg, accelerator, step = session.cfg, session.accelerator, session.progress.global_step
    settings = MiningSettings(
        cfg.num_hard_negatives,
        cfg.mining_same_language_share,
        cfg.mining_margin,
        cfg.seed,
        bf16=cfg.eval_precision == "bf16",
    )
    languages = [session.sampler.corpus_languages(index) for index in range(len(session.corpora))]
    encoder = accelerator.unwrap_model(session.model)
    mined = mine_hard_negatives(encoder, session.corpora, languages, settings, step, accelerator)
    path = mined_file(session.output_dir, step)
    if accelerator.is_main_process:
        mined.save(path)
    use_negatives(session, mined, f"-> {path}")


def use_negatives(session: Session, mined: MinedNegatives, where: str) -> None:
    session.loader.collate_fn.mined_negatives = mined.for_collator()
    session.console.print(f"{mined.describe()} ({where})")
    if warning := mined.margin_warning():
        session.console.print(warning)
