"""Hard-negative mining against its contract: never the query's answer in any language nor its text, the language
shares, the margin, determinism, the file, and every rank of a launch getting the same negatives."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from hbt_accel.data import CorpusStore, load_training_corpus, store_from_rows
from hbt_accel.training.mining import MinedNegatives, MiningSettings, mine_hard_negatives, same_language_count
from tests.conftest import free_port, join_gloo_world


# ---------------------------------------------------------------- hand-set embeddings
def _at_cosine(cosine: float) -> np.ndarray:
    """A unit vector at `cosine` with the query direction e0."""
    return np.array([cosine, math.sqrt(1 - cosine**2), 0.0, 0.0], dtype=np.float32)


class TableEncoder:
    """Hand-set vectors by text (either kind); every other text lies orthogonal to e0, at a text-seeded direction."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, texts, kind="query", batch_size=64, bf16=False) -> np.ndarray:
        rows = []
        for text in texts:
            if text not in self.table:
                seed = sum(map(ord, text))
                direction = np.random.default_rng(seed).standard_normal(3).astype(np.float32)
                self.table[text] = np.concatenate([[0.0], direction / np.linalg.norm(direction)]).astype(np.float32)
            rows.append(self.table[text])
        return np.stack(rows)


SHARED = "Paris is the capital."  # id a's English answer, also id c's: one sentence answering two questions
HAND_VECTORS = {
    "q a en": _at_cosine(1.0),
    SHARED: _at_cosine(0.90),  # the English answer: the margin reference in en (and es, which id a lacks)
    "A auf Deutsch.": _at_cosine(0.80),  # a's German answer: the reference in de; a translation, never a negative
    "C auf Deutsch.": _at_cosine(0.85),  # c's German answer: a translation of the shared sentence, never a negative
    "near duplicate en": _at_cosine(0.88),  # above 0.95 x 0.90 = 0.855: dropped by the margin
    "en one": _at_cosine(0.85),
    "en two": _at_cosine(0.50),
    "en three": _at_cosine(0.30),
    "de one": _at_cosine(0.78),  # above 0.95 x 0.80 = 0.76 (the German answer is the reference): dropped
    "de two": _at_cosine(0.75),
    "de three": _at_cosine(0.40),
    "es one": _at_cosine(0.86),  # id a has no Spanish answer: reference 0.90 (en), dropped
    "es two": _at_cosine(0.70),
    "es three": _at_cosine(0.20),
}


def _row(example_id: str, lang: str, query: str, positive: str, negatives=()) -> dict:
    return {"id": example_id, "lang": lang, "query": query, "positive": positive, "negatives": list(negatives)}


def hand_corpus(folder) -> CorpusStore:
    en_negatives = ("near duplicate en", "en one", "en two", "en three")
    rows = [
        _row("a", "en", "q a en", SHARED, en_negatives),
        # the German paragraph also holds a sentence with exactly the text of a's English answer (a name, a number)
        _row("a", "de", "q a de", "A auf Deutsch.", ("de one", "de two", "de three", SHARED)),
        _row("c", "en", "q c en", SHARED),
        _row("c", "de", "q c de", "C auf Deutsch."),
        _row("b", "en", "q b en", "B in English."),
        _row("b", "es", "q b es", "B en español.", ("es one", "es two", "es three")),
    ]
    return store_from_rows(rows, folder, name="hand")


def _mine_hand(folder, **settings) -> MinedNegatives:
    settings = MiningSettings(**{"negatives_per_query": 4, **settings})
    return mine_hard_negatives(TableEncoder(dict(HAND_VECTORS)), [hand_corpus(folder)], [["de", "en", "es"]], settings)


def _texts(mined: MinedNegatives, key) -> list[tuple[str, str]]:
    return mined.for_collator()[key]


