from __future__ import annotations

import collections

import numpy as np
import pytest

from hbt_accel.data import CorpusStore, load_training_corpus, store_from_rows
from hbt_accel.data.sampling import BatchRow, HybridBatchSampler, PairBudget, SamplingError


def is_monolingual_batch(rows: list[BatchRow]) -> bool:
    """The X-X contract, read off the rows: one language on both sides of every row; and the sampler says so."""
    languages = {row.query_language for row in rows} | {lang for row in rows for lang in row.passage_languages}
    assert all(row.in_xx_batch == (len(languages) == 1) for row in rows) or len(rows) < 2
    return len(languages) == 1


@pytest.fixture(scope="module")
def mlqa(tmp_path_factory) -> CorpusStore:
    return load_training_corpus("mlqa-r", cache_dir=str(tmp_path_factory.mktemp("cache")))


def global_batches(corpus, strategy, batch=16, world=1, epochs=1, **kw):
    sampler = HybridBatchSampler(corpus, strategy, batch, world_size=world, **kw)
    return [rows for epoch in range(epochs) for rows in sampler.global_batches(epoch)]


def test_xx_batches_are_one_language_and_cover_languages(mlqa):
    batches = global_batches(mlqa, "xx", epochs=3)
    assert all(is_monolingual_batch(rows) for rows in batches)
    assert {rows[0].query_language for rows in batches} == set(mlqa.languages)


def test_xy_rows_cross_languages(mlqa):
    for rows in global_batches(mlqa, "xy", epochs=2):
        assert all(row.query_language != row.passage_language for row in rows)
        for row in rows:  # both sides exist for that id
            assert {row.query_language, row.passage_language} <= set(mlqa.languages_of(row.example_index))


def test_hybrid_share_is_alpha_and_ids_never_repeat(mlqa):
    sampler = HybridBatchSampler(mlqa, "hybrid", 8, alpha=0.5, world_size=4, seed=3)
    batches = []
    epoch = 0
    while len(batches) < 2000:
        batches += list(sampler.global_batches(epoch))
        epoch += 1
    batches = batches[:2000]
    share = sum(is_monolingual_batch(rows) for rows in batches) / len(batches)
    assert abs(share - 0.5) < 0.03
    for rows in batches:
        assert len(rows) == 32 and len({row.example_index for row in rows}) == 32
        if not is_monolingual_batch(rows):
            assert all(row.query_language != row.passage_language for row in rows)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_extremes(mlqa, alpha):
    batches = global_batches(mlqa, "hybrid", epochs=8, alpha=alpha)
    share = sum(is_monolingual_batch(rows) for rows in batches) / len(batches)
    assert abs(share - alpha) < 0.08 if 0 < alpha < 1 else share == alpha


def test_xx_mixed_and_en_en(mlqa):
    for rows in global_batches(mlqa, "xx_mixed"):
        assert all(row.query_language == row.passage_language for row in rows)
    mixed = [rows for rows in global_batches(mlqa, "xx_mixed") if not is_monolingual_batch(rows)]
    assert mixed, "xx_mixed should mix languages within a batch"
    for rows in global_batches(mlqa, "en_en"):
        assert {row.query_language for row in rows} == {"en"} == {row.passage_language for row in rows}


def test_ranks_take_disjoint_slices_of_the_same_global_batch(mlqa):
    per_rank = [list(HybridBatchSampler(mlqa, "hybrid", 8, rank=r, world_size=2, seed=5)) for r in (0, 1)]
    reference = global_batches(mlqa, "hybrid", batch=8, world=2, seed=5)
    assert len(per_rank[0]) == len(per_rank[1]) == len(reference)
    for rank0, rank1, whole in zip(*per_rank, reference):
        assert rank0 + rank1 == whole


def test_epoch_covers_ids_and_changes_with_set_epoch(mlqa):
    sampler = HybridBatchSampler(mlqa, "xx_mixed", 16)
    first = list(sampler)
    seen = {row.example_index for rows in first for row in rows}
    assert len(seen) >= 0.95 * (len(first) * 16)  # an epoch walks a permutation: almost no repeats
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_resume_mid_epoch_continues_the_same_sequence(mlqa):
    straight = HybridBatchSampler(mlqa, "hybrid", 16, seed=11)
    full = list(straight) + (straight.set_epoch(1) or list(straight))
    resumed = HybridBatchSampler(mlqa, "hybrid", 16, seed=11)
    resumed.set_position(30)
    tail = list(resumed)
    resumed.set_epoch(resumed.epoch + 1)
    tail += list(resumed)
    assert tail == full[30:]
    next_epoch = HybridBatchSampler(mlqa, "hybrid", 16, seed=11)
    next_epoch.set_position(straight.batches_per_epoch + 4)
    assert list(next_epoch) == full[straight.batches_per_epoch + 4 :]


