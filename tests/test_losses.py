"""InfoNCE against hand computations; GradCache against the plain loss; 2 gloo processes against one."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hbt_accel.data.collate import NO_PARALLEL_ID, PADDING_PASSAGE
from hbt_accel.training.losses import CachedInfoNCELoss, InfoNCELoss
from tests.conftest import free_port, join_gloo_world

# ---------------------------------------------------------------- hand-computed toy
# q rows (1,0), (0,1), (1,1); p rows (1,0), (0,1), (0,0); temperature 0.5 doubles the dot products:
# scores = [[2, 0, 0], [0, 2, 0], [2, 2, 0]], targets on the diagonal.
TOY_Q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
TOY_P = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
E2 = math.exp(2)


def _toy():
    return torch.tensor(TOY_Q, dtype=torch.float64), torch.tensor(TOY_P, dtype=torch.float64)


def test_infonce_matches_hand_computation():
    q, p = _toy()
    rows = [
        math.log(E2 + 1 + 1) - 2,  # logsumexp(2, 0, 0) - 2 = 0.23954
        math.log(1 + E2 + 1) - 2,  # logsumexp(0, 2, 0) - 2
        math.log(E2 + E2 + 1) - 0,  # logsumexp(2, 2, 0) - 0 = 2.75863
    ]
    expected = sum(rows) / 3
    assert expected == pytest.approx(1.0792377, abs=1e-6)
    assert InfoNCELoss(temperature=0.5)(q, p).item() == pytest.approx(expected, abs=1e-12)


def test_identical_passage_keys_are_not_negatives():
    q, p = _toy()
    keys = torch.tensor([0, 1, 0])  # passages 0 and 2 hold the same text
    rows = [
        math.log(E2 + 1) - 2,  # column 2 masked: logsumexp(2, 0) - 2 = 0.12693
        math.log(1 + E2 + 1) - 2,  # key 1 unique: unchanged
        math.log(E2 + 1) - 0,  # column 0 masked: logsumexp(2, 0) - 0 = 2.12693
    ]
    masked = InfoNCELoss(temperature=0.5)(q, p, keys).item()
    assert masked == pytest.approx(sum(rows) / 3, abs=1e-12)
    assert masked < InfoNCELoss(temperature=0.5)(q, p).item() - 0.2  # 1.0792 unmasked


def test_hard_negative_with_positive_text_is_masked():
    # B=2, k=1: p = [pos0, pos1, neg0, neg1]; neg1 repeats pos0's text (key 7).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    keys = torch.tensor([7, 8, 9, 7])
    # scores/0.5: row0 = [2, 0, 0, 2] (column 3 masked), row1 = [0, 2, 0, 0]
    rows = [math.log(E2 + 1 + 1) - 2, math.log(1 + E2 + 1 + 1) - 2]
    assert InfoNCELoss(temperature=0.5)(q, p, keys).item() == pytest.approx(sum(rows) / 2, abs=1e-12)


def test_symmetric_term_by_hand():
    q, p = _toy()
    forward_rows = [math.log(E2 + 2) - 2, math.log(E2 + 2) - 2, math.log(2 * E2 + 1)]
    # passage -> query scores = transpose: [[2, 0, 2], [0, 2, 2], [0, 0, 0]]
    backward_rows = [math.log(2 * E2 + 1) - 2, math.log(2 * E2 + 1) - 2, math.log(3)]
    expected = (sum(forward_rows) / 3 + sum(backward_rows) / 3) / 2
    loss = InfoNCELoss(temperature=0.5, symmetric=True)(q, p).item()
    assert loss == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- cached vs plain, one process
QUERIES = [
    "where is the eiffel tower",
    "wer schrieb faust",
    "¿cuál es la capital de españa?",
    "how many legs does a spider have",
]
POSITIVES = [
    "The Eiffel Tower is in Paris.",
    "Goethe schrieb Faust.",
    "Madrid es la capital de España.",
    "Spiders have eight legs.",
]
NEGATIVES = [
    "The Colosseum is in Rome, a city in Italy with a long history.",
    "Schiller schrieb Die Räuber.",
    "Madrid es la capital de España.",  # same text as a positive: masked by its key
    "Ants have six legs.",
]
KEYS = [0, 1, 2, 3, 4, 5, 2, 6]


def _batches(encoder, rows=slice(None)):
    queries = encoder.tokenize(QUERIES[rows], "query")
    passages = encoder.tokenize(POSITIVES[rows] + NEGATIVES[rows], "passage")
    keys = torch.tensor(KEYS[:4][rows] + KEYS[4:][rows])
    return dict(queries), dict(passages), keys


def _plain_step(model, loss_fn, queries, passages, keys) -> torch.Tensor:
    loss = loss_fn(model(**queries), model(**passages), keys)
    loss.backward()
    return loss.detach()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_equals_plain_loss_and_gradients(tiny_encoder, symmetric):
    queries, passages, keys = _batches(tiny_encoder)
    plain = _plain_step(tiny_encoder, InfoNCELoss(symmetric=symmetric), queries, passages, keys)
    expected = _grads(tiny_encoder)
    tiny_encoder.zero_grad(set_to_none=True)

    cached = CachedInfoNCELoss(symmetric=symmetric, mini_batch_size=3)  # 2 query chunks, 3 passage chunks
    loss = cached.step(tiny_encoder, queries, passages, keys)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    _assert_same_grads(_grads(tiny_encoder), expected, atol=1e-5)


def test_cached_replays_dropout_masks(tiny_encoder):
    for module in tiny_encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.2
    tiny_encoder.train()
    queries, passages, keys = _batches(tiny_encoder)
    loss_fn = CachedInfoNCELoss(mini_batch_size=8)  # one chunk per side: same dropout draws as the plain path

    def plain(seed):
        tiny_encoder.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = _plain_step(tiny_encoder, loss_fn, queries, passages, keys)
        return loss, _grads(tiny_encoder)

    plain_loss, plain_grads = plain(1)
    other_loss, _ = plain(2)
    assert abs(other_loss.item() - plain_loss.item()) > 1e-4  # dropout really changes the result

    tiny_encoder.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = loss_fn.step(tiny_encoder, queries, passages, keys)
    assert loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    _assert_same_grads(_grads(tiny_encoder), plain_grads, atol=1e-5)


# ---------------------------------------------------------------- 2 gloo processes vs one
WORLD = 2
B_LOCAL, K, DIM = 3, 2, 5


def _global_embeddings():
    """Per-rank float64 leaves: q (B_LOCAL, DIM), p (B_LOCAL*(1+K), DIM), keys with cross-rank duplicates."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(WORLD, B_LOCAL, DIM, generator=g, dtype=torch.float64)
    p = torch.randn(WORLD, B_LOCAL * (1 + K), DIM, generator=g, dtype=torch.float64)
    keys = torch.arange(WORLD * B_LOCAL * (1 + K)).view(WORLD, -1).clone()
    keys[1, 0] = keys[0, 1]  # rank 1's first positive = rank 0's second positive (same text)
    keys[0, B_LOCAL + 2] = keys[1, 2]  # a rank-0 hard negative repeats a rank-1 positive
    return q, p, keys


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    join_gloo_world(rank, WORLD, port)
    torch.set_num_threads(1)
    from transformers import XLMRobertaTokenizerFast

    from hbt_accel.distributed import make_accelerator
    from tests.conftest import XLMR_TOKENIZER_FILE, load_tiny_encoder

    accelerator = make_accelerator()
    results = {"num_processes": accelerator.num_processes, "rank": accelerator.process_index}

    # (a) float64 leaves: loss and local gradients, plain and symmetric
    q_all, p_all, keys_all = _global_embeddings()
    for symmetric in (False, True):
        q = q_all[rank].clone().requires_grad_()
        p = p_all[rank].clone().requires_grad_()
        loss = InfoNCELoss(temperature=0.05, symmetric=symmetric)(q, p, keys_all[rank])
        loss.backward()
        results[f"leaves_{symmetric}"] = (loss.detach(), q.grad, p.grad)

    # (b) tiny BERT under DDP: plain (accelerator.backward) vs cached (step)
    encoder = load_tiny_encoder(model_dir, XLMRobertaTokenizerFast(tokenizer_file=str(XLMR_TOKENIZER_FILE)))
    model = accelerator.prepare(encoder)
    rows = slice(2 * rank, 2 * rank + 2)
    queries, passages, keys = _batches(encoder, rows)
    loss = InfoNCELoss(symmetric=True)(model(**queries), model(**passages), keys)
    accelerator.backward(loss)
    results["plain"] = (loss.detach(), _grads(encoder))
    encoder.zero_grad(set_to_none=True)
    cached = CachedInfoNCELoss(symmetric=True, mini_batch_size=1).step(model, queries, passages, keys, accelerator)
    results["cached"] = (cached, _grads(encoder))

    # (c) by parallel id (multi-positive + passage alignment): float64 leaves, then tiny BERT plain vs cached
    q_all, p_all, keys_all, ids_all = _id_global_embeddings()
    q = q_all[rank].clone().requires_grad_()
    p = p_all[rank].clone().requires_grad_()
    loss = InfoNCELoss(**ID_LOSS)(q, p, keys_all[rank], ids_all[rank])
    loss.backward()
    results["id_leaves"] = (loss.detach(), q.grad, p.grad)
    encoder.zero_grad(set_to_none=True)
    queries, passages, keys, ids = _id_batches(encoder, rows)
    loss = InfoNCELoss(**ID_LOSS)(model(**queries), model(**passages), keys, ids)
    accelerator.backward(loss)
    results["id_plain"] = (loss.detach(), _grads(encoder))
    encoder.zero_grad(set_to_none=True)
    cached = CachedInfoNCELoss(mini_batch_size=2, **ID_LOSS).step(model, queries, passages, keys, accelerator, ids)
    results["id_cached"] = (cached, _grads(encoder))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.end_training()  # also destroys the process group


