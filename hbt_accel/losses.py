"""InfoNCE with cross-device negatives, and its cached (GradCache) variant, behind ONE training-step protocol.

Both losses implement `training_step(model, batch, accelerator) -> detached loss`: forward AND backward of one
micro-batch (`batch` as `PairCollator` makes it), gradients left in the parameters. The training loop and the speed
benchmark call only that, so there is one code path whichever loss a recipe picks.

Batch arithmetic (per optimiser step): each of W ranks holds B_local queries and B_local*(1+k)
passages laid out as [positives (B_local); hard negatives (B_local*k)]. Every query is scored against
the W*B_local*(1+k) passages of the GLOBAL batch, so it sees W*B_local*(1+k) - 1 negatives.
The loss is the mean over LOCAL rows and is not rescaled by W: DDP then averages parameter
gradients over ranks and the update equals one process on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hbt_accel.distributed import all_gather_with_grad, gather_no_grad


class TrainingStep(Protocol):
    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        """Forward and backward of one micro-batch {query, passage: tokenised (N, L); passage_keys: (N_p,)};
        returns the loss, detached. The caller clips, steps the optimizer and zeroes the gradients."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _masked_cross_entropy(
    scores: torch.Tensor, target: torch.Tensor, row_keys: torch.Tensor | None, column_keys: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of `scores` (R, C) against `target` (R,), with every column whose key equals the row's
    key set to -inf except the target column (identical passage texts are not negatives)."""
    if row_keys is not None:
        same_text = column_keys[None, :] == row_keys[:, None]  # (R, C)
        same_text[torch.arange(len(target), device=target.device), target] = False
        scores = scores.masked_fill(same_text, float("-inf"))  # (R, C)
    return F.cross_entropy(scores, target)


class InfoNCELoss(nn.Module):
    """InfoNCE over the global batch (cross-device negatives), optionally symmetric.

    forward(q (B_local, d), p (B_local*(1+k), d) = [positives; hard negatives], passage_keys (B_local*(1+k),)
    int64 or None) -> scalar. Equal keys mean identical passage text; such columns are masked out of a
    row's negatives. With `symmetric`, the passage->query term (local positives against the gathered
    queries) is averaged with the query->passage term.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, q: torch.Tensor, p: torch.Tensor, passage_keys: torch.Tensor | None = None) -> torch.Tensor:
        batch = q.size(0)  # B_local
        passages = p.size(0)  # B_local*(1+k)
        if passages % batch != 0:
            raise ValueError(f"p has {passages} rows, not a multiple of the {batch} queries")
        if passage_keys is not None and passage_keys.shape != (passages,):
            raise ValueError(f"passage_keys must have shape ({passages},), got {tuple(passage_keys.shape)}")
        rank = _rank()
        rows = torch.arange(batch, device=q.device)  # (B_local,)

        p_all = all_gather_with_grad(p)  # (W*B_local*(1+k), d)
        scores = q @ p_all.T / self.temperature  # (B_local, W*B_local*(1+k))
        target = rank * passages + rows  # (B_local,)
        keys_all = gather_no_grad(passage_keys) if passage_keys is not None else None  # (W*B_local*(1+k),)
        row_keys = passage_keys[:batch] if passage_keys is not None else None  # (B_local,)
        loss = _masked_cross_entropy(scores, target, row_keys, keys_all)
        if not self.symmetric:
            return loss

        q_all = all_gather_with_grad(q)  # (W*B_local, d)
        scores_pq = p[:batch] @ q_all.T / self.temperature  # (B_local, W*B_local)
        target_pq = rank * batch + rows  # (B_local,)
        # A query whose positive has the same text as this passage is a match, not a negative.
        query_keys_all = gather_no_grad(row_keys) if row_keys is not None else None  # (W*B_local,)
        loss_pq = _masked_cross_entropy(scores_pq, target_pq, row_keys, query_keys_all)
        return (loss + loss_pq) / 2

    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        """Embed queries and passages with grad, InfoNCE, `accelerator.backward` (scales for accumulation)."""
        query = model(batch["query"]["input_ids"], batch["query"]["attention_mask"])  # (B_local, d)
        passage = model(batch["passage"]["input_ids"], batch["passage"]["attention_mask"])  # (B_local(1+k), d)
        loss = self(query, passage, batch["passage_keys"])
        accelerator.backward(loss)
        return loss.detach()


