"""PairCollator's layout and passage ids; the default path (no ids) unchanged bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hbt_accel.data import CorpusStore, store_from_rows
from hbt_accel.data.collate import (
    NO_PARALLEL_ID,
    PADDING_PASSAGE,
    PairCollator,
    parallel_id_key,
    passage_key,
)
from hbt_accel.data.sampling import BatchRow
from hbt_accel.training.losses import InfoNCELoss

TEXTS = [
    ("where is the eiffel tower", "The Eiffel Tower is in Paris.", "La tour Eiffel est à Paris."),
    ("wer schrieb faust", "Goethe schrieb Faust.", "Goethe wrote Faust."),
    ("how many legs does a spider have", "Spiders have eight legs.", "Las arañas tienen ocho patas."),
]


@pytest.fixture
def toy_corpus(tmp_path) -> CorpusStore:
    """Ids 0-2 (indices 0-2) in en (with 2 paragraph negatives each) and de; id 2 also in es."""
    rows = []
    for i, (query, english, other) in enumerate(TEXTS):
        negatives = [f"A sentence near answer {i}.", "Madrid es la capital de España."]
        rows.append({"id": str(i), "lang": "en", "query": query, "positive": english, "negatives": negatives})
        rows.append({"id": str(i), "lang": "de", "query": f"de: {query}", "positive": other})
    rows.append(
        {
            "id": "2",
            "lang": "es",
            "query": "¿cuántas patas tiene una araña?",
            "positive": "Una araña tiene ocho patas.",
        }
    )
    return store_from_rows(rows, tmp_path, name="toy")


class _Backward:
    """The one accelerator method a training step calls, for a plain module."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


DEFAULT_ROWS = [BatchRow(0, "en", "de", 0, 5), BatchRow(1, "de", "en", 0, 6), BatchRow(2, "en", "en", 0, 7)]
# InfoNCELoss(0.02, symmetric) on this batch and the tiny BERT, computed with the code before issue 14 (commit c06ba29)
LOSS_BEFORE_ISSUE_14 = 1.673364520072937


def test_default_path_is_unchanged_bit_for_bit(toy_corpus, tiny_encoder):
    batch = PairCollator([toy_corpus], tiny_encoder, 2)(DEFAULT_ROWS)
    assert set(batch) == {"query", "passage", "passage_keys", "monolingual"}  # no passage_ids: the plain loss
    loss = InfoNCELoss(temperature=0.02, symmetric=True).training_step(tiny_encoder, batch, _Backward())
    grads = _grads(tiny_encoder)
    tiny_encoder.zero_grad(set_to_none=True)

    # the pre-issue-14 loss, operation for operation
    q = tiny_encoder(batch["query"]["input_ids"], batch["query"]["attention_mask"])
    p = tiny_encoder(batch["passage"]["input_ids"], batch["passage"]["attention_mask"])
    keys, rows = batch["passage_keys"], torch.arange(3)

    def masked_ce(scores, row_keys, column_keys):
        same = column_keys[None, :] == row_keys[:, None]
        same[rows, rows] = False
        return F.cross_entropy(scores.masked_fill(same, float("-inf")), rows)

    reference = (masked_ce(q @ p.T / 0.02, keys[:3], keys) + masked_ce(p[:3] @ q.T / 0.02, keys[:3], keys[:3])) / 2
    reference.backward()
    assert torch.equal(loss, reference.detach())
    # recorded on an AMD EPYC; the last bits of a float sum differ between CPU kinds (AMX on Sapphire Rapids: 5e-7)
    assert loss.item() == pytest.approx(LOSS_BEFORE_ISSUE_14, rel=1e-5)
    reference_grads = _grads(tiny_encoder)
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)