@pytest.fixture(scope="module")
def two_process_results(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(free_port(), str(tiny_model_dir), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("symmetric", [False, True])
def test_two_processes_equal_one_on_concatenated_batch(two_process_results, symmetric):
    q_all, p_all, keys_all = _global_embeddings()
    # One process, concatenated batch: all positives first, then all hard negatives.
    q = q_all.reshape(-1, DIM).clone().requires_grad_()  # (W*B, d)
    positives, negatives = p_all[:, :B_LOCAL], p_all[:, B_LOCAL:]
    p = torch.cat([positives.reshape(-1, DIM), negatives.reshape(-1, DIM)]).requires_grad_()  # (W*B*(1+K), d)
    keys = torch.cat([keys_all[:, :B_LOCAL].reshape(-1), keys_all[:, B_LOCAL:].reshape(-1)])
    reference = InfoNCELoss(temperature=0.05, symmetric=symmetric)(q, p, keys)
    reference.backward()
    q_grad = q.grad.view(WORLD, B_LOCAL, DIM)
    p_grad = torch.cat(
        [p.grad[: WORLD * B_LOCAL].view(WORLD, B_LOCAL, DIM), p.grad[WORLD * B_LOCAL :].view(WORLD, B_LOCAL * K, DIM)],
        dim=1,
    )

    assert [r["num_processes"] for r in two_process_results] == [WORLD, WORLD]
    losses = [r[f"leaves_{symmetric}"][0] for r in two_process_results]
    assert (sum(losses) / WORLD).item() == pytest.approx(reference.item(), abs=1e-12)
    for rank, result in enumerate(two_process_results):
        _, local_q_grad, local_p_grad = result[f"leaves_{symmetric}"]
        # Each rank's loss is a mean over its own rows (not / W): its local gradients are W times the
        # single-process ones, and DDP's average over ranks brings parameter gradients back to equal.
        torch.testing.assert_close(local_q_grad, WORLD * q_grad[rank], atol=1e-6, rtol=0)
        torch.testing.assert_close(local_p_grad, WORLD * p_grad[rank], atol=1e-6, rtol=0)


@pytest.mark.distributed
def test_two_process_ddp_parameters_equal_one_process(two_process_results, tiny_encoder):
    queries, passages, keys = _batches(tiny_encoder)  # the concatenated batch of both ranks
    reference = _plain_step(tiny_encoder, InfoNCELoss(symmetric=True), queries, passages, keys)
    expected = _grads(tiny_encoder)
    # _batches(rows) keeps [positives; negatives] per rank; the single process sees the same 8 columns.
    losses = [r["plain"][0] for r in two_process_results]
    assert (sum(losses) / WORLD).item() == pytest.approx(reference.item(), abs=1e-5)
    for result in two_process_results:
        _assert_same_grads(result["plain"][1], expected, atol=1e-5)


@pytest.mark.distributed
def test_two_process_cached_equals_plain(two_process_results):
    for result in two_process_results:
        plain_loss, plain_grads = result["plain"]
        cached_loss, cached_grads = result["cached"]
        assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
        _assert_same_grads(cached_grads, plain_grads, atol=1e-5)
    # DDP synchronised the cached gradients: both ranks hold the same values
    _assert_same_grads(two_process_results[0]["cached"][1], two_process_results[1]["cached"][1], atol=1e-7)


def test_world_size_guard_fails_loudly():
    # A process told WORLD_SIZE=2 that ends up alone (e.g. --multi_gpu on CPU without ACCELERATE_USE_CPU).
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "ACCELERATE_USE_CPU")}
    code = "from hbt_accel.distributed import make_accelerator; make_accelerator()"
    run = subprocess.run([sys.executable, "-c", code], env={**env, "WORLD_SIZE": "2"}, capture_output=True, text=True)
    assert run.returncode != 0
    assert "RuntimeError: WORLD_SIZE=2 but accelerator.num_processes=1" in run.stderr


