"""Record (or check) the sampler's row sequence on MLQA-R: per configuration, one short digest per global batch.

The committed tests/fixtures/sampler_sequences.json was recorded with the in-memory data layer, BEFORE the corpus
moved to the Arrow store, so `test_sampler_sequences.py` proves the move kept every row of every batch.
Re-record only for a deliberate change of the sequence: `python -m tests.record_sampler_sequences`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "sampler_sequences.json"
EPOCHS = 4  # MLQA-R has 71 global batches of 16 per epoch: 284 batches cross three epoch boundaries

# name -> (train_data entries, sampler keyword arguments)
CONFIGURATIONS = {
    "xx": (["mlqa-r"], {"strategy": "xx", "per_device_batch_size": 16}),
    "xy": (["mlqa-r"], {"strategy": "xy", "per_device_batch_size": 16}),
    "hybrid": (["mlqa-r"], {"strategy": "hybrid", "per_device_batch_size": 16, "alpha": 0.5}),
    "xx_mixed": (["mlqa-r"], {"strategy": "xx_mixed", "per_device_batch_size": 16}),
    "en_en": (["mlqa-r"], {"strategy": "en_en", "per_device_batch_size": 16}),
    "multilingual": (["mlqa-r"], {"strategy": "multilingual", "per_device_batch_size": 16, "answers_per_query": 3}),
    "hybrid_restricted_tempered_2ranks": (
        ["mlqa-r"],
        {
            "strategy": "hybrid",
            "per_device_batch_size": 8,
            "world_size": 2,
            "alpha": 0.3,
            "seed": 7,
            "languages": ["en", "de", "ar"],
            "language_temperature": 0.5,
        },
    ),
    "hybrid_two_corpora": (
        ["mlqa-r:train", "mlqa-r:validation"],
        {"strategy": "hybrid", "per_device_batch_size": 16, "corpus_weights": [1.0, 1.0]},
    ),
}


def row_text(corpora, row) -> str:
    example_id = getattr(row, "example_id", None)
    if example_id is None:  # the Arrow store: rows carry an integer id index
        example_id = corpora[row.corpus_index].example_id(row.example_index)
    extra = ",".join(row.extra_passage_languages)
    return f"{example_id}|{row.query_language}|{row.passage_language}|{row.corpus_index}|{row.draw}|{extra}"


def batch_digest(corpora, rows) -> str:
    text = "\n".join(row_text(corpora, row) for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TextsOnly:
    """Stands in for the encoder: the collator's "tokenised" output is then the texts themselves."""

    def tokenize(self, texts, kind):
        return list(texts)


# name -> (sampling configuration, collator keyword arguments): the texts of the first COLLATED_BATCHES batches
COLLATED = {
    "hybrid": {"num_hard_negatives": 3},
    "multilingual": {"num_hard_negatives": 2, "answers_per_row": 3, "with_passage_ids": True},
}
COLLATED_BATCHES = 60


def collated_digest(batch) -> str:
    parts = [batch["query"], batch["passage"], batch["passage_keys"].tolist(), batch.get("passage_ids", [])]
    text = json.dumps([part if isinstance(part, list) else part.tolist() for part in parts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sequences(load_corpus, make_sampler) -> dict[str, list[str]]:
    """name -> digests of every global batch of EPOCHS epochs."""
    out = {}
    for name, (sources, kwargs) in CONFIGURATIONS.items():
        corpora = [load_corpus(source) for source in sources]
        kwargs = dict(kwargs)
        strategy, batch = kwargs.pop("strategy"), kwargs.pop("per_device_batch_size")
        sampler = make_sampler(corpora, strategy, batch, **kwargs)
        out[name] = [batch_digest(corpora, rows) for epoch in range(EPOCHS) for rows in sampler.global_batches(epoch)]
    return out


def collated(load_corpus, make_sampler, make_collator) -> dict[str, list[str]]:
    """name -> digests of the collated texts of the first COLLATED_BATCHES global batches (hard negatives on)."""
    out = {}
    for name, collator_kwargs in COLLATED.items():
        sources, kwargs = CONFIGURATIONS[name]
        corpora = [load_corpus(source, hard_negatives=True) for source in sources]
        kwargs = dict(kwargs)
        strategy, batch = kwargs.pop("strategy"), kwargs.pop("per_device_batch_size")
        sampler = make_sampler(corpora, strategy, batch, **kwargs)
        collator = make_collator(corpora, TextsOnly(), **collator_kwargs)
        batches = sampler.global_batches(0)
        out[f"collated_{name}"] = [collated_digest(collator(next(batches))) for _ in range(COLLATED_BATCHES)]
    return out


if __name__ == "__main__":
    from hbt_accel.data import load_training_corpus
    from hbt_accel.data.collate import PairCollator
    from hbt_accel.data.sampling import HybridBatchSampler

    recorded = sequences(load_training_corpus, HybridBatchSampler)
    recorded |= collated(load_training_corpus, HybridBatchSampler, PairCollator)
    FIXTURE.write_text(json.dumps(recorded, indent=0) + "\n")
    print({name: len(digests) for name, digests in recorded.items()})