def test_language_rebalancing_reduces_english_in_xy(mlqa):
    counts = collections.Counter()
    for rows in global_batches(mlqa, "xy", epochs=10):
        for row in rows:
            counts[row.query_language] += 1
            counts[row.passage_language] += 1
    # English is in every MLQA-R id; uniform per-id draws would put it in ~60% of rows, rebalanced far less.
    rows = sum(counts.values()) / 2
    assert counts["en"] / rows < 0.45


def test_temperature_and_weights_shift_xx_languages(mlqa):
    weighted = global_batches(mlqa, "xx", epochs=6, language_weights={"de": 10.0, "en": 1.0})
    languages = collections.Counter(rows[0].query_language for rows in weighted)
    assert set(languages) <= {"de", "en"} and languages["de"] > 4 * languages["en"]


@pytest.fixture
def tiny(tmp_path):
    """tiny(multilingual, ids=8): ids 0..n-1 in English, and in German too when multilingual."""
    made = []

    def make(multilingual: bool, ids: int = 8, prefix: str = "") -> CorpusStore:
        rows = [{"id": f"{prefix}{i}", "lang": "en", "query": f"q{i}", "positive": f"p{i}"} for i in range(ids)]
        if multilingual:
            rows += [{"id": f"{prefix}{i}", "lang": "de", "query": f"f{i}", "positive": f"d{i}"} for i in range(ids)]
        made.append(tmp_path / f"tiny{len(made)}")
        return store_from_rows(rows, made[-1], name="tiny")

    return make


def test_clear_errors(tiny):
    with pytest.raises(SamplingError, match="per_device_train_batch_size: global batch 16 exceeds the 8 distinct"):
        HybridBatchSampler(tiny(True), "hybrid", 8, world_size=2)
    with pytest.raises(SamplingError, match="X-Y batches of 4 need 4\\+ ids present in 2\\+ languages"):
        HybridBatchSampler(tiny(False), "xy", 4)
    HybridBatchSampler(tiny(False), "xx", 4)  # monolingual data is fine for X-X
    with pytest.raises(SamplingError, match="alpha"):
        HybridBatchSampler(tiny(True), "hybrid", 4, alpha=-0.1)
    with pytest.raises(SamplingError, match="sampling: got 'mixed'"):
        HybridBatchSampler(tiny(True), "mixed", 4)


def test_several_corpora_mix_by_weight(mlqa, tiny):
    other = tiny(True)
    sampler = HybridBatchSampler([mlqa, other], "xx", 4, corpus_weights=[1.0, 1.0], seed=1)
    batches = [rows for epoch in range(2) for rows in sampler.global_batches(epoch)]
    share = sum(rows[0].corpus_index == 1 for rows in batches) / len(batches)
    assert 0.4 < share < 0.6


def test_monolingual_corpus_feeds_xx_batches_beside_a_parallel_one(mlqa, tiny):
    """hybrid over MLQA-R (parallel) + a monolingual corpus: every batch of the monolingual corpus is X-X, the
    parallel corpus keeps alpha, no id repeats within a batch, and xx_share states the resulting mix."""
    mono = tiny(False, ids=400, prefix="mono")
    sampler = HybridBatchSampler([mlqa, mono], "hybrid", 8, world_size=2, alpha=0.25, corpus_weights=[3.0, 1.0])
    assert sampler.xx_share == pytest.approx(0.25 + 0.75 * 0.25)
    batches = [rows for epoch in range(6) for rows in sampler.global_batches(epoch)]
    by_corpus = collections.defaultdict(list)
    for rows in batches:
        assert len({row.example_index for row in rows}) == 16
        by_corpus[rows[0].corpus_index].append(is_monolingual_batch(rows))
    assert all(by_corpus[1]) and len(by_corpus[1]) > 30
    assert abs(sum(by_corpus[0]) / len(by_corpus[0]) - 0.25) < 0.08
    with pytest.raises(SamplingError, match="X-Y batches of 16 need 16\\+ ids present in 2\\+ languages; tiny has 0"):
        HybridBatchSampler([mono], "hybrid", 8, world_size=2)  # hybrid with no parallel corpus at all