# ---------------------------------------------------------------- by parallel id: multi-positive and alignment
# temperature 1; q0 = (1, 0), q1 = (0, 1), so a passage (x, y) scores x for row 0 and y for row 1.
# B=2, k=1, 2 answers per row: p = [pos0, pos1, neg0, neg1, extra0, slot]; row 0 is id A (its extra: German
# answer), row 1 is id B whose id has no second language (an empty slot).
E = math.e
ID_Q = [[1.0, 0.0], [0.0, 1.0]]
ID_P = [[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
A, B = 11, 22
ID_IDS = [A, B, NO_PARALLEL_ID, NO_PARALLEL_ID, A, PADDING_PASSAGE]
ID_KEYS = [100, 101, 102, 103, 104, 105]


def _id_toy(keys=ID_KEYS):
    q = torch.tensor(ID_Q, dtype=torch.float64)
    p = torch.tensor(ID_P, dtype=torch.float64)
    return q, p, torch.tensor(keys), torch.tensor(ID_IDS)


def test_multi_positive_matches_hand_computation():
    q, p, keys, ids = _id_toy()
    # row 0: positives pos0 (2) and extra0 (1); negatives pos1 (0), neg0 (1), neg1 (0); the slot is masked
    negatives0 = 2 + E  # e^0 + e^1 + e^0
    row0 = (math.log(1 + negatives0 / E**2) + math.log(1 + negatives0 / E)) / 2
    # row 1: positive pos1 (2); negatives pos0 (0), neg0 (1), neg1 (1), extra0 (0)
    row1 = math.log(1 + (2 + 2 * E) / E**2)
    loss = InfoNCELoss(temperature=1.0, multi_positive=True)(q, p, keys, ids)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-12)
    assert (row0 + row1) / 2 == pytest.approx(0.7232335, abs=1e-6)


def test_without_multi_positive_a_translation_is_masked_not_a_negative():
    q, p, keys, ids = _id_toy()
    row0 = math.log(1 + (2 + E) / E**2)  # extra0 (row 0's id) is neither positive nor negative
    row1 = math.log(1 + (2 + 2 * E) / E**2)
    loss = InfoNCELoss(temperature=1.0)(q, p, keys, ids)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-12)


