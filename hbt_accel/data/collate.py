"""From the sampler's rows to tensors: text lookup, hard negatives, tokenisation, the DataLoader.

`HybridBatchSampler` decides WHICH (id, query language, passage language) rows form a batch; `PairCollator` turns
them into the tokenised queries and passages a training step consumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from hbt_accel.data import CorpusStore
from hbt_accel.data.sampling import BatchRow, HybridBatchSampler

# `passage_ids` values that are not an example id: a passage answering no question of the corpus, and an empty slot.
NO_PARALLEL_ID = -1
PADDING_PASSAGE = -2


def passage_key(text: str) -> int:
    """A process-independent 64-bit id of a passage text (Python's hash() differs between ranks)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def parallel_id_key(corpus_index: int, example_id: str) -> int:
    """A process-independent non-negative 63-bit id of one example id of one corpus: every translation of the
    example's answer carries it in `passage_ids` (the negative values are NO_PARALLEL_ID and PADDING_PASSAGE)."""
    digest = hashlib.blake2b(f"{corpus_index}\t{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _RowIdentity(torch.utils.data.Dataset):
    """The sampler yields whole `BatchRow`s; the collator looks their texts up, so the dataset passes them through."""

    def __getitem__(self, row: BatchRow) -> BatchRow:
        return row


class PairCollator:
    """Turns a rank's `BatchRow`s into {query, passage: tokenised (N, L), passage_keys (N_p,), monolingual: bool},
    passages laid out as [positives (B); hard negatives (B*k)].

    With `answers_per_row` > 1 (multilingual sampling) each row's answer in its `extra_passage_languages` follows:
    [positives (B); hard negatives (B*k); further answers (B*(answers_per_row-1))], a row with fewer languages padded
    with empty slots. With `with_passage_ids` the batch also holds `passage_ids` (N_p,) int64: `parallel_id_key` of
    the example each passage answers (for a hard negative: of the example whose answer in that language it is, else
    NO_PARALLEL_ID), PADDING_PASSAGE for an empty slot; the loss finds a query's answers in every language by it.

    `mined_negatives`, when set (`hbt_accel.training.mining`), maps (corpus index, example id, query language) to
    the mined [(language, text)] of that query; they replace the example's own negatives.
    """

    def __init__(
        self,
        corpora: list[CorpusStore],
        encoder,
        num_hard_negatives: int,
        answers_per_row: int = 1,
        with_passage_ids: bool = False,
    ):
        self.corpora, self.encoder, self.num_hard_negatives = corpora, encoder, num_hard_negatives
        self.answers_per_row, self.with_passage_ids = answers_per_row, with_passage_ids
        self.mined_negatives: Mapping[tuple[int, str, str], Sequence[tuple[str, str]]] | None = None
        self._language_rows: dict[tuple[int, str], np.ndarray] = {}
        self._answer_ids: dict[tuple[int, str], dict[str, int]] = {}

    def __call__(self, rows: list[BatchRow]) -> dict:
        # negatives and further answers as (row, language, text); an empty slot has row None
        queries = self._texts("queries", [(row, row.query_language) for row in rows])
        positives = self._texts("positives", [(row, row.passage_language) for row in rows])
        extra = iter(self._texts("positives", [(row, lang) for row in rows for lang in row.extra_passage_languages]))
        negatives, answers = [], []
        for row in rows:
            negatives += [(row, *negative) for negative in self._hard_negatives(row)]
            answers += [(row, language, next(extra)) for language in row.extra_passage_languages]
            answers += [(None, "", "")] * (self.answers_per_row - len(row.passage_languages))  # empty slots
        passages = positives + [text for *_, text in negatives] + [text for *_, text in answers]
        batch = {
            "query": self.encoder.tokenize(queries, "query"),
            "passage": self.encoder.tokenize(passages, "passage"),
            "passage_keys": torch.tensor([passage_key(text) for text in passages], dtype=torch.long),
            "monolingual": all(row.in_xx_batch for row in rows),  # decided by the sampler
        }
        if self.with_passage_ids:
            batch["passage_ids"] = torch.tensor(self._passage_ids(rows, negatives, answers), dtype=torch.long)
        return batch

    def _texts(self, kind: str, wanted: list[tuple[BatchRow, str]]) -> list[str]:
        """The queries or positives of (row, language) pairs, fetched in one read per corpus."""
        out = [""] * len(wanted)
        for corpus_index in {row.corpus_index for row, _ in wanted}:
            corpus = self.corpora[corpus_index]
            positions = [k for k, (row, _) in enumerate(wanted) if row.corpus_index == corpus_index]
            store_rows = [corpus.row(wanted[k][0].example_index, wanted[k][1]) for k in positions]
            for position, text in zip(positions, getattr(corpus, kind)(store_rows)):
                out[position] = text
        return out

    def _parallel_id(self, row: BatchRow) -> int:
        return parallel_id_key(row.corpus_index, self.corpora[row.corpus_index].example_id(row.example_index))

    def _passage_ids(self, rows: list[BatchRow], negatives: list[tuple], answers: list[tuple]) -> list[int]:
        ids = [self._parallel_id(row) for row in rows]
        ids += [self._answer_id(row.corpus_index, language, text) for row, language, text in negatives]
        for row, *_ in answers:
            ids.append(PADDING_PASSAGE if row is None else self._parallel_id(row))
        return ids

    def _answer_id(self, corpus_index: int, language: str, text: str) -> int:
        """`parallel_id_key` of the (first) example whose answer in `language` is `text`, else NO_PARALLEL_ID.

        Built per language on first use from every positive of that language: a pass over the corpus, paid by the
        multi-positive loss only (`with_passage_ids`)."""
        key = (corpus_index, language)
        if key not in self._answer_ids:
            corpus = self.corpora[corpus_index]
            rows = self._rows_in(corpus_index, language)
            example_ids = corpus.example_ids(corpus.ids_of_rows(rows))
            answer_ids: dict[str, int] = {}
            for positive, example_id in zip(corpus.positives(rows), example_ids):
                answer_ids.setdefault(positive, parallel_id_key(corpus_index, example_id))
            self._answer_ids[key] = answer_ids
        return self._answer_ids[key].get(text, NO_PARALLEL_ID)

    def _hard_negatives(self, row: BatchRow) -> list[tuple[str, str]]:
        """`num_hard_negatives` (language, text) pairs: the mined ones of the row's query when mining is on, else the
        example's own negatives; random same-language passages when there are none."""
        if not self.num_hard_negatives:
            return []
        corpus = self.corpora[row.corpus_index]
        rng = np.random.default_rng(row.draw)
        mined = self.mined_negatives.get(self._query_of(row), ()) if self.mined_negatives is not None else ()
        if mined:
            # all of them in mined order (they honour the language shares); a tiny corpus may have left fewer
            repeats = rng.choice(len(mined), size=max(0, self.num_hard_negatives - len(mined)))
            return list(mined[: self.num_hard_negatives]) + [mined[k] for k in repeats]
        passage_row = corpus.row(row.example_index, row.passage_language)
        available = corpus.count_negatives(passage_row)
        if available:
            picks = rng.choice(available, size=self.num_hard_negatives, replace=available < self.num_hard_negatives)
            texts = corpus.negative_texts_of(passage_row, picks)
        else:  # e.g. a one-sentence LAReQA paragraph: the positives of other ids in the language
            language_rows = self._rows_in(row.corpus_index, row.passage_language)
            count = len(language_rows)
            picks = rng.choice(count, size=self.num_hard_negatives, replace=count < self.num_hard_negatives)
            texts = corpus.positives(language_rows[picks])
        return [(row.passage_language, text) for text in texts]

    def _rows_in(self, corpus_index: int, language: str) -> np.ndarray:
        key = (corpus_index, language)
        if key not in self._language_rows:
            self._language_rows[key] = self.corpora[corpus_index].rows_in(language)
        return self._language_rows[key]

    def _query_of(self, row: BatchRow) -> tuple[int, str, str]:
        """The key mined negatives are stored under: (corpus index, example id, query language)."""
        return row.corpus_index, self.corpora[row.corpus_index].example_id(row.example_index), row.query_language


def build_loader(sampler: HybridBatchSampler, collator: PairCollator, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over the sampler's rows. NOT passed to accelerate's `prepare`: the sampler already gives each
    rank its slice of a global batch every rank agreed on, which accelerate's re-sharding would break."""
    # Its own generator: creating an iterator draws a seed, which must not consume the global RNG that dropout uses
    # (a resumed run creates its iterator at a different point than an uninterrupted one).
    return DataLoader(
        _RowIdentity(),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
