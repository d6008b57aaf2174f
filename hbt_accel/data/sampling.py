"""Global-batch samplers for X-X, X-Y and hybrid batch training (method.md, "Batch sampling").

The sampler builds the whole GLOBAL batch (per_device_batch * world_size rows) from the seed alone, so every rank
computes the same decision (X-X or X-Y, which language) without communication and takes its own slice. A global
batch never holds the same example id twice: two rows with one id are translations of each other, i.e. false
negatives for each other's queries.

Strategies:
- ``xx``: the whole batch in ONE language (query and passage), the language drawn per batch;
- ``xy``: every row has query language != passage language, rows drawn independently;
- ``hybrid``: X-X with probability ``alpha``, else X-Y;
- ``xx_mixed``: LAReQA's X-X baseline, each row monolingual, languages mixed within a batch;
- ``en_en``: one fixed language (English by default);
- ``multilingual``: every row is a query with its answer in its own language AND in up to ``answers_per_query - 1``
  other languages of its id (`BatchRow.extra_passage_languages`), for the multi-positive loss and the passage
  alignment term (docs/beyond_paper.md). Still one row per id: the extra answers travel with their row.

An epoch walks a fresh permutation of the ids; each batch takes the next ids that fit its decision (the X-X
language, or 2+ languages for X-Y). When too few unused ids fit, the batch is topped up with ids already used this
epoch. An epoch is ``total_ids // global_batch_size`` batches.

Everything here is integer arrays over a `CorpusStore`'s ids (id index, language index, per-id language bitmask):
memory grows by a few bytes per id, never by text. A batch is drawn from one corpus, chosen per batch. A
monolingual corpus (MIRACL, Mr. TyDi, MLDR: no id in two languages) can only give X-X batches: under ``hybrid`` its
batches are X-X whatever the draw, and the parallel corpora give the X-Y ones (so the share of X-X batches is the
monolingual corpora's weight plus alpha times the rest; `HybridBatchSampler.xx_share` says it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hbt_accel.data import CorpusStore
from hbt_accel.errors import ConfigError

# The one list of sampling strategies (config choices, model card and docs read it from here).
STRATEGIES = {
    "xx": "X-X: every global batch is in one language, drawn per batch",
    "xy": "X-Y: every row pairs a query with a passage in a different language",
    "hybrid": "hybrid: each global batch is X-X (one language for the whole batch) with probability alpha, "
    "else X-Y (every row pairs a query with a passage in a different language)",
    "xx_mixed": "LAReQA X-X: every row is monolingual, languages mixed within a batch",
    "en_en": "En-En: one language only",
    "multilingual": "multilingual: every row is a query with its answer in its own language and in the other "
    "languages of its id (up to answers_per_query), all of them positives",
}


# The id order behind `train_id_fraction`: fixed, so every seed of a data-size point trains on the same ids.
ID_SUBSET_SEED = 20240820


class SamplingError(ConfigError):
    """A sampling request the data cannot satisfy; the message says which field and why."""


@dataclass(frozen=True)
class PairBudget:
    """The data-matched control's training set: `pairs` (id, language) pairs, of which `xy_ids` ids come in exactly
    two languages (the ids an X-Y batch can use) and the rest in one."""

    pairs: int
    xy_ids: int = 0

    def __post_init__(self):
        if self.pairs < 1 or self.xy_ids < 0 or 2 * self.xy_ids > self.pairs:
            raise SamplingError(
                f"train_pairs/train_xy_ids: got {self.pairs} pairs and {self.xy_ids} two-language ids, expected a "
                "positive number of pairs of which two per two-language id"
            )


@dataclass(frozen=True)
class BatchRow:
    example_index: int  # into the corpus's ids (`CorpusStore.example_id` gives the id)
    query_language: str
    passage_language: str
    corpus_index: int = 0
    draw: int = 0  # a per-row random number, so row-level choices (which hard negatives) are seeded and resumable
    extra_passage_languages: tuple[str, ...] = ()  # multilingual: the id's answer in these languages too
    in_xx_batch: bool = False  # the sampler drew this row's global batch as X-X: one language on both sides

    @property
    def passage_languages(self) -> tuple[str, ...]:
        """Every language the row's answer is brought in: the passage language first."""
        return (self.passage_language, *self.extra_passage_languages)