def test_multilingual_rows_bring_further_answers_and_empty_slots(toy_corpus, tiny_encoder):
    rows = [BatchRow(0, "de", "de", 0, 1, ("en",)), BatchRow(2, "en", "en", 0, 2, ("de", "es"))]
    collator = PairCollator([toy_corpus], tiny_encoder, 1, answers_per_row=3, with_passage_ids=True)
    batch = collator(rows)
    texts = tiny_encoder.tokenizer.batch_decode(batch["passage"]["input_ids"], skip_special_tokens=True)
    texts = [text.removeprefix("passage:").strip() for text in texts]
    # [answers (2); negatives (2*1); further answers (2*2)]: row 0 has one further language, then an empty slot
    assert texts[:2] == ["La tour Eiffel est à Paris.", "Spiders have eight legs."]
    assert texts[2] in {"La tour Eiffel est à Paris.", "Goethe wrote Faust.", "Las arañas tienen ocho patas."}
    assert texts[3] in {"A sentence near answer 2.", "Madrid es la capital de España."}  # row 2's en paragraph
    assert texts[4:] == [
        "The Eiffel Tower is in Paris.",
        "",
        "Las arañas tienen ocho patas.",
        "Una araña tiene ocho patas.",
    ]
    id0, id2 = parallel_id_key(0, "0"), parallel_id_key(0, "2")
    ids = batch["passage_ids"].tolist()
    assert ids[:2] == [id0, id2] and ids[4:] == [id0, PADDING_PASSAGE, id2, id2]
    assert batch["passage_keys"][4].item() == passage_key("The Eiffel Tower is in Paris.")
    assert not batch["monolingual"]


def test_mined_negatives_replace_the_example_negatives_and_carry_their_id(toy_corpus, tiny_encoder):
    collator = PairCollator([toy_corpus], tiny_encoder, 2, with_passage_ids=True)
    collator.mined_negatives = {
        (0, "0", "en"): [("de", "Goethe wrote Faust."), ("en", "A sentence near answer 2.")],
        (0, "1", "en"): [("en", "A sentence near answer 0.")],  # fewer than asked: repeated
    }
    batch = collator([BatchRow(0, "en", "en", 0, 3), BatchRow(1, "en", "de", 0, 4)])
    keys = batch["passage_keys"].tolist()
    assert keys[2:4] == [passage_key("Goethe wrote Faust."), passage_key("A sentence near answer 2.")]
    assert keys[4:6] == [passage_key("A sentence near answer 0.")] * 2
    # "Goethe wrote Faust." is id 1's German answer: the loss masks it for row 1 (or makes it a positive)
    assert batch["passage_ids"].tolist()[2:] == [
        parallel_id_key(0, "1"),
        NO_PARALLEL_ID,
        NO_PARALLEL_ID,
        NO_PARALLEL_ID,
    ]


def test_parallel_id_keys_are_non_negative_and_differ_by_corpus():
    keys = {parallel_id_key(c, str(i)) for c in range(3) for i in range(1000)}
    assert len(keys) == 3000 and min(keys) >= 0


@pytest.mark.parametrize("multi_positive", [False, True])
def test_the_training_step_passes_the_passage_ids(toy_corpus, tiny_encoder, multi_positive):
    rows = [BatchRow(0, "de", "de", 0, 1, ("en",)), BatchRow(2, "en", "en", 0, 2, ("de",))]
    batch = PairCollator([toy_corpus], tiny_encoder, 1, answers_per_row=2, with_passage_ids=True)(rows)
    loss_fn = InfoNCELoss(multi_positive=multi_positive, alignment_weight=0.5)
    loss = loss_fn.training_step(tiny_encoder, batch, _Backward())
    q = tiny_encoder(**batch["query"])
    p = tiny_encoder(**batch["passage"])
    assert loss.item() == pytest.approx(loss_fn(q, p, batch["passage_keys"], batch["passage_ids"]).item(), abs=1e-6)
    assert abs(loss.item() - loss_fn(q, p, batch["passage_keys"]).item()) > 1e-3  # without ids: another loss