class _RandomState:
    """The RNG state before one mini-batch forward, so its re-forward draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng: the outer RNG stream continues as if the replay never happened.
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _mini_batches(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Slice every tensor of a tokenized batch along dim 0; drop trailing all-padding columns of each
    slice (right padding only, so positions and results do not change)."""
    total = next(iter(batch.values())).size(0)
    chunks = []
    for start in range(0, total, size):
        chunk = {name: t[start : start + size] for name, t in batch.items()}
        mask = chunk.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            used = mask.any(dim=0).nonzero()  # (L_used, 1)
            length = int(used.max()) + 1 if len(used) else mask.size(1)
            chunk = {name: t[:, :length] if t.dim() == 2 else t for name, t in chunk.items()}
        chunks.append(chunk)
    return chunks


class CachedInfoNCELoss(nn.Module):
    """GradCache version of `InfoNCELoss`: the same loss and gradients with activation memory of one
    mini-batch of `mini_batch_size` texts, whatever the batch size.

    `training_step(model, batch, accelerator)` (the protocol) or `step(model, query_batch, passage_batch,
    passage_keys, accelerator)`: both run the backward themselves and return the detached loss. `model` is the
    prepared model (plain, DDP or DeepSpeed engine) called as `model(**batch) -> (N, d)`. Under DDP all
    chunk backwards but the last run inside `accelerator.no_sync`; under DeepSpeed the chunk backwards
    go to the engine with the accumulation boundary set on the last one only, so `engine.step()` runs
    once. Calling the module directly (`forward`) computes the plain loss, e.g. for validation.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, mini_batch_size: int = 32):
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.loss = InfoNCELoss(temperature=temperature, symmetric=symmetric)
        self.mini_batch_size = mini_batch_size

    def forward(self, q: torch.Tensor, p: torch.Tensor, passage_keys: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(q, p, passage_keys)

    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        return self.step(model, batch["query"], batch["passage"], batch["passage_keys"], accelerator)

    def step(
        self,
        model: nn.Module,
        query_batch: Mapping[str, torch.Tensor],
        passage_batch: Mapping[str, torch.Tensor],
        passage_keys: torch.Tensor | None = None,
        accelerator=None,
    ) -> torch.Tensor:
        """One forward/backward over the local batch; gradients end up in the parameters. Returns the loss."""
        query_chunks = _mini_batches(query_batch, self.mini_batch_size)
        passage_chunks = _mini_batches(passage_batch, self.mini_batch_size)
        chunks = query_chunks + passage_chunks
        device = query_chunks[0]["input_ids"].device

        # (1) Embed every mini-batch without grad, remembering the RNG state before each forward.
        states, embeddings = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_RandomState(device))
                embeddings.append(model(**chunk))  # (m, d)
        q = torch.cat(embeddings[: len(query_chunks)]).detach().requires_grad_()  # (B_local, d)
        p = torch.cat(embeddings[len(query_chunks) :]).detach().requires_grad_()  # (B_local*(1+k), d)

        # (2) The same InfoNCE on the detached leaves; its backward gives d loss / d embedding only
        # (the cross-rank part of that gradient arrives through the gather's backward).
        loss = self.loss(q, p, passage_keys)
        loss.backward()
        cached_grads = torch.cat([q.grad, p.grad]).split([len(e) for e in embeddings])  # [(m, d)]

        # (3) Re-embed each mini-batch with grad under its step-1 RNG state and backprop the cached
        # gradient through it: sum over chunks of d(emb . g)/d theta = d loss / d theta.
        for index, (chunk, state, grad) in enumerate(zip(chunks, states, cached_grads)):
            last = index == len(chunks) - 1
            sync = nullcontext() if last or accelerator is None else accelerator.no_sync(model)
            with sync, state.replay():
                embedding = model(**chunk)  # (m, d)
                surrogate = (embedding * grad).sum()  # scalar
                _backward(surrogate, accelerator, last)
        return loss.detach()


def _backward(surrogate: torch.Tensor, accelerator, last: bool) -> None:
    if accelerator is None:
        surrogate.backward()
        return
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and not last:
        # accelerator.backward would also call engine.step() after this chunk; go to the engine directly
        # and keep it inside one accumulation window. The last chunk closes the window below.
        engine = accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=False)
        engine.backward(surrogate)
        return
    # Scales by gradient_accumulation_steps like the plain path; under DeepSpeed steps the engine.
    accelerator.backward(surrogate)
