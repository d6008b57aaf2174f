"""From the sampler's rows to tensors: text lookup, hard negatives, tokenisation, the DataLoader.

`HybridBatchSampler` decides WHICH (id, query language, passage language) rows form a batch; `PairCollator` turns
them into the tokenised queries and passages a training step consumes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from hbt_accel.data import ParallelCorpus
from hbt_accel.sampling import BatchRow, HybridBatchSampler, is_monolingual_batch


def passage_key(text: str) -> int:
    """A process-independent 64-bit id of a passage text (Python's hash() differs between ranks)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class _RowIdentity(torch.utils.data.Dataset):
    """The sampler yields whole `BatchRow`s; the collator looks their texts up, so the dataset passes them through."""

    def __getitem__(self, row: BatchRow) -> BatchRow:
        return row


class PairCollator:
    """Turns a rank's `BatchRow`s into {query, passage: tokenised (N, L), passage_keys (N_p,), monolingual: bool},
    passages laid out as [positives (B); hard negatives (B*k)]."""

    def __init__(self, corpora: list[ParallelCorpus], encoder, num_hard_negatives: int):
        self.corpora, self.encoder, self.num_hard_negatives = corpora, encoder, num_hard_negatives
        self._passages_by_language: dict[tuple[int, str], list[str]] = {}

    def __call__(self, rows: list[BatchRow]) -> dict:
        queries, positives, negatives = [], [], []
        for row in rows:
            by_language = self.corpora[row.corpus_index].examples[row.example_id]
            queries.append(by_language[row.query_language].query)
            passage = by_language[row.passage_language]
            positives.append(passage.positive)
            negatives += self._hard_negatives(passage.negatives, row)
        passages = positives + negatives
        return {
            "query": self.encoder.tokenize(queries, "query"),
            "passage": self.encoder.tokenize(passages, "passage"),
            "passage_keys": torch.tensor([passage_key(text) for text in passages], dtype=torch.long),
            "monolingual": is_monolingual_batch(rows),
        }

    def _hard_negatives(self, available: tuple[str, ...], row: BatchRow) -> list[str]:
        """`num_hard_negatives` of the example's own negatives; random same-language passages when it has none."""
        if not self.num_hard_negatives:
            return []
        rng = np.random.default_rng(row.draw)
        if not available:  # e.g. a one-sentence LAReQA paragraph
            available = tuple(self._language_passages(row.corpus_index, row.passage_language))
        picks = rng.choice(
            len(available), size=self.num_hard_negatives, replace=len(available) < self.num_hard_negatives
        )
        return [available[k] for k in picks]

    def _language_passages(self, corpus_index: int, language: str) -> list[str]:
        key = (corpus_index, language)
        if key not in self._passages_by_language:
            corpus = self.corpora[corpus_index]
            self._passages_by_language[key] = [
                by_language[language].positive for by_language in corpus.examples.values() if language in by_language
            ]
        return self._passages_by_language[key]


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