def test_hand_set_embeddings_pick_exactly_the_expected_negatives(tmp_path):
    mined = _mine_hand(tmp_path / "corpus", same_language_share=0.5, margin=0.95)
    picked = _texts(mined, (0, "a", "en"))
    # 2 in English (best survivors), then one each from German and Spanish: every other candidate above them is a
    # translation of the answer, a copy of its text, or above the margin
    assert picked[:2] == [("en", "en one"), ("en", "en two")]
    assert sorted(picked[2:]) == [("de", "de two"), ("es", "es two")]
    scores = [m.score for m in mined.picks[0, "a", "en"]]
    np.testing.assert_allclose(sorted(scores, reverse=True), [0.85, 0.75, 0.70, 0.50], atol=1e-6)


def test_without_the_margin_the_closest_non_answers_win(tmp_path):
    picked = _texts(_mine_hand(tmp_path / "corpus", same_language_share=0.5, margin=0.0), (0, "a", "en"))
    assert picked[:2] == [("en", "near duplicate en"), ("en", "en one")]
    assert sorted(picked[2:]) == [("de", "de one"), ("es", "es one")]  # still never a translation or the same text


def test_shares_spread_over_the_other_languages(tmp_path):
    picked = _texts(_mine_hand(tmp_path / "corpus", same_language_share=0.25, margin=0.95), (0, "a", "en"))
    languages = [language for language, _ in picked]
    assert languages.count("en") == 1 and {languages.count("de"), languages.count("es")} == {1, 2}
    only_own = _texts(_mine_hand(tmp_path / "second_corpus", same_language_share=1.0, margin=0.95), (0, "a", "en"))
    assert only_own == [("en", "en one"), ("en", "en two"), ("en", "en three"), ("en", "B in English.")]