class _EpochCursor:
    """One corpus's ids in this epoch's order, with one read pointer per eligibility key ("*", "multi", or a
    language): a key's list is the epoch order filtered by that key, walked lazily (lazy deletion of used ids)."""

    SCAN = 4096  # ids looked at per step of a walk

    def __init__(self, order: np.ndarray, corpus_ids: _CorpusIds):
        self.order, self.corpus_ids = order, corpus_ids
        self.pointer: dict[str, int] = {}
        self.used = np.zeros(len(corpus_ids.language_mask), dtype=bool)

    def take(self, key: str, count: int, rng: np.random.Generator) -> list[int]:
        taken: list[int] = []
        position = self.pointer.get(key, 0)
        while len(taken) < count and position < len(self.order):
            block = self.order[position : position + self.SCAN]
            free = self.corpus_ids.eligible(key, block) & ~self.used[block]
            found = np.flatnonzero(free)[: count - len(taken)]
            taken += block[found].tolist()
            # a full take stops just after its last id; otherwise the whole block was looked at
            position += int(found[-1]) + 1 if len(taken) == count else len(block)
        self.pointer[key] = position
        self.used[taken] = True
        if len(taken) < count:  # this list is spent for the epoch: top up with already-seen ids, still distinct
            candidates = self.order[self.corpus_ids.eligible(key, self.order)]
            pool = candidates[~np.isin(candidates, taken)]
            taken += [int(pool[k]) for k in rng.choice(len(pool), size=count - len(taken), replace=False)]
        return taken


def _mask_type(languages: int) -> type:
    """The narrowest unsigned integer with a bit per language."""
    return next(kind for kind in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(kind).bits >= languages)