def test_multi_positive_masks_the_text_of_a_positive():
    q, p, _, ids = _id_toy()
    keys = torch.tensor([100, 101, 102, 104, 104, 105])  # neg1 has extra0's text: for row 0 it is no negative
    negatives0 = 1 + E  # pos1, neg0
    row0 = (math.log(1 + negatives0 / E**2) + math.log(1 + negatives0 / E)) / 2
    row1 = math.log(1 + (2 + 2 * E) / E**2)  # row 1: both copies stay negatives
    loss = InfoNCELoss(temperature=1.0, multi_positive=True)(q, p, keys, ids)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-12)


def test_one_positive_per_id_equals_plain_infonce():
    q, p = _toy()
    keys = torch.tensor([0, 1, 0])
    plain = InfoNCELoss(temperature=0.5)(q, p, keys)
    by_id = InfoNCELoss(temperature=0.5, multi_positive=True)(q, p, keys, torch.tensor([5, 6, 7]))
    assert by_id.item() == pytest.approx(plain.item(), abs=1e-12)


def test_passage_alignment_matches_hand_computation():
    q, p, keys, ids = _id_toy()
    # anchors: the passages of a known id with a translation in the batch: pos0 and extra0 (id A); pos1 (id B)
    # has none, neg0/neg1 have no id, the slot is masked. Passage-passage dot products:
    # pos0 (2,0): extra0 2 (positive) | pos1 0, neg0 2, neg1 0
    # extra0 (1,0): pos0 2 (positive) | pos1 0, neg0 1, neg1 0
    anchor_pos0 = math.log(1 + (2 + E**2) / E**2)
    anchor_extra0 = math.log(1 + (2 + E) / E**2)
    alignment = (anchor_pos0 + anchor_extra0) / 2
    query_term = InfoNCELoss(temperature=1.0, multi_positive=True)(q, p, keys, ids).item()
    loss = InfoNCELoss(temperature=1.0, multi_positive=True, alignment_weight=0.3)(q, p, keys, ids)
    assert loss.item() == pytest.approx(query_term + 0.3 * alignment, abs=1e-12)
    assert alignment == pytest.approx(0.6569435, abs=1e-6)


