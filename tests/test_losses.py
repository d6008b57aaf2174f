"""InfoNCE against hand computations; GradCache against the plain loss; 2 gloo processes against one."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hbt_accel.losses import CachedInfoNCELoss, InfoNCELoss

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
    )
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
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.end_training()  # also destroys the process group


@pytest.fixture(scope="module")
def two_process_results(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(tiny_model_dir), str(out_dir)), nprocs=WORLD, join=True)
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
