"""The Arrow data layer yields exactly the rows the in-memory one did (recorded before the move)."""

from __future__ import annotations

import json

import pytest

from hbt_accel.data import load_training_corpus
from hbt_accel.data.collate import PairCollator
from hbt_accel.data.sampling import HybridBatchSampler
from tests.record_sampler_sequences import COLLATED, CONFIGURATIONS, FIXTURE, collated, sequences


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[str]]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> dict[str, list[str]]:
    cache = str(tmp_path_factory.mktemp("corpus_cache"))

    def load(source, hard_negatives=False):
        return load_training_corpus(source, hard_negatives=hard_negatives, cache_dir=cache)

    return sequences(load, HybridBatchSampler) | collated(load, HybridBatchSampler, PairCollator)


@pytest.mark.parametrize("name", [*CONFIGURATIONS, *(f"collated_{name}" for name in COLLATED)])
def test_same_batches_as_the_in_memory_layer(recorded, computed, name):
    first_difference = next((k for k, (a, b) in enumerate(zip(recorded[name], computed[name])) if a != b), None)
    assert len(computed[name]) == len(recorded[name])
    assert first_difference is None, f"{name}: batch {first_difference} differs"