def _reference_by_id(q, p, keys, ids, temperature, alignment_weight):
    """A loop-by-loop multi-positive InfoNCE + translation ranking, one process, for gradient checks."""

    def per_anchor(scores, positives, negatives):
        terms = [
            torch.logsumexp(torch.stack([scores[j], *[scores[n] for n in negatives]]), 0) - scores[j]
            for j in positives
        ]
        return torch.stack(terms).mean()

    columns = range(len(p))
    rows = []
    for r in range(len(q)):
        scores = p @ q[r] / temperature
        positives = [c for c in columns if ids[c] == ids[r]]
        texts = {int(keys[c]) for c in positives}
        negatives = [
            c for c in columns if c not in positives and ids[c] != PADDING_PASSAGE and int(keys[c]) not in texts
        ]
        rows.append(per_anchor(scores, positives, negatives))
    loss = torch.stack(rows).mean()
    anchors = []
    for a in columns:
        positives = [c for c in columns if c != a and ids[a] >= 0 and ids[c] == ids[a]]
        if not positives:
            continue
        texts = {int(keys[c]) for c in positives + [a]}
        negatives = [
            c
            for c in columns
            if c != a and c not in positives and ids[c] != PADDING_PASSAGE and int(keys[c]) not in texts
        ]
        anchors.append(per_anchor(p @ p[a] / temperature, positives, negatives))
    return loss + alignment_weight * torch.stack(anchors).mean()