class _CorpusIds:
    """The integer view of one corpus the sampler needs, after the language restriction: a few bytes per id.

    ids: id indices with at least one training language, in corpus order; language_mask: (num_ids,) bitmask of each
    id's training languages (bit k = corpus language k; uint8 up to 8 languages); language_count: (num_ids,) int8;
    id_count: language -> how many ids have it."""

    def __init__(
        self,
        corpus: CorpusStore,
        restrict: set[str] | None,
        id_fraction: float = 1.0,
        pair_budget: PairBudget | None = None,
    ):
        self.languages = list(corpus.languages)  # sorted codes: bit k is languages[k]
        if len(self.languages) > 64:
            raise SamplingError(f"{corpus.name}: {len(self.languages)} languages; the sampler handles at most 64")
        self.language_mask = np.zeros(corpus.num_ids, dtype=_mask_type(len(self.languages)))
        self.language_count = np.zeros(corpus.num_ids, dtype=np.int8)
        wanted = [k for k, lang in enumerate(self.languages) if restrict is None or lang in restrict]
        for first_id, end_id, first_row, end_row in corpus.id_blocks():  # blocks: small temporaries at any size
            language = np.asarray(corpus.row_language[first_row:end_row])
            starts = np.asarray(corpus.id_offsets[first_id:end_id]) - first_row
            for k in wanted:
                has = np.logical_or.reduceat(language == k, starts)
                self.language_mask[first_id:end_id] |= has.astype(self.language_mask.dtype) << k
                self.language_count[first_id:end_id] += has
        if id_fraction < 1.0:
            self._keep_subset(id_fraction)
        if pair_budget is not None:
            self._keep_pair_budget(corpus.name, pair_budget)
        self.id_count = {}
        for k in wanted:
            count = int(np.count_nonzero(self.language_mask & self._bit(k)))
            if count:
                self.id_count[self.languages[k]] = count
        self.ids = np.flatnonzero(self.language_count > 0).astype(np.int32)  # < 2**31 ids: half the memory
        self.num_xy_ids = int(np.count_nonzero(self.language_count >= 2))

    def _fixed_order(self) -> np.ndarray:
        """The ids with a training language, in the one order the data-size and data-matched subsets take them from
        (`ID_SUBSET_SEED`, whatever the run's seed)."""
        candidates = np.flatnonzero(self.language_count > 0)
        return candidates[np.random.default_rng(ID_SUBSET_SEED).permutation(len(candidates))]

    def _keep_subset(self, id_fraction: float) -> None:
        """Drop every id outside the first `id_fraction` of the fixed order."""
        order = self._fixed_order()
        dropped = order[max(1, round(id_fraction * len(order))) :]
        self.language_mask[dropped] = 0
        self.language_count[dropped] = 0

    def _keep_pair_budget(self, corpus_name: str, budget: PairBudget) -> None:
        """Keep `budget.pairs` (id, language) pairs: `budget.xy_ids` ids in two of their languages, then single pairs
        of other ids. Ids come in the fixed order (`_fixed_order`), and each pair goes to the language with the fewest
        pairs kept so far, so the pairs spread as evenly as the data allows."""
        order = self._fixed_order()
        kept = np.zeros_like(self.language_mask)
        per_language = np.zeros(len(self.languages), dtype=np.int64)
        two_language_ids = order[self.language_count[order] >= 2][: budget.xy_ids]
        for index in two_language_ids:
            self._keep_least_used(index, 2, kept, per_language)
        singles = self._keep_single_pairs(order, budget.pairs - 2 * len(two_language_ids), kept, per_language)
        if len(two_language_ids) < budget.xy_ids or singles < budget.pairs - 2 * budget.xy_ids:
            raise SamplingError(
                f"train_pairs/train_xy_ids: {corpus_name} gives {len(two_language_ids)} ids in two training languages "
                f"and {singles} more in one, expected {budget.xy_ids} and {budget.pairs - 2 * budget.xy_ids}"
            )
        self.language_mask = kept
        self.language_count = np.zeros(len(kept), dtype=np.int8)
        self.language_count[kept > 0] = 1
        self.language_count[two_language_ids] = 2

    def _keep_least_used(self, index: int, width: int, kept: np.ndarray, per_language: np.ndarray) -> None:
        """Keep `width` of id `index`'s languages: those with the fewest pairs kept so far."""
        mask = int(self.language_mask[index])
        has = [k for k in range(len(self.languages)) if mask >> k & 1]
        for k in sorted(has, key=lambda k: (per_language[k], k))[:width]:
            kept[index] |= self._bit(k)
            per_language[k] += 1

    def _keep_single_pairs(self, order: np.ndarray, wanted: int, kept: np.ndarray, per_language: np.ndarray) -> int:
        """Keep up to `wanted` pairs of ids not kept yet, one each, always for the least-used language that still has
        such an id (walked in `order`); returns how many were kept."""
        candidates = {k: order[(self.language_mask[order] & self._bit(k)) != 0] for k in range(len(self.languages))}
        position = dict.fromkeys(candidates, 0)
        taken = 0
        while taken < wanted and candidates:
            k = min(candidates, key=lambda k: (per_language[k], k))
            ids, at = candidates[k], position[k]
            while at < len(ids) and kept[ids[at]]:
                at += 1
            if at == len(ids):
                del candidates[k]  # no unused id left in this language
                continue
            kept[ids[at]] |= self._bit(k)
            per_language[k] += 1
            position[k], taken = at + 1, taken + 1
        return taken

    def languages_of(self, example_index: int) -> list[str]:
        """The id's training languages, sorted."""
        mask = int(self.language_mask[example_index])
        return [lang for k, lang in enumerate(self.languages) if mask >> k & 1]

    def eligible(self, key: str, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: which of `ids` belong to the list `key` ("*", "multi" = 2+ languages, a language)."""
        if key == "*":
            return np.ones(len(ids), dtype=bool)
        if key == "multi":
            return self.language_count[ids] >= 2
        return (self.language_mask[ids] & self._bit(self.languages.index(key))) != 0

    def _bit(self, k: int):
        return self.language_mask.dtype.type(1 << k)


class HybridBatchSampler:
    """Yields, for one rank, lists of `BatchRow` forming its slice of each global batch.

    Args:
        corpora: one or more parallel corpora; a batch is drawn from one corpus, chosen per batch.
        strategy: one of STRATEGIES.
        per_device_batch_size: rows per rank; the global batch is this times `world_size`.
        alpha: hybrid only, the probability of an X-X batch.
        language_weights: target share of each language (unnormalised); default uniform over languages.
        language_temperature: if > 0 and no weights, target share proportional to n_ids(lang) ** tau.
        corpus_weights: per-corpus batch probability; default proportional to the number of ids.
        languages: restrict training to these languages.
        id_fraction: train on this share of each corpus's ids (all their languages), a prefix of a fixed order of
            the ids (`ID_SUBSET_SEED`, not `seed`), so smaller shares are nested in larger ones.
        pair_budget: train each corpus on a fixed number of (id, language) pairs and of ids in two languages,
            whatever the languages (`PairBudget`): the data-matched control of the language-count study.
        answers_per_query: multilingual only, answer languages per row (its own included); 0 = every language the
            id has. `answers_per_row` is the width every row is padded to by the collator.
    """

    def __init__(
        self,
        corpora: CorpusStore | Sequence[CorpusStore],
        strategy: str,
        per_device_batch_size: int,
        *,
        alpha: float = 0.5,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        language_weights: Mapping[str, float] | None = None,
        language_temperature: float = 0.0,
        corpus_weights: Sequence[float] | None = None,
        languages: Sequence[str] | None = None,
        id_fraction: float = 1.0,
        pair_budget: PairBudget | None = None,
        en_en_language: str = "en",
        answers_per_query: int = 0,
    ):
        if strategy not in STRATEGIES:
            raise SamplingError(f"sampling: got {strategy!r}, expected one of {', '.join(STRATEGIES)}")
        if not 0.0 <= alpha <= 1.0:
            raise SamplingError(f"alpha: got {alpha!r}, expected a probability in [0, 1]")
        if answers_per_query < 0 or answers_per_query == 1:
            raise SamplingError(f"answers_per_query: got {answers_per_query!r}, expected 0 (all) or 2 or more")
        self.corpora = [corpora] if isinstance(corpora, CorpusStore) else list(corpora)
        self.strategy, self.alpha, self.seed = strategy, alpha, seed
        self.rank, self.world_size = rank, world_size
        self.per_device_batch_size = per_device_batch_size
        self.global_batch_size = per_device_batch_size * world_size
        self.epoch, self.skip_batches = 0, 0

        restrict = set(languages) if languages else None
        if strategy == "en_en":
            restrict = {en_en_language}
        if not 0.0 < id_fraction <= 1.0:
            raise SamplingError(f"train_id_fraction: got {id_fraction!r}, expected a share of the ids in (0, 1]")
        self.pair_budget = pair_budget
        self._ids = [_CorpusIds(corpus, restrict, id_fraction, pair_budget) for corpus in self.corpora]
        if restrict:
            present = {lang for ids in self._ids for lang in ids.id_count}
            missing = sorted(restrict - present)
            if missing:
                raise SamplingError(f"train_languages/en_en_language: no training data in {', '.join(missing)}")
        self._check_feasible()
        self.answers_per_row = self._answers_per_row(answers_per_query)
        self.target_share = self._target_share(language_weights, language_temperature)
        sizes = np.array([len(ids.ids) for ids in self._ids], dtype=float)
        weights = np.asarray(corpus_weights, dtype=float) if corpus_weights else sizes
        if len(weights) != len(self.corpora) or (weights < 0).any() or weights.sum() <= 0:
            raise SamplingError(
                f"train_data_weights: expected {len(self.corpora)} non-negative weights, got {weights}"
            )
        self.corpus_probability = weights / weights.sum()
        self.batches_per_epoch = max(1, int(sizes.sum()) // self.global_batch_size)

    # ---- set-up -----------------------------------------------------------------------------------------------
    def _xx_languages(self, corpus_index: int) -> list[str]:
        """Languages with enough ids for a whole monolingual global batch."""
        id_count = self._ids[corpus_index].id_count
        return sorted(lang for lang, count in id_count.items() if count >= self.global_batch_size)

    def _is_parallel(self, corpus_index: int) -> bool:
        """Whether a corpus can give X-Y batches: a global batch of ids present in 2+ languages."""
        return self._ids[corpus_index].num_xy_ids >= self.global_batch_size

    def _answers_per_row(self, answers_per_query: int) -> int:
        """Passages of a row's answer: 1, or for multilingual the most languages a row can bring (a fixed width, so
        every rank's passage tensor has one shape for the cross-device gather)."""
        if self.strategy != "multilingual":
            return 1
        most = max(int(ids.language_count.max(initial=0)) for ids in self._ids)
        return min(answers_per_query, most) if answers_per_query else most

    def training_set(self, corpus_index: int) -> dict[str, int]:
        """What one corpus trains on after every restriction: ids, (id, language) pairs, ids in 2+ languages."""
        ids = self._ids[corpus_index]
        return {"ids": len(ids.ids), "pairs": int(ids.language_count.sum()), "xy_ids": ids.num_xy_ids}

    def corpus_languages(self, corpus_index: int) -> list[str]:
        """The training languages of one corpus (after `languages` / en_en restrictions)."""
        return sorted(self._ids[corpus_index].id_count)

    @property
    def xx_share(self) -> float:
        """The expected share of X-X batches: alpha in parallel corpora, every batch of a monolingual one."""
        if self.strategy in ("xx", "en_en", "xx_mixed"):
            return 1.0
        if self.strategy != "hybrid":
            return 0.0
        parallel = np.array([self._is_parallel(k) for k in range(len(self.corpora))])
        return float(self.corpus_probability[~parallel].sum() + self.alpha * self.corpus_probability[parallel].sum())

    def _check_feasible(self) -> None:
        size = self.global_batch_size
        parallel = [self._is_parallel(index) for index in range(len(self.corpora))]
        # hybrid: a monolingual corpus gives X-X batches only, as long as some corpus can give the X-Y ones
        hybrid_xy_elsewhere = self.strategy == "hybrid" and any(parallel)
        for index, corpus in enumerate(self.corpora):
            n_ids = len(self._ids[index].ids)
            if n_ids < size:
                raise SamplingError(
                    f"per_device_train_batch_size: global batch {size} exceeds the {n_ids} distinct ids of "
                    f"{corpus.name} (a global batch may not repeat an id)"
                )
            needs_xx = self.strategy in ("xx", "en_en") or (self.strategy == "hybrid" and self.alpha > 0)
            needs_xx = needs_xx or (self.strategy == "hybrid" and not parallel[index])
            needs_xy = self.strategy in ("xy", "multilingual") or (self.strategy == "hybrid" and self.alpha < 1)
            needs_xy = needs_xy and not (hybrid_xy_elsewhere and not parallel[index])
            if needs_xx and not self._xx_languages(index):
                raise SamplingError(
                    f"sampling: X-X batches of {size} need one language with {size}+ ids in {corpus.name}; none has"
                )
            if needs_xy and not parallel[index]:
                kind = "multilingual" if self.strategy == "multilingual" else "X-Y"
                budget = f" (train_xy_ids keeps {self.pair_budget.xy_ids})" if self.pair_budget else ""
                raise SamplingError(
                    f"sampling: {kind} batches of {size} need {size}+ ids present in 2+ languages; {corpus.name} has "
                    f"{self._ids[index].num_xy_ids}{budget} (use sampling xx or hybrid with a parallel corpus "
                    "beside it)"
                )

    def _target_share(self, weights: Mapping[str, float] | None, tau: float) -> dict[str, float]:
        counts: dict[str, int] = {}
        for corpus_ids in self._ids:
            for lang, count in corpus_ids.id_count.items():
                counts[lang] = counts.get(lang, 0) + count
        if weights:
            unknown = sorted(set(weights) - set(counts))
            if unknown:
                raise SamplingError(f"language_weights: no training data in {', '.join(unknown)}")
            share = {lang: float(weights.get(lang, 0.0)) for lang in counts}
        elif tau > 0:
            share = {lang: n**tau for lang, n in counts.items()}
        else:
            share = dict.fromkeys(counts, 1.0)
        total = sum(share.values())
        return {lang: value / total for lang, value in share.items()}

    # ---- epochs and resume -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, global_step: int) -> None:
        """Resume at a global batch count: the epoch and the batches to skip within it."""
        self.epoch, self.skip_batches = divmod(global_step, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[BatchRow]]:
        start = self.rank * self.per_device_batch_size
        for index, rows in enumerate(self.global_batches(self.epoch)):
            if index >= self.skip_batches:
                yield rows[start : start + self.per_device_batch_size]
        self.skip_batches = 0  # the next epoch starts from its first batch

    # ---- the sequence ------------------------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> Iterator[list[BatchRow]]:
        """Every global batch of `epoch`, identical on every rank (a function of seed and epoch only)."""
        epoch_rng = np.random.default_rng([self.seed, epoch])
        cursors = []
        for corpus_ids in self._ids:
            order = corpus_ids.ids[epoch_rng.permutation(len(corpus_ids.ids))]  # id indices in epoch order
            cursors.append(_EpochCursor(order, corpus_ids))
        for batch_index in range(self.batches_per_epoch):
            rng = np.random.default_rng([self.seed, epoch, batch_index])
            corpus_index = int(rng.choice(len(self.corpora), p=self.corpus_probability))
            yield self._draw_batch(rng, corpus_index, cursors[corpus_index])

    def _draw_batch(self, rng: np.random.Generator, corpus_index: int, cursor: _EpochCursor) -> list[BatchRow]:
        size = self.global_batch_size
        monolingual = self.strategy in ("xx", "en_en") or (self.strategy == "hybrid" and rng.random() < self.alpha)
        monolingual = monolingual or (self.strategy == "hybrid" and not self._is_parallel(corpus_index))
        if monolingual:
            languages = self._xx_languages(corpus_index)
            share = np.array([self.target_share[lang] for lang in languages])
            language = languages[int(rng.choice(len(languages), p=share / share.sum()))]
            ids = cursor.take(language, size, rng)
            return [BatchRow(i, language, language, corpus_index, self._row_draw(rng), in_xx_batch=True) for i in ids]
        if self.strategy == "multilingual":
            return [self._multilingual_row(rng, corpus_index, i) for i in cursor.take("multi", size, rng)]
        if self.strategy == "xx_mixed":
            ids = cursor.take("*", size, rng)
            rows = []
            for example_index in ids:
                language = self._draw_languages(rng, corpus_index, example_index, 1)[0]
                rows.append(BatchRow(example_index, language, language, corpus_index, self._row_draw(rng)))
            return rows
        ids = cursor.take("multi", size, rng)
        rows = []
        for example_index in ids:
            query_language, passage_language = self._draw_languages(rng, corpus_index, example_index, 2)
            rows.append(BatchRow(example_index, query_language, passage_language, corpus_index, self._row_draw(rng)))
        return rows

    def _multilingual_row(self, rng: np.random.Generator, corpus_index: int, example_index: int) -> BatchRow:
        """A query in one language of the id; its answer in that language plus up to answers_per_row - 1 others."""
        query_language = self._draw_languages(rng, corpus_index, example_index, 1)[0]
        others = [lang for lang in self._ids[corpus_index].languages_of(example_index) if lang != query_language]
        if len(others) > self.answers_per_row - 1:
            others = self._draw_languages(rng, corpus_index, example_index, self.answers_per_row - 1, query_language)
        draw = self._row_draw(rng)
        return BatchRow(example_index, query_language, query_language, corpus_index, draw, tuple(sorted(others)))

    @staticmethod
    def _row_draw(rng: np.random.Generator) -> int:
        return int(rng.integers(2**31))

    def _draw_languages(
        self, rng: np.random.Generator, corpus_index: int, example_index: int, count: int, exclude: str = ""
    ) -> list[str]:
        """Distinct languages of one id (but `exclude`), each weighted by target share / how many ids have it.

        Dividing by the count keeps a language present in every id (English in MLQA-R) from dominating X-Y rows.
        """
        corpus_ids = self._ids[corpus_index]
        languages = [lang for lang in corpus_ids.languages_of(example_index) if lang != exclude]
        weights = np.array([self.target_share[lang] / corpus_ids.id_count[lang] for lang in languages])
        weights = weights + 1e-12  # a zero-weight language may still be needed to make a pair
        picked = rng.choice(len(languages), size=count, replace=False, p=weights / weights.sum())
        return [languages[k] for k in picked]