def test_same_language_count_rounds_half_up():
    assert [same_language_count(k, 0.5) for k in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert same_language_count(8, 0.0) == 0 and same_language_count(8, 1.0) == 8


# ---------------------------------------------------------------- the contract on real MLQA-R text, tiny model
# No margin here: the tiny random model scores most candidates above a query's answer, so a margin would leave a few
# queries without survivors in a language (the margin has its own test below).
K, SHARE = 6, 0.5


@pytest.fixture(scope="module")
def slice_corpus(mlqa_slice, tmp_path_factory) -> CorpusStore:
    return load_training_corpus(str(mlqa_slice), cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def mined_slice(slice_corpus, tiny_model_dir, xlmr_tokenizer):
    from tests.conftest import load_tiny_encoder

    encoder = load_tiny_encoder(tiny_model_dir, xlmr_tokenizer)
    settings = MiningSettings(K, SHARE, margin=0.0, seed=3)
    return encoder, mine_hard_negatives(encoder, [slice_corpus], [["de", "en", "es"]], settings, step=0)


def test_mined_negatives_are_never_an_answer_of_the_query_id_nor_its_text(slice_corpus, mined_slice):
    _, mined = mined_slice
    negatives = mined.for_collator()
    assert len(negatives) == slice_corpus.num_pairs == 64 * 3
    for (_, example_id, _), picked in negatives.items():
        answers = set(slice_corpus.answers(slice_corpus.index_of(example_id)).values())
        assert not answers & {text for _, text in picked}
        assert len({text for _, text in picked}) == len(picked)  # no text twice


def test_mined_negatives_honour_the_language_shares(slice_corpus, mined_slice):
    _, mined = mined_slice
    assert mined.margin_warning() is None  # margin 0: no filter, nothing to warn about
    for (_, _, language), picked in mined.for_collator().items():
        languages = [lang for lang, _ in picked]
        assert len(picked) == K
        assert languages.count(language) == same_language_count(K, SHARE) == 3
        others = [lang for lang in languages if lang != language]
        assert len(set(others)) == 2  # 3 others over the 2 other languages: never all in one
    assert mined.stats["same_language_share"] == pytest.approx(0.5)


def test_mined_negatives_score_below_the_margin_of_the_answer(slice_corpus, mined_slice):
    encoder, _ = mined_slice
    margin = 1.0  # nothing scoring above the answer itself: with the tiny random model that is most candidates
    mined = mine_hard_negatives(encoder, [slice_corpus], [["de", "en", "es"]], MiningSettings(K, SHARE, margin))
    assert mined.stats["margin_dropped"] > 0.5 and mined.stats["queries_short"] == 0
    dropped = mined.stats["margin_dropped"]
    assert (mined.margin_warning() is not None) == (dropped > 0.9)  # most of the list dropped: the run says so
    assert mined.margin_warning(worst_share=dropped - 0.01).startswith(
        f"warning: mining_margin 1.0 dropped {dropped:.1%}"
    )
    assert mined.margin_warning(worst_share=dropped) is None
    for (_, example_id, language), picked in list(mined.picks.items())[:40]:
        index = slice_corpus.index_of(example_id)
        by_language = slice_corpus.answers(index)  # language -> answer text
        query = encoder.encode(slice_corpus.queries([slice_corpus.row(index, language)]), "query")[0]
        for passage in picked:
            # the reference: the answer in the candidate's language, or in the query's when the id lacks that one
            answer = by_language[passage.language if passage.language in by_language else language]
            text = mined.candidates[0][passage.language][passage.index]
            candidate, answer_vector = encoder.encode([text, answer], "passage")
            assert passage.score == pytest.approx(float(query @ candidate), abs=1e-5)
            assert passage.score <= margin * float(query @ answer_vector) + 1e-6


def test_mining_is_deterministic_given_the_seed_and_the_file_round_trips(slice_corpus, mined_slice, tmp_path):
    encoder, mined = mined_slice
    again = mine_hard_negatives(encoder, [slice_corpus], [["de", "en", "es"]], mined.settings, step=0)
    assert again.for_collator() == mined.for_collator()
    other_seed = MiningSettings(K, SHARE, margin=0.0, seed=4)
    reseeded = mine_hard_negatives(encoder, [slice_corpus], [["de", "en", "es"]], other_seed, step=0).for_collator()
    # the seed only orders the other languages' round-robin: the same-language picks stay, the others shift
    assert reseeded != mined.for_collator()
    assert all(reseeded[key][:3] == picked[:3] for key, picked in mined.for_collator().items())
    path = mined.save(tmp_path / "mined_negatives" / "step-0.json")
    loaded = MinedNegatives.load(path)
    assert loaded.for_collator() == mined.for_collator() and loaded.step == 0 and loaded.settings == mined.settings


# ---------------------------------------------------------------- 2 gloo processes: the same negatives on every rank
WORLD = 2


def _mining_worker(rank: int, port: int, data: str, out_dir: str) -> None:
    join_gloo_world(rank, WORLD, port)
    import json

    from hbt_accel.distributed import make_accelerator
    from tests.distributed_eval_script import HashEncoder

    accelerator = make_accelerator()
    encoder = HashEncoder()
    corpus = load_training_corpus(data, cache_dir=os.path.join(out_dir, "cache"))  # both ranks: a race it survives
    mined = mine_hard_negatives(encoder, [corpus], [["de", "en", "es"]], MiningSettings(4, 0.5, 0.95), 0, accelerator)
    result = {
        "encoded": encoder.calls,
        "negatives": {"\t".join(map(str, k)): v for k, v in mined.for_collator().items()},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    accelerator.end_training()


@pytest.mark.distributed
def test_two_processes_share_the_encoding_and_get_the_negatives_of_one(mlqa_slice, tmp_path):
    import json

    from tests.distributed_eval_script import HashEncoder

    mp.spawn(_mining_worker, args=(free_port(), str(mlqa_slice), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    encoder = HashEncoder()
    corpus = load_training_corpus(str(mlqa_slice), cache_dir=str(tmp_path / "cache"))
    single = mine_hard_negatives(encoder, [corpus], [["de", "en", "es"]], MiningSettings(4, 0.5, 0.95))
    expected = {"\t".join(map(str, k)): [list(pair) for pair in v] for k, v in single.for_collator().items()}
    assert ranks[0]["negatives"] == ranks[1]["negatives"] == expected
    # each rank encoded about half of the texts (queries and candidates), not all of them
    assert all(abs(rank["encoded"] - encoder.calls / 2) <= 2 for rank in ranks)