def test_by_id_gradients_match_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3 * 4, 4, generator=g, dtype=torch.float64, requires_grad=True)  # [pos (3); neg (6); extra (3)]
    ids = torch.tensor([1, 2, 3, NO_PARALLEL_ID, 2, NO_PARALLEL_ID, 3, NO_PARALLEL_ID, NO_PARALLEL_ID, 1, 3, -2])
    keys = torch.tensor([10, 11, 12, 13, 14, 15, 12, 17, 18, 19, 20, 21])  # negative 6 repeats row 2's answer
    loss = InfoNCELoss(temperature=0.1, multi_positive=True, alignment_weight=0.5)(q, p, keys, ids)
    q_grad, p_grad = torch.autograd.grad(loss, [q, p])
    reference = _reference_by_id(q, p, keys, ids, temperature=0.1, alignment_weight=0.5)
    q_ref, p_ref = torch.autograd.grad(reference, [q, p])
    assert loss.item() == pytest.approx(reference.item(), abs=1e-10)
    torch.testing.assert_close(q_grad, q_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(p_grad, p_ref, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- by parallel id: cached, and 2 processes vs one
ID_LOSS = {"multi_positive": True, "alignment_weight": 0.5}
EXTRAS = ["La tour Eiffel est à Paris.", "Goethe wrote Faust.", "", "Las arañas tienen ocho patas."]
EXTRA_KEYS = [7, 8, 9, 10]
# answers carry their row's id; "Madrid es la capital..." as a negative is row 2's answer text (id 2); an empty slot
ANSWER_IDS = [0, 1, 2, 3]
NEGATIVE_IDS = [NO_PARALLEL_ID, NO_PARALLEL_ID, 2, NO_PARALLEL_ID]
EXTRA_IDS = [0, 1, PADDING_PASSAGE, 3]


def _id_batches(encoder, rows=slice(None)):
    """Like `_batches` with a further answer per row: p = [answers; negatives; further answers]."""
    queries = encoder.tokenize(QUERIES[rows], "query")
    passages = encoder.tokenize(POSITIVES[rows] + NEGATIVES[rows] + EXTRAS[rows], "passage")
    keys = torch.tensor(KEYS[:4][rows] + KEYS[4:][rows] + EXTRA_KEYS[rows])
    ids = torch.tensor(ANSWER_IDS[rows] + NEGATIVE_IDS[rows] + EXTRA_IDS[rows])
    return dict(queries), dict(passages), keys, ids


@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_equals_plain_by_id(tiny_encoder, symmetric):
    queries, passages, keys, ids = _id_batches(tiny_encoder)
    plain_fn = InfoNCELoss(symmetric=symmetric, **ID_LOSS)
    plain = plain_fn(tiny_encoder(**queries), tiny_encoder(**passages), keys, ids)
    plain.backward()
    expected = _grads(tiny_encoder)
    tiny_encoder.zero_grad(set_to_none=True)
    cached = CachedInfoNCELoss(symmetric=symmetric, mini_batch_size=3, **ID_LOSS)
    loss = cached.step(tiny_encoder, queries, passages, keys, None, ids)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    _assert_same_grads(_grads(tiny_encoder), expected, atol=1e-5)


EXTRA = 2  # further answer slots per row in the leaves test


def _id_global_embeddings():
    """Per-rank float64 leaves: q (B_LOCAL, DIM), p (B_LOCAL*(1+K+EXTRA), DIM) = [answers; negatives; further
    answers], keys and ids with cross-rank translations, a shared text and empty slots."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(WORLD, B_LOCAL, DIM, generator=g, dtype=torch.float64)
    p = torch.randn(WORLD, B_LOCAL * (1 + K + EXTRA), DIM, generator=g, dtype=torch.float64)
    keys = torch.arange(WORLD * B_LOCAL * (1 + K + EXTRA)).view(WORLD, -1).clone()
    pad, none = PADDING_PASSAGE, NO_PARALLEL_ID
    ids = torch.tensor(
        [
            # answers    | negatives             | further answers (2 slots per row)
            [0, 1, 2, none, 10, none, none, none, none, 0, pad, 1, 1, 2, 2],
            [10, 11, 12, 2, none, none, none, none, none, 10, 10, 11, pad, pad, pad],
        ]
    )
    keys[0, B_LOCAL + 1] = keys[1, B_LOCAL * (1 + K)]  # rank 0's negative IS rank 1 row 0's first further answer
    keys[1, 0] = keys[0, 1]  # two ids share one answer text (several questions, one sentence)
    return q, p, keys, ids


def _concatenated(per_rank: torch.Tensor) -> torch.Tensor:
    """One process's layout of the ranks' passages: every rank's answers, then negatives, then further answers."""
    cuts = [B_LOCAL, B_LOCAL * K, B_LOCAL * EXTRA]
    parts = [part.split(cuts) for part in per_rank]  # per rank: (answers, negatives, further)
    return torch.cat([torch.cat([rank_parts[block] for rank_parts in parts]) for block in range(3)])


@pytest.mark.distributed
def test_two_processes_equal_one_by_id(two_process_results):
    q_all, p_all, keys_all, ids_all = _id_global_embeddings()
    q = q_all.reshape(-1, DIM).clone().requires_grad_()
    p = _concatenated(p_all).clone().requires_grad_()
    reference = InfoNCELoss(**ID_LOSS)(q, p, _concatenated(keys_all), _concatenated(ids_all))
    reference.backward()
    # back to each rank's layout: the same slicing applied to the gradient of every position
    positions = _concatenated(torch.arange(p.size(0)).view(WORLD, -1))  # concatenated position -> flat rank position
    p_grad = torch.empty_like(p.grad)
    p_grad[positions] = p.grad
    p_grad = p_grad.view(WORLD, -1, DIM)

    losses = [r["id_leaves"][0] for r in two_process_results]
    assert (sum(losses) / WORLD).item() == pytest.approx(reference.item(), abs=1e-12)
    for rank, result in enumerate(two_process_results):
        _, local_q_grad, local_p_grad = result["id_leaves"]
        torch.testing.assert_close(local_q_grad, WORLD * q.grad.view(WORLD, B_LOCAL, DIM)[rank], atol=1e-9, rtol=0)
        torch.testing.assert_close(local_p_grad, WORLD * p_grad[rank], atol=1e-9, rtol=0)


@pytest.mark.distributed
def test_two_process_ddp_by_id_equals_one_process_and_cached(two_process_results, tiny_encoder):
    queries, passages, keys, ids = _id_batches(tiny_encoder)
    reference = InfoNCELoss(**ID_LOSS)(tiny_encoder(**queries), tiny_encoder(**passages), keys, ids)
    reference.backward()
    expected = _grads(tiny_encoder)
    losses = [r["id_plain"][0] for r in two_process_results]
    assert (sum(losses) / WORLD).item() == pytest.approx(reference.item(), abs=1e-5)
    for result in two_process_results:
        _assert_same_grads(result["id_plain"][1], expected, atol=1e-5)
        assert result["id_cached"][0].item() == pytest.approx(result["id_plain"][0].item(), abs=1e-5)
        _assert_same_grads(result["id_cached"][1], expected, atol=1e-5)