# ---------------------------------------------------------------- multilingual (multi-positive) rows
@pytest.mark.parametrize("answers", [0, 2, 3])
def test_multilingual_rows_bring_the_answer_in_several_languages_of_their_id(mlqa, answers):
    sampler = HybridBatchSampler(mlqa, "multilingual", 8, world_size=2, seed=4, answers_per_query=answers)
    assert sampler.answers_per_row == (answers or 4)  # MLQA-R ids hold 2-4 languages
    batches = [rows for epoch in range(2) for rows in sampler.global_batches(epoch)]
    assert len(batches) == 2 * (1148 // 16)
    for rows in batches:
        assert len(rows) == 16 and len({row.example_index for row in rows}) == 16  # one row per id, extras ride along
        for row in rows:
            id_languages = set(mlqa.languages_of(row.example_index))
            assert row.passage_language == row.query_language  # the own-language answer is always a positive
            assert len(set(row.passage_languages)) == len(row.passage_languages)  # distinct languages
            assert set(row.passage_languages) <= id_languages
            assert len(row.passage_languages) == min(len(id_languages), sampler.answers_per_row)
        assert not is_monolingual_batch(rows)


def test_multilingual_ranks_agree_and_resume(mlqa):
    per_rank = [list(HybridBatchSampler(mlqa, "multilingual", 4, rank=r, world_size=2, seed=7)) for r in (0, 1)]
    whole = global_batches(mlqa, "multilingual", batch=4, world=2, seed=7)
    assert [a + b for a, b in zip(*per_rank)] == whole
    resumed = HybridBatchSampler(mlqa, "multilingual", 4, rank=1, world_size=2, seed=7)
    resumed.set_position(9)
    assert list(resumed) == per_rank[1][9:]


def test_multilingual_extra_languages_are_spread(mlqa):
    """With 2 answers per row the second language is drawn (English is in every id but must not dominate)."""
    counts = collections.Counter(
        row.extra_passage_languages[0]
        for rows in global_batches(mlqa, "multilingual", epochs=4, answers_per_query=2)
        for row in rows
    )
    assert set(counts) == set(mlqa.languages)
    assert counts["en"] / sum(counts.values()) < 0.4


def test_multilingual_needs_parallel_ids_and_a_sensible_width(tiny):
    with pytest.raises(SamplingError, match="sampling: multilingual batches of 4 need 4\\+ ids present in 2\\+"):
        HybridBatchSampler(tiny(False), "multilingual", 4)
    with pytest.raises(SamplingError, match="answers_per_query: got 1"):
        HybridBatchSampler(tiny(True), "multilingual", 4, answers_per_query=1)
    sampler = HybridBatchSampler(tiny(True), "multilingual", 4, answers_per_query=5)
    assert sampler.answers_per_row == 2  # capped at the most languages an id has


def test_blockwise_id_scan_equals_the_whole_scan(mlqa, monkeypatch):
    """The sampler and the summary read rows in id blocks (small temporaries at any size): tiny blocks must give
    the same batches and counts as one block."""
    whole = global_batches(mlqa, "hybrid", epochs=2, languages=["en", "de", "ar", "zh"])
    from rich.console import Console

    def render(store):
        console = Console(width=120, record=True)
        console.print(store.summary_table())
        return console.export_text()

    whole_table = render(mlqa)
    scan = CorpusStore.id_blocks
    monkeypatch.setattr(CorpusStore, "id_blocks", lambda self, max_rows=0: scan(self, 37))
    assert len(list(mlqa.id_blocks())) > 100
    assert global_batches(mlqa, "hybrid", epochs=2, languages=["en", "de", "ar", "zh"]) == whole
    assert render(mlqa) == whole_table


def test_id_fraction_trains_on_nested_subsets_whatever_the_seed(mlqa):
    def ids_drawn(fraction, seed):
        sampler = HybridBatchSampler(mlqa, "hybrid", 16, id_fraction=fraction, seed=seed)
        return {row.example_index for epoch in range(4) for rows in sampler.global_batches(epoch) for row in rows}

    small, large = ids_drawn(0.1, 1), ids_drawn(0.5, 2)
    assert small <= large  # nested: the 10% ids are among the 50% ones
    assert small == ids_drawn(0.1, 7)  # the subset does not move with the seed
    assert abs(len(small) - round(0.1 * mlqa.num_ids)) <= 1  # 4 epochs visit every id of the subset
    assert len(ids_drawn(1.0, 1)) > 0.9 * mlqa.num_ids


@pytest.mark.parametrize(
    "languages", [["en", "de"], ["en", "de", "es", "ar"], ["en", "de", "es", "ar", "hi", "vi", "zh"]]
)
def test_pair_budget_matches_the_data_whatever_the_language_count(mlqa, languages):
    budget = PairBudget(pairs=1148, xy_ids=500)
    sampler = HybridBatchSampler(mlqa, "hybrid", 16, languages=languages, pair_budget=budget, seed=3)
    assert sampler.training_set(0) == {"ids": 648, "pairs": 1148, "xy_ids": 500}
    full = HybridBatchSampler(mlqa, "hybrid", 16, languages=languages)._ids[0].language_mask
    kept = sampler._ids[0].language_mask
    assert np.array_equal(kept & full, kept)  # every kept pair is one the data has
    kept_languages = [bin(int(mask)).count("1") for mask in kept[kept > 0]]
    assert sorted(set(kept_languages)) == [1, 2] and kept_languages.count(2) == 500
    pairs_per_language = sampler._ids[0].id_count
    if len(languages) == 2:  # every id with German has English: German gets all it has, English the rest
        assert pairs_per_language == {"de": 512, "en": 636}
    else:  # each pair went to the least-used language: the pairs spread evenly
        assert max(pairs_per_language.values()) - min(pairs_per_language.values()) <= 1
    other_seed = HybridBatchSampler(mlqa, "xy", 16, languages=languages, pair_budget=budget, seed=9)
    assert np.array_equal(other_seed._ids[0].language_mask, kept)  # the training set does not move with the seed
    drawn = {
        (row.example_index, lang)
        for epoch in range(3)
        for rows in sampler.global_batches(epoch)
        for row in rows
        for lang in (row.query_language, row.passage_language)
    }
    languages_sorted = sampler._ids[0].languages
    assert all(int(kept[index]) >> languages_sorted.index(lang) & 1 for index, lang in drawn)


def test_pair_budget_says_what_the_data_cannot_give(mlqa):
    with pytest.raises(SamplingError, match="train_pairs/train_xy_ids: mlqa-r gives 0 ids in two training languages"):
        HybridBatchSampler(mlqa, "xx", 16, languages=["en"], pair_budget=PairBudget(1148, 10))
    with pytest.raises(SamplingError, match="gives 512 ids in two training languages .* expected 600"):
        HybridBatchSampler(mlqa, "xy", 16, languages=["en", "de"], pair_budget=PairBudget(1200, 600))
    only_english = HybridBatchSampler(mlqa, "xx", 16, languages=["en"], pair_budget=PairBudget(1148))
    assert only_english.training_set(0) == {"ids": 1148, "pairs": 1148, "xy_ids": 0}
    with pytest.raises(SamplingError, match="got 0 pairs and 0 two-language ids"):
        PairBudget(0)
    with pytest.raises(SamplingError, match="got 3 pairs and 2 two-language ids"):
        PairBudget(3, 2)
    with pytest.raises(SamplingError, match=r"has 0 \(train_xy_ids keeps 0\)"):
        HybridBatchSampler(mlqa, "xy", 16, languages=["en", "de"], pair_budget=PairBudget(100))


def test_pair_budget_applies_after_the_id_fraction(mlqa):
    sampler = HybridBatchSampler(mlqa, "hybrid", 16, id_fraction=0.5, pair_budget=PairBudget(400, 150))
    subset = HybridBatchSampler(mlqa, "hybrid", 16, id_fraction=0.5)._ids[0].language_mask
    kept = sampler._ids[0].language_mask
    assert sampler.training_set(0) == {"ids": 250, "pairs": 400, "xy_ids": 150}
    assert np.array_equal(kept & subset, kept)  # only pairs of the 50% subset


def test_id_fraction_keeps_every_language_of_an_id(mlqa):
    full = HybridBatchSampler(mlqa, "xy", 16)
    part = HybridBatchSampler(mlqa, "xy", 16, id_fraction=0.25)
    kept = np.flatnonzero(part._ids[0].language_count > 0)
    assert np.array_equal(part._ids[0].language_mask[kept], full._ids[0].language_mask[kept])
    with pytest.raises(SamplingError, match="train_id_fraction: got 0"):
        HybridBatchSampler(mlqa, "xy", 16, id_fraction=0)
